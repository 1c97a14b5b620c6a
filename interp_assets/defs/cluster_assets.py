"""Clustering: feature_clusters (features grouped by co-activation and decoder cosine) and document_clusters
(a dataset's documents clustered on a chosen set of features), thin wiring around
`interp_assets.analysis.clustering`; both configured from the launchpad."""

import time

import polars as pl
from dagster import (
    AssetDep,
    AssetExecutionContext,
    Config,
    MetadataValue,
    Output,
    asset,
    multi_asset,
)

from interp_assets.analysis import clustering
from interp_assets.comparisons import parse_comparison_key
from interp_assets.defs.partitions import datasets_partitions
from interp_assets.defs.shared import (
    OWNERS,
    column_schema,
    recorded_d_sae,
    sae_decoder,
    side_table_output,
    table_out,
    token_activations_metadata,
)
from interp_assets.storage.parquet import (
    markdown_preview,
    read_table,
    table_exists,
    table_files,
    write_table,
)
from resources.sae_reader import SAEReaderResource
from resources.storage import StorageResource

FAMILIES = ("token", "document")


def _require(storage: StorageResource, table: str, partition: str, what: str) -> None:
    if not table_exists(storage.parquet_base, table, partition):
        raise FileNotFoundError(
            f"{what}: no {table} for {partition!r} at {storage.parquet_base}; materialize {table} for "
            "that partition first."
        )


def _d_sae(context: AssetExecutionContext, storage: StorageResource, dataset: str) -> int | None:
    """The SAE width token_activations recorded for `dataset`, else the one stored with its pooled files."""
    from interp_assets.notebook import _stored_d_sae

    recorded = recorded_d_sae(context, dataset)
    return recorded or _stored_d_sae(table_files(storage.parquet_base, "pooled_embeddings", dataset))


def _labels(storage: StorageResource, dataset: str) -> pl.DataFrame | None:
    if not table_exists(storage.parquet_base, "feature_labels", dataset):
        return None
    return read_table(storage.parquet_base, "feature_labels", dataset).collect()


def _selection(
    storage: StorageResource,
    dataset: str,
    features: list[int] | None,
    label_query: str | None,
    criterion: str | None = None,
    n_criterion_features: int = 20,
    significant_only: bool = True,
) -> list[int] | None:
    """The union of the configured feature list, label query and criterion; None when none is set."""
    if features is None and not label_query and not criterion:
        return None
    chosen = set(features or [])
    if label_query:
        _require(storage, "feature_labels", dataset, f"label_query {label_query!r}")
        chosen.update(clustering.features_matching(_labels(storage, dataset), label_query))
    if criterion:
        _require(storage, "feature_associations", dataset, f"criterion {criterion!r}")
        table = read_table(storage.parquet_base, "feature_associations", dataset).collect()
        chosen.update(
            clustering.criterion_features(
                table, criterion, n=n_criterion_features, significant_only=significant_only
            )
        )
    return sorted(chosen)


class FeatureClustersConfig(Config):
    """How features are grouped. `by`: "coactivation" (documents they fire in) and/or "decoder" (decoder
    cosine; loads the SAE of the `sae_reader` resource, which must be the one that read the dataset)."""

    by: list[str] = ["coactivation"]
    coactivation: str = "jaccard"  # or "correlation" (phi over the dataset's documents)
    min_similarity: float = 0.5  # groups merge while their mean similarity is at least this
    n_clusters: int | None = None  # or cut into this many groups instead
    min_documents: int = 5  # default features: those firing in at least this many documents
    max_doc_frequency: float = 0.5  # and in at most this share of them
    max_features: int = 5000
    features: list[int] | None = None  # and/or features whose label contains `label_query`
    label_query: str | None = None


@asset(
    partitions_def=datasets_partitions,
    io_manager_key="parquet_io_manager",
    group_name="analysis",
    kinds={"scipy", "parquet"},
    owners=OWNERS,
    metadata=column_schema("feature_clusters"),
    code_version="1",
    deps=[AssetDep("pooled_embeddings"), AssetDep("activation_status"), AssetDep("feature_labels")],
    description="Features grouped by co-activation over the dataset's documents (Jaccard or phi of the "
    "documents they fire in) and, when configured, by decoder cosine: average-linkage agglomerative "
    "clustering cut at a minimum similarity, each group named by its members' labels.",
)
def feature_clusters(
    context: AssetExecutionContext,
    config: FeatureClustersConfig,
    storage: StorageResource,
    sae_reader: SAEReaderResource,
):
    dataset = context.partition_key
    started = time.perf_counter()
    _require(storage, "pooled_embeddings", dataset, "feature_clusters")
    decoder = None
    if "decoder" in config.by:
        decoder = _decoder(context, dataset, sae_reader)
    status = read_table(storage.parquet_base, "activation_status", dataset)
    n_docs = int(status.filter(pl.col("status") == "encoded").select(pl.len()).collect().item())
    try:
        table = clustering.feature_clusters(
            read_table(storage.parquet_base, "pooled_embeddings", dataset),
            decoder=decoder,
            features=_selection(storage, dataset, config.features, config.label_query),
            labels=_labels(storage, dataset),
            by=config.by,
            coactivation=config.coactivation,
            n_docs=n_docs,
            min_similarity=config.min_similarity,
            n_clusters=config.n_clusters,
            min_documents=config.min_documents,
            max_doc_frequency=config.max_doc_frequency,
            max_features=config.max_features,
            n_features=_d_sae(context, storage, dataset) if decoder is None else None,
        )
    except ValueError as exc:
        raise ValueError(f"feature_clusters for {dataset!r}: {exc} (asset config, launchpad)") from exc
    groups = (
        table.filter(pl.col("size") > 1)
        .group_by("by", "cluster", maintain_order=True)
        .agg(pl.col("size").first(), pl.col("name").first(), pl.col("feature").head(8).alias("features"))
    )
    return Output(
        table.select(pl.lit(dataset).alias("dataset"), pl.all()),
        metadata={
            "features": table.select("feature").n_unique(),
            "groups_of_two_or_more": MetadataValue.json(
                {b: int(groups.filter(pl.col("by") == b).height) for b in config.by}
            ),
            "largest_groups": MetadataValue.md(
                markdown_preview(
                    groups.head(20)
                    .with_columns(pl.col("features").cast(pl.List(pl.String)).list.join(", "))
                    .to_arrow(),
                    max_rows=20,
                )
            ),
            "seconds": round(time.perf_counter() - started, 2),
        },
    )


def _decoder(context: AssetExecutionContext, dataset: str, sae_reader: SAEReaderResource):
    """The decoder of the configured SAE, after checking it is the SAE that read `dataset`."""
    recorded = token_activations_metadata(context, dataset).get("reader_fingerprint")
    current = sae_reader.get_identity().fingerprint
    if recorded is not None and recorded != current:
        raise ValueError(
            f"feature_clusters for {dataset!r}: the sae_reader resource ({current}) is not the reader that "
            f"made this dataset's features ({recorded}); configure that reader, re-materialize "
            "token_activations, or drop 'decoder' from `by`."
        )
    return sae_decoder(sae_reader)


class DocumentClustersConfig(Config):
    """How the dataset's documents are clustered. Features: the union of `features`, those whose label
    contains `label_query` and the top `n_criterion_features` of `criterion` (a feature_associations
    criterion, e.g. `topic=billing`); none set: every feature that fires. `family`: "token" (the reader's
    SAE, pooled_embeddings) or "document" (the document SAE of `comparison`, document_features)."""

    n_clusters: int = 8
    features: list[int] | None = None
    label_query: str | None = None
    criterion: str | None = None
    n_criterion_features: int = 20
    significant_only: bool = True  # criterion: only features significantly associated with it
    family: str = "token"
    comparison: str | None = None  # family "document": the comparison whose document SAE to use
    aggregation: str = "max"
    top_n: int = 10  # distinguishing features per cluster
    seed: int = 0


def _token_family_input(
    context: AssetExecutionContext, storage: StorageResource, dataset: str, config: DocumentClustersConfig
):
    """(pooled_embeddings, encoded doc_ids, SAE width, feature_labels, chosen features) of `dataset`."""
    for table in ("pooled_embeddings", "activation_status"):
        _require(storage, table, dataset, "document_clusters")
    base = storage.parquet_base
    status = read_table(base, "activation_status", dataset).filter(pl.col("status") == "encoded")
    features = _selection(
        storage,
        dataset,
        config.features,
        config.label_query,
        config.criterion,
        config.n_criterion_features,
        config.significant_only,
    )
    return (
        read_table(base, "pooled_embeddings", dataset),
        status.select("doc_id").collect()["doc_id"].to_numpy(),
        _d_sae(context, storage, dataset),
        _labels(storage, dataset),
        features,
    )


def _document_family_input(storage: StorageResource, dataset: str, config: DocumentClustersConfig):
    """(document features of `dataset` as pooled rows, doc_ids, SAE width) from the comparison's tables."""
    key = config.comparison
    if not key:
        raise ValueError(
            "family 'document' needs `comparison` (a comparison A__vs__B with this dataset, whose "
            "document_features are materialized)."
        )
    if dataset not in parse_comparison_key(key):
        raise ValueError(f"comparison {key!r} does not include this dataset.")
    if config.label_query or config.criterion:
        raise ValueError(
            "label_query and criterion pick token-level features; with family 'document' list the "
            "document features in `features`."
        )
    _require(storage, "document_features", key, "document_clusters")
    base = storage.parquet_base
    pooled = (
        read_table(base, "document_features", key)
        .filter(pl.col("dataset") == dataset)
        .select("doc_id", "feature", pl.col("activation").alias("max_activation"))
    )
    n_features = read_table(base, "document_sae", key).select("n_features").collect().item()
    return pooled, None, int(n_features)


@multi_asset(
    name="document_clusters",
    partitions_def=datasets_partitions,
    outs={
        "document_clusters": table_out(
            "document_clusters",
            group="analysis",
            kinds={"scipy", "parquet"},
            code_version="1",
            description="The dataset's documents clustered on a chosen set of features (a list, a label "
            "query, a criterion's top features; or a comparison's document features): TF-IDF weighted, "
            "spherical k-means.",
        ),
        "document_cluster_features": table_out(
            "document_cluster_features",
            group="analysis",
            kinds={"scipy", "parquet"},
            code_version="1",
            description="Each document cluster's distinguishing features with their firing rates inside and "
            "outside the cluster. Written by the document_clusters step.",
        ),
    },
    deps=[
        AssetDep("pooled_embeddings"),
        AssetDep("activation_status"),
        AssetDep("feature_labels"),
        AssetDep("feature_associations"),
    ],
)
def document_clusters(
    context: AssetExecutionContext, config: DocumentClustersConfig, storage: StorageResource
):
    dataset = context.partition_key
    started = time.perf_counter()
    base = storage.parquet_base
    if config.family not in FAMILIES:
        raise ValueError(f"document_clusters: family must be one of {list(FAMILIES)}; got {config.family!r}.")
    try:
        if config.family == "token":
            pooled, doc_ids, n_features, labels, features = _token_family_input(
                context, storage, dataset, config
            )
        else:
            pooled, doc_ids, n_features = _document_family_input(storage, dataset, config)
            labels, features = None, config.features
        result = clustering.document_clusters(
            pooled,
            config.n_clusters,
            features=features,
            doc_ids=doc_ids,
            n_features=n_features,
            aggregation=config.aggregation,
            labels=labels,
            top_n=config.top_n,
            seed=config.seed,
            what=f"{config.family}-level features of {dataset!r}",
        )
    except ValueError as exc:
        raise ValueError(f"document_clusters for {dataset!r}: {exc} (asset config, launchpad)") from exc
    identity = [pl.lit(dataset).alias("dataset"), pl.lit(config.family).alias("family")]
    names = result.clusters.select("cluster", "size", pl.col("name").alias("cluster_name"))
    written = write_table(
        base,
        "document_cluster_features",
        dataset,
        result.features.join(names, on="cluster", how="left", maintain_order="left").select(
            *identity, "cluster", "size", "cluster_name", pl.exclude("cluster", "size", "cluster_name")
        ),
    )
    top = pl.col("top_features").list.head(5).cast(pl.List(pl.String)).list.join(", ")
    shown = result.clusters.select("cluster", "size", "name", top)
    unclustered = int(result.documents["cluster"].null_count())
    yield Output(
        result.documents.join(
            names.select("cluster", "cluster_name"), on="cluster", how="left", maintain_order="left"
        ).select(*identity, pl.all()),
        output_name="document_clusters",
        metadata={
            "family": config.family,
            "n_clusters": config.n_clusters,
            "documents_clustered": result.documents.height - unclustered,
            "documents_unclustered": unclustered,
            "features_used": len(result.features_used),
            "features_silent": len(result.features_silent),
            "clusters": MetadataValue.md(markdown_preview(shown.to_arrow(), max_rows=shown.height)),
            "seconds": round(time.perf_counter() - started, 2),
        },
    )
    yield side_table_output("document_cluster_features", written)
