"""Sharded encoding: one large dataset read by several workers at once.

`encode_shards_job` (config: the dataset) takes the documents of the dataset's stored raw_documents
partition that the activation cache lacks, splits them into shards of about `shard_documents` documents
(`INTERP_SHARD_DOCUMENTS`, default 10,000; fewer documents make one shard), cut where the cache's chunks
would be cut anyway (`ActivationCache.shard_plan`), and runs one `encode_shard` step per shard (a dynamic
output): each encodes its documents into the cache, in the `sae_model` pool and on the `sae_model` celery
queue. On the celery executor (`INTERP_EXECUTOR=celery`) the shard steps run on different workers at
once, as many at a time as the pool's limit allows. The cache is content-addressed and its chunks are
committed atomically under unique names, so shards never collide; token_activations then finds every
document cached and writes the dataset's tables from the cache without loading the model, equal row for
row to a run that encoded the whole dataset in one step.

A large dataset: materialize raw_documents [dataset], run encode_shards_job for it, then embed_job
(or dataset_job) [dataset] as usual.
"""

import os
import time

import polars as pl
from dagster import (
    Config,
    DynamicOut,
    DynamicOutput,
    OpExecutionContext,
    job,
    op,
)
from pydantic import Field

from interp_assets.conversations import reader_columns
from interp_assets.defs.jobs import EXECUTOR
from interp_assets.defs.shared import MODEL_POOL, MODEL_STEP_TAGS, encode_with_progress, stored_documents
from interp_assets.engine.activation_cache import ActivationCache
from interp_assets.progress import Progress
from interp_assets.storage.parquet import table_exists
from resources.sae_reader import SAEReaderResource
from resources.storage import StorageResource

SHARD_DOCUMENTS = int(os.environ.get("INTERP_SHARD_DOCUMENTS", "10000"))


class ShardConfig(Config):
    dataset: str = Field(description="The dataset (a `datasets` partition whose raw_documents are stored).")
    shard_documents: int = Field(
        default=SHARD_DOCUMENTS,
        ge=1,
        description="About this many documents per shard, cut at activation-cache chunk boundaries "
        "(default: INTERP_SHARD_DOCUMENTS, else 10,000); at most this many documents make one shard.",
    )


@op(
    out=DynamicOut(dict, description="One shard: the dataset, the shard's index and its documents' hashes."),
    description="Split the documents of the dataset that the activation cache lacks into shards.",
)
def plan_shards(
    context: OpExecutionContext, config: ShardConfig, sae_reader: SAEReaderResource, storage: StorageResource
):
    if not table_exists(storage.parquet_base, "raw_documents", config.dataset):
        raise ValueError(
            f"encode_shards_job: no raw_documents stored for dataset {config.dataset!r} under "
            f"{storage.parquet_base}: materialize raw_documents for that partition first (embed_job or "
            "the UI), then run this job again."
        )
    docs = stored_documents(storage, config.dataset)
    fingerprint = sae_reader.get_identity().fingerprint
    cache = ActivationCache(storage.activation_cache_root, fingerprint, on_warning=context.log.warning)
    shards = cache.shard_plan(docs, config.shard_documents)
    sizes = ", ".join(f"{len(s):,}" for s in shards)
    context.log.info(
        f"{config.dataset}: {len(shards)} shard(s) of the {sum(map(len, shards)):,} of {docs.height:,} "
        f"documents the activation cache lacks ({sizes} documents)"
    )
    for i, hashes in enumerate(shards):
        shard = {"dataset": config.dataset, "index": i, "doc_hashes": hashes}
        yield DynamicOutput(shard, mapping_key=f"shard_{i}")


@op(
    pool=MODEL_POOL,
    tags=MODEL_STEP_TAGS,
    description="Encode one shard's documents that the activation cache lacks into the cache.",
)
def encode_shard(
    context: OpExecutionContext, shard: dict, sae_reader: SAEReaderResource, storage: StorageResource
) -> dict:
    dataset = shard["dataset"]
    stored = stored_documents(storage, dataset)
    stored = stored.select(reader_columns(stored.columns)).unique("doc_hash", keep="first")
    wanted = pl.DataFrame({"doc_hash": shard["doc_hashes"]}, schema={"doc_hash": pl.String})
    docs = wanted.join(stored, on="doc_hash", how="inner", maintain_order="left")
    identity = sae_reader.get_identity()
    cache = ActivationCache(
        storage.activation_cache_root, identity.fingerprint, on_warning=context.log.warning
    )
    progress = Progress(f"{dataset} shard {shard['index']}: encoding", 0, context.log.info)
    started = time.perf_counter()
    stats = encode_with_progress(cache, sae_reader, docs, progress, embeddings_to=storage)
    return {
        "dataset": dataset,
        "index": shard["index"],
        "documents": docs.height,
        "encoded_now": stats.encoded,
        "reused_from_cache": stats.reused,
        "rejected": stats.rejected,
        "chunks_written": stats.chunks_written,
        "encode_seconds": round(time.perf_counter() - started, 2),
        "pid": os.getpid(),
    }


@op(description="Sum up the shards: documents encoded now, reused from the cache, rejected.")
def shards_done(context: OpExecutionContext, shards: list[dict]) -> dict:
    counts = ("documents", "encoded_now", "reused_from_cache", "rejected")
    total = {k: sum(s[k] for s in shards) for k in counts}
    context.log.info(
        f"{len(shards)} shard(s): {total['encoded_now']:,} documents encoded now, "
        f"{total['reused_from_cache']:,} reused from the cache, {total['rejected']:,} rejected"
    )
    context.add_output_metadata({"shards": len(shards), **total})
    return {"shards": sorted(shards, key=lambda s: s["index"]), **total}


@job(
    executor_def=EXECUTOR,
    description="Encode one large dataset's documents into the activation cache in shards that several "
    "workers read at once (run config: ops.plan_shards.config.dataset); then embed_job writes its tables.",
)
def encode_shards_job():
    shards_done(plan_shards().map(encode_shard).collect())
