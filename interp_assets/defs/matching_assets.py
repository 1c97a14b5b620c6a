"""Extra readers and feature_matches: thin Dagster wiring around `interp_assets.defs.readers` (the config) and
`interp_assets.analysis.matching` (the matching).

Per extra reader `r` (`<data_dir>/config/readers.json`) an asset factory builds `r/token_activations` (with
its side tables `r/tokens` and `r/activation_status`) and `r/pooled_embeddings`, partitioned by dataset:
the default reader's asset bodies, with the reader resource `sae_reader__r` and the tables under
`<parquet base>/readers/r/` (IO manager `parquet_io_manager__r`), so nothing collides with the default
reader's tables; both share the activation cache, keyed by the reader's fingerprint. `feature_matches` (one
table per dataset) matches each extra reader's features with those of the reader named by its `match_with`
(default: the default reader) on the documents both encoded.
"""

from typing import Any

import polars as pl
from dagster import (
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    AssetsDefinition,
    AssetSelection,
    DagsterRunStatus,
    DefaultSensorStatus,
    Output,
    RunRequest,
    RunStatusSensorContext,
    SkipReason,
    asset,
    define_asset_job,
    multi_asset,
    run_status_sensor,
)

from interp_assets.defs.feature_assets import pool_embeddings, read_token_activations
from interp_assets.defs.jobs import EXECUTOR, dataset_job
from interp_assets.defs.partitions import datasets_partitions
from interp_assets.defs.readers import DEFAULT_READER, READERS_FILE, ExtraReader
from interp_assets.defs.shared import (
    MODEL_POOL,
    MODEL_STEP_TAGS,
    OWNERS,
    column_schema,
    label_cache,
    sae_decoder,
    stored_documents,
    table_out,
)
from interp_assets.engine.pooling import POOLING_VERSION
from interp_assets.engine.reader import ENGINE_VERSION
from interp_assets.labels import labeling
from interp_assets.storage.parquet import read_table, read_token_activations_wide, table_exists
from interp_assets.storage.paths import reader_parquet_base
from io_managers.parquet import ParquetIOManager
from resources.sae_reader import SAEReaderResource
from resources.storage import StorageResource

MATCHING_VERSION = "2"  # 2: offline labels and label similarity of the strongest matches
LABELED_MATCHES = 50  # the strongest one-to-one matches whose two features are labeled and compared


def reader_resource_key(reader: str) -> str:
    """The resource key of a reader: `sae_reader` for the default one, `sae_reader__<name>` otherwise."""
    return "sae_reader" if reader == DEFAULT_READER else f"sae_reader__{reader}"


def reader_io_manager_key(reader: str) -> str:
    """The IO manager key of an extra reader's tables: `parquet_io_manager__<name>`."""
    return f"parquet_io_manager__{reader}"


def reader_asset_key(reader: str, asset_name: str) -> AssetKey:
    """`pooled_embeddings` for the default reader, `<name>/pooled_embeddings` for an extra one."""
    return AssetKey(asset_name) if reader == DEFAULT_READER else AssetKey([reader, asset_name])


def reader_storage(storage: StorageResource, reader: str) -> StorageResource:
    """`storage` with the reader's Parquet base (`<base>/readers/<name>`; the default reader's is `<base>`);
    landing, config and caches stay shared."""
    if reader == DEFAULT_READER:
        return storage
    return StorageResource(
        data_dir=storage.data_dir,
        parquet_base_url=reader_parquet_base(storage.parquet_base, reader),
        activation_cache_url=storage.activation_cache_url,
    )


def reader_resources(readers: dict[str, ExtraReader], parquet_base: str) -> dict[str, Any]:
    """Each extra reader's `SAEReaderResource` and Parquet IO manager (under `parquet_base`'s
    `readers/<name>`), to add to the Definitions' resources."""
    out: dict[str, Any] = {}
    for reader in readers.values():
        out[reader_resource_key(reader.name)] = SAEReaderResource(**reader.settings)
        out[reader_io_manager_key(reader.name)] = ParquetIOManager(
            base_path=reader_parquet_base(parquet_base, reader.name)
        )
    return out


def _loaded_reader(context: AssetExecutionContext, reader: str) -> SAEReaderResource:
    """The reader's resource, its identity checked: a reader that cannot be read fails naming it and the
    file that declares it."""
    resource = getattr(context.resources, reader_resource_key(reader))
    try:
        resource.get_identity()
    except (OSError, ValueError) as exc:
        where = "INTERP_MODEL / INTERP_SAE_*" if reader == DEFAULT_READER else f"config/{READERS_FILE}"
        raise ValueError(
            f"Reader {reader!r} cannot be loaded: {exc} Fix its settings in {where} (under the data dir)."
        ) from exc
    return resource


def _token_activations_asset(reader: ExtraReader) -> AssetsDefinition:
    key = reader_asset_key(reader.name, "token_activations")
    where = f"config/{READERS_FILE}"

    @multi_asset(
        name=f"{reader.name}__token_activations",
        ins={"raw_documents": AssetIn("raw_documents")},
        partitions_def=datasets_partitions,
        outs={
            "token_activations": table_out(
                "token_activations",
                io_manager_key=reader_io_manager_key(reader.name),
                key=key,
                group="features",
                kinds={"pytorch", "parquet"},
                code_version=ENGINE_VERSION,
                description=f"token_activations of extra reader {reader.name!r} ({where}): every nonzero "
                "SAE activation of every pooled token, as the default reader's, stored under "
                f"readers/{reader.name}/.",
            ),
            "tokens": table_out(
                "tokens",
                io_manager_key=reader_io_manager_key(reader.name),
                key=reader_asset_key(reader.name, "tokens"),
                group="features",
                kinds={"pytorch", "parquet"},
                code_version=ENGINE_VERSION,
                description=f"tokens of extra reader {reader.name!r} ({where}): the text and offsets of "
                "every token with a nonzero activation, as the default reader's.",
            ),
            "activation_status": table_out(
                "activation_status",
                io_manager_key=reader_io_manager_key(reader.name),
                key=reader_asset_key(reader.name, "activation_status"),
                group="features",
                kinds={"pytorch", "parquet"},
                code_version=ENGINE_VERSION,
                description=f"activation_status of extra reader {reader.name!r} ({where}): every document "
                "accounted for by its model step, encoded or rejected with the reason.",
            ),
        },
        pool=MODEL_POOL,
        op_tags=MODEL_STEP_TAGS,
        required_resource_keys={"storage", reader_resource_key(reader.name)},
        check_specs=[
            AssetCheckSpec("every_document_accounted_for", asset=key, blocking=True),
            AssetCheckSpec("activations_finite_and_positive", asset=key, blocking=True),
        ],
    )
    def _asset(context: AssetExecutionContext, raw_documents: pl.LazyFrame):
        sae_reader = _loaded_reader(context, reader.name)
        storage = reader_storage(context.resources.storage, reader.name)
        # document_embeddings are the default reader's: this reader's pass does not make them
        yield from read_token_activations(context, raw_documents, sae_reader, storage, embed_documents=False)

    return _asset


def _pooled_embeddings_asset(reader: ExtraReader) -> AssetsDefinition:
    key = reader_asset_key(reader.name, "pooled_embeddings")

    @asset(
        key=key,
        partitions_def=datasets_partitions,
        io_manager_key=reader_io_manager_key(reader.name),
        group_name="features",
        kinds={"polars", "parquet"},
        owners=OWNERS,
        metadata=column_schema("pooled_embeddings"),
        code_version=POOLING_VERSION,
        deps=[
            AssetDep(reader_asset_key(reader.name, "token_activations")),
            AssetDep(reader_asset_key(reader.name, "activation_status")),
        ],
        required_resource_keys={"storage"},
        check_specs=[AssetCheckSpec("pooled_statistics_consistent", asset=key)],
        description=f"pooled_embeddings of extra reader {reader.name!r}: per (document, feature) max, sum "
        f"and count of active tokens, as the default reader's, stored under readers/{reader.name}/.",
    )
    def _asset(context: AssetExecutionContext):
        yield from pool_embeddings(context, reader_storage(context.resources.storage, reader.name))

    return _asset


def _encoded_documents(storage: StorageResource, reader: str, dataset: str) -> tuple[pl.DataFrame, Any]:
    """(doc_id, doc_hash) of the documents `reader` encoded in `dataset`, and its pooled_embeddings rows."""
    base = reader_storage(storage, reader).parquet_base
    for table in ("activation_status", "pooled_embeddings"):
        if not table_exists(base, table, dataset):
            asset_key = reader_asset_key(reader, "pooled_embeddings").to_user_string()
            raise FileNotFoundError(
                f"feature_matches [{dataset}]: reader {reader!r} has no {table} for dataset {dataset!r} "
                f"under {base}: materialize {asset_key} (and its token_activations) for partition "
                f"{dataset!r} first."
            )
    status = read_table(base, "activation_status", dataset)
    encoded = status.filter(pl.col("status") == "encoded").select("doc_id", "doc_hash").collect()
    pooled = read_table(base, "pooled_embeddings", dataset).select("doc_id", "feature", "max_activation")
    return encoded, pooled


def same_residual_space(a: SAEReaderResource, b: SAEReaderResource) -> bool:
    """Whether two readers' SAEs read one residual stream: same model (name and configuration) and hook."""
    ia, ib = a.get_identity().identity, b.get_identity().identity
    return all(ia.get(k) == ib.get(k) for k in ("model", "model_config", "hook"))


def match_pair(
    context: AssetExecutionContext, storage: StorageResource, reader_a: str, reader_b: str
) -> pl.DataFrame:
    """feature_matches rows of reader A's features against reader B's on one dataset partition."""
    from interp_assets.analysis.matching import document_signatures, match_features

    dataset = context.partition_key
    res_a, res_b = _loaded_reader(context, reader_a), _loaded_reader(context, reader_b)
    docs_a, pooled_a = _encoded_documents(storage, reader_a, dataset)
    docs_b, pooled_b = _encoded_documents(storage, reader_b, dataset)
    common = docs_a.join(docs_b, on=["doc_id", "doc_hash"], how="inner").sort("doc_id")
    if common.height < 2:
        raise ValueError(
            f"feature_matches [{dataset}]: readers {reader_a!r} and {reader_b!r} have {common.height} "
            f"document(s) in common (encoded by both, same doc_id and text; {docs_a.height} and "
            f"{docs_b.height} encoded) and matching needs at least 2. Materialize "
            f"{reader_asset_key(reader_a, 'token_activations').to_user_string()} and "
            f"{reader_asset_key(reader_b, 'token_activations').to_user_string()} for {dataset!r} after the "
            "same raw_documents (their activation_status tables say which documents were rejected)."
        )
    ids = common["doc_id"].to_list()
    d_a, d_b = res_a.get_identity().d_sae, res_b.get_identity().d_sae
    try:
        sig_a = document_signatures(pooled_a.collect(), ids, d_a)
        sig_b = document_signatures(pooled_b.collect(), ids, d_b)
    except ValueError as exc:
        raise ValueError(f"feature_matches [{dataset}] ({reader_a} vs {reader_b}): {exc}") from exc
    shared = same_residual_space(res_a, res_b)
    decoders = {}
    if shared:
        dec_a, dec_b = sae_decoder(res_a), sae_decoder(res_b)
        if dec_a.shape[1] == dec_b.shape[1]:
            decoders = {"decoder_a": dec_a, "decoder_b": dec_b}
    table = match_features(sig_a, sig_b, **decoders)
    if "decoder_cosine" not in table.columns:
        table = table.with_columns(pl.lit(None, dtype=pl.Float64).alias("decoder_cosine"))
    table = table.join(
        _label_similarity(storage, dataset, (reader_a, res_a), (reader_b, res_b), table),
        on="feature_a",
        how="left",
    )
    context.log.info(
        f"feature_matches [{dataset}]: {reader_a} ({d_a} features) vs {reader_b} ({d_b}) over "
        f"{len(ids)} documents; decoder cosine {'computed' if decoders else 'not comparable'}"
    )
    return table.select(
        pl.lit(dataset).alias("dataset"),
        pl.lit(reader_a).alias("reader_a"),
        pl.lit(reader_b).alias("reader_b"),
        "feature_a",
        "match_b",
        "match_correlation",
        "best_b",
        "best_correlation",
        "decoder_cosine",
        "label_a",
        "label_b",
        "label_similarity",
        pl.lit(len(ids), dtype=pl.Int64).alias("documents"),
    )


def _offline_labels(
    storage: StorageResource,
    docs: pl.DataFrame,
    dataset: str,
    reader: str,
    resource: SAEReaderResource,
    features: list[int],
) -> dict[int, str]:
    """Offline labels (`labeling.label_features`, cached like feature_labels') of `features` of `reader`
    on `dataset` (`docs`: its raw_documents), as "label: description"."""
    base = reader_storage(storage, reader).parquet_base
    acts = read_token_activations_wide(base, dataset, features).collect()
    labels = labeling.label_features(
        acts,
        docs,
        features,
        dataset=dataset,
        sae_id=resource.get_identity().fingerprint,
        cache=label_cache(storage),
    )
    return {
        int(f): f"{label}: {description}" if description and description != label else str(label)
        for f, label, description in labels.select("feature", "label", "description").iter_rows()
    }


def _label_similarity(
    storage: StorageResource,
    dataset: str,
    a: tuple[str, SAEReaderResource],
    b: tuple[str, SAEReaderResource],
    table: pl.DataFrame,
) -> pl.DataFrame:
    """feature_a, label_a, label_b, label_similarity for the `LABELED_MATCHES` strongest one-to-one matches:
    both features labeled offline on this dataset, and the cosine of the two labels' sentence embeddings
    (1 for identical labels)."""
    from interp_assets.labels.embedding import sentence_embeddings

    top = (
        table.filter(pl.col("match_b").is_not_null())
        .sort("match_correlation", descending=True)
        .head(LABELED_MATCHES)
    )
    empty = pl.DataFrame(
        schema={
            "feature_a": pl.Int32,
            "label_a": pl.String,
            "label_b": pl.String,
            "label_similarity": pl.Float64,
        }
    )
    if top.is_empty():
        return empty
    feats_a, feats_b = top["feature_a"].to_list(), top["match_b"].to_list()
    docs = stored_documents(storage, dataset)
    labels_a = _offline_labels(storage, docs, dataset, a[0], a[1], feats_a)
    labels_b = _offline_labels(storage, docs, dataset, b[0], b[1], feats_b)
    text_a = [labels_a.get(int(f), "") for f in feats_a]
    text_b = [labels_b.get(int(f), "") for f in feats_b]
    vectors = sentence_embeddings([*text_a, *text_b])
    similarity = (vectors[: len(text_a)] * vectors[len(text_a) :]).sum(axis=1).astype(float)
    return pl.DataFrame(
        {
            "feature_a": pl.Series(feats_a, dtype=pl.Int32),
            "label_a": text_a,
            "label_b": text_b,
            "label_similarity": similarity,
        },
        schema=empty.schema,
    )


def _feature_matches_asset(readers: dict[str, ExtraReader]) -> AssetsDefinition:
    pairs = [(r.match_with, r.name) for r in readers.values()]
    involved = sorted({name for pair in pairs for name in pair})

    @asset(
        name="feature_matches",
        partitions_def=datasets_partitions,
        io_manager_key="parquet_io_manager",
        group_name="analysis",
        kinds={"scipy", "parquet"},
        owners=OWNERS,
        metadata=column_schema("feature_matches"),
        code_version=MATCHING_VERSION,
        deps=[
            AssetDep(reader_asset_key(name, table))
            for name in involved
            for table in ("pooled_embeddings", "activation_status")
        ],
        required_resource_keys={"storage", *(reader_resource_key(name) for name in involved)},
        description="Features of each extra reader matched with those of its match_with reader on the same "
        "documents: correlation of per-document max activations, one-to-one (Hungarian) and many-to-one, "
        "with decoder cosine where both SAEs read one residual stream, and the strongest matches' offline "
        "labels and label similarity.",
    )
    def feature_matches(context: AssetExecutionContext):
        storage = context.resources.storage
        tables = [match_pair(context, storage, a, b) for a, b in pairs]
        table = pl.concat(tables)
        matched = table.filter(pl.col("match_b").is_not_null())
        return Output(
            table,
            metadata={
                "pairs": [f"{a} -> {b}" for a, b in pairs],
                "matched_one_to_one": matched.height,
                "median_match_correlation": float(matched["match_correlation"].median() or 0.0),
                "median_label_similarity": float(matched["label_similarity"].median() or 0.0),
            },
        )

    return feature_matches


def reader_assets(readers: dict[str, ExtraReader]) -> list[AssetsDefinition]:
    """Every extra reader's token_activations and pooled_embeddings, and feature_matches (none without
    extra readers)."""
    if not readers:
        return []
    out: list[AssetsDefinition] = []
    for reader in readers.values():
        out += [_token_activations_asset(reader), _pooled_embeddings_asset(reader)]
    return [*out, _feature_matches_asset(readers)]


def reader_jobs(readers: dict[str, ExtraReader]) -> list[Any]:
    """`readers_job`: every extra reader's assets and feature_matches for one dataset, in one process (each
    reader model loads once per run); none without extra readers. The default reader's tables come from
    `dataset_job` / `embed_job`."""
    if not readers:
        return []
    keys = [k for a in reader_assets(readers) for k in a.keys]
    return [
        define_asset_job(
            "readers_job",
            selection=AssetSelection.assets(*keys),
            partitions_def=datasets_partitions,
            executor_def=EXECUTOR,
            description="Read one dataset with every extra reader (config/readers.json) and match their "
            "features with their match_with reader's (feature_matches).",
        )
    ]


PARTITION_TAG = "dagster/partition"


def reader_sensors(jobs: list[Any]) -> list[Any]:
    """`readers_after_dataset_sensor`: after each successful `dataset_job` run (a new or changed drop), the
    same dataset's `readers_job`, so extra readers keep up with the default one; none without readers."""
    if not jobs:
        return []
    (readers_job,) = jobs

    @run_status_sensor(
        run_status=DagsterRunStatus.SUCCESS,
        monitored_jobs=[dataset_job],
        request_job=readers_job,
        default_status=DefaultSensorStatus.RUNNING,
        description="After each successful dataset_job run, readers_job for the same dataset: every extra "
        "reader (config/readers.json) reads the new documents and feature_matches follows.",
    )
    def readers_after_dataset_sensor(context: RunStatusSensorContext):
        partition = context.dagster_run.tags.get(PARTITION_TAG)
        if not partition:
            return SkipReason(f"Run {context.dagster_run.run_id} has no dataset partition.")
        return RunRequest(run_key=f"readers:{context.dagster_run.run_id}", partition_key=partition)

    return [readers_after_dataset_sensor]
