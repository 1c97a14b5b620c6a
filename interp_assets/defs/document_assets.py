"""Document-level features (the HypotheSAEs method): document_embeddings per dataset, then per comparison a
document_sae trained label-blind on both datasets' documents and the document_features it gives them."""

import hashlib
import json
import time

import numpy as np
import polars as pl
from dagster import (
    AllPartitionMapping,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    Config,
    DataVersion,
    MetadataValue,
    Output,
    asset,
)

from interp_assets.comparisons import parse_comparison_key
from interp_assets.defs.partitions import comparisons_partitions, datasets_partitions
from interp_assets.defs.shared import (
    INPUTS_KEY,
    MODEL_POOL,
    MODEL_STEP_TAGS,
    OWNERS,
    cached_document_embeddings,
    column_schema,
    inputs_key,
    reuse_stored_output,
)
from interp_assets.engine.documents import (
    DEFAULT_MEMBERS,
    DOCUMENT_SAE_VERSION,
    TRAINING_REPORT,
    DocumentSAEConfig,
    LexicalProjection,
    document_representation,
    document_sae_problem,
    encode_documents,
    fit_lexical_projection,
    lexical_profiles,
    load_document_sae,
    load_lexical_projection,
    save_document_sae,
    save_lexical_projection,
    train_document_saes,
)
from interp_assets.storage.cache_files import quarantine
from interp_assets.storage.parquet import read_table, table_exists
from resources.sae_reader import SAEReaderResource
from resources.storage import StorageResource

DOCUMENT_EMBEDDINGS_SCHEMA = {
    "dataset": pl.String,
    "doc_id": pl.Int32,
    "doc_hash": pl.String,
    "embedding": pl.List(pl.Float32),
}
DOCUMENT_FEATURES_SCHEMA = {
    "comparison": pl.String,
    "dataset": pl.String,
    "doc_id": pl.Int32,
    "feature": pl.Int32,
    "activation": pl.Float32,
}
# document SAE quality below which the asset check warns
MIN_FRACTION_VARIANCE_EXPLAINED = 0.3  # k of a few per document explains less than a token SAE
MAX_DEAD_FEATURE_FRACTION = 0.25


def reader_hook_index(sae_reader: SAEReaderResource) -> int:
    """The hidden-state index the reader's SAE reads (its hook), known without loading the model."""
    from interp_assets.engine.activations import hook_hidden_index
    from interp_assets.engine.reader import HookPoint

    layer, position = sae_reader.get_identity().identity["hook"]
    return hook_hidden_index(HookPoint(int(layer), str(position)))


class DocumentEmbeddingsConfig(Config):
    """Which model and layer embed documents. Empty `model`: the SAE reader's model.

    `layer` indexes the hidden states (0 = the embeddings, -1 = the last layer). None: the hidden state the
    reader's SAE reads (its hook: `blocks.3.hook_resid_post` is 4) for the reader's model, the last layer
    for another model. Measured on the planted benchmark's documents (DBpedia, MiniLM), the SAE's layer
    keeps neighbouring topics apart better than the last, which a sentence-embedding model trains to merge
    (README, "document_embeddings")."""

    model: str = ""
    layer: int | None = None
    normalize: bool = True


@asset(
    partitions_def=datasets_partitions,
    io_manager_key="parquet_io_manager",
    group_name="documents",
    kinds={"pytorch", "parquet"},
    owners=OWNERS,
    metadata=column_schema("document_embeddings"),
    code_version="1",
    pool=MODEL_POOL,
    op_tags=MODEL_STEP_TAGS,
    # after token_activations: for BERT readers (the embedded MiniLM) its forward pass carries on to the last
    # layer and leaves the default embeddings in the cache, so the layers up to the SAE's hook run once
    deps=["token_activations"],
    description="One embedding per document: the reader's hidden states at one layer (default: the layer its "
    "SAE reads), mean-pooled over the document's tokens and L2-normalized. Cached by content hash; for BERT "
    "readers token_activations' forward pass makes the default ones on its way.",
)
def document_embeddings(
    context: AssetExecutionContext,
    config: DocumentEmbeddingsConfig,
    raw_documents: pl.LazyFrame,
    sae_reader: SAEReaderResource,
    storage: StorageResource,
):
    dataset = context.partition_key
    docs = raw_documents.select("doc_id", "doc_hash", "text").collect().sort("doc_id")
    model = config.model or sae_reader.model
    layer = config.layer
    if layer is None and model == sae_reader.model:
        layer = reader_hook_index(sae_reader)
    started = time.perf_counter()
    vectors, computed = cached_document_embeddings(
        storage,
        docs,
        model,
        layer,
        config.normalize,
        log=context.log.info,
        device=sae_reader.device,  # where the reader runs (a GPU when there is one)
        dtype=sae_reader.dtype,
    )
    table = pl.DataFrame(
        {
            "dataset": [dataset] * docs.height,
            "doc_id": docs["doc_id"],
            "doc_hash": docs["doc_hash"],
            "embedding": list(vectors),
        },
        schema=DOCUMENT_EMBEDDINGS_SCHEMA,
    )
    precision = [] if sae_reader.dtype == "float32" else [sae_reader.dtype]
    version = hashlib.sha256(
        json.dumps([model, layer, config.normalize, sorted(docs["doc_hash"].to_list()), *precision]).encode()
    ).hexdigest()[:24]
    return Output(
        table,
        data_version=DataVersion(version),
        metadata={
            "documents": docs.height,
            "dimensions": int(vectors.shape[1]) if vectors.ndim == 2 else 0,
            "model": model,
            "layer": "last" if layer is None else layer,
            "normalize": config.normalize,
            "dtype": sae_reader.dtype,
            "embedded_now": computed,
            "seconds": round(time.perf_counter() - started, 2),
        },
    )


class DocumentSAETrainingConfig(Config):
    """How the comparison's document SAE is trained. 0 for `d_sae`/`k`: chosen by corpus size (per member).

    `members` SAEs are trained with seeds `seed`, `seed + 1`, ...; their features together are the
    document family (more members: more chances that a topic of a few percent gets a feature of its own).
    """

    d_sae: int = 0
    k: int = 0
    steps: int = 2000  # at most; fewer when max_epochs passes over the documents take fewer
    max_epochs: int = 200
    lr: float = 1e-3
    seed: int = 0
    members: int = DEFAULT_MEMBERS
    lexical_dims: int = 0  # lexical profile directions beside the embedding (e.g. 128); 0: embedding alone


def _comparison_embeddings(storage: StorageResource, key: str) -> dict[str, pl.DataFrame]:
    a, b = parse_comparison_key(key)
    out = {}
    for ds in (a, b):
        if not table_exists(storage.parquet_base, "document_embeddings", ds):
            raise FileNotFoundError(
                f"Comparison {key}: dataset {ds!r} has no document_embeddings yet; materialize "
                "document_embeddings for it first (embed_job does)."
            )
        out[ds] = read_table(storage.parquet_base, "document_embeddings", ds).sort("doc_id").collect()
    return out


def _token_features(storage: StorageResource, key: str, dataset: str, doc_ids: pl.Series) -> tuple:
    """`(row, feature)` of every token-level feature firing in the documents `doc_ids` (row = position)."""
    if not table_exists(storage.parquet_base, "pooled_embeddings", dataset):
        raise FileNotFoundError(
            f"Comparison {key}: dataset {dataset!r} has no pooled_embeddings yet (the document SAE reads "
            "which token features fire in each document); materialize it first (embed_job does), or set "
            "lexical_dims: 0 to train on the embeddings alone."
        )
    rows = pl.DataFrame({"doc_id": doc_ids.cast(pl.Int32), "row": np.arange(doc_ids.len(), dtype=np.int64)})
    fired = (
        read_table(storage.parquet_base, "pooled_embeddings", dataset)
        .filter(pl.col("max_activation") > 0)
        .select(pl.col("doc_id").cast(pl.Int32), pl.col("feature").cast(pl.Int64))
        .collect()
        .join(rows, on="doc_id", how="inner")
    )
    return fired["row"].to_numpy(), fired["feature"].to_numpy()


def _represent(
    storage: StorageResource,
    key: str,
    dataset: str,
    frame: pl.DataFrame,
    projection: LexicalProjection | None,
) -> np.ndarray:
    """What the comparison's document SAE reads for one dataset's documents (rows of `frame`)."""
    embeddings = np.asarray(frame["embedding"].to_list(), dtype=np.float32)
    if projection is None:
        return embeddings
    rows, features = _token_features(storage, key, dataset, frame["doc_id"])
    return document_representation(embeddings, lexical_profiles(rows, features, frame.height, projection))


@asset(
    partitions_def=comparisons_partitions,
    io_manager_key="parquet_io_manager",
    group_name="documents",
    kinds={"pytorch", "parquet"},
    owners=OWNERS,
    metadata=column_schema("document_sae"),
    code_version=DOCUMENT_SAE_VERSION,
    pool=MODEL_POOL,
    op_tags=MODEL_STEP_TAGS,
    deps=[
        AssetDep("document_embeddings", partition_mapping=AllPartitionMapping()),
        AssetDep("pooled_embeddings", partition_mapping=AllPartitionMapping()),
    ],
    check_specs=[AssetCheckSpec("document_sae_quality", asset="document_sae")],
    description="TopK SAEs (SAELens) trained label-blind on the document embeddings of both datasets of a "
    "comparison (with `lexical_dims`, each beside its lexical profile: which token-level SAE features "
    "fire in it, TF-IDF weighted and SVD-reduced), width and k by corpus size (HypotheSAEs): `members` "
    "independently seeded SAEs whose features together are the document family; saved in SAELens format "
    "under <data_dir>/models/document_sae/. One row: size, members, variance explained, dead features, "
    "path.",
)
def document_sae(context: AssetExecutionContext, config: DocumentSAETrainingConfig, storage: StorageResource):
    key = context.partition_key
    frames = _comparison_embeddings(storage, key)
    # one row per distinct document (by content) over both datasets, in doc_hash order
    tagged = [f.with_columns(pl.lit(ds).alias("dataset")) for ds, f in frames.items()]
    pooled = pl.concat(tagged).unique("doc_hash", keep="first").sort("doc_hash")
    train_config = DocumentSAEConfig(
        d_sae=config.d_sae,
        k=config.k,
        steps=config.steps,
        max_epochs=config.max_epochs,
        lr=config.lr,
        seed=config.seed,
        members=config.members,
    )
    # what was trained and on what: the SAE's settings and how its input was built
    settings = vars(train_config) | {"lexical_dims": config.lexical_dims}
    embeddings = np.asarray(pooled["embedding"].to_list(), dtype=np.float32)
    lexical = np.zeros((0, 2), dtype=np.int64)
    if config.lexical_dims > 0:
        parts = []
        for ds in frames:
            mine = pooled.with_row_index("row").filter(pl.col("dataset") == ds)
            rows, features = _token_features(storage, key, ds, mine["doc_id"])
            parts.append(np.c_[mine["row"].to_numpy()[rows], features])
        lexical = np.concatenate(parts)  # one row per (document, feature): pooled rows are unique
        lexical = lexical[np.lexsort((lexical[:, 1], lexical[:, 0]))]  # a stable order for the hash
    training_hash = hashlib.sha256(
        (
            json.dumps([DOCUMENT_SAE_VERSION, settings], sort_keys=True)
            + "".join(pooled["doc_hash"].to_list())
            + hashlib.sha256(embeddings.tobytes()).hexdigest()
            + hashlib.sha256(lexical.tobytes()).hexdigest()
        ).encode()
    ).hexdigest()[:20]
    folder = storage.root / "models" / "document_sae" / training_hash
    report_path = folder / TRAINING_REPORT
    started = time.perf_counter()
    problem = document_sae_problem(str(folder)) if report_path.exists() else None
    if problem:  # a damaged save is set aside, named, and trained again
        what = f"saved document SAE of comparison {key}"
        quarantine(folder, problem, what, "will train it again now", context.log.warning)
    if report_path.exists():
        report = json.loads(report_path.read_text())
        trained_now = False
    else:
        projection = None
        if config.lexical_dims > 0:
            projection = fit_lexical_projection(
                lexical[:, 0], lexical[:, 1], pooled.height, config.lexical_dims, seed=config.seed
            )
            profiles = lexical_profiles(lexical[:, 0], lexical[:, 1], pooled.height, projection)
            embeddings = document_representation(embeddings, profiles)
            save_lexical_projection(projection, str(folder))
        sae, report = train_document_saes(embeddings, train_config)
        report = report | {
            "comparison": key,
            "config": settings,
            "training_hash": training_hash,
            "lexical_dims": int(projection.components.shape[0]) if projection is not None else 0,
        }
        save_document_sae(sae, str(folder), report)  # the report is written last: its presence marks done
        trained_now = True
    row = pl.DataFrame(
        {
            "comparison": [key],
            "training_hash": [training_hash],
            "d_in": [int(report["d_in"])],
            "d_sae": [int(report["d_sae"])],
            "k": [int(report["k"])],
            "members": [int(report["members"])],
            "n_features": [int(report["n_features"])],
            "n_documents": [int(report["n_documents"])],
            "fraction_variance_explained": [float(report["fraction_variance_explained"])],
            "dead_feature_fraction": [float(report["dead_feature_fraction"])],
            "model_path": [str(folder.resolve())],
        }
    )
    fve, dead = float(report["fraction_variance_explained"]), float(report["dead_feature_fraction"])
    yield Output(
        row,
        data_version=DataVersion(training_hash),
        metadata={
            "d_sae": int(report["d_sae"]),
            "k": int(report["k"]),
            "members": int(report["members"]),
            "n_features": int(report["n_features"]),
            "documents": int(report["n_documents"]),
            "fraction_variance_explained": round(fve, 4),
            "dead_feature_fraction": round(dead, 4),
            "trained_now": trained_now,
            "seconds": round(time.perf_counter() - started, 2),
            "model_path": MetadataValue.path(str(folder.resolve())),
        },
    )
    yield AssetCheckResult(
        check_name="document_sae_quality",
        passed=fve >= MIN_FRACTION_VARIANCE_EXPLAINED and dead <= MAX_DEAD_FEATURE_FRACTION,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "fraction_variance_explained": fve,
            "min_fraction_variance_explained": MIN_FRACTION_VARIANCE_EXPLAINED,
            "dead_feature_fraction": dead,
            "max_dead_feature_fraction": MAX_DEAD_FEATURE_FRACTION,
        },
    )


@asset(
    partitions_def=comparisons_partitions,
    io_manager_key="parquet_io_manager",
    group_name="documents",
    kinds={"pytorch", "parquet"},
    owners=OWNERS,
    metadata=column_schema("document_features"),
    code_version=DOCUMENT_SAE_VERSION,
    deps=[
        AssetDep("document_embeddings", partition_mapping=AllPartitionMapping()),
        AssetDep("pooled_embeddings", partition_mapping=AllPartitionMapping()),
    ],
    description="Every nonzero feature of the comparison's document SAE for every document of both datasets "
    "(comparison, dataset, doc_id, feature, activation): exactly k per member SAE per document.",
)
def document_features(context: AssetExecutionContext, document_sae: pl.LazyFrame, storage: StorageResource):
    key = context.partition_key
    a, b = parse_comparison_key(key)
    inputs = inputs_key(
        context.instance,
        [("document_sae", key)]
        + [(t, ds) for ds in (a, b) for t in ("raw_documents", "document_embeddings", "pooled_embeddings")],
        {},
        DOCUMENT_SAE_VERSION,
    )
    reused = reuse_stored_output(context, storage, "document_features", key, inputs)
    if reused is not None:
        return reused
    info = document_sae.collect().row(0, named=True)
    problem = document_sae_problem(info["model_path"])
    if problem:
        raise RuntimeError(
            f"Comparison {key}: the saved document SAE cannot be trusted ({problem}). Materialize "
            "document_sae for this comparison again: it sets the damaged save aside and trains it again."
        )
    sae = load_document_sae(info["model_path"])
    projection = load_lexical_projection(info["model_path"])
    parts = []
    for ds, frame in _comparison_embeddings(storage, key).items():
        rows, feature, activation = encode_documents(sae, _represent(storage, key, ds, frame, projection))
        parts.append(
            pl.DataFrame(
                {
                    "comparison": key,
                    "dataset": ds,
                    "doc_id": frame["doc_id"].to_numpy()[rows],
                    "feature": feature,
                    "activation": activation,
                },
                schema=DOCUMENT_FEATURES_SCHEMA,
            )
        )
    table = pl.concat(parts)
    per_dataset = table.group_by("dataset").agg(
        pl.col("doc_id").n_unique().alias("documents"), pl.col("feature").n_unique().alias("features")
    )
    return Output(
        table,
        data_version=DataVersion(f"{info['training_hash']}:{table.height}"),
        metadata={
            INPUTS_KEY: inputs,
            "rows": table.height,
            "n_features": int(info["n_features"]),
            "features_alive": int(table["feature"].n_unique()),
            "per_dataset": MetadataValue.json(per_dataset.sort("dataset").to_dicts()),
        },
    )
