"""SAE features of each document: token_activations (the reader over every document) with its side tables
tokens and activation_status, and pooled_embeddings."""

import hashlib
import time

import numpy as np
import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    DataVersion,
    Output,
    asset,
    multi_asset,
)

from interp_assets.conversations import reader_columns
from interp_assets.defs.partitions import datasets_partitions
from interp_assets.defs.shared import (
    MODEL_POOL,
    MODEL_STEP_TAGS,
    OWNERS,
    column_schema,
    encode_with_progress,
    side_table_output,
    table_out,
)
from interp_assets.engine.activation_cache import TOKENS_SCHEMA, ActivationCache, token_activations_schema
from interp_assets.engine.pooling import (
    POOLED_SCHEMA,
    POOLING_VERSION,
    pool_token_activations,
    pooled_segment_name,
    pooled_summary,
)
from interp_assets.engine.reader import ENGINE_VERSION
from interp_assets.progress import Progress
from interp_assets.storage.parquet import (
    KEEP,
    SegmentedTable,
    StreamedTable,
    read_table,
    scan_parquet_files,
    stored_segments,
    table_segments,
    write_table,
)
from resources.sae_reader import SAEReaderResource
from resources.storage import StorageResource


@multi_asset(
    name="token_activations",
    partitions_def=datasets_partitions,
    outs={
        "token_activations": table_out(
            "token_activations",
            group="features",
            kinds={"pytorch", "parquet"},
            code_version=ENGINE_VERSION,
            description="Every nonzero SAE activation of every pooled token (doc_id, token_index, feature, "
            "activation; the token's text and offsets are in tokens). Only new or changed documents go "
            "through the model (content-hash cache), and only the segments (one per cache chunk) whose "
            "documents changed are written.",
        ),
        "tokens": table_out(
            "tokens",
            group="features",
            kinds={"pytorch", "parquet"},
            code_version=ENGINE_VERSION,
            description="Every token with at least one nonzero SAE activation: its text and character "
            "offsets, once per token (token_activations refers to it by doc_id and token_index; the DuckDB "
            "view token_activations_wide joins the two). Segments as token_activations'.",
        ),
        "activation_status": table_out(
            "activation_status",
            group="features",
            kinds={"pytorch", "parquet"},
            code_version=ENGINE_VERSION,
            description="Every document of the dataset accounted for by the model step that writes "
            "token_activations: encoded (with its pooled token count) or rejected, with the reason.",
        ),
    },
    pool=MODEL_POOL,
    op_tags=MODEL_STEP_TAGS,
    check_specs=[
        AssetCheckSpec("every_document_accounted_for", asset="token_activations", blocking=True),
        AssetCheckSpec("activations_finite_and_positive", asset="token_activations", blocking=True),
    ],
)
def token_activations(
    context: AssetExecutionContext,
    raw_documents: pl.LazyFrame,
    sae_reader: SAEReaderResource,
    storage: StorageResource,
):
    yield from read_token_activations(context, raw_documents, sae_reader, storage)


def read_token_activations(
    context: AssetExecutionContext,
    raw_documents: pl.LazyFrame,
    sae_reader: SAEReaderResource,
    storage: StorageResource,
    embed_documents: bool = True,
):
    """token_activations' body: `sae_reader` reads the partition's documents into tables under
    `storage.parquet_base` (an extra reader's own base, `interp_assets.defs.matching_assets`). With
    `embed_documents`, the same pass makes their default document embeddings where the reader allows
    (`encode_with_progress`)."""
    dataset = context.partition_key
    docs = raw_documents.select("doc_id", *reader_columns(raw_documents.collect_schema().names())).collect()
    identity = sae_reader.get_identity()  # the model itself loads only if a document needs encoding
    cache = ActivationCache(
        storage.activation_cache_root, identity.fingerprint, on_warning=context.log.warning
    )
    progress = Progress(f"{dataset}: encoding new documents", 0, context.log.info)

    def start(total: int) -> None:
        if total:
            context.log.info(f"{dataset}: {total:,} of {docs.height:,} documents need encoding")

    # the SAE width travels with the files (a notebook's matrices then have every feature's column)
    schema = token_activations_schema(identity.activation_dtype)
    schema = schema.with_metadata({**(schema.metadata or {}), b"d_sae": str(identity.d_sae).encode()})
    ids = docs.select("doc_id", "doc_hash")
    base = storage.parquet_base
    stored = stored_segments(base, "token_activations", dataset, schema, context.log.warning)
    stored_tokens = stored_segments(base, "tokens", dataset, TOKENS_SCHEMA, context.log.warning)
    # Cached chunks are trusted only once checked, and only those whose segments must be written are read:
    # a damaged one is quarantined here and its documents are encoded again just below.
    to_read = {s.chunk for s in cache.activation_segments(ids, dataset, schema) if s.name not in stored}
    to_read |= {
        s.chunk for s in cache.activation_segments(ids, dataset, TOKENS_SCHEMA) if s.name not in stored_tokens
    }
    cache.verify_chunks(sorted(to_read))
    started = time.perf_counter()
    stats = encode_with_progress(
        cache, sae_reader, docs, progress, on_start=start, embeddings_to=storage if embed_documents else None
    )
    seconds = time.perf_counter() - started
    status = cache.activation_status(ids, dataset)
    version = hashlib.sha256(
        (identity.fingerprint + "".join(sorted(docs["doc_hash"].to_list()))).encode()
    ).hexdigest()[:24]
    written = write_table(storage.parquet_base, "activation_status", dataset, status)
    status_pl = pl.from_arrow(status)
    counts = status_pl.group_by("status").len()
    count = dict(zip(counts["status"].to_list(), counts["len"].to_list(), strict=True))
    rejected = status_pl.filter(pl.col("status") == "rejected")
    if rejected.height:
        context.log.warning(
            f"{rejected.height} document(s) of {dataset} could not be encoded, e.g. doc_id "
            f"{rejected['doc_id'][0]}: {rejected['reason'][0]} (see the activation_status table)"
        )

    # One segment per cache chunk holding documents of this dataset, named by its content: a segment
    # already stored under its name (and sound, see above) is kept as is; the others are streamed from
    # the cache.
    plan = cache.activation_segments(ids, dataset, schema)
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
    # tokens first: once a token_activations segment is committed, its tokens are too
    token_segments = {
        s.name: KEEP
        if s.name in stored_tokens
        else StreamedTable(TOKENS_SCHEMA, cache.iter_tokens_segment(s, dataset))
        for s in cache.activation_segments(ids, dataset, TOKENS_SCHEMA)
    }
    yield Output(
        SegmentedTable(TOKENS_SCHEMA, token_segments), output_name="tokens", data_version=DataVersion(version)
    )
    yield Output(
        SegmentedTable(schema, segments),
        output_name="token_activations",
        data_version=DataVersion(version),
        metadata={
            "documents": docs.height,
            "encoded_now": stats.encoded,
            "reused_from_cache": stats.reused,
            "rejected": count.get("rejected", 0),
            "chunks_written": stats.chunks_written,
            "encode_seconds": round(seconds, 2),
            "reader_fingerprint": identity.fingerprint,
            "d_sae": identity.d_sae,
            "device": sae_reader.get_reader().device if sae_reader.loaded else "not loaded",
            "reader_loaded": sae_reader.loaded,
        },
    )
    yield side_table_output("activation_status", written, DataVersion(version))
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
    group_name="features",
    kinds={"polars", "parquet"},
    owners=OWNERS,
    metadata=column_schema("pooled_embeddings"),
    code_version=POOLING_VERSION,
    deps=[AssetDep("token_activations"), AssetDep("activation_status")],
    check_specs=[AssetCheckSpec("pooled_statistics_consistent", asset="pooled_embeddings")],
    description="Per (document, feature): max, sum and count of active tokens, and the document's pooled "
    "token count, so max/mean/sum/binarize/count are all derivable. One segment per token_activations "
    "segment; only new ones are pooled.",
)
def pooled_embeddings(context: AssetExecutionContext, storage: StorageResource):
    yield from pool_embeddings(context, storage)


def pool_embeddings(context: AssetExecutionContext, storage: StorageResource):
    """pooled_embeddings' body, over the token_activations under `storage.parquet_base`."""
    dataset = context.partition_key
    base = storage.parquet_base
    sources = table_segments(base, "token_activations", dataset)
    stored = stored_segments(base, "pooled_embeddings", dataset, POOLED_SCHEMA, context.log.warning)
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
