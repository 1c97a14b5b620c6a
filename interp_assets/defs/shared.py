"""What the asset modules share: the model pool, data versions, and reads of a dataset's stored tables."""

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetOut,
    AssetRecordsFilter,
    DagsterInstance,
    DataVersion,
    EventLogRecord,
    MetadataValue,
    Output,
    TableColumn,
    TableSchema,
)

from interp_assets.comparisons import load_dataset_settings
from interp_assets.labels.labeling import LabelCache
from interp_assets.progress import Progress
from interp_assets.storage.cache_files import load_cache_file, parquet_frame, sums_path, write_cache_file
from interp_assets.storage.checksums import checksum_problem, file_sha256
from interp_assets.storage.parquet import (
    is_tmp_name,
    parquet_bytes,
    read_table,
    table_exists,
    table_files,
)
from interp_assets.storage.paths import table_path
from interp_assets.storage.schemas import TABLES
from io_managers.parquet import output_metadata
from resources.sae_reader import SAEReaderResource
from resources.storage import StorageResource

DATA_VERSION_TAG = "dagster/data_version"  # the tag Dagster stores a materialization's data version under

MODEL_POOL = "sae_model"  # every step that runs the reader model shares this concurrency pool
# On the celery executor (INTERP_EXECUTOR=celery) every step that runs the reader model goes to its own
# queue, which only the workers beside a GPU consume; the other steps go to celery's default `dagster`.
MODEL_QUEUE = "sae_model"
MODEL_STEP_TAGS = {"dagster-celery/queue": MODEL_QUEUE}
OWNERS = ["team:interp-platform"]  # who answers for every asset (the catalog's owner filter)


COLUMN_SCHEMA = "dagster/column_schema"


def column_schema(table: str) -> dict:
    """Definition metadata with `table`'s documented columns (`interp_assets.storage.schemas`): the
    catalog shows their types and meanings before any run; the IO manager keeps the meanings in the
    schema it records after each write."""
    columns = [TableColumn(name, type_, meaning) for name, type_, meaning, _ in TABLES[table].columns]
    return {COLUMN_SCHEMA: MetadataValue.table_schema(TableSchema(columns=columns))}


def table_out(
    table: str,
    *,
    group: str,
    kinds: set[str],
    code_version: str,
    description: str,
    key: AssetKey | None = None,
    io_manager_key: str = "parquet_io_manager",
) -> AssetOut:
    """A `multi_asset` output that stores `table`: owned by the platform's team, described by the table's
    documented columns (`column_schema`), written by the Parquet IO manager unless `io_manager_key` says
    otherwise (an extra reader's)."""
    return AssetOut(
        key=key,
        io_manager_key=io_manager_key,
        group_name=group,
        kinds=kinds,
        owners=OWNERS,
        metadata=column_schema(table),
        code_version=code_version,
        description=description,
    )


def side_table_output(
    table: str, written: dict, data_version: DataVersion | None = None, metadata: dict | None = None
) -> Output:
    """The output of a side table (an extra asset of a `multi_asset`) that its step already wrote with
    `write_table` (`written`: what that returned): nothing left for the IO manager to write, and the
    metadata it would have recorded (rows, path, size, columns with their meanings, preview), plus
    `metadata`."""
    return Output(
        None,
        output_name=table,
        data_version=data_version,
        metadata={**output_metadata(written, column_schema(table)[COLUMN_SCHEMA]), **(metadata or {})},
    )


def dataset_settings(storage: StorageResource, dataset: str) -> dict:
    """This dataset's entry in `<data_dir>/config/datasets.json` (empty if none)."""
    return load_dataset_settings(storage.config_dir / "datasets.json").get(dataset, {})


def encoded_doc_count(storage: StorageResource, dataset: str) -> int:
    """Documents of `dataset` that token_activations encoded (activation_status = encoded)."""
    status = read_table(storage.parquet_base, "activation_status", dataset)
    return int(status.filter(pl.col("status") == "encoded").select(pl.len()).collect().item())


def stored_documents(storage: StorageResource, dataset: str) -> pl.DataFrame:
    """The raw_documents partition of `dataset`, sorted by doc_id."""
    return read_table(storage.parquet_base, "raw_documents", dataset).sort("doc_id").collect()


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


INPUTS_KEY = "inputs_key"  # metadata: what a materialization was computed from (see `inputs_key`)


def inputs_key(
    instance: DagsterInstance, upstream: list[tuple[str, str]], settings: object, code_version: str
) -> str | None:
    """A hash of everything a step reads: the data versions of `upstream` (asset, partition) pairs, the
    step's `settings` (config, files it reads, resources that change its result) and its code version.
    None when an upstream partition has no data version yet (then nothing is reused)."""
    versions = [(asset, partition, data_version(instance, asset, partition)) for asset, partition in upstream]
    if any(v is None for *_, v in versions):
        return None
    payload = json.dumps([code_version, versions, settings], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def reuse_stored_output(
    context: AssetExecutionContext,
    storage: StorageResource,
    asset: str,
    partition: str,
    key: str | None,
    this_run: dict | None = None,
    output_name: str = "result",
) -> Output | None:
    """The stored table, kept as it is, when its last materialization was computed from exactly `key`
    (`output_name`: the output's name, for one asset of a `multi_asset`).

    Returns an `Output(None)` (the Parquet IO manager writes nothing) that repeats the last
    materialization's data version and metadata (what describes the table), with `this_run` overriding
    the per-run counters (e.g. `labels_recomputed: 0`) and `reused_stored_table: True`; or None when the
    step must compute (no key, inputs changed, never materialized, or the table is missing from storage
    or differs from the size and content checksum its materialization recorded: then with a warning
    naming the file). A materialization recorded before checksums gets the file's checksum now.
    """
    if key is None:
        return None
    record = latest_materialization(context.instance, asset, partition)
    if record is None or not table_exists(storage.parquet_base, asset, partition):
        return None
    metadata = record.asset_materialization.metadata
    stored = metadata.get(INPUTS_KEY)
    if stored is None or stored.value != key:
        return None
    path = table_path(storage.parquet_base, asset, partition)
    checked = {}
    if table_files(storage.parquet_base, asset, partition) == [path]:  # a single file (segments: own checks)
        recorded = {
            k: metadata[m].value for k, m in (("bytes", "size_bytes"), ("sha256", "sha256")) if m in metadata
        }
        problem = checksum_problem(path, recorded)
        if problem is not None:
            context.log.warning(f"Stored table {path} is damaged ({problem}): it is computed again.")
            return None
        checked = {"sha256": recorded.get("sha256") or file_sha256(path)}
    version = record.asset_materialization.tags.get(DATA_VERSION_TAG)
    context.log.info(f"{asset} [{partition}]: inputs unchanged since the last run; the stored table is kept.")
    return Output(
        None,
        output_name=output_name,
        data_version=DataVersion(version) if version else None,
        metadata={**metadata, **checked, **(this_run or {}), "reused_stored_table": True},
    )


def token_activations_metadata(context: AssetExecutionContext, dataset: str) -> dict:
    """Metadata of the latest token_activations materialization of `dataset` (SAE width, fingerprint)."""
    record = latest_materialization(context.instance, "token_activations", dataset)
    if record is None:
        return {}
    return {k: v.value for k, v in record.asset_materialization.metadata.items()}


def recorded_d_sae(context: AssetExecutionContext, dataset: str) -> int | None:
    """SAE width recorded by token_activations for `dataset` (None if unknown)."""
    value = token_activations_metadata(context, dataset).get("d_sae")
    return int(value) if value is not None else None


EMBEDDING_SCHEMA = {"doc_hash": pl.String, "embedding": pl.List(pl.Float32)}
EMBEDDING_PARTS_MERGED_AT = 32  # a write that finds more parts than this merges them into one


def _embedding_parts(folder: Path) -> list[Path]:
    """The committed parts of one embeddings cache, oldest first (names start with their write time)."""
    return sorted(p for p in folder.glob("*.parquet") if not is_tmp_name(p.name)) if folder.is_dir() else []


def _read_embedding_cache(
    folder: Path, log: Callable[[str], None] | None = None
) -> tuple[pl.DataFrame, list[Path]]:
    """Every cached embedding (first part wins for a document in several) and the parts read. Each part is
    checked against its recorded checksum (`storage.cache_files`): a damaged one is quarantined with a
    warning and its documents count as not embedded. A part that a concurrent merge deleted after it was
    listed makes the listing start again."""
    for _ in range(5):
        parts = _embedding_parts(folder)
        legacy = folder.with_suffix(".parquet")  # the single file earlier versions rewrote on every write
        files = ([legacy] if legacy.exists() else []) + parts
        what = "document embeddings cache part"
        try:
            frames = [load_cache_file(f, parquet_frame, what, log, absent_ok=False) for f in files]
        except FileNotFoundError:
            continue
        frames = [f for f in frames if f is not None]  # None: damaged, quarantined, embedded again
        known = pl.concat(frames) if frames else pl.DataFrame(schema=EMBEDDING_SCHEMA)
        return known.unique("doc_hash", keep="first", maintain_order=True), [p for p in parts if p.exists()]
    raise RuntimeError(
        f"Embeddings cache {folder}: its parts kept changing while being read; run the step again."
    )


def _append_embedding_cache(folder: Path, new: pl.DataFrame, known: pl.DataFrame, read: list[Path]) -> None:
    """Add `new` as a part of its own (atomic, a unique name, its checksum recorded), so concurrent steps
    never overwrite each other's embeddings; past EMBEDDING_PARTS_MERGED_AT parts, the parts read (`known`,
    first-wins) become one part named as the oldest of them, which sorts before every part written since,
    and are deleted."""
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"
    write_cache_file(part, parquet_bytes(new.to_arrow()))
    if len(read) > EMBEDDING_PARTS_MERGED_AT:
        oldest = read[0].name.split("-")[0]
        merged = folder / f"{oldest}-{uuid.uuid4().hex[:12]}.parquet"
        write_cache_file(merged, parquet_bytes(known.to_arrow()))
        for part in read:
            part.unlink(missing_ok=True)
            sums_path(part).unlink(missing_ok=True)


def _embedding_cache_folder(
    storage: StorageResource, model: str, layer: int | None, normalize: bool, dtype: str
) -> Path:
    """The embeddings cache's folder for one embedding setting."""
    # "text-as-text": special-token strings in a text are tokenized as text (embeddings made before are stale)
    settings = [model, layer, normalize, "text-as-text"] + ([] if dtype == "float32" else [dtype])
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]
    return storage.cache_dir / "embeddings" / key


def store_document_embeddings(
    storage: StorageResource,
    model: str,
    dtype: str,
    layer: int | None,
    hashes: list[str],
    vectors: list[np.ndarray],
) -> int:
    """Add normalized document embeddings at `layer` (None: the last) that the cache lacks, by document
    hash, as `cached_document_embeddings` would have made them; returns how many were added."""
    folder = _embedding_cache_folder(storage, model, layer, True, dtype)
    known, parts = _read_embedding_cache(folder)
    new = pl.DataFrame({"doc_hash": hashes, "embedding": vectors}, schema=EMBEDDING_SCHEMA)
    new = new.unique("doc_hash", keep="first", maintain_order=True).join(
        known.select("doc_hash"), on="doc_hash", how="anti"
    )
    if new.height:
        _append_embedding_cache(folder, new, known, parts)
    return new.height


def embedded_document_hashes(storage: StorageResource, model: str, dtype: str, layer: int | None) -> set[str]:
    """The document hashes the embeddings cache holds at `layer`, normalized (`store_document_embeddings`)."""
    known, _ = _read_embedding_cache(_embedding_cache_folder(storage, model, layer, True, dtype))
    return set(known["doc_hash"].to_list())


def cached_document_embeddings(
    storage: StorageResource,
    docs: pl.DataFrame,
    model: str,
    layer: int | None = None,
    normalize: bool = True,
    log: Callable[[str], None] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> tuple[np.ndarray, int]:
    """Embeddings of `docs` (row i = docs row i) and how many were computed now; the rest come from a cache
    under `<data_dir>/cache/embeddings/<key>/` keyed by (model, layer, normalize, dtype unless float32) and
    document hash: one Parquet part per write, so steps running at once (several workers) each add theirs.
    Missing ones are computed on `device` (a reader setting: "auto" is resolved only when one is missing)."""
    from interp_assets.engine.documents import document_embeddings

    folder = _embedding_cache_folder(storage, model, layer, normalize, dtype)
    known, parts = _read_embedding_cache(folder, log)
    missing = (
        docs.select("doc_hash", "text")
        .unique("doc_hash", keep="first")
        .join(known.select("doc_hash"), on="doc_hash", how="anti")
    )
    if missing.height:
        progress = Progress("embedding documents", missing.height, log) if log is not None else None
        from interp_assets.engine.reader import resolve_device

        vectors = document_embeddings(
            missing["text"].to_list(),
            model,
            layer=layer,
            normalize=normalize,
            on_batch=progress.update if progress is not None else None,
            device=resolve_device(device),
            dtype=dtype,
        )
        new = pl.DataFrame(
            {"doc_hash": missing["doc_hash"], "embedding": list(vectors)}, schema=EMBEDDING_SCHEMA
        )
        _append_embedding_cache(folder, new, known, parts)
        known = pl.concat([known, new])
    aligned = docs.select("doc_hash").join(known, on="doc_hash", how="left", maintain_order="left")
    return np.asarray(aligned["embedding"].to_list(), dtype=np.float32), missing.height


_TEXTS = {"doc_hash": pl.String, "text": pl.String}


def cached_text_embeddings(
    storage: StorageResource, texts: list[str], model: str, layer: int | None = None, normalize: bool = True
) -> tuple[np.ndarray, int]:
    """`cached_document_embeddings` for any texts (excerpts, label queries): the same cache, keyed by the
    same content hash, so an excerpt that is a whole document, or a text embedded by an earlier run, is
    not embedded again. Returns the vectors (row i = texts[i]) and how many texts were embedded now."""
    from interp_assets.ingest import doc_hash

    frame = pl.DataFrame({"doc_hash": [doc_hash(t) for t in texts], "text": list(texts)}, schema=_TEXTS)
    return cached_document_embeddings(storage, frame, model, layer, normalize)


def sae_decoder(sae_reader: SAEReaderResource) -> np.ndarray:
    """The decoder `(d_sae, d_in)` of `sae_reader`'s SAE as float32 numpy, loaded on CPU without the model."""
    from interp_assets.engine.reader import load_sae

    sae, _ = load_sae(
        sae_path=sae_reader.sae_path,
        release=sae_reader.release,
        sae_id=sae_reader.sae_id,
        device="cpu",
        dtype="float32",
    )
    return sae.W_dec.detach().float().numpy()


def label_cache(storage: StorageResource, on_warning: Callable[[str], None] | None = None) -> LabelCache:
    """The label cache every labeling step shares (`<data_dir>/cache/labels.parquet`): a feature labeled
    by one asset is served from it to the others."""
    return LabelCache(storage.cache_dir / "labels.parquet", on_warning)


def encode_with_progress(
    cache: Any,
    sae_reader: SAEReaderResource,
    docs: pl.DataFrame,
    progress: Progress,
    on_start: Callable[[int], None] | None = None,
    embeddings_to: StorageResource | None = None,
) -> Any:
    """`cache.encode_missing(docs)` with `sae_reader`'s reader (loaded only if a document needs encoding),
    reporting documents done to `progress` after every batch; `on_start(n)` hears how many need encoding.
    Returns the `EncodeStats`.

    With `embeddings_to`, when the reader's forward can give the document embeddings
    (`engine.activations.embeds_documents`: the embedded MiniLM and other BERT encoders), a chunk with
    documents that storage's embeddings cache lacks also makes their normalized document embeddings at the
    SAE's hook (document_embeddings' default) and at the last layer (the label scorer's) and stores them
    there: document_embeddings and the scorer then find them made, and the blocks up to the SAE's hook run
    once for all."""
    from interp_assets.engine.activations import embeds_documents, encode_texts, hook_hidden_index
    from interp_assets.engine.documents import DOCUMENT_MAX_LENGTH
    from interp_assets.ingest import doc_hash

    embedded: dict[int | None, set[str]] = {}  # per layer, the cache's hashes, read when first needed

    def embedding_length(reader: Any, texts: list[str]) -> int | None:
        """DOCUMENT_MAX_LENGTH when this chunk has a text the embeddings cache lacks, else None."""
        if embeddings_to is None or not embeds_documents(reader):
            return None
        for layer in (hook_hidden_index(reader.hook), None):
            if layer not in embedded:
                embedded[layer] = embedded_document_hashes(
                    embeddings_to, sae_reader.model, sae_reader.dtype, layer
                )
        hashes = [doc_hash(t) for t in texts if isinstance(t, str)]
        lacking = any(h not in known for known in embedded.values() for h in hashes)
        return DOCUMENT_MAX_LENGTH if lacking else None

    chunk_start = [0]  # documents done before the chunk in flight

    def start(total: int) -> None:
        progress.total = total
        if on_start is not None:
            on_start(total)

    def chunk_done(done: int, total: int) -> None:
        chunk_start[0] = done
        progress.update(done)

    def encode(texts: list[str]) -> Any:
        reader = sae_reader.get_reader()
        return encode_texts(
            reader,
            texts,
            on_batch=lambda n: progress.update(chunk_start[0] + n),
            document_embedding_max_length=embedding_length(reader, texts),
        )

    def encoded(hashes: list[str], result: Any) -> None:
        for layer, made in result.document_embeddings.items():
            if made and embeddings_to is not None:
                rows = sorted(made)
                store_document_embeddings(
                    embeddings_to,
                    sae_reader.model,
                    sae_reader.dtype,
                    layer,
                    [hashes[i] for i in rows],
                    [made[i] for i in rows],
                )

    return cache.encode_missing(encode, docs, on_chunk=chunk_done, on_start=start, on_encoded=encoded)
