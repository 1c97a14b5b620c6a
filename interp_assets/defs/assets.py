"""The asset chain, as thin Dagster wiring around the pure modules.

raw_documents -> token_activations -> pooled_embeddings -> feature_labels -> feature_scores -> diff_reports

All but diff_reports are partitioned by dataset; diff_reports is partitioned by comparison (`A__vs__B`)
and loads the two datasets' partitions explicitly. Side tables (document_rejects, activation_status,
diff_features) are written next to the asset tables with the same atomic Parquet writer.
"""

import hashlib
import json
import time

import numpy as np
import polars as pl
import pyarrow as pa
from dagster import (
    AllPartitionMapping,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    AssetRecordsFilter,
    Config,
    DagsterInstance,
    DataVersion,
    EventLogRecord,
    MetadataValue,
    Output,
    asset,
)

from interp_assets import ingest
from interp_assets.analysis import associations, diffing, reports
from interp_assets.comparisons import (
    find_comparison,
    load_comparisons,
    load_dataset_settings,
    parse_comparison_key,
)
from interp_assets.defs.partitions import comparisons_partitions, datasets_partitions
from interp_assets.engine.activation_cache import ActivationCache, token_activations_schema
from interp_assets.engine.activations import encode_texts
from interp_assets.engine.pooling import (
    POOLED_SCHEMA,
    POOLING_VERSION,
    pool_token_activations,
    pooled_segment_name,
    pooled_summary,
)
from interp_assets.engine.reader import ENGINE_VERSION
from interp_assets.labels import labeling, scoring
from interp_assets.labels.feature_selection import select_features
from interp_assets.storage.parquet import (
    KEEP,
    SegmentedTable,
    StreamedTable,
    markdown_preview,
    read_table,
    scan_parquet_files,
    stored_segments,
    table_exists,
    table_segments,
    write_bytes_atomic,
    write_table,
)
from resources.llm import LLMResource
from resources.sae_reader import SAEReaderResource
from resources.storage import StorageResource

DATA_VERSION_TAG = "dagster/data_version"  # the tag Dagster stores a materialization's data version under
MODEL_POOL = "sae_model"  # every step that runs the reader model shares this concurrency pool

DOCUMENT_REJECTS_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()),
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("problem", pa.string()),
    ]
)


class RawDocumentsConfig(Config):
    """How to read a drop. Per-dataset settings in `<data_dir>/config/datasets.json` take precedence."""

    text_column: str = "text"
    id_column: str | None = None


def _dataset_settings(storage: StorageResource, dataset: str) -> dict:
    return load_dataset_settings(storage.config_dir / "datasets.json").get(dataset, {})


@asset(
    partitions_def=datasets_partitions,
    io_manager_key="parquet_io_manager",
    code_version="1",
    check_specs=[AssetCheckSpec("documents_have_text", asset="raw_documents")],
    description="Documents of one dataset, read from its drop in the landing folder; bad rows go to "
    "document_rejects with file, row and problem.",
)
def raw_documents(context: AssetExecutionContext, config: RawDocumentsConfig, storage: StorageResource):
    dataset = context.partition_key
    drops = {d.dataset: d for d in ingest.list_drops(storage.landing_dir)}
    if dataset not in drops:
        raise FileNotFoundError(
            f"No drop for dataset {dataset!r} in {storage.landing_dir}: put a CSV/TSV/JSONL/Parquet file "
            f"'{dataset}.<ext>' (or a folder '{dataset}/') there, or delete the partition."
        )
    drop = drops[dataset]
    settings = _dataset_settings(storage, dataset)
    text_column = settings.get("text_column", config.text_column)
    id_column = settings.get("id_column", config.id_column)
    result = ingest.read_drop(drop, dataset, text_column=text_column, id_column=id_column)
    rejects = (
        result.rejects.cast(DOCUMENT_REJECTS_SCHEMA)
        if result.rejects.num_rows
        else DOCUMENT_REJECTS_SCHEMA.empty_table()
    )
    write_table(storage.parquet_base, "document_rejects", dataset, rejects)
    docs = result.documents
    if rejects.num_rows:
        context.log.warning(
            f"{rejects.num_rows} row(s) of {dataset} rejected, e.g. "
            + "; ".join(
                f"{r['source_file']} row {r['source_row']}: {r['problem']}"
                for r in rejects.slice(0, 3).to_pylist()
            )
        )
    texts = docs.column("text")
    empty = sum(1 for t in texts.to_pylist() if not t or not t.strip())
    yield Output(
        docs,
        data_version=DataVersion(
            hashlib.sha256(f"{drop.fingerprint}:{text_column}:{id_column}".encode()).hexdigest()[:24]
        ),
        metadata={
            "documents": docs.num_rows,
            "rejected_rows": rejects.num_rows,
            "drop_fingerprint": drop.fingerprint[:16],
            "files": MetadataValue.json(
                list(result.summary.get("per_file", {})) or [str(p) for p in drop.paths]
            ),
            "text_column": text_column,
        },
    )
    yield AssetCheckResult(
        check_name="documents_have_text",
        passed=empty == 0 and docs.num_rows > 0,
        metadata={"empty_texts": empty, "documents": docs.num_rows},
    )


@asset(
    partitions_def=datasets_partitions,
    io_manager_key="parquet_io_manager",
    code_version=ENGINE_VERSION,
    pool=MODEL_POOL,
    check_specs=[
        AssetCheckSpec("every_document_accounted_for", asset="token_activations", blocking=True),
        AssetCheckSpec("activations_finite_and_positive", asset="token_activations", blocking=True),
    ],
    description="Every nonzero SAE activation of every pooled token (doc_id, token_index, token, offsets, "
    "feature, activation). Only new or changed documents go through the model (content-hash cache), and "
    "only the segments (one per cache chunk) whose documents changed are written.",
)
def token_activations(
    context: AssetExecutionContext,
    raw_documents: pl.LazyFrame,
    sae_reader: SAEReaderResource,
    storage: StorageResource,
):
    dataset = context.partition_key
    docs = raw_documents.select("doc_id", "doc_hash", "text").collect()
    reader = sae_reader.get_reader()
    cache = ActivationCache(storage.cache_dir / "activations", reader.fingerprint)
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        context.log.info(f"{dataset}: encoded {done}/{total} new documents")

    stats = cache.encode_missing(lambda texts: encode_texts(reader, texts), docs, on_chunk=progress)
    seconds = time.perf_counter() - started
    status = cache.activation_status(docs.select("doc_id", "doc_hash"), dataset)
    write_table(storage.parquet_base, "activation_status", dataset, status)
    status_pl = pl.from_arrow(status)
    counts = status_pl.group_by("status").len()
    count = dict(zip(counts["status"].to_list(), counts["len"].to_list(), strict=True))
    rejected = status_pl.filter(pl.col("status") == "rejected")
    if rejected.height:
        context.log.warning(
            f"{rejected.height} document(s) of {dataset} could not be encoded, e.g. doc_id "
            f"{rejected['doc_id'][0]}: {rejected['reason'][0]} (see the activation_status table)"
        )
    version = hashlib.sha256(
        (reader.fingerprint + "".join(sorted(docs["doc_hash"].to_list()))).encode()
    ).hexdigest()[:24]

    # One segment per cache chunk holding documents of this dataset, named by its content: a segment
    # already stored under its name is kept as is; the others are streamed from the cache.
    schema = token_activations_schema(reader.activation_dtype)
    plan = cache.activation_segments(docs.select("doc_id", "doc_hash"), dataset, schema)
    stored = stored_segments(storage.parquet_base, "token_activations", dataset, schema)
    # New segments are checked while the IO manager writes them, which Dagster does while handling the
    # Output, before this generator resumes; `written` counts the segments streamed to the end, so the
    # check fails loudly (not passes silently) if that order ever changed.
    seen = {"bad_values": 0, "written": 0}

    def checked_segment(segment):
        for batch in cache.iter_segment(segment, dataset, schema):
            act = batch.column("activation").to_numpy(zero_copy_only=False)
            seen["bad_values"] += int(np.count_nonzero(~np.isfinite(act) | (act <= 0)))
            yield batch
        seen["written"] += 1

    segments = {s.name: KEEP if s.name in stored else StreamedTable(schema, checked_segment(s)) for s in plan}
    kept = [stored[name] for name, value in segments.items() if value is KEEP]
    yield Output(
        SegmentedTable(schema, segments),
        data_version=DataVersion(version),
        metadata={
            "documents": docs.height,
            "encoded_now": stats.encoded,
            "reused_from_cache": stats.reused,
            "rejected": count.get("rejected", 0),
            "chunks_written": stats.chunks_written,
            "encode_seconds": round(seconds, 2),
            "reader_fingerprint": reader.fingerprint,
            "d_sae": reader.d_sae,
            "device": reader.device,
        },
    )
    missing = count.get("missing", 0)
    kept_bad = _bad_activations(scan_parquet_files(kept, schema))  # one column of the kept segments
    new_segments = len(segments) - len(kept)
    yield AssetCheckResult(
        check_name="every_document_accounted_for",
        passed=missing == 0 and status_pl.height == docs.height,
        metadata={
            "encoded": count.get("encoded", 0),
            "rejected": count.get("rejected", 0),
            "missing": missing,
        },
    )
    yield AssetCheckResult(
        check_name="activations_finite_and_positive",
        passed=seen["written"] == new_segments and seen["bad_values"] + kept_bad == 0,
        metadata={
            "bad_values": seen["bad_values"] + kept_bad,
            "segments_checked_while_writing": seen["written"],
            "segments_written": new_segments,
            "segments_kept_checked_from_storage": len(kept),
        },
    )


def _bad_activations(token_activations: pl.LazyFrame) -> int:
    """Rows whose activation is not finite or not positive."""
    act = pl.col("activation").cast(pl.Float32)
    return int(token_activations.select((~act.is_finite() | (act <= 0)).sum()).collect().item() or 0)


@asset(
    partitions_def=datasets_partitions,
    io_manager_key="parquet_io_manager",
    code_version=POOLING_VERSION,
    deps=[AssetDep("token_activations")],
    check_specs=[AssetCheckSpec("pooled_statistics_consistent", asset="pooled_embeddings")],
    description="Per (document, feature): max, sum and count of active tokens, and the document's pooled "
    "token count, so max/mean/sum/binarize/count are all derivable. One segment per token_activations "
    "segment; only new ones are pooled.",
)
def pooled_embeddings(context: AssetExecutionContext, storage: StorageResource):
    dataset = context.partition_key
    base = storage.parquet_base
    sources = table_segments(base, "token_activations", dataset)
    stored = stored_segments(base, "pooled_embeddings", dataset, POOLED_SCHEMA)
    doc_tokens = (
        read_table(base, "activation_status", dataset)
        .filter(pl.col("status") == "encoded")
        .select("doc_id", "pooled_tokens")
        .collect()
    )
    segments: dict = {}
    frames = []  # the whole table (kept segments from storage, new ones in memory) for stats and the check
    for source, path in sources.items():
        name = pooled_segment_name(source)
        if name in stored:
            segments[name] = KEEP
            frames.append(scan_parquet_files([stored[name]]))
        else:
            segments[name] = pool_token_activations(scan_parquet_files([path]), doc_tokens)
            frames.append(segments[name].lazy())
    empty = pl.from_arrow(POOLED_SCHEMA.empty_table())
    summary = pooled_summary(pl.concat(frames) if frames else empty.lazy())
    written = sum(1 for v in segments.values() if v is not KEEP)
    yield Output(
        SegmentedTable(POOLED_SCHEMA, segments),
        metadata={
            "rows": summary["rows"],
            "documents_with_features": summary["documents_with_features"],
            "mean_features_per_document": summary["mean_features_per_document"],
            "distinct_features": summary["distinct_features"],
        },
    )
    yield AssetCheckResult(
        check_name="pooled_statistics_consistent",
        passed=summary["inconsistent_rows"] == 0,
        metadata={
            "inconsistent_rows": summary["inconsistent_rows"],
            "rows_checked": summary["rows"],
            "segments_pooled_now": written,
            "segments_kept": len(segments) - written,
        },
    )


class FeatureLabelsConfig(Config):
    """Which features to label and how much evidence to show the labeler."""

    n_frequent: int = 20
    n_distinctive: int = 30
    n_associated: int = 3  # per metadata criterion, when feature_associations exists
    requested_features: list[int] = []
    published_labels_path: str | None = None
    n_evidence: int = 20
    n_holdout: int = 40
    seed: int = 0
    hard_negatives_max_docs: int = 20000


def _encoded_doc_count(storage: StorageResource, dataset: str) -> int:
    status = read_table(storage.parquet_base, "activation_status", dataset)
    return int(status.filter(pl.col("status") == "encoded").select(pl.len()).collect().item())


def _documents(storage: StorageResource, dataset: str) -> pl.DataFrame:
    return read_table(storage.parquet_base, "raw_documents", dataset).sort("doc_id").collect()


def _document_embeddings(storage: StorageResource, docs: pl.DataFrame, max_docs: int) -> np.ndarray | None:
    """Sentence embeddings of the documents (row i = docs row i), cached by content hash; None if too many."""
    if docs.height > max_docs:
        return None
    from interp_assets.labels.embedding import sentence_embeddings

    path = storage.cache_dir / "embeddings" / "minilm.parquet"
    known = (
        pl.read_parquet(path)
        if path.exists()
        else pl.DataFrame(schema={"doc_hash": pl.String, "embedding": pl.List(pl.Float32)})
    )
    missing = (
        docs.select("doc_hash", "text")
        .unique("doc_hash")
        .join(known.select("doc_hash"), on="doc_hash", how="anti")
    )
    if missing.height:
        vectors = sentence_embeddings(missing["text"].to_list())
        new = pl.DataFrame(
            {"doc_hash": missing["doc_hash"], "embedding": [v for v in vectors.astype(np.float32)]},
            schema={"doc_hash": pl.String, "embedding": pl.List(pl.Float32)},
        )
        known = pl.concat([known, new])
        path.parent.mkdir(parents=True, exist_ok=True)
        write_table(str(path.parent), "minilm", None, known)
    aligned = docs.select("doc_hash").join(known, on="doc_hash", how="left", maintain_order="left")
    return np.asarray(aligned["embedding"].to_list(), dtype=np.float32)


@asset(
    partitions_def=datasets_partitions,
    io_manager_key="parquet_io_manager",
    code_version="1",
    pool=MODEL_POOL,
    deps=[AssetDep("pooled_embeddings"), AssetDep("feature_associations")],
    description="Labels for the features that matter in this dataset (frequent, distinctive against its "
    "comparison partners, requested): published labels, else an LLM when configured, else an offline "
    "contrastive log-odds labeler. Cached by (SAE, feature, evidence).",
)
def feature_labels(
    context: AssetExecutionContext,
    config: FeatureLabelsConfig,
    token_activations: pl.LazyFrame,
    storage: StorageResource,
    llm: LLMResource,
):
    dataset = context.partition_key
    base = storage.parquet_base
    pooled = read_table(base, "pooled_embeddings", dataset)
    n_docs = _encoded_doc_count(storage, dataset)
    docs = _documents(storage, dataset)
    partners = {}
    for comparison in load_comparisons(storage.config_dir / "comparisons.json"):
        other = comparison.b if comparison.a == dataset else comparison.a if comparison.b == dataset else None
        if other and table_exists(base, "pooled_embeddings", other):
            pairs = (
                diffing.pairs_from_key(docs, _documents(storage, other), comparison.paired_on)
                if comparison.paired_on
                else None
            )
            partners[other] = (
                read_table(base, "pooled_embeddings", other),
                _encoded_doc_count(storage, other),
                pairs,
            )
    sae_id = str(_token_activations_metadata(context, dataset).get("reader_fingerprint", "unknown"))
    selected = select_features(
        pooled,
        n_docs,
        partners=partners,
        n_frequent=config.n_frequent,
        n_distinctive=config.n_distinctive,
        requested=config.requested_features,
        associated=_top_associated(base, dataset, config.n_associated),
    )
    features = selected["feature"].to_list()
    acts = token_activations.filter(pl.col("feature").is_in(features)).collect()
    embeddings = _document_embeddings(storage, docs, config.hard_negatives_max_docs)
    published = (
        labeling.load_published_labels(config.published_labels_path) if config.published_labels_path else None
    )
    errors: list[str] = []
    labels = labeling.label_features(
        acts,
        docs,
        features,
        dataset=dataset,
        sae_id=sae_id,
        embeddings=embeddings,
        published=published,
        llm=llm if llm.enabled else None,
        cache=labeling.LabelCache(storage.cache_dir / "labels.parquet"),
        selected_because=dict(
            zip(selected["feature"].to_list(), selected["selected_because"].to_list(), strict=True)
        ),
        n_evidence=config.n_evidence,
        n_holdout=config.n_holdout,
        seed=config.seed,
        errors=errors,
    )
    for message in errors[:20]:
        context.log.warning(message)
    preview = labels.select("feature", "label", "selected_because", "source").head(20)
    return Output(
        labels,
        metadata={
            "labeled_features": labels.height,
            "sources": MetadataValue.json(labels.group_by("source").len().to_dicts()),
            "labeling_errors": len(errors),
            "llm_calls_made": llm.calls_made if llm.enabled else 0,
            # the comparisons_sensor re-labels when a partner's activations change after this
            "partner_versions": MetadataValue.json(
                {other: data_version(context.instance, "token_activations", other) for other in partners}
            ),
            # feature_scores re-derives the held-out split from exactly these
            "split_parameters": MetadataValue.json(_split_parameters(config)),
            "labels": MetadataValue.md(markdown_preview(preview.to_arrow(), max_rows=preview.height)),
        },
    )


def _top_associated(base: str, dataset: str, n: int) -> dict[str, list[int]]:
    """The `n` most significant features of each metadata criterion (empty before feature_associations)."""
    if n <= 0 or not table_exists(base, "feature_associations", dataset):
        return {}
    top = (
        read_table(base, "feature_associations", dataset)
        .filter(pl.col("significant"))
        .sort("q_value")
        .group_by("criterion", maintain_order=True)
        .head(n)
        .collect()
    )
    return {c: part["feature"].to_list() for (c,), part in top.group_by(["criterion"], maintain_order=True)}


SPLIT_PARAMETERS = ("n_evidence", "n_holdout", "seed", "hard_negatives_max_docs")


def _split_parameters(config: FeatureLabelsConfig) -> dict[str, int]:
    return {name: getattr(config, name) for name in SPLIT_PARAMETERS}


@asset(
    partitions_def=datasets_partitions,
    io_manager_key="parquet_io_manager",
    code_version="1",
    pool=MODEL_POOL,
    description="Every label scored on held-out documents never shown to the labeler: precision, recall, F1, "
    "balanced accuracy, AUC and a bootstrap interval, offline (embedding) and with an LLM when configured.",
)
def feature_scores(
    context: AssetExecutionContext,
    feature_labels: pl.LazyFrame,
    storage: StorageResource,
    llm: LLMResource,
):
    dataset = context.partition_key
    record = latest_materialization(context.instance, "feature_labels", dataset)
    stored = record.asset_materialization.metadata.get("split_parameters") if record else None
    split = stored.value if stored is not None else _split_parameters(FeatureLabelsConfig())
    labels = feature_labels.collect()
    docs = _documents(storage, dataset)
    features = labels["feature"].to_list()
    acts = (
        read_table(storage.parquet_base, "token_activations", dataset)
        .filter(pl.col("feature").is_in(features))
        .collect()
    )
    embeddings = _document_embeddings(storage, docs, split["hard_negatives_max_docs"])
    errors: list[str] = []
    scores = scoring.score_features(
        labels,
        acts,
        docs,
        llm=llm if llm.enabled else None,
        embeddings=embeddings,
        n_evidence=split["n_evidence"],
        n_holdout=split["n_holdout"],
        seed=split["seed"],
        errors=errors,
    )
    for message in errors[:20]:
        context.log.warning(message)
    summary = scores.group_by("method").agg(
        pl.len().alias("labels"), pl.col("f1").mean().alias("mean_f1"), pl.col("auc").mean().alias("mean_auc")
    )
    return Output(
        scores,
        metadata={
            "scored_labels": scores.height,
            "scoring_errors": len(errors),
            "summary": MetadataValue.md(markdown_preview(summary.to_arrow(), max_rows=summary.height)),
        },
    )


class FeatureAssociationsConfig(Config):
    """Which metadata columns to relate to features. Per-dataset `association_columns` take precedence."""

    columns: list[str] | None = None  # None: every boolean, numeric, date or few-valued text column
    aggregation: str = "max"
    alpha: float = 0.05
    max_levels: int = 20


@asset(
    partitions_def=datasets_partitions,
    io_manager_key="parquet_io_manager",
    code_version="1",
    deps=[AssetDep("raw_documents"), AssetDep("pooled_embeddings")],
    description="Which features go with each metadata column (criterion): AUC for boolean columns and "
    "each level of a few-valued text column, correlation for numeric and date columns, with BH FDR per "
    "criterion. Join feature_labels on (dataset, feature) for names.",
)
def feature_associations(
    context: AssetExecutionContext, config: FeatureAssociationsConfig, storage: StorageResource
):
    dataset = context.partition_key
    base = storage.parquet_base
    columns = _dataset_settings(storage, dataset).get("association_columns", config.columns)
    docs = _documents(storage, dataset)
    encoded = read_table(base, "activation_status", dataset).filter(pl.col("status") == "encoded")
    docs = docs.join(encoded.select("doc_id").collect(), on="doc_id", how="semi")
    try:
        criteria, skipped = associations.metadata_criteria(docs, columns, max_levels=config.max_levels)
    except ValueError as exc:
        raise ValueError(
            f"feature_associations for {dataset!r}: {exc} Fix `association_columns` for this dataset in "
            f"{storage.config_dir / 'datasets.json'} or the asset's `columns` config."
        ) from exc
    table, failed = associations.criteria_associations(
        read_table(base, "pooled_embeddings", dataset),
        criteria,
        dataset=dataset,
        aggregation=config.aggregation,
        alpha=config.alpha,
    )
    for criterion, reason in {**skipped, **failed}.items():
        context.log.info(f"{dataset}: criterion {criterion!r} not tested: {reason}")
    top = table.filter("significant").group_by("criterion", maintain_order=True).head(3)
    if table_exists(base, "feature_labels", dataset):
        labels = read_table(base, "feature_labels", dataset).select("feature", "label").collect()
        top = top.join(labels, on="feature", how="left", maintain_order="left")
    shown = top.select(
        [c for c in ("criterion", "feature", "label", "statistic", "effect", "q_value") if c in top.columns]
    )
    per_criterion = table.group_by("criterion").agg(pl.col("significant").sum()).sort("criterion")
    return Output(
        table,
        metadata={
            "criteria_tested": per_criterion.height,
            "significant_rows": int(table["significant"].sum()),
            "not_tested": MetadataValue.json({**skipped, **failed}),
            "significant_per_criterion": MetadataValue.md(
                markdown_preview(per_criterion.to_arrow(), max_rows=per_criterion.height)
            ),
            "top_features": MetadataValue.md(markdown_preview(shown.to_arrow(), max_rows=shown.height)),
        },
    )


class DiffReportsConfig(Config):
    """Statistics and report settings for one comparison."""

    threshold: float = 0.0
    alpha: float = 0.05
    top_n: int = 10
    examples_per_feature: int = 3


@asset(
    partitions_def=comparisons_partitions,
    io_manager_key="parquet_io_manager",
    code_version="1",
    deps=[
        AssetDep("feature_scores", partition_mapping=AllPartitionMapping()),
    ],
    check_specs=[AssetCheckSpec("report_features_labeled", asset="diff_reports")],
    description="Dataset A against dataset B: per-feature frequencies, differences with intervals, "
    "two-sided tests with Benjamini-Hochberg FDR (paired when declared), and a Markdown + HTML report.",
)
def diff_reports(
    context: AssetExecutionContext,
    config: DiffReportsConfig,
    storage: StorageResource,
):
    key = context.partition_key
    comparison = find_comparison(storage.config_dir / "comparisons.json", key)
    a, b = parse_comparison_key(key)
    base = storage.parquet_base
    for ds in (a, b):
        for table in ("pooled_embeddings", "raw_documents", "activation_status"):
            if not table_exists(base, table, ds):
                raise FileNotFoundError(
                    f"Comparison {key}: dataset {ds!r} has no {table} yet; materialize the dataset's assets "
                    "(raw_documents through feature_scores) first."
                )
    pooled_a, pooled_b = read_table(base, "pooled_embeddings", a), read_table(base, "pooled_embeddings", b)
    n_a, n_b = _encoded_doc_count(storage, a), _encoded_doc_count(storage, b)
    d_sae = _d_sae(context, a)
    docs_a, docs_b = _documents(storage, a), _documents(storage, b)
    if comparison.paired_on:
        pairs = diffing.pairs_from_key(docs_a, docs_b, comparison.paired_on)
        diff = diffing.paired_diff_features(
            pooled_a, pooled_b, pairs, threshold=config.threshold, alpha=config.alpha, n_features=d_sae
        )
    else:
        diff = diffing.diff_features(
            pooled_a, n_a, pooled_b, n_b, threshold=config.threshold, alpha=config.alpha, n_features=d_sae
        )
    diff = diff.with_columns(
        pl.lit(key).alias("comparison"), pl.lit(a).alias("dataset_a"), pl.lit(b).alias("dataset_b")
    )
    write_table(base, "diff_features", key, diff)

    labels, scores = _report_labels(storage, diff, a, b, config.top_n)
    top = reports.top_features(diff, config.top_n)
    top_ids = [int(f) for d in ("a", "b") for f in top[d]["feature"].to_list()]
    needed = pl.Series("feature", top_ids, dtype=pl.Int32)
    ta_a = read_table(base, "token_activations", a).filter(pl.col("feature").is_in(needed.implode()))
    ta_b = read_table(base, "token_activations", b).filter(pl.col("feature").is_in(needed.implode()))
    examples = reports.report_examples(
        diff,
        ta_a.collect(),
        docs_a,
        ta_b.collect(),
        docs_b,
        top_n=config.top_n,
        n=config.examples_per_feature,
    )
    common = dict(
        name_a=a,
        name_b=b,
        n_docs_a=n_a,
        n_docs_b=n_b,
        labels=labels,
        scores=scores,
        examples=examples,
        top_n=config.top_n,
        n_features=d_sae,
        alpha=config.alpha,
    )
    markdown = reports.render_markdown(diff, **common)
    html = reports.render_html(diff, **common)
    storage.reports_dir.mkdir(parents=True, exist_ok=True)
    md_path = storage.reports_dir / f"{key}.md"
    html_path = storage.reports_dir / f"{key}.html"
    write_bytes_atomic(str(md_path), markdown.encode("utf-8"))
    write_bytes_atomic(str(html_path), html.encode("utf-8"))

    significant = diff.filter(pl.col("significant"))
    row = pl.DataFrame(
        {
            "comparison": [key],
            "dataset_a": [a],
            "dataset_b": [b],
            "paired_on": [comparison.paired_on],
            "n_docs_a": [n_a],
            "n_docs_b": [n_b],
            "features_tested": [d_sae],
            "significant_a": [significant.filter(pl.col("direction") == "a").height],
            "significant_b": [significant.filter(pl.col("direction") == "b").height],
            "top_features_a": [json.dumps(top["a"]["feature"].to_list())],
            "top_features_b": [json.dumps(top["b"]["feature"].to_list())],
            "report_markdown_path": [str(md_path.resolve())],
            "report_html_path": [str(html_path.resolve())],
        },
        schema_overrides={"paired_on": pl.String},
    )
    labeled = set(labels["feature"].to_list()) if labels is not None else set()
    unlabeled = [f for f in top_ids if f not in labeled]
    yield Output(
        row,
        metadata={
            "report": MetadataValue.md(markdown[:60000]),
            "report_html": MetadataValue.path(str(html_path.resolve())),
            "significant_a": row["significant_a"][0],
            "significant_b": row["significant_b"][0],
            "paired_on": comparison.paired_on or "",
        },
    )
    yield AssetCheckResult(
        check_name="report_features_labeled",
        passed=not unlabeled,
        severity=AssetCheckSeverity.WARN,
        metadata={"unlabeled_top_features": MetadataValue.json(unlabeled)},
    )


def _report_labels(
    storage: StorageResource, diff: pl.DataFrame, a: str, b: str, top_n: int
) -> tuple[pl.DataFrame | None, pl.DataFrame | None]:
    """Labels and scores of the report's top features, each from the dataset where it is more frequent."""
    base = storage.parquet_base
    top = reports.top_features(diff, top_n)
    label_parts, score_parts = [], []
    for direction, ds in (("a", a), ("b", b)):
        feats = top[direction]["feature"].to_list()
        if table_exists(base, "feature_labels", ds):
            label_parts.append(
                read_table(base, "feature_labels", ds).filter(pl.col("feature").is_in(feats)).collect()
            )
        if table_exists(base, "feature_scores", ds):
            score_parts.append(
                read_table(base, "feature_scores", ds).filter(pl.col("feature").is_in(feats)).collect()
            )
    labels = (
        pl.concat(label_parts, how="diagonal_relaxed").unique("feature", keep="first")
        if label_parts
        else None
    )
    scores = pl.concat(score_parts, how="diagonal_relaxed") if score_parts else None
    return labels, scores


def latest_materialization(instance: DagsterInstance, asset: str, partition: str) -> EventLogRecord | None:
    """The latest materialization record of one partition of `asset` (None if never materialized)."""
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[partition]), limit=1
    ).records
    return records[0] if records else None


def data_version(instance: DagsterInstance, asset: str, partition: str) -> str | None:
    """The data version of the latest materialization of one partition of `asset` (None if none)."""
    record = latest_materialization(instance, asset, partition)
    return record.asset_materialization.tags.get(DATA_VERSION_TAG) if record else None


def _token_activations_metadata(context: AssetExecutionContext, dataset: str) -> dict:
    """Metadata of the latest token_activations materialization of `dataset` (SAE width, fingerprint)."""
    record = latest_materialization(context.instance, "token_activations", dataset)
    if record is None:
        return {}
    return {k: v.value for k, v in record.asset_materialization.metadata.items()}


def _d_sae(context: AssetExecutionContext, dataset: str) -> int | None:
    """SAE width recorded by token_activations for `dataset` (None if unknown)."""
    value = _token_activations_metadata(context, dataset).get("d_sae")
    return int(value) if value is not None else None


ALL_ASSETS = [
    raw_documents,
    token_activations,
    pooled_embeddings,
    feature_labels,
    feature_scores,
    feature_associations,
    diff_reports,
]
WAREHOUSE_TABLES = [
    "raw_documents",
    "document_rejects",
    "token_activations",
    "activation_status",
    "pooled_embeddings",
    "feature_labels",
    "feature_scores",
    "feature_associations",
    "diff_features",
    "diff_reports",
]
