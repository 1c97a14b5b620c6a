"""Content-addressed store of encoded documents: what makes recompute incremental and crashes cheap.

Activations are keyed by (reader fingerprint, document hash). Documents are encoded in chunks; each
chunk is committed as `<id>.acts.parquet` (one row per nonzero), then `<id>.sums.json` (size and SHA-256
of both Parquet files), then `<id>.docs.parquet` (one row per document: tokens, truncation, status).
The `.docs` file is the commit marker: a chunk without it (a crash between the renames, or mid-write) is
ignored and redone. A run killed midway therefore redoes at most the chunk in flight, and an unchanged
drop encodes nothing. Chunks committed before sums were recorded have none until they are first read.
What a crash left uncommitted (`.acts` / `.sums.json` without `.docs`, temp files of interrupted
writes) is deleted by the next `encode_missing` once it is an hour old (`sweep_orphans`).

The cache root is a local folder or an fsspec URL of an object store (`s3://bucket/prefix`). There each
file is one object, uploaded whole (a PUT is atomic, so no rename is needed), in the same order: a chunk
is committed when its `.docs` object exists, and chunk ids are unique, so concurrent writers never touch
one another's objects. A local root keeps the local file operations (and their speed).

The token_activations and tokens tables of a dataset are stored in segments, one per cache chunk holding
some of its documents (`activation_segments`); a segment's name is a key of its content, so a re-run
rewrites only the segments whose documents changed. A chunk's rows carry each nonzero's token text and
offsets; the tables split them: token_activations keeps (doc_id, token_index, feature, activation), tokens
one row per (doc_id, token_index) with its text and offsets.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from interp_assets.conversations import document_inputs, reader_columns
from interp_assets.engine.activations import ACTIVATION_DTYPES, EncodedTexts, activation_fields, iter_chunks
from interp_assets.engine.allocator import release_freed_memory
from interp_assets.storage.checksums import (
    bytes_problem,
    bytes_record,
    checksum_problem,
    file_record,
    is_sha256,
)
from interp_assets.storage.parquet import (
    is_tmp_name,
    parquet_bytes,
    write_bytes_atomic,
    write_parquet_atomic,
    zstd_level_hint,
)

DOC_STATUS_SCHEMA = pa.schema(
    [
        ("doc_hash", pa.string()),
        ("n_tokens", pa.int32()),
        ("pooled_tokens", pa.int32()),
        ("truncated", pa.bool_()),
        ("status", pa.string()),
        ("reason", pa.string()),
    ]
)


# token_activations is written once and read many times: zstd at 15 stores it ~2% smaller than at 3 and
# reads as fast (writing a segment of 700k nonzeros takes about 0.2 s instead of 0.1 s).
TOKEN_ACTIVATIONS_ZSTD_LEVEL = 15


def token_activations_schema(activation_dtype: str = "float16") -> pa.Schema:
    """Schema of the token_activations table; `activation` is stored as `activation_dtype`. A token's text
    and offsets are in the tokens table (`TOKENS_SCHEMA`), once per token instead of once per nonzero."""
    schema = pa.schema(
        [
            ("dataset", pa.dictionary(pa.int32(), pa.string())),
            ("doc_id", pa.int32()),
            ("token_index", pa.int32()),
            *activation_fields(activation_dtype),
        ]
    )
    return zstd_level_hint(schema, TOKEN_ACTIVATIONS_ZSTD_LEVEL)


TOKENS_SCHEMA = pa.schema(
    [
        ("dataset", pa.dictionary(pa.int32(), pa.string())),
        ("doc_id", pa.int32()),
        ("token_index", pa.int32()),
        ("token", pa.dictionary(pa.int32(), pa.string())),
        ("char_start", pa.int32()),
        ("char_end", pa.int32()),
    ]
)


ACTIVATION_STATUS_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()),
        ("doc_id", pa.int32()),
        ("doc_hash", pa.string()),
        ("n_tokens", pa.int32()),
        ("pooled_tokens", pa.int32()),
        ("truncated", pa.bool_()),
        ("status", pa.string()),
        ("reason", pa.string()),
    ]
)


@dataclass(frozen=True)
class ActivationSegment:
    """The token_activations rows of one dataset that one cache chunk holds, named by their content."""

    name: str
    chunk: str
    documents: pl.DataFrame  # doc_id (int32), doc_hash of the documents read from this chunk, sorted


def activation_segment_name(
    fingerprint: str, chunk: str, dataset: str, schema: pa.Schema, documents: pl.DataFrame
) -> str:
    """`<chunk>-<digest>` over the reader fingerprint, chunk, dataset, table schema and the sorted
    (doc_id, doc_hash) pairs: what decides the segment's rows (a committed chunk never changes)."""
    digest = hashlib.sha256()
    for part in (fingerprint, chunk, dataset):
        digest.update(part.encode() + b"\0")
    digest.update(schema.serialize().to_pybytes())
    digest.update(documents["doc_id"].cast(pl.Int32).to_numpy().tobytes())
    digest.update("\n".join(documents["doc_hash"].to_list()).encode())
    return f"{chunk}-{digest.hexdigest()[:16]}"


@dataclass
class EncodeStats:
    """What one `encode_missing` call did."""

    documents: int
    reused: int
    encoded: int
    rejected: int
    chunks_written: int


QUARANTINE = "quarantine"  # sub-folder where unreadable chunks are moved aside
CHUNK_FILES = (".docs.parquet", ".sums.json", ".acts.parquet")  # docs first: without it, no commit
# a chunk holds at most this many documents / characters (read when a chunk is planned)
CHUNK_DOCS, CHUNK_CHARS = 2048, 400_000
ORPHAN_AGE_S = 3600.0  # an uncommitted file older than this is no chunk in flight: a crash left it


class ActivationCache:
    """Encoded documents for one reader fingerprint, under `<root>/<fingerprint>/` (`location`).

    `root` is a local folder (then `dir` is that fingerprint's folder as a `Path`) or an fsspec URL
    (`s3://bucket/prefix`; `dir` is then None and every file is reached through fsspec).

    A committed chunk whose files cannot be read (truncated, overwritten) or differ from its sums is moved
    to `quarantine/` with a warning naming it (`on_warning`, default: this module's logger); its documents
    then count as not encoded, so the next `encode_missing` encodes them again. Other chunks and datasets
    are unaffected. The `.docs` file is checked whenever the index is read (it is read whole anyway); the
    `.acts` file, the large one, only before its rows are read (`verify_chunks`, `iter_segment`), so
    chunks whose segments are already stored cost nothing.
    """

    def __init__(
        self, root: str | Path, fingerprint: str, on_warning: Callable[[str], None] | None = None
    ) -> None:
        self.fingerprint = fingerprint
        self._fs: fsspec.AbstractFileSystem | None = None
        self.dir: Path | None = None
        if isinstance(root, str) and "://" in root:
            fs, fspath = fsspec.core.url_to_fs(root)
            if isinstance(fs, LocalFileSystem):
                root = fspath
            else:
                self._fs = fs
                self._root = f"{fspath.rstrip('/')}/{fingerprint}"  # the folder, in fs's terms
                self.location = f"{root.rstrip('/')}/{fingerprint}"  # the same, as a URL
        if self._fs is None:
            self.dir = Path(root) / fingerprint
            self.dir.mkdir(parents=True, exist_ok=True)
            self.location = str(self.dir)
        self._index: tuple[tuple[str, ...], pl.DataFrame] | None = None
        self._verified: set[str] = set()  # chunks whose .acts file this instance checked or wrote
        self._warn = on_warning or logging.getLogger(__name__).warning

    # Files by name: local paths, or objects through fsspec
    def _url(self, name: str) -> str:
        """A file of this cache as a local path or a URL (what the storage functions take)."""
        return str(self.dir / name) if self.dir is not None else f"{self.location}/{name}"

    def _objects(self) -> dict[str, dict]:
        """{name: info} of the files in an object-store cache folder, from one fresh listing."""
        assert self._fs is not None
        self._fs.invalidate_cache(self._root)
        try:
            infos = self._fs.ls(self._root, detail=True)
        except FileNotFoundError:
            return {}
        return {i["name"].rstrip("/").rpartition("/")[2]: i for i in infos if i.get("type") == "file"}

    def _read(self, name: str) -> bytes:
        """The whole file (FileNotFoundError when absent)."""
        if self.dir is not None:
            return (self.dir / name).read_bytes()
        assert self._fs is not None
        return self._fs.cat_file(f"{self._root}/{name}")

    def _exists(self, name: str) -> bool:
        if self.dir is not None:
            return (self.dir / name).exists()
        assert self._fs is not None
        return self._fs.exists(f"{self._root}/{name}")

    def _parquet_metadata(self, name: str) -> pq.FileMetaData:
        """The footer of a Parquet file (an object store reads only its end)."""
        if self.dir is not None:
            return pq.read_metadata(self.dir / name)
        assert self._fs is not None
        with self._fs.open(f"{self._root}/{name}", "rb") as f:
            return pq.read_metadata(f)

    def _read_parquet(self, name: str, columns: list[str] | None = None) -> pl.DataFrame:
        if self.dir is not None:
            return pl.read_parquet(self.dir / name, columns=columns)
        return pl.read_parquet(io.BytesIO(self._read(name)), columns=columns)

    def quarantine(self, chunk_id: str, problem: str) -> None:
        """Move the files of a chunk to `quarantine/` and say so (its documents will be encoded again)."""
        moved = []
        if self.dir is not None:
            target = str(self.dir / QUARANTINE)
            os.makedirs(target, exist_ok=True)
            for suffix in CHUNK_FILES:
                path = self.dir / f"{chunk_id}{suffix}"
                if path.exists():
                    os.replace(path, f"{target}/{path.name}")
                    moved.append(f"{target}/{path.name}")
        else:  # an object store: copy, then delete (another process may be moving it too)
            assert self._fs is not None
            target = f"{self.location}/{QUARANTINE}"
            present = self._objects()
            for name in (f"{chunk_id}{suffix}" for suffix in CHUNK_FILES):
                if name in present:
                    with contextlib.suppress(FileNotFoundError):
                        self._fs.mv(f"{self._root}/{name}", f"{self._root}/{QUARANTINE}/{name}")
                        moved.append(f"{target}/{name}")
        self._index = None
        self._verified.discard(chunk_id)
        self._warn(
            f"Activation cache chunk {self._url(chunk_id)}.* is damaged or unreadable ({problem}); moved "
            f"to {', '.join(moved) or target}. Its documents will be encoded again; delete the quarantined "
            "files once you no longer need them."
        )

    def chunk_sums(self, chunk_id: str) -> dict | None:
        """The recorded `{"acts": {"bytes", "sha256"}, "docs": {...}}` of a chunk; None for a chunk committed
        before sums were recorded. ValueError when the sums file exists but is not valid."""
        name = f"{chunk_id}.sums.json"
        try:
            sums = json.loads(self._read(name))
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise ValueError(f"{name} is not valid JSON ({exc})") from exc
        if not isinstance(sums, dict) or not all(
            isinstance(sums.get(k), dict) and is_sha256(sums[k].get("sha256")) for k in ("acts", "docs")
        ):
            raise ValueError(f"{name} does not hold the sums of both files")
        return sums

    def verify_chunks(self, chunk_ids: Iterable[str]) -> list[str]:
        """Check the `.acts` files of committed chunks against their sums before their rows are trusted;
        quarantine each that differs (see `quarantine`) and return those ids.

        A chunk committed before sums were recorded gets them now (its footer was checked by
        `document_index`). Each chunk is checked once per instance; chunks it wrote are not checked.
        """
        bad = []
        for chunk_id in chunk_ids:
            if chunk_id in self._verified:
                continue
            acts = f"{chunk_id}.acts.parquet"
            try:
                sums = self.chunk_sums(chunk_id)
                if sums is None:
                    self._record_sums(chunk_id)
                    problem = None
                else:
                    problem = checksum_problem(self._url(acts), sums["acts"])
            except (OSError, ValueError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if problem is None:
                self._verified.add(chunk_id)
            else:
                self.quarantine(chunk_id, f"{acts}: {problem}")
                bad.append(chunk_id)
        return bad

    def _record_sums(self, chunk_id: str) -> None:
        """Write the sums of a chunk committed before sums were recorded (skipped on a read-only cache)."""
        record = {kind: file_record(self._url(f"{chunk_id}.{kind}.parquet")) for kind in ("acts", "docs")}
        with contextlib.suppress(OSError):
            write_bytes_atomic(self._url(f"{chunk_id}.sums.json"), json.dumps(record).encode())

    def sweep_orphans(self, min_age_s: float = ORPHAN_AGE_S) -> list[str]:
        """Delete what crashes left behind: `.acts` / `.sums.json` files of chunks that never got their
        `.docs` commit marker, and temp files of interrupted atomic writes; returns the names deleted.

        Only files older than `min_age_s` go: another process may be committing a chunk right now (its
        files appear within seconds of one another). Committed chunks are never touched.
        """
        now = time.time()
        if self.dir is None:
            removed = self._sweep_objects(now, min_age_s)
        else:
            removed = self._sweep_files(now, min_age_s)
        if removed:
            self._warn(
                f"Activation cache {self.location}: deleted {len(removed)} file(s) of chunks that were never "
                f"committed (a run ended mid-write): {', '.join(sorted(removed)[:5])}"
                f"{' ...' if len(removed) > 5 else ''}. Their documents are encoded again when needed."
            )
        return removed

    @staticmethod
    def _orphan(name: str, committed: set[str]) -> bool:
        chunk_id = next((name[: -len(s)] for s in CHUNK_FILES[1:] if name.endswith(s)), None)
        return (chunk_id is not None and chunk_id not in committed) or is_tmp_name(name)

    def _sweep_objects(self, now: float, min_age_s: float) -> list[str]:
        assert self._fs is not None
        objects = self._objects()
        committed = {n[: -len(".docs.parquet")] for n in objects if n.endswith(".docs.parquet")}
        removed = []
        for name, info in objects.items():
            if not self._orphan(name, committed):
                continue
            stamp = info.get("LastModified") or info.get("mtime") or info.get("created")
            age = now - (stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp or now))
            if age >= min_age_s:
                with contextlib.suppress(FileNotFoundError):
                    self._fs.rm_file(f"{self._root}/{name}")
                    removed.append(name)
        return removed

    def _sweep_files(self, now: float, min_age_s: float) -> list[str]:
        assert self.dir is not None
        committed = {p.name[: -len(".docs.parquet")] for p in self.dir.glob("*.docs.parquet")}
        removed = []
        for path in self.dir.iterdir():
            name = path.name
            if not self._orphan(name, committed) or not path.is_file():
                continue
            with contextlib.suppress(OSError):  # gone already, or a read-only cache: nothing to do
                if now - path.stat().st_mtime >= min_age_s:
                    path.unlink()
                    removed.append(name)
        return removed

    def committed_chunks(self) -> list[str]:
        """Ids of committed chunks, oldest name first (the order decides which copy of a document wins)."""
        if self.dir is None:
            objects = self._objects()
            docs = sorted(n[: -len(".docs.parquet")] for n in objects if n.endswith(".docs.parquet"))
            return [c for c in docs if f"{c}.acts.parquet" in objects]
        ids = []
        for p in sorted(self.dir.glob("*.docs.parquet")):
            chunk_id = p.name[: -len(".docs.parquet")]
            if (self.dir / f"{chunk_id}.acts.parquet").exists():
                ids.append(chunk_id)
        return ids

    def document_index(self) -> pl.DataFrame:
        """One row per cached document hash: the chunk holding it and its status (first chunk wins).

        Committed chunks never change, so the index is read again only when the set of chunks has.
        """
        chunks = tuple(self.committed_chunks())
        if self._index is not None and self._index[0] == chunks:
            return self._index[1]
        frames = []
        for c in chunks:
            name = f"{c}.acts.parquet"
            try:
                self._parquet_metadata(name)  # the activations are read later: their footer must be sound now
                name = f"{c}.docs.parquet"
                docs = self._read(name)
                sums = self.chunk_sums(c)
                problem = None if sums is None else bytes_problem(docs, sums["docs"])
                if problem is None:
                    frames.append(pl.read_parquet(io.BytesIO(docs)).with_columns(pl.lit(c).alias("chunk")))
            except (OSError, ValueError, pa.ArrowException, pl.exceptions.PolarsError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if problem is not None:
                self.quarantine(c, f"{name}: {problem}")
        chunks = tuple(self.committed_chunks())  # without the quarantined ones
        if not frames:
            empty = pl.from_arrow(DOC_STATUS_SCHEMA.empty_table())
            index = empty.with_columns(pl.lit("").alias("chunk")).head(0)
        else:
            index = (
                pl.concat(frames)
                .sort(pl.col("status") != "encoded", maintain_order=True)  # an encoded copy beats a rejection
                .unique("doc_hash", keep="first", maintain_order=True)
            )
        self._index = (chunks, index)
        return index

    def missing_documents(self, documents: pl.DataFrame, *, retry_rejected: bool = False) -> pl.DataFrame:
        """The documents (columns doc_hash, text, and messages for conversations) whose hash is not cached
        yet, first copy of each, in order: what `encode_missing` encodes."""
        unique = documents.select(reader_columns(documents.columns)).unique(
            "doc_hash", keep="first", maintain_order=True
        )
        index = self.document_index()
        done = index if not retry_rejected else index.filter(pl.col("status") == "encoded")
        return unique.join(done.select("doc_hash"), on="doc_hash", how="anti", maintain_order="left")

    def shard_plan(
        self,
        documents: pl.DataFrame,
        shard_documents: int,
        *,
        max_docs: int | None = None,
        max_chars: int | None = None,
    ) -> list[list[str]]:
        """The documents `encode_missing` would encode now, split into shards of about `shard_documents`
        (one shard when there are at most that many): the doc_hash lists, in order.

        Shards are cut at `encode_missing`'s own chunk boundaries, so a shard encoded by `encode_missing`
        forms the same chunks, hence the same batches and bit-identical activations, as the whole list in
        one call (a forward pass over a different batch can differ in the last bits)."""
        if shard_documents < 1:
            raise ValueError(f"shard_documents must be at least 1, got {shard_documents}")
        missing = self.missing_documents(documents)
        hashes = missing["doc_hash"].to_list()
        lengths = [len(t) for t in missing["text"].to_list()]
        count = max(1, -(-len(hashes) // shard_documents))
        shards: list[list[str]] = [[]]
        for rng in iter_chunks(len(hashes), lengths, max_docs or CHUNK_DOCS, max_chars or CHUNK_CHARS):
            # start a new shard when this chunk lies mostly past the current shard's share of the documents
            if shards[-1] and (rng.start + rng.stop) / 2 > len(hashes) * len(shards) / count:
                shards.append([])
            shards[-1].extend(hashes[i] for i in rng)
        return [s for s in shards if s]

    def encode_missing(
        self,
        encode: Callable[[Sequence[str]], EncodedTexts],
        documents: pl.DataFrame,
        *,
        max_docs: int | None = None,
        max_chars: int | None = None,
        retry_rejected: bool = False,
        on_chunk: Callable[[int, int], None] | None = None,
        on_start: Callable[[int], None] | None = None,
        on_encoded: Callable[[list[str], EncodedTexts], None] | None = None,
    ) -> EncodeStats:
        """Encode the documents (columns doc_hash, text, and messages for conversations) whose hash is not
        cached yet, chunk by chunk.

        `on_start(n)` hears how many documents need encoding before the first chunk; `on_encoded(hashes,
        result)` each chunk's document hashes and what `encode` gave for them, once committed; `on_chunk(done,
        n)` after each committed chunk."""
        unique = documents.unique("doc_hash", keep="first", maintain_order=True)
        self.sweep_orphans()
        missing = self.missing_documents(unique, retry_rejected=retry_rejected)
        texts = document_inputs(missing)  # a conversation is read as its turns, its text is the transcript
        hashes = missing["doc_hash"].to_list()
        encoded = rejected = chunks = 0
        lengths = [len(t) for t in texts]
        if on_start is not None:
            on_start(len(texts))
        for rng in iter_chunks(len(texts), lengths, max_docs or CHUNK_DOCS, max_chars or CHUNK_CHARS):
            result = encode([texts[i] for i in rng])
            chunk_hashes = [hashes[i] for i in rng]
            self._commit(chunk_hashes, result)
            if on_encoded is not None:
                on_encoded(chunk_hashes, result)
            chunks += 1
            rejected += len(result.errors)
            encoded += len(rng) - len(result.errors)
            del result
            release_freed_memory()
            if on_chunk is not None:
                on_chunk(rng.stop, len(texts))
        return EncodeStats(
            documents=unique.height,
            reused=unique.height - len(texts),
            encoded=encoded,
            rejected=rejected,
            chunks_written=chunks,
        )

    def _commit(self, hashes: list[str], result: EncodedTexts) -> None:
        # time first, so sorted names are oldest first (uuid1's hex starts with a field that wraps)
        chunk_id = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        acts = result.activations
        doc_hash = pa.array(np.array(hashes, dtype=object)[acts["doc_index"].to_numpy()], pa.string())
        acts = acts.drop_columns(["doc_index"]).add_column(0, "doc_hash", doc_hash)
        status = pa.table(
            {
                "doc_hash": pa.array(hashes, pa.string()),
                "n_tokens": pa.array(result.n_tokens, pa.int32()),
                "pooled_tokens": pa.array(result.pooled_tokens, pa.int32()),
                "truncated": pa.array(result.truncated, pa.bool_()),
                "status": pa.array(
                    ["rejected" if i in result.errors else "encoded" for i in range(len(hashes))]
                ),
                "reason": pa.array([result.errors.get(i) for i in range(len(hashes))], pa.string()),
            },
            schema=DOC_STATUS_SCHEMA,
        )
        written = write_parquet_atomic(self._url(f"{chunk_id}.acts.parquet"), acts)
        docs = parquet_bytes(status)
        acts_record = {"bytes": written["size_bytes"], "sha256": written["sha256"]}
        sums = {"acts": acts_record, "docs": bytes_record(docs)}
        write_bytes_atomic(self._url(f"{chunk_id}.sums.json"), json.dumps(sums).encode())
        write_bytes_atomic(self._url(f"{chunk_id}.docs.parquet"), docs)  # the commit marker, last
        self._verified.add(chunk_id)

    def activation_status(self, documents: pl.DataFrame, dataset: str) -> pa.Table:
        """Per-document outcome for a dataset (columns of ACTIVATION_STATUS_SCHEMA); missing = not encoded."""
        index = self.document_index().drop("chunk")
        joined = documents.select("doc_id", "doc_hash").join(
            index, on="doc_hash", how="left", maintain_order="left"
        )
        joined = joined.with_columns(
            pl.lit(dataset).alias("dataset"),
            pl.col("status").fill_null("missing"),
            pl.col("doc_id").cast(pl.Int32),
        ).select(ACTIVATION_STATUS_SCHEMA.names)
        return joined.to_arrow().cast(ACTIVATION_STATUS_SCHEMA)

    def stored_activation_dtype(self) -> str | None:
        """The dtype of the cached activation values (one per cache), or None while the cache is empty."""
        chunks = self.committed_chunks()
        if not chunks:
            return None
        name = f"{chunks[0]}.acts.parquet"
        if self.dir is not None:
            schema = pq.read_schema(self.dir / name)
        else:
            assert self._fs is not None
            with self._fs.open(f"{self._root}/{name}", "rb") as f:
                schema = pq.read_schema(f)
        stored = schema.field("activation").type
        return next(name for name, t in ACTIVATION_DTYPES.items() if t == stored)

    def activation_segments(
        self, documents: pl.DataFrame, dataset: str, schema: pa.Schema
    ) -> list[ActivationSegment]:
        """The encoded documents of `documents` (doc_id, doc_hash) grouped by the chunk holding them, oldest
        chunk first: one token_activations segment each (see `activation_segment_name`)."""
        index = self.document_index().filter(pl.col("status") == "encoded").select("doc_hash", "chunk")
        wanted = documents.select(pl.col("doc_id").cast(pl.Int32), "doc_hash").join(index, on="doc_hash")
        segments = []
        for (chunk,), part in sorted(wanted.group_by(["chunk"]), key=lambda group: group[0][0]):
            docs = part.select("doc_id", "doc_hash").sort("doc_id", "doc_hash")
            name = activation_segment_name(self.fingerprint, chunk, dataset, schema, docs)
            segments.append(ActivationSegment(name, chunk, docs))
        return segments

    def _segment_rows(self, segment: ActivationSegment, dataset: str, schema: pa.Schema) -> pl.DataFrame:
        """The cached rows of one segment's documents (this chunk's copy of each, first chunk wins), with
        their doc_id(s) and `dataset`: one row per nonzero, with the chunk's columns that `schema` names
        (only those are read: tokens and token_activations each read the chunk once).

        The chunk is verified first (`verify_chunks`); a damaged one is quarantined and this raises."""
        name = f"{segment.chunk}.acts.parquet"
        columns = ["doc_hash", *(c for c in schema.names if c not in ("dataset", "doc_id"))]
        try:
            if self.verify_chunks([segment.chunk]):
                raise OSError("it differs from its recorded size or checksum")
            acts = self._read_parquet(name, columns)
        except (OSError, pl.exceptions.PolarsError) as exc:
            if self._exists(name):
                self.quarantine(segment.chunk, f"{name}: {type(exc).__name__}: {exc}")
            raise ValueError(
                f"Activation cache chunk {self._url(name)} could not be read ({exc}); it was moved to "
                "quarantine and its documents will be encoded again: run the step again."
            ) from exc
        # map hash -> doc_id(s): a text that occurs twice in the dataset gets both documents' rows
        return acts.join(segment.documents, on="doc_hash").with_columns(pl.lit(dataset).alias("dataset"))

    def iter_segment(
        self, segment: ActivationSegment, dataset: str, schema: pa.Schema
    ) -> Iterator[pa.RecordBatch]:
        """The token_activations rows of one segment (sorted by doc_id, token_index, feature), cast to
        `schema`. The chunk is verified first (see `_segment_rows`)."""
        rows = self._segment_rows(segment, dataset, schema).sort("doc_id", "token_index", "feature")
        yield from rows.select(schema.names).to_arrow().cast(schema).to_batches(max_chunksize=1_000_000)

    def iter_tokens_segment(
        self, segment: ActivationSegment, dataset: str, schema: pa.Schema = TOKENS_SCHEMA
    ) -> Iterator[pa.RecordBatch]:
        """The tokens rows of one segment: one per (doc_id, token_index) with at least one nonzero, sorted,
        with the token's text and offsets. The chunk is verified first (see `_segment_rows`)."""
        rows = self._segment_rows(segment, dataset, schema).select(schema.names)
        rows = rows.unique(["doc_id", "token_index"], keep="first").sort("doc_id", "token_index")
        yield from rows.to_arrow().cast(schema).to_batches(max_chunksize=1_000_000)

    def iter_token_activations(
        self, documents: pl.DataFrame, dataset: str, schema: pa.Schema | None = None
    ) -> Iterator[pa.RecordBatch]:
        """Stream the token_activations rows of `documents` (doc_id, doc_hash), one cache chunk at a time.

        `schema` defaults to `token_activations_schema` with the dtype the cache holds.
        """
        schema = schema or token_activations_schema(self.stored_activation_dtype() or "float16")
        for segment in self.activation_segments(documents, dataset, schema):
            yield from self.iter_segment(segment, dataset, schema)

    def iter_tokens(self, documents: pl.DataFrame, dataset: str) -> Iterator[pa.RecordBatch]:
        """Stream the tokens rows of `documents` (doc_id, doc_hash), one cache chunk at a time."""
        for segment in self.activation_segments(documents, dataset, TOKENS_SCHEMA):
            yield from self.iter_tokens_segment(segment, dataset)
