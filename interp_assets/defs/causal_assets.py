"""Causal evidence: feature_effects (ablate the diff's top features in the reader, beside controls)."""

import numpy as np
import polars as pl
from dagster import (
    AllPartitionMapping,
    AssetDep,
    AssetExecutionContext,
    Config,
    DataVersion,
    MetadataValue,
    Output,
    asset,
)

from interp_assets.analysis import reports
from interp_assets.causal import effects
from interp_assets.comparisons import parse_comparison_key
from interp_assets.defs.partitions import comparisons_partitions
from interp_assets.defs.shared import (
    INPUTS_KEY,
    MODEL_POOL,
    OWNERS,
    column_schema,
    inputs_key,
    reuse_stored_output,
    stored_documents,
)
from interp_assets.storage.parquet import markdown_preview, read_table, table_exists, write_bytes_atomic
from resources.sae_reader import SAEReaderResource
from resources.storage import StorageResource

EFFECTS_CODE_VERSION = "1"


class FeatureEffectsConfig(Config):
    """Which features to ablate and how much evidence to gather for each."""

    features: list[int] = []  # empty: the diff's top significant token-level features per direction
    # Defaults sized for the main job on a CPU (one traced forward pass per feature and control, over
    # documents_per_feature + unaffected_documents documents); raise them on a GPU.
    top_n: int = 2  # per direction, when `features` is empty
    documents_per_feature: int = 16  # documents where the feature fires (its side's dataset)
    unaffected_documents: int = 4  # documents where it does not fire (side effects)
    reference_documents: int = 100  # per dataset, never edited: they fix the scores' directions
    n_controls: int = 10
    n_boot: int = 1000
    seed: int = 0


def _targets(diff: pl.DataFrame, config: FeatureEffectsConfig, key: str) -> list[tuple[int, str]]:
    """(feature, direction) pairs to measure."""
    if not config.features:
        top = reports.top_features(diff, config.top_n)
        return [(int(f), d) for d in ("a", "b") for f in top[d]["feature"].to_list()]
    known = dict(zip(diff["feature"].to_list(), diff["direction"].to_list(), strict=True))
    missing = [f for f in config.features if f not in known]
    if missing:
        raise ValueError(
            f"feature_effects [{key}]: features {missing} are not in this comparison's diff_features "
            f"(token family, {len(known)} features). Use feature ids of the comparison's SAE."
        )
    return [(int(f), known[f]) for f in config.features]


def _sample(ids: list[str], n: int, rng: np.random.Generator) -> list[str]:
    if len(ids) <= n:
        return ids
    return [ids[i] for i in sorted(rng.choice(len(ids), size=n, replace=False))]


@asset(
    partitions_def=comparisons_partitions,
    io_manager_key="parquet_io_manager",
    group_name="analysis",
    kinds={"pytorch", "parquet"},
    owners=OWNERS,
    metadata=column_schema("feature_effects"),
    code_version=EFFECTS_CODE_VERSION,
    pool=MODEL_POOL,
    deps=[
        AssetDep("diff_reports"),
        AssetDep("token_activations", partition_mapping=AllPartitionMapping()),
        AssetDep("raw_documents", partition_mapping=AllPartitionMapping()),
    ],
    description="Causal evidence for the diff's top token-level features: each is ablated inside the reader "
    "(nnsight) on documents where it fires; the shift of the document embedding along the feature's "
    "signature and along the comparison (and, for causal LMs, the change of next-token log-probability) is "
    "compared with frequency-matched random features and a placebo, with bootstrap intervals. Adds a "
    "'Causal evidence' section to the comparison's report.",
)
def feature_effects(
    context: AssetExecutionContext,
    config: FeatureEffectsConfig,
    sae_reader: SAEReaderResource,
    storage: StorageResource,
):
    key = context.partition_key
    a, b = parse_comparison_key(key)
    base = storage.parquet_base
    if not table_exists(base, "diff_features", key):
        raise FileNotFoundError(
            f"feature_effects [{key}]: no diff_features yet; materialize diff_reports first."
        )
    fingerprint = sae_reader.get_identity().fingerprint
    inputs = inputs_key(
        context.instance,
        [("diff_reports", key), ("token_activations", a), ("token_activations", b)],
        {"config": config.model_dump(), "reader": fingerprint},
        EFFECTS_CODE_VERSION,
    )
    reused = reuse_stored_output(context, storage, "feature_effects", key, inputs)
    if reused is not None:
        return reused

    diff = read_table(base, "diff_features", key).filter(pl.col("family") == "token").collect()
    targets = _targets(diff, config, key)
    side = {"a": a, "b": b}
    docs = {ds: stored_documents(storage, ds).select("doc_id", "text") for ds in (a, b)}
    text_of = {ds: dict(docs[ds].iter_rows()) for ds in (a, b)}
    fires = {
        (feature, ds): set(
            read_table(base, "token_activations", ds)
            .filter(pl.col("feature") == feature)
            .select("doc_id")
            .unique()
            .collect()["doc_id"]
            .to_list()
        )
        for feature, _ in targets
        for ds in (a, b)
    }
    rng = np.random.default_rng(config.seed)
    edited: dict[int, list[str]] = {}
    used: dict[str, set[str]] = {a: set(), b: set()}
    for feature, direction in targets:
        ds = side[direction]
        ids = docs[ds]["doc_id"].to_list()
        on = [d for d in ids if d in fires[(feature, ds)]]
        off = [d for d in ids if d not in fires[(feature, ds)]]
        edited[feature] = _sample(on, config.documents_per_feature, rng) + _sample(
            off, config.unaffected_documents, rng
        )
        used[ds] |= set(edited[feature])
    # Directions come from documents that are never edited.
    reference = {
        ds: _sample(
            [d for d in docs[ds]["doc_id"].to_list() if d not in used[ds]], config.reference_documents, rng
        )
        for ds in (a, b)
    }
    reader = sae_reader.get_reader()
    with reader.forward_lock:
        emb = {
            ds: effects.document_embeddings(reader, [text_of[ds][d] for d in reference[ds]]) for ds in (a, b)
        }
        plan = []
        for feature, direction in targets:
            ds, other = side[direction], side["b" if direction == "a" else "a"]
            fired = np.array([d in fires[(feature, x)] for x in (a, b) for d in reference[x]], dtype=bool)
            both = np.vstack([emb[a], emb[b]])
            try:
                signature = effects.mean_difference_direction(both[fired], both[~fired], seed=config.seed)
                comparison = effects.mean_difference_direction(emb[ds], emb[other], seed=config.seed)
            except ValueError as exc:
                context.log.warning(f"feature_effects [{key}]: feature {feature} not measured: {exc}")
                continue
            texts = [text_of[ds][d] for d in edited[feature]]
            plan.append(effects.EffectTarget(feature, direction, texts, signature, comparison))
        records = effects.feature_effects(
            reader, plan, n_controls=config.n_controls, n_boot=config.n_boot, seed=config.seed
        )
    summary = effects.effect_summary(records)
    table = records.with_columns(
        pl.lit(key).alias("comparison"),
        pl.lit(a).alias("dataset_a"),
        pl.lit(b).alias("dataset_b"),
    )
    directions = pl.DataFrame(
        [
            {
                "target_feature": t.feature,
                "signature_auc": t.signature.held_out_auc,
                "comparison_auc": t.comparison.held_out_auc,
            }
            for t in plan
        ],
        schema={"target_feature": pl.Int64, "signature_auc": pl.Float64, "comparison_auc": pl.Float64},
    )
    table = table.join(directions, on="target_feature", how="left")

    labels: dict[int, str] = {}
    for direction, ds in (("a", a), ("b", b)):
        if table_exists(base, "feature_labels", ds):
            wanted = [f for f, d in targets if d == direction]
            frame = read_table(base, "feature_labels", ds).filter(pl.col("feature").is_in(wanted)).collect()
            labels.update(dict(zip(frame["feature"].to_list(), frame["label"].to_list(), strict=True)))
    section = dict(name_a=a, name_b=b, labels=labels, n_controls=config.n_controls)
    for suffix, render, is_html in (
        ("md", reports.render_causal_markdown, False),
        ("html", reports.render_causal_html, True),
    ):
        path = storage.reports_dir / f"{key}.{suffix}"
        if path.exists():
            page = reports.with_causal_section(
                path.read_text(encoding="utf-8"), render(summary, **section), html_page=is_html
            )
            write_bytes_atomic(str(path), page.encode("utf-8"))

    shown = summary.select(
        "feature", "direction", "score_name", "documents", "effect", "controls_below", "evidence"
    )
    return Output(
        table,
        data_version=DataVersion(inputs) if inputs else None,
        metadata={
            INPUTS_KEY: inputs,
            "features_measured": summary["feature"].n_unique() if summary.height else 0,
            "features_with_evidence": int(summary["evidence"].sum()) if summary.height else 0,
            "effects": MetadataValue.md(markdown_preview(shown.to_arrow(), max_rows=shown.height)),
        },
    )
