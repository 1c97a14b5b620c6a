"""Analysis: feature_associations (features vs metadata columns) and diff_reports (dataset A vs B) with its
per-feature table diff_features."""

import json

import polars as pl
from dagster import (
    AllPartitionMapping,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    Config,
    DataVersion,
    MetadataValue,
    Output,
    asset,
    multi_asset,
)

from interp_assets.analysis import associations, diffing, reports
from interp_assets.comparisons import find_comparison, parse_comparison_key
from interp_assets.defs.partitions import comparisons_partitions, datasets_partitions
from interp_assets.defs.shared import (
    INPUTS_KEY,
    OWNERS,
    column_schema,
    dataset_settings,
    encoded_doc_count,
    inputs_key,
    label_cache,
    recorded_d_sae,
    reuse_stored_output,
    side_table_output,
    stored_documents,
    table_out,
)
from interp_assets.engine.documents import document_feature_spans
from interp_assets.labels import labeling
from interp_assets.storage.parquet import (
    markdown_preview,
    read_table,
    read_token_activations_wide,
    table_exists,
    write_bytes_atomic,
    write_table,
)
from resources.storage import StorageResource

ASSOCIATIONS_CODE_VERSION = "1"
DIFF_REPORTS_CODE_VERSION = "2"  # 2: exact min-p within a feature (adaptive firing)


class FeatureAssociationsConfig(Config):
    """Which metadata columns to relate to features. Per-dataset `association_columns` take precedence."""

    columns: list[str] | None = None  # None: every boolean, numeric, date or few-valued text column
    aggregation: str = "max"
    alpha: float = 0.05
    max_levels: int = 20


@asset(
    partitions_def=datasets_partitions,
    io_manager_key="parquet_io_manager",
    group_name="analysis",
    kinds={"scipy", "parquet"},
    owners=OWNERS,
    metadata=column_schema("feature_associations"),
    code_version=ASSOCIATIONS_CODE_VERSION,
    deps=[AssetDep("raw_documents"), AssetDep("pooled_embeddings"), AssetDep("activation_status")],
    description="Which features go with each metadata column (criterion): AUC for boolean columns and "
    "each level of a few-valued text column, correlation for numeric and date columns, with BH FDR per "
    "criterion. Join feature_labels on (dataset, feature) for names.",
)
def feature_associations(
    context: AssetExecutionContext, config: FeatureAssociationsConfig, storage: StorageResource
):
    dataset = context.partition_key
    base = storage.parquet_base
    columns = dataset_settings(storage, dataset).get("association_columns", config.columns)
    key = inputs_key(
        context.instance,
        [("raw_documents", dataset), ("token_activations", dataset), ("pooled_embeddings", dataset)],
        {"config": config.model_dump(), "columns": columns},
        ASSOCIATIONS_CODE_VERSION,
    )
    reused = reuse_stored_output(context, storage, "feature_associations", dataset, key)
    if reused is not None:
        return reused
    docs = stored_documents(storage, dataset)
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
        data_version=DataVersion(key) if key else None,
        metadata={
            INPUTS_KEY: key,
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
    firing: str = diffing.REPORT_FIRING  # "adaptive" (label-blind thresholds per feature) or "fixed"
    within_feature: str = "exact"  # adaptive: exact min-p over a feature's thresholds, or "bonferroni"
    document_family: bool = True  # also compare the comparison's document_features, when materialized


# What each of the step's tables reads: both datasets' tables (AllPartitionMapping: a comparison names its
# datasets only at run time) and its own comparison's document SAE and features; the report also names and
# scores its top features, and renders the diff.
_DATASET_TABLES = ("raw_documents", "token_activations", "pooled_embeddings", "activation_status")
_COMPARISON_TABLES = ("document_sae", "document_features")
_REPORT_ONLY = ("feature_labels", "feature_scores", "tokens")  # tokens: the examples' spans


@multi_asset(
    name="diff_reports",
    partitions_def=comparisons_partitions,
    outs={
        "diff_features": table_out(
            "diff_features",
            group="analysis",
            kinds={"polars", "parquet"},
            code_version=DIFF_REPORTS_CODE_VERSION,
            description="Dataset A against dataset B, one row per (family, feature) active in either: "
            "frequencies, difference with interval, p and BH q value, direction. Written by the diff_reports "
            "step; the report shows its top rows.",
        ),
        "diff_reports": table_out(
            "diff_reports",
            group="analysis",
            kinds={"polars", "parquet"},
            code_version=DIFF_REPORTS_CODE_VERSION,
            description="Dataset A against dataset B: per-feature frequencies, differences with intervals, "
            "two-sided tests with Benjamini-Hochberg FDR (paired when declared), and a Markdown + HTML "
            "report.",
        ),
    },
    deps=[
        *(AssetDep(t, partition_mapping=AllPartitionMapping()) for t in (*_DATASET_TABLES, *_REPORT_ONLY)),
        *(AssetDep(t) for t in _COMPARISON_TABLES),
    ],
    internal_asset_deps={
        "diff_features": {AssetKey(t) for t in (*_DATASET_TABLES, *_COMPARISON_TABLES)},
        "diff_reports": {
            AssetKey(t) for t in (*_DATASET_TABLES, *_COMPARISON_TABLES, *_REPORT_ONLY, "diff_features")
        },
    },
    check_specs=[AssetCheckSpec("report_features_labeled", asset="diff_reports")],
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
    inputs = _diff_inputs_key(context, config, storage, comparison, key)
    reused = _reuse_diff(context, storage, key, inputs)
    if reused is not None:
        yield from reused
        return
    pooled_a, pooled_b = read_table(base, "pooled_embeddings", a), read_table(base, "pooled_embeddings", b)
    n_a, n_b = encoded_doc_count(storage, a), encoded_doc_count(storage, b)
    d_sae = recorded_d_sae(context, a)
    docs_a, docs_b = stored_documents(storage, a), stored_documents(storage, b)
    if comparison.paired_on:
        pairs = diffing.pairs_from_key(docs_a, docs_b, comparison.paired_on)
        diff = diffing.paired_diff_features(
            pooled_a, pooled_b, pairs, threshold=config.threshold, alpha=config.alpha, n_features=d_sae
        )
    else:
        diff = diffing.diff_features(
            pooled_a,
            n_a,
            pooled_b,
            n_b,
            threshold=config.threshold,
            alpha=config.alpha,
            n_features=d_sae,
            firing=config.firing,
            within_feature=config.within_feature,
        )
    document = (
        _document_family(storage, key, a, b, docs_a, docs_b, comparison.paired_on, config)
        if config.document_family and table_exists(base, "document_features", key)
        else None
    )
    identity = [pl.lit(key).alias("comparison"), pl.lit(a).alias("dataset_a"), pl.lit(b).alias("dataset_b")]
    diff = diff.with_columns(*identity, pl.lit("token").alias("family"))
    stored = [diff]
    if document is not None:
        document["diff"] = document["diff"].with_columns(*identity, pl.lit("document").alias("family"))
        stored.append(document["diff"])
    written = write_table(base, "diff_features", key, pl.concat(stored, how="diagonal_relaxed"))
    # before diff_reports, which reads it
    version = DataVersion(inputs) if inputs else None  # what it was computed from, settings included
    yield side_table_output("diff_features", written, version, metadata={INPUTS_KEY: inputs})

    labels, scores = _report_labels(storage, diff, a, b, config.top_n)
    top = reports.top_features(diff, config.top_n)
    top_ids = [int(f) for d in ("a", "b") for f in top[d]["feature"].to_list()]
    ta_a = read_token_activations_wide(base, a, top_ids)
    ta_b = read_token_activations_wide(base, b, top_ids)
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
    if document is not None:
        common["title"] = f"{a} vs {b}: token-level SAE features"
    markdown = reports.render_markdown(diff, **common)
    html = reports.render_html(diff, **common)
    if document is not None:
        doc_common = common | {
            "labels": document["labels"],
            "scores": None,
            "examples": document["examples"],
            "n_features": document["n_features"],
            "title": f"{a} vs {b}: document-level features (document SAE trained on both, label-blind)",
        }
        markdown += "\n" + reports.render_markdown(document["diff"], **doc_common)
        html = reports.combine_html(html, reports.render_html(document["diff"], **doc_common))
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
            "document_significant_a": [document["significant"]["a"] if document else None],
            "document_significant_b": [document["significant"]["b"] if document else None],
            "document_top_features_a": [json.dumps(document["top"]["a"]) if document else None],
            "document_top_features_b": [json.dumps(document["top"]["b"]) if document else None],
        },
        schema_overrides={
            "paired_on": pl.String,
            "document_significant_a": pl.Int64,
            "document_significant_b": pl.Int64,
            "document_top_features_a": pl.String,
            "document_top_features_b": pl.String,
        },
    )
    yield Output(
        row,
        output_name="diff_reports",
        data_version=version,
        metadata={
            INPUTS_KEY: inputs,
            "report": MetadataValue.md(markdown[:60000]),
            "report_html": MetadataValue.path(str(html_path.resolve())),
            "significant_a": row["significant_a"][0],
            "significant_b": row["significant_b"][0],
            "document_significant_a": row["document_significant_a"][0],
            "document_significant_b": row["document_significant_b"][0],
            "paired_on": comparison.paired_on or "",
        },
    )
    yield _labeled_check(top_ids, labels)


def _labeled_check(top_ids: list[int], labels: pl.DataFrame | None) -> AssetCheckResult:
    """report_features_labeled: every top feature of the report has a label."""
    labeled = set(labels["feature"].to_list()) if labels is not None else set()
    unlabeled = [f for f in top_ids if f not in labeled]
    return AssetCheckResult(
        check_name="report_features_labeled",
        passed=not unlabeled,
        severity=AssetCheckSeverity.WARN,
        metadata={"unlabeled_top_features": MetadataValue.json(unlabeled)},
    )


def _diff_inputs_key(
    context: AssetExecutionContext,
    config: DiffReportsConfig,
    storage: StorageResource,
    comparison: object,
    key: str,
) -> str | None:
    """What the comparison's diff and report are computed from: the data versions of every table they read
    that exists (which ones exist is part of the key: labels appearing later change it), the config, the
    comparison's declaration and the code version."""
    base = storage.parquet_base
    a, b = parse_comparison_key(key)
    wanted = [(t, ds) for ds in (a, b) for t in (*_DATASET_TABLES, *_REPORT_ONLY)]
    wanted += [(t, key) for t in _COMPARISON_TABLES]
    present = [(t, p) for t, p in wanted if table_exists(base, t, p)]
    settings = {"config": config.model_dump(), "comparison": repr(comparison), "present": present}
    return inputs_key(context.instance, present, settings, DIFF_REPORTS_CODE_VERSION)


def _reuse_diff(
    context: AssetExecutionContext, storage: StorageResource, key: str, inputs: str | None
) -> list | None:
    """The step's events when diff_features, diff_reports and both report files are kept as they are
    (`reuse_stored_output`; the label check evaluated again on the stored top features), else None."""
    features, report = (
        reuse_stored_output(context, storage, table, key, inputs, output_name=table)
        for table in ("diff_features", "diff_reports")
    )
    files = [storage.reports_dir / f"{key}.{suffix}" for suffix in ("md", "html")]
    if features is None or report is None or not all(f.exists() for f in files):
        return None
    row = read_table(storage.parquet_base, "diff_reports", key).collect().row(0, named=True)
    top = {d: [int(f) for f in json.loads(row[f"top_features_{d}"])] for d in ("a", "b")}
    labels = _top_rows(storage, "feature_labels", top, *parse_comparison_key(key))
    return [features, report, _labeled_check(top["a"] + top["b"], pl.concat(labels) if labels else None)]


def _top_rows(
    storage: StorageResource, table: str, top: dict[str, list[int]], a: str, b: str
) -> list[pl.DataFrame]:
    """The rows of `table` (feature_labels, feature_scores) for the report's top features `top` (by
    direction), each direction's from its own dataset, where that dataset has the table."""
    base = storage.parquet_base
    return [
        read_table(base, table, ds).filter(pl.col("feature").is_in(top[d])).collect()
        for d, ds in (("a", a), ("b", b))
        if table_exists(base, table, ds)
    ]


def _report_labels(
    storage: StorageResource, diff: pl.DataFrame, a: str, b: str, top_n: int
) -> tuple[pl.DataFrame | None, pl.DataFrame | None]:
    """Labels and scores of the report's top features, each from the dataset where it is more frequent."""
    top = {d: frame["feature"].to_list() for d, frame in reports.top_features(diff, top_n).items()}
    label_parts = _top_rows(storage, "feature_labels", top, a, b)
    score_parts = _top_rows(storage, "feature_scores", top, a, b)
    labels = (
        pl.concat(label_parts, how="diagonal_relaxed").unique("feature", keep="first")
        if label_parts
        else None
    )
    scores = pl.concat(score_parts, how="diagonal_relaxed") if score_parts else None
    return labels, scores


def _document_family(
    storage: StorageResource,
    key: str,
    a: str,
    b: str,
    docs_a: pl.DataFrame,
    docs_b: pl.DataFrame,
    paired_on: str | None,
    config: DiffReportsConfig,
) -> dict:
    """The comparison's document-level diff, its top features' offline labels and report excerpts."""
    base = storage.parquet_base
    features = read_table(base, "document_features", key).collect()
    sae = read_table(base, "document_sae", key).collect().row(0, named=True)
    side = {
        ds: features.filter(pl.col("dataset") == ds).select(
            "doc_id", "feature", pl.col("activation").alias("max_activation")
        )
        for ds in (a, b)
    }
    if paired_on:
        diff = diffing.paired_diff_features(
            side[a],
            side[b],
            diffing.pairs_from_key(docs_a, docs_b, paired_on),
            alpha=config.alpha,
            n_features=sae["n_features"],
        )
    else:
        diff = diffing.diff_features(
            side[a],
            docs_a.height,
            side[b],
            docs_b.height,
            alpha=config.alpha,
            n_features=sae["n_features"],
            firing=config.firing,
            within_feature=config.within_feature,
        )
    top = reports.top_features(diff, config.top_n)
    spans = {
        ds: document_feature_spans(features.filter(pl.col("dataset") == ds), docs)
        for ds, docs in ((a, docs_a), (b, docs_b))
    }
    labels = []
    for direction, ds, docs in (("a", a, docs_a), ("b", b, docs_b)):
        chosen = top[direction]["feature"].to_list()
        if chosen:
            labels.append(
                labeling.label_features(
                    spans[ds],
                    docs,
                    chosen,
                    dataset=ds,
                    sae_id=f"document_sae:{sae['training_hash']}",
                    cache=label_cache(storage),
                    selected_because={f: "document_diff" for f in chosen},
                )
            )
    labels_frame = pl.concat(labels, how="diagonal_relaxed") if labels else None
    if labels_frame is not None:  # the top features' names travel with the stored diff rows
        names = labels_frame.select(pl.col("feature").cast(pl.Int32), "label").unique("feature", keep="first")
        diff = diff.join(names, on="feature", how="left", maintain_order="left")
    significant = diff.filter(pl.col("significant"))
    return {
        "diff": diff,
        "n_features": int(sae["n_features"]),
        "labels": labels_frame,
        "examples": reports.report_examples(
            diff, spans[a], docs_a, spans[b], docs_b, top_n=config.top_n, n=config.examples_per_feature
        ),
        "significant": {d: significant.filter(pl.col("direction") == d).height for d in ("a", "b")},
        "top": {d: top[d]["feature"].to_list() for d in ("a", "b")},
    }
