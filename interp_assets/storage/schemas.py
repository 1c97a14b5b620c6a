"""Every table's columns, their types and what they mean, written once.

Two readers: the Dagster catalog (`interp_assets.defs.shared.column_schema` turns a table's entry into
`dagster/column_schema` definition metadata, so the UI shows column descriptions before any run) and the
README's table section (`render_markdown`; `python -m interp_assets.storage.schemas --write` rewrites it,
`--check` fails when it differs, as `tests/storage/test_schemas.py` does). The tests also hold these
entries against the schemas the code writes and against the tables a pipeline run stores, so the
documentation cannot drift from the data.

Types are the stored Parquet/Arrow types as `arrow_type_name` spells them.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa


@dataclass(frozen=True)
class Columns:
    """One documentation row: one or more columns that share a meaning (`types`: one per name)."""

    names: tuple[str, ...]
    types: tuple[str, ...]
    meaning: str
    optional: bool = False  # present only in some modes (the meaning says which)

    def __post_init__(self) -> None:
        if len(self.names) != len(self.types):
            raise ValueError(f"{self.names}: one type per column, got {self.types}")

    @property
    def type_text(self) -> str:
        return self.types[0] if len(set(self.types)) == 1 else ", ".join(self.types)


def col(names: str, types: str, meaning: str = "", optional: bool = False) -> Columns:
    """`col("a, b", "int32", ...)`: columns a and b, both int32; `col("a, b", "string, bool", ...)`."""
    name_list = tuple(n.strip() for n in names.split(","))
    type_list = tuple(t.strip() for t in types.split(", ")) if ", " in types else (types,) * len(name_list)
    return Columns(name_list, type_list, meaning, optional)


@dataclass(frozen=True)
class Table:
    name: str
    partition: str  # what one partition is: "dataset" or "comparison"
    intro: str  # the paragraph above the column table ("" for none)
    rows: tuple[Columns, ...]
    other_columns: str | None = None  # a table that keeps its input's other columns: what they are

    @property
    def columns(self) -> list[tuple[str, str, str, bool]]:
        """(name, type, meaning, optional) of every documented column, in order."""
        return [
            (n, t, r.meaning, r.optional) for r in self.rows for n, t in zip(r.names, r.types, strict=True)
        ]

    @property
    def required(self) -> list[str]:
        return [n for n, _, _, optional in self.columns if not optional]


_FLOAT16_NOTE = (
    "SAE activation (> 0); float16 keeps ~3 significant digits at half the bytes. Set "
    "`INTERP_ACTIVATION_DTYPE=float32` (resource `activation_dtype`) for exact values; a value beyond "
    "float16's range rejects its document with that advice"
)

# The columns of an intervention record (interp-lab's shape), shared by feature_effects and criterion_effects.
_INTERVENTION_RECORD_COLUMNS = (
    col(
        "intervention, strength, control_type",
        "string, float64, string",
        "`ablate`, 1.0 (0 for the placebo), `target` / `random_matched` / `placebo`",
    ),
    col("documents", "int64", "edited documents where the ablated feature fires"),
    col(
        "baseline_score, intervention_score",
        "float64",
        "mean score on those documents before and after the edit",
    ),
    col(
        "effect, effect_ci_low, effect_ci_high",
        "float64",
        "mean paired change and its 95% bootstrap interval",
    ),
    col(
        "side_effect_score",
        "float64",
        "mean absolute change on edited documents where it never fires (0 for an ablation)",
    ),
)

_TABLES = (
    Table(
        "raw_documents",
        "dataset",
        "",
        (
            col("dataset", "string", "dataset name (partition key)"),
            col(
                "doc_id",
                "int32",
                "0-based position of the document in the dataset; rows of every notebook matrix follow it",
            ),
            col("doc_hash", "string", "hex BLAKE2b-128 of the text: the content identity used for reuse"),
            col("text", "string", "the document text (from the configured text column, default `text`)"),
            col("source_file", "string", "file name of the drop the row came from"),
            col("source_row", "int64", "1-based row (CSV/Parquet) or line (JSONL) in that file"),
            col(
                "messages",
                "string",
                "conversations only (the text column held a list of `{role, content}` turns): the turns as "
                "JSON, `text` being the transcript (`<role>: <content>` per turn, blank lines between); null "
                "for plain documents, absent from datasets without conversations",
                optional=True,
            ),
        ),
        other_columns="every other column of the drop, kept as document metadata (a metadata column whose "
        "name collides with one above is renamed `meta_<name>`)",
    ),
    Table(
        "token_activations",
        "dataset",
        "One row per nonzero SAE activation of one token, sorted by (doc_id, token_index, feature) within a "
        "segment. The token's\ntext and offsets are in `tokens` (same doc_id, token_index); the DuckDB view "
        "`token_activations_wide` joins the two\n(dataset, doc_id, token_index, token, char_start, char_end, "
        "feature, activation).",
        (
            col("dataset", "string (dictionary)", "dataset name"),
            col("doc_id", "int32", "document (joins raw_documents.doc_id)"),
            col("token_index", "int32", "position of the token in the model's input sequence (joins tokens)"),
            col("feature", "int32", "SAE feature index (dictionary-encoded, zstd)"),
            col("activation", "float16", _FLOAT16_NOTE),
        ),
    ),
    Table(
        "tokens",
        "dataset",
        "One row per token with at least one nonzero activation (the tokens token_activations refers to; "
        "with a TopK SAE\nevery pooled token), written by the token_activations step in the same segments.",
        (
            col("dataset", "string (dictionary)", "dataset name"),
            col("doc_id", "int32", "document (joins raw_documents.doc_id)"),
            col("token_index", "int32", "position of the token in the model's input sequence"),
            col("token", "string (dictionary)", "the token text as the tokenizer spells it"),
            col("char_start", "int32", "start offset of the token in `text` (characters)"),
            col("char_end", "int32", "end offset (exclusive)"),
        ),
    ),
    Table(
        "pooled_embeddings",
        "dataset",
        "One row per (document, feature) with at least one active token.",
        (
            col("dataset", "string", "dataset name"),
            col("doc_id", "int32", "document"),
            col("feature", "int32", "SAE feature index"),
            col("max_activation", "float32", "max over the document's pooled tokens"),
            col("sum_activation", "float32", "sum over pooled tokens"),
            col("active_tokens", "int32", "number of pooled tokens where the feature is active"),
            col(
                "doc_tokens",
                "int32",
                "number of pooled tokens of the document (mean = sum_activation / doc_tokens)",
            ),
        ),
    ),
    Table(
        "document_rejects",
        "dataset",
        "Rows of a drop that could not be read (the good rows are kept).",
        (
            col("dataset", "string", "dataset"),
            col("source_file", "string", "file name in the drop"),
            col("source_row", "int64", "1-based row / line (element number for a JSON array)"),
            col("problem", "string", "what was wrong, e.g. `line 7: invalid JSON (...)`"),
        ),
    ),
    Table(
        "activation_status",
        "dataset",
        "Every document accounted for: encoded or rejected by the model step, with the reason.",
        (
            col("dataset", "string", "dataset"),
            col("doc_id", "int32", "document"),
            col("doc_hash", "string", "content hash (the cache key, with the reader fingerprint)"),
            col("n_tokens", "int32", "tokens read by the model, special tokens included"),
            col(
                "pooled_tokens",
                "int32",
                "tokens pooled (special/template tokens excluded; text such as `[SEP]` or `<|eot_id|>` "
                "written in a document is tokenized as text, never as the special token)",
            ),
            col("truncated", "bool", "the document was longer than `max_length` and was cut"),
            col("status", "string", "`encoded` or `rejected`"),
            col("reason", "string", "why a document was rejected (null otherwise)"),
        ),
    ),
    Table(
        "feature_labels",
        "dataset",
        "",
        (
            col("dataset", "string", "dataset whose documents were the evidence"),
            col("feature", "int32", "SAE feature"),
            col("label", "string", "short name (a few words)"),
            col("description", "string", "one sentence"),
            col("source", "string", "`published:<file>`, `llm:<model>` or `offline:log-odds`"),
            col(
                "selected_because",
                "string",
                "`frequent`, `distinctive:<other dataset>`, `requested` (comma-joined)",
            ),
            col(
                "evidence_doc_ids",
                "list<int32>",
                "documents shown to the labeler (the scorer must not use them)",
            ),
            col(
                "evidence_hash", "string", "hash of the evidence; with sae_id and feature it is the cache key"
            ),
            col("sae_id", "string", "identity of the SAE (and reader model) that produced the features"),
            col(
                "status",
                "string",
                "what happened to the LLM answer: `ok`, `parsed_from_prose` (JSON inside prose or a code "
                "fence), or why it was not used and the offline label stands in: `refused`, `truncated`, "
                "`restated_prompt`, `invalid`, `failed`, `budget_exhausted` (`ok` without an LLM)",
            ),
        ),
    ),
    Table(
        "feature_scores",
        "dataset",
        "",
        (
            col("dataset", "string", "dataset whose held-out documents scored the label"),
            col("feature", "int32", "SAE feature"),
            col("label", "string", "the label scored"),
            col("method", "string", "`detection`, `fuzz` (LLM) or `embedding` (offline)"),
            col("n_examples, n_positive, n_negative", "int32", "held-out examples scored"),
            col("precision, recall, f1, balanced_accuracy", "float64", "at the method's decision threshold"),
            col("auc", "float64", "null when the scorer gives no continuous score"),
            col("f1_ci_low, f1_ci_high", "float64", "95% bootstrap interval of F1"),
            col(
                "length_baseline_auc",
                "float64",
                "AUC of excerpt length alone on the same held-out examples, direction fitted on the evidence",
            ),
            col(
                "beats_length_baseline",
                "bool",
                "the label's headline metric (`HEADLINE_METRIC`: AUC, balanced accuracy for LLM scorers) is "
                'above that: the report shows both and calls a label that does not "unclear"',
            ),
            col(
                "status",
                "string",
                "the worst of the LLM replies behind the score (`ok` for embedding): `ok`, "
                "`parsed_from_prose`, or a reason the excerpts of some replies were left out: `refused`, "
                "`truncated`, `restated_prompt`, `out_of_range` (answers other than 0/1), `invalid`, "
                "`failed`, `budget_exhausted`",
            ),
        ),
    ),
    Table(
        "feature_associations",
        "dataset",
        "One row per (criterion, feature active in at least 5 of its documents); "
        "`interp_assets/analysis/associations.py`.",
        (
            col("dataset, column", "string", "the dataset and the metadata column"),
            col(
                "criterion, level",
                "string",
                "`csat`, `escalated`, `topic=billing` (a text level against the rest; `level` null "
                "otherwise)",
            ),
            col("feature", "int32", "SAE feature"),
            col("statistic", "string", "`auc` (binary criteria) or `spearman` (numbers, dates)"),
            col(
                "aggregation",
                "string",
                "pooled value used (default `max`; zeros where the feature is silent)",
            ),
            col("n_docs, n_active", "int64", "documents with a value / of those, where the feature fires"),
            col(
                "effect, ci_low, ci_high",
                "float64",
                "AUC (0.5 = none, DeLong 95% interval) or Spearman rho (Fisher-z interval)",
            ),
            col(
                "p_value",
                "float64",
                "two-sided; `test` says how: Mann-Whitney / t, or exact over the active count in a small "
                "group (`*_mixture`) where normal tails would give false discoveries",
            ),
            col(
                "q_value, significant", "float64, bool", "Benjamini-Hochberg within the criterion; q < alpha"
            ),
            col("test", "string", "`mann_whitney`, `spearman_t`, `pearson_t`, or one of these + `_mixture`"),
            col("positive_class", "string", "the class AUC > 0.5 points to (binary)"),
            col(
                "freq_pos, freq_neg, mean_pos, mean_neg",
                "float64",
                "firing frequency / mean value in each class (binary only)",
            ),
        ),
    ),
    Table(
        "diff_features",
        "comparison `A__vs__B`",
        "One row per (family, feature) active in either dataset: `family` = `token` (the reader's SAE, "
        "from\npooled_embeddings) or `document` (the comparison's document SAE, from document_features).",
        (
            col("comparison, dataset_a, dataset_b", "string", "the comparison"),
            col("family", "string", "`token` or `document`"),
            col("feature", "int32", "SAE feature (of that family's SAE)"),
            col("docs_a, docs_b", "int64", "documents where the feature fires at the reported threshold"),
            col("freq_a, freq_b", "float64", "docs / documents"),
            col(
                "freq_diff, freq_diff_ci_low, freq_diff_ci_high",
                "float64",
                "a - b with a 95% Newcombe interval (paired Newcombe in paired mode)",
            ),
            col(
                "log2_ratio, log2_ratio_ci_low, log2_ratio_ci_high",
                "float64",
                "log2(freq_a / freq_b), Haldane-corrected, 95% interval",
            ),
            col(
                "p_value",
                "float64",
                "two-sided: Fisher exact for small expected counts, else two-proportion z; exact McNemar "
                "when paired; with adaptive firing, the best threshold's p-value times the feature's "
                "number of thresholds",
            ),
            col(
                "q_value",
                "float64",
                "Benjamini-Hochberg; adaptive firing: over the features that could reach significance "
                "(`tested`), 1 for the others; fixed firing: over all `d_sae` features (untested count as "
                "p = 1)",
            ),
            col("significant", "bool", "q_value < alpha (default 0.05)"),
            col("direction", "string", "`a` or `b`: where the feature is more frequent"),
            col("mean_activation_a, mean_activation_b", "float64", "mean max-activation where it fires"),
            col("test", "string", "`fisher_exact`, `z_test` or `mcnemar_exact`"),
            col(
                "threshold",
                "float64",
                "adaptive firing: the activation at or above which a document counts as firing",
                optional=True,
            ),
            col(
                "n_thresholds",
                "int64",
                "adaptive firing: thresholds the feature was tested at",
                optional=True,
            ),
            col(
                "tested",
                "bool",
                "adaptive firing: whether the feature could reach significance (independent filtering)",
                optional=True,
            ),
            col(
                "label",
                "string",
                "document family: the offline label of the report's top features (others null)",
                optional=True,
            ),
            col("n_pairs, docs_both, docs_a_only, docs_b_only", "int64", "paired mode only", optional=True),
        ),
    ),
    Table(
        "diff_reports",
        "comparison",
        "",
        (
            col("comparison, dataset_a, dataset_b", "string", "the comparison"),
            col("paired_on", "string", "key column shared by A and B (null when unpaired)"),
            col("n_docs_a, n_docs_b", "int64", "encoded documents"),
            col("features_tested", "int64", "SAE width"),
            col("significant_a, significant_b", "int64", "significant features more frequent in A / B"),
            col("top_features_a, top_features_b", "string", "JSON lists of the report's top features"),
            col(
                "report_markdown_path, report_html_path",
                "string",
                "the rendered reports (`<data_dir>/reports/<comparison>.md/.html`)",
            ),
            col(
                "document_significant_a, document_significant_b",
                "int64",
                "the same for the document family (null without document_features)",
            ),
            col(
                "document_top_features_a, document_top_features_b",
                "string",
                "JSON lists of the report's top document features",
            ),
        ),
    ),
    Table(
        "feature_effects",
        "comparison",
        "One record per (target feature, score, intervened feature), in interp-lab's intervention-record "
        "shape.",
        (
            col("target_feature", "int64", "the report feature these records test"),
            col(
                "feature",
                "int64",
                "the feature ablated: the target itself, a frequency-matched random control, or the target "
                "at strength 0 (placebo)",
            ),
            col(
                "direction",
                "string",
                "`a` / `b`: the dataset where the target is more frequent (its documents are edited)",
            ),
            col(
                "score_name",
                "string",
                "`feature_signature`, `comparison_direction`, `next_token_logprob` (causal LMs), and with "
                "the comparison's document SAE `document_feature_shift` (L1 change of the document's "
                "document-SAE activations) and `document_features_flipped` (document features that start "
                "or stop firing); these two compare each document with itself unedited (baseline 0)",
            ),
            *_INTERVENTION_RECORD_COLUMNS,
            col("comparison, dataset_a, dataset_b", "string", "the comparison"),
            col(
                "signature_auc, comparison_auc",
                "float64",
                "how well each score's direction separates its two groups of documents (unedited embeddings) "
                "(cross-fitted AUC)",
            ),
        ),
    ),
    Table(
        "criterion_effects",
        "dataset",
        "feature_effects' records for the features that go with one binary metadata criterion (on demand).",
        (
            col("target_feature", "int64", "the criterion's feature these records test"),
            col(
                "feature",
                "int64",
                "the feature ablated: the target, a frequency-matched random control, or the target at "
                "strength 0 (placebo)",
            ),
            col(
                "score_name",
                "string",
                "`feature_signature`, `criterion_direction` (mean embedding where the criterion holds minus "
                "where it does not) or `next_token_logprob` (causal LMs)",
            ),
            *_INTERVENTION_RECORD_COLUMNS,
            col("dataset, criterion", "string", "the dataset and the criterion (e.g. `topic=billing`)"),
            col(
                "criterion_auc",
                "float64",
                "how well the criterion direction separates documents, unedited (cross-fitted AUC)",
            ),
        ),
    ),
    Table(
        "document_embeddings",
        "dataset",
        "",
        (
            col("dataset, doc_id, doc_hash", "string, int32, string", "the document"),
            col(
                "embedding",
                "list<float32>",
                "the reader's hidden states at the configured layer (default: the one its SAE reads; "
                "metadata `layer`), mean-pooled over the document's tokens, L2-normalized",
            ),
        ),
    ),
    Table(
        "document_sae",
        "comparison",
        "One row: the document SAE trained on both datasets' documents (deduplicated by content), "
        "label-blind.",
        (
            col("comparison", "string", "the comparison"),
            col(
                "training_hash",
                "string",
                "hash of the training documents, their embeddings, their lexical profiles and the "
                "training config (names the model folder)",
            ),
            col(
                "d_in",
                "int64",
                "what the SAE reads: the embedding width (384 on the embedded default), plus "
                "`lexical_dims` with a lexical profile",
            ),
            col("d_sae, k", "int64", "width of each member SAE, active features per document in each"),
            col(
                "members, n_features",
                "int64",
                "independently seeded member SAEs (seeds `seed`, `seed + 1`, ...) and their features in all "
                "(members x d_sae): member i's feature f is document feature i * d_sae + f",
            ),
            col("n_documents", "int64", "training documents"),
            col(
                "fraction_variance_explained, dead_feature_fraction",
                "float64",
                "quality on the training documents, mean over members (the `document_sae_quality` check "
                "warns below 0.3 / above 0.25)",
            ),
            col(
                "model_path",
                "string",
                "`<data_dir>/models/document_sae/<training_hash>/`: the member SAEs (SAELens format, "
                "`member_00/`, ...), `training_report.json`, and `lexical_projection.npz` with a lexical "
                "profile",
            ),
        ),
    ),
    Table(
        "feature_clusters",
        "dataset",
        "One row per (grouping, feature); `interp_assets/analysis/clustering.py`.",
        (
            col("dataset", "string", "dataset"),
            col("by", "string", "`coactivation` or `decoder`: which similarity grouped them"),
            col("cluster", "int32", "group (0 = largest); a feature alone is a group of one"),
            col("size", "int32", "features in the group"),
            col(
                "name",
                "string",
                "labels of its most central labeled members (up to 3, ` / `-joined); null without labels",
            ),
            col("feature, label", "int32, string", "the feature and its label"),
            col("centrality", "float64", "its mean similarity to the other members (null in a group of one)"),
            col("documents", "int64", "documents where it fires"),
        ),
    ),
    Table(
        "document_clusters",
        "dataset",
        "",
        (
            col(
                "dataset, family",
                "string",
                "dataset; `token` or `document` (which features were clustered)",
            ),
            col(
                "doc_id",
                "int32",
                "document (every encoded document; family `document`: every document in the comparison's "
                "document_features)",
            ),
            col(
                "cluster", "int32", "its cluster (0 = largest); null where none of the chosen features fires"
            ),
            col(
                "similarity", "float64", "cosine of its (weighted) feature profile to its cluster's centroid"
            ),
            col(
                "cluster_name",
                "string",
                "labels of the cluster's top distinguishing features (null without labels)",
            ),
        ),
    ),
    Table(
        "document_cluster_features",
        "dataset",
        "Each cluster's distinguishing features: those firing in a larger share of its documents than of "
        "the other clustered documents, by rate_diff, then log2_ratio (top `top_n` per cluster).",
        (
            col("dataset, family", "string", "as in document_clusters"),
            col("cluster, size, cluster_name", "int32, int64, string", "the cluster"),
            col("rank", "int32", "0 = most distinguishing"),
            col("feature, label", "int32, string", "the feature and its label"),
            col("docs_in", "int64", "the cluster's documents where it fires"),
            col(
                "rate_in, rate_out, rate_diff",
                "float64",
                "share of the cluster's / the other clustered documents where it fires; their difference",
            ),
            col(
                "log2_ratio",
                "float64",
                "log2 of rate_in / rate_out, 0.5 added to each count and 1 to each total",
            ),
        ),
    ),
    Table(
        "feature_matches",
        "dataset",
        "One row per (extra reader, feature of the reader it is matched with); only with extra readers "
        "(`config/readers.json`). Signatures: each feature's per-document max activation over the documents "
        "both readers encoded; `interp_assets/analysis/matching.py`. The strongest 50 one-to-one matches "
        "also get both features' offline labels, computed on the dataset, and their similarity.",
        (
            col("dataset", "string", "dataset"),
            col(
                "reader_a, reader_b",
                "string",
                "the reader matched against (`default` or the extra reader's `match_with`) and the extra "
                "reader",
            ),
            col("feature_a", "int32", "a feature of reader A (every one of its SAE's features)"),
            col(
                "match_b, match_correlation",
                "int32, float64",
                "one-to-one (Hungarian) match in B and the Pearson correlation of the two signatures; null "
                "when the best assignment is not positively correlated or A's feature never fires",
            ),
            col(
                "best_b, best_correlation",
                "int32, float64",
                "many-to-one: B's feature most correlated with it (several of A's may share one)",
            ),
            col(
                "decoder_cosine",
                "float64",
                "cosine of the one-to-one pair's decoder directions; null unless both SAEs read the same "
                "model and hook (one residual space)",
            ),
            col(
                "label_a, label_b",
                "string",
                "offline labels (label: description) of the pair's two features on this dataset, for the 50 "
                "strongest one-to-one matches; null for the others",
            ),
            col(
                "label_similarity",
                "float64",
                "cosine of the two labels' sentence embeddings (the embedded MiniLM); 1 for identical labels",
            ),
            col("documents", "int64", "documents in the signatures (encoded by both readers)"),
        ),
    ),
    Table(
        "document_features",
        "comparison",
        "",
        (
            col("comparison, dataset, doc_id", "string, string, int32", "the document"),
            col("feature", "int32", "document SAE feature"),
            col("activation", "float32", "its activation (exactly the top k of each document are stored)"),
        ),
    ),
)
TABLES: dict[str, Table] = {t.name: t for t in _TABLES}


def arrow_type_name(dtype: pa.DataType) -> str:
    """How these docs spell a stored Arrow type: `int32`, `string (dictionary)`, `list<float32>`, `bool`."""
    if pa.types.is_dictionary(dtype):
        return f"{arrow_type_name(dtype.value_type)} (dictionary)"
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return f"list<{arrow_type_name(dtype.value_type)}>"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype):
        return "string"
    if pa.types.is_boolean(dtype):
        return "bool"
    if pa.types.is_floating(dtype):
        return {16: "float16", 32: "float32", 64: "float64"}[dtype.bit_width]
    return str(dtype)


def schema_mismatches(table: str, schema: pa.Schema) -> list[str]:
    """How a stored (or about to be stored) Arrow `schema` differs from `table`'s documentation: missing
    columns, undocumented ones (allowed where the table keeps its input's other columns), other types."""
    doc = TABLES[table]
    documented = {name: type_ for name, type_, _, _ in doc.columns}
    problems = [f"{table}: documented column {n!r} is missing" for n in doc.required if n not in schema.names]
    for field in schema:
        if field.name not in documented:
            if doc.other_columns is None:
                problems.append(f"{table}: column {field.name!r} is not documented")
        elif arrow_type_name(field.type) != documented[field.name]:
            problems.append(
                f"{table}.{field.name}: stored as {arrow_type_name(field.type)}, documented as "
                f"{documented[field.name]}"
            )
    return problems


def stored_schemas(parquet_base: str) -> dict[tuple[str, str], pa.Schema]:
    """The Arrow schema of every stored partition of every documented table under a local `parquet_base`,
    keyed by (table, partition); for `schema_mismatches`."""
    import pyarrow.parquet as pq

    from interp_assets.storage.parquet import table_files

    found = {}
    for table in TABLES:
        folder = Path(parquet_base) / table
        if not folder.is_dir():
            continue
        entries = [p for p in folder.iterdir() if p.is_dir() or p.suffix == ".parquet"]
        partitions = {p.name.removesuffix(".parquet") for p in entries if not p.name.startswith(".")}
        for partition in sorted(partitions):
            files = table_files(parquet_base, table, partition)
            if files:
                found[(table, partition)] = pq.read_schema(files[0])
    return found


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_table(table: Table) -> str:
    """One table's README section: heading, intro, and a column | type | meaning table."""
    lines = [f"### {table.name} (partition: {table.partition})"]
    if table.intro:
        lines.append(table.intro)
    lines += ["| column | type | meaning |", "|---|---|---|"]
    lines += [f"| {', '.join(r.names)} | {r.type_text} | {_cell(r.meaning)} |" for r in table.rows]
    if table.other_columns:
        lines.append(f"| *other columns* | as read | {_cell(table.other_columns)} |")
    return "\n".join(lines)


BEGIN = (
    "<!-- table schemas: rendered from interp_assets/storage/schemas.py; edit there, then run "
    "python -m interp_assets.storage.schemas --write -->"
)
END = "<!-- end of table schemas -->"


def render_markdown() -> str:
    """Every table's README section, in README order, between the BEGIN and END markers."""
    return "\n".join([BEGIN, "\n\n".join(render_table(t) for t in TABLES.values()), END])


def readme_section(readme: str) -> str:
    """The rendered part of a README's text (markers included); ValueError when the markers are missing."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README has no table-schema section between {BEGIN!r} and {END!r}")
    return readme[start : end + len(END)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render the README's table-schema section.")
    parser.add_argument("--readme", default=str(Path(__file__).resolve().parents[2] / "README.md"))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the README's section in place")
    mode.add_argument("--check", action="store_true", help="exit 1 when the README's section differs")
    args = parser.parse_args(argv)
    if not (args.write or args.check):
        print(render_markdown())
        return 0
    path = Path(args.readme)
    text = path.read_text()
    current, rendered = readme_section(text), render_markdown()
    if args.check:
        if current != rendered:
            print(
                f"{path}: the table-schema section differs from interp_assets/storage/schemas.py; run "
                "python -m interp_assets.storage.schemas --write",
                file=sys.stderr,
            )
            return 1
        return 0
    if current != rendered:
        path.write_text(text.replace(current, rendered))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
