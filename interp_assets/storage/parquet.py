"""Parquet tables on pyarrow: atomic, streaming writes; segmented partitions; lazy Polars reads.

Layout (the same as `interp_assets.storage.paths.table_path`):
`<base>/<asset_name>/<partition>.parquet`, unpartitioned `<base>/<asset_name>.parquet`,
where `asset_name` is the last component of the asset key path. `base_path` is a local path or an
fsspec URL (`s3://...`, `memory://...`).

A partition written as a `SegmentedTable` is a folder `<base>/<asset_name>/<partition>/` instead: one
Parquet file per segment plus `_manifest.json`, which lists the segment files readers read (see
`write_segmented_atomic`). Every reader here (`read_table`, `table_exists`, `table_files`, the IO
manager's loads) accepts either layout.
"""

from __future__ import annotations

import base64
import contextlib
import inspect
import io
import json
import os
import random
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from interp_assets.storage.checksums import checksum_problem, file_sha256, is_sha256
from interp_assets.storage.paths import check_storage_key, segments_path, table_path

PREVIEW_ROWS = 5
PREVIEW_CELL_CHARS = 60
# Each row group repeats its columns' dictionaries: 512k rows amortize them (token_activations, default SAE:
# the `token` column 0.18 -> 0.10 bytes per nonzero) while a pending group stays far below ROW_GROUP_BYTES.
ROW_GROUP_ROWS = 512 * 1024
ROW_GROUP_BYTES = 64 * 1024 * 1024
# zstd's own default level; Arrow's (1) stores token_activations ~2.5% larger for about the same speed. A
# schema can ask for another level (`zstd_level_hint`).
ZSTD_LEVEL = 3
ZSTD_LEVEL_HINT = b"parquet.zstd_level"

_FLOAT_PHYSICAL = ("FLOAT", "DOUBLE")
_HAS_BYTE_STREAM_SPLIT = "use_byte_stream_split" in inspect.signature(pq.ParquetWriter.__init__).parameters


@dataclass(frozen=True)
class StreamedTable:
    """A table given as a schema plus an iterable of record batches (may be empty), written batch by batch."""

    schema: pa.Schema
    batches: Iterable[pa.RecordBatch]


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _as_stream(data: Any) -> tuple[pa.Schema, Iterator[pa.RecordBatch] | None, pa.Table | None]:
    """Normalize supported inputs to `(schema, batches, table)`: exactly one of batches/table is set."""
    if isinstance(data, pa.Table):
        return data.schema, None, data
    if isinstance(data, pa.RecordBatch):
        return data.schema, None, pa.Table.from_batches([data])
    if isinstance(data, pl.DataFrame):
        table = data.to_arrow()
        return table.schema, None, table
    if isinstance(data, pl.LazyFrame):
        schema = pl.DataFrame(schema=data.collect_schema()).to_arrow().schema
        frames = data.collect_batches()
        return schema, (b for df in frames for b in df.to_arrow().to_batches()), None
    if isinstance(data, StreamedTable):
        return data.schema, iter(data.batches), None
    if isinstance(data, pa.RecordBatchReader):
        return data.schema, iter(data), None
    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise TypeError(
            f"ParquetIOManager cannot write a {type(data).__name__}: return a pyarrow.Table, a "
            "polars.DataFrame/LazyFrame, an iterable of pyarrow.RecordBatch, a StreamedTable(schema, "
            "batches), or None."
        )
    batches = iter(data)
    first = next(batches, None)
    if first is None:
        raise ValueError(
            "The record-batch iterator was empty, so the table has no schema: return "
            "StreamedTable(schema, batches) (or a zero-row pyarrow.Table) to write an empty table."
        )
    if isinstance(first, pa.Table):
        first_batches = first.to_batches()
        schema = first.schema
    elif isinstance(first, pa.RecordBatch):
        first_batches, schema = [first], first.schema
    else:
        raise TypeError(f"The iterable yielded a {type(first).__name__}; yield pyarrow.RecordBatch objects.")

    def chained() -> Iterator[pa.RecordBatch]:
        yield from first_batches
        for item in batches:
            if isinstance(item, pa.Table):
                yield from item.to_batches()
            else:
                yield item

    return schema, chained(), None


ENCODING_HINT = b"parquet.encoding"


def encoding_hint(field: pa.Field, encoding: str) -> pa.Field:
    """`field` marked to be written with `encoding`: "byte_stream_split" or "plain" (no dictionary)."""
    if encoding not in ("byte_stream_split", "plain"):
        raise ValueError(f"encoding must be 'byte_stream_split' or 'plain', got {encoding!r}.")
    return field.with_metadata({**(field.metadata or {}), ENCODING_HINT: encoding.encode()})


def zstd_level_hint(schema: pa.Schema, level: int) -> pa.Schema:
    """`schema` marked to be written with zstd at `level` instead of `ZSTD_LEVEL` (other metadata kept)."""
    return schema.with_metadata({**(schema.metadata or {}), ZSTD_LEVEL_HINT: str(int(level)).encode()})


def _zstd_level(schema: pa.Schema) -> int:
    return int((schema.metadata or {}).get(ZSTD_LEVEL_HINT, ZSTD_LEVEL))


def _encoding_options(schema: pa.Schema) -> dict[str, Any]:
    """Per-column Parquet encodings: dictionary by default, BYTE_STREAM_SPLIT on float leaves.

    A top-level field can override this with `encoding_hint` (e.g. BYTE_STREAM_SPLIT on an integer
    column of near-random ids, or plain for float16). Dictionary encoding wins over BYTE_STREAM_SPLIT
    when a column has both, so split columns are left out of the dictionary list. Leaf paths come from the
    Parquet schema of a zero-row file (`a.list.element`).
    """
    hints = {f.name: (f.metadata or {}).get(ENCODING_HINT, b"").decode() for f in schema}
    if not _HAS_BYTE_STREAM_SPLIT:
        plain = [name for name, hint in hints.items() if hint]
        return {"use_dictionary": [f.name for f in schema if f.name not in plain] or False}
    buf = io.BytesIO()
    pq.write_table(schema.empty_table(), buf)
    pq_schema = pq.ParquetFile(pa.BufferReader(buf.getvalue())).schema
    split, dictionary = [], []
    for leaf in (pq_schema.column(i) for i in range(len(pq_schema))):
        hint = hints.get(leaf.path.split(".")[0], "")
        if hint == "byte_stream_split" or (not hint and leaf.physical_type in _FLOAT_PHYSICAL):
            split.append(leaf.path)
        elif not hint:
            dictionary.append(leaf.path)
    options: dict[str, Any] = {"use_dictionary": dictionary or False}
    if split:
        options["use_byte_stream_split"] = split
    return options


def _schema_str(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def _conform(batch: Any, schema: pa.Schema, index: int, where: str) -> pa.RecordBatch:
    if not isinstance(batch, pa.RecordBatch):
        raise TypeError(f"Batch {index} for {where} is a {type(batch).__name__}; yield pyarrow.RecordBatch.")
    if batch.schema.equals(schema, check_metadata=False):
        return batch
    try:
        return batch.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
        raise ValueError(
            f"Batch {index} for {where} has schema [{_schema_str(batch.schema)}] but the table's schema "
            f"is [{_schema_str(schema)}]; make every batch share one schema."
        ) from e


def _write_stream(
    sink: Any, schema: pa.Schema, batches: Iterator[pa.RecordBatch] | None, table: pa.Table | None, where: str
) -> tuple[int, pa.Table]:
    """Write to `sink` with zstd; returns (row count, first rows for the preview). Memory stays bounded."""
    rows = 0
    head: list[pa.RecordBatch] = []
    head_rows = 0
    with pq.ParquetWriter(
        sink, schema, compression="zstd", compression_level=_zstd_level(schema), **_encoding_options(schema)
    ) as writer:
        if table is not None:
            writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
            return table.num_rows, table.slice(0, PREVIEW_ROWS)
        pending: list[pa.RecordBatch] = []
        pending_rows = pending_bytes = 0
        for i, raw in enumerate(batches or ()):
            batch = _conform(raw, schema, i, where)
            if batch.num_rows == 0:
                continue
            rows += batch.num_rows
            if head_rows < PREVIEW_ROWS:
                head.append(batch.slice(0, PREVIEW_ROWS - head_rows))
                head_rows += head[-1].num_rows
            pending.append(batch)
            pending_rows += batch.num_rows
            pending_bytes += batch.nbytes
            if pending_rows >= ROW_GROUP_ROWS or pending_bytes >= ROW_GROUP_BYTES:
                writer.write_table(pa.Table.from_batches(pending, schema), row_group_size=ROW_GROUP_ROWS)
                pending, pending_rows, pending_bytes = [], 0, 0
        if pending:
            writer.write_table(pa.Table.from_batches(pending, schema), row_group_size=ROW_GROUP_ROWS)
    return rows, pa.Table.from_batches(head, schema)


def _fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of `path` and the path in it. An object store's cached listings of `path` and its
    parents are dropped first: another process may have written there since (s3fs caches listings)."""
    fs, fspath = fsspec.core.url_to_fs(path)
    if not _is_local(fs):
        fs.invalidate_cache(fspath)
    return fs, fspath


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    """An S3-compatible object store (s3fs): no rename, but every PUT of an object is atomic and writes can
    be conditional (`If-Match` / `If-None-Match`)."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "s3" in protocols


def _tmp_name(final: str) -> str:
    head, _, name = final.rpartition("/")
    return f"{head}/.{name}.{uuid.uuid4().hex}.tmp"


def is_tmp_name(name: str) -> bool:
    """Whether a file name is the temp file of an atomic write (`_tmp_name`): what an interrupted write
    leaves behind."""
    return name.startswith(".") and name.endswith(".tmp")


def _fsync_local(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Written:
    """What one atomic file write produced."""

    path: str  # as shown in metadata: the absolute local path, or the URL
    rows: int
    size: int
    sha256: str  # of the file's bytes, read back before the rename
    schema: pa.Schema
    head: pa.Table


def write_parquet_atomic(path: str, data: Any) -> dict[str, Any]:
    """Write `data` to `path` atomically (temp file in the same folder, then rename); return what was written
    (`written_summary`).

    A failure mid-write leaves the previous file untouched and no temp file behind. The summary's
    `sha256` is the file's content checksum (`interp_assets.storage.checksums`).
    """
    w = _write_file_atomic(path, data)
    return written_summary(w.path, w.rows, w.size, w.schema, w.head, w.sha256)


def _discard(fs: fsspec.AbstractFileSystem, tmp: str) -> None:
    """Remove a temp file a failed write left (best effort: the failure itself is what gets raised)."""
    with contextlib.suppress(Exception):
        if _is_local(fs):
            os.remove(tmp)
        elif fs.exists(tmp):
            fs.rm(tmp)


def _write_file_atomic(path: str, data: Any) -> _Written:
    schema, batches, table = _as_stream(data)
    fs, fspath = _fs(path)
    if _is_s3(fs):
        return _put_file_atomic(fs, fspath, path, schema, batches, table)
    if _is_local(fs):
        fspath = os.path.abspath(fspath)
        os.makedirs(os.path.dirname(fspath), exist_ok=True)
    else:
        fs.makedirs(fspath.rpartition("/")[0], exist_ok=True)
    tmp = _tmp_name(fspath)
    try:
        if _is_local(fs):
            rows, head = _write_stream(tmp, schema, batches, table, path)
            _fsync_local(tmp)
            sha256 = file_sha256(tmp)
            os.replace(tmp, fspath)
            with contextlib.suppress(OSError):
                _fsync_local(os.path.dirname(fspath))
            size = os.path.getsize(fspath)
            shown_path = fspath
        else:
            with fs.open(tmp, "wb") as f:
                rows, head = _write_stream(f, schema, batches, table, path)
            sha256 = file_sha256(fs.unstrip_protocol(tmp))
            fs.mv(tmp, fspath)
            size = fs.size(fspath)
            shown_path = path
    except BaseException:
        _discard(fs, tmp)
        raise
    return _Written(shown_path, rows, size, sha256, schema, head)


def _put_file_atomic(
    fs: fsspec.AbstractFileSystem,
    fspath: str,
    path: str,
    schema: pa.Schema,
    batches: Iterator[pa.RecordBatch] | None,
    table: pa.Table | None,
) -> _Written:
    """`_write_file_atomic` on an object store, which has no rename: the file is written to a local temp
    file (its checksum read there), then uploaded as one object. The object appears only whole, when its
    PUT (or its multipart upload) completes; a failed upload is aborted, so a failure leaves the previous
    object and nothing else behind."""
    handle, tmp = tempfile.mkstemp(prefix=".interp-upload-", suffix=".parquet.tmp")
    os.close(handle)
    try:
        rows, head = _write_stream(tmp, schema, batches, table, path)
        sha256 = file_sha256(tmp)
        size = os.path.getsize(tmp)
        fs.put_file(tmp, fspath)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)
    return _Written(path, rows, size, sha256, schema, head)


def write_bytes_atomic(path: str, payload: bytes) -> None:
    """Write a small file atomically (temp file, fsync, rename), like `write_parquet_atomic`; on an object
    store, one PUT (atomic there)."""
    fs, fspath = _fs(path)
    if _is_s3(fs):
        fs.pipe_file(fspath, payload)
        return
    tmp = _tmp_name(fspath)
    try:
        if _is_local(fs):
            with open(tmp, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, fspath)
            with contextlib.suppress(OSError):
                _fsync_local(os.path.dirname(fspath))
        else:
            fs.pipe_file(tmp, payload)
            fs.mv(tmp, fspath)
    except BaseException:
        _discard(fs, tmp)
        raise


def parquet_bytes(data: Any) -> bytes:
    """`data` as the bytes of a Parquet file written as `write_parquet_atomic` writes it: for a small file
    whose checksum must be recorded before the file itself is written (`write_bytes_atomic`)."""
    schema, batches, table = _as_stream(data)
    buf = io.BytesIO()
    _write_stream(buf, schema, batches, table, "parquet_bytes")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------------


def _cell(value: Any, limit: int = PREVIEW_CELL_CHARS) -> str:
    text = "" if value is None else str(value)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return (
        text.replace("\\", "\\\\")
        .replace("|", "\\|")
        .replace("\r\n", "\\n")
        .replace("\n", "\\n")
        .replace("\r", "\\n")
    )


_FLOAT_TYPES = {"halffloat": np.float16, "float": np.float32}


def markdown_preview(head: pa.Table, max_rows: int = PREVIEW_ROWS) -> str:
    """First `max_rows` rows as a Markdown table; cells truncated, `|` and newlines escaped."""
    names = [_cell(n) for n in head.column_names]
    if not names:
        return "_(no columns)_"
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    # floats shown as the shortest text their own type round-trips (a float16 0.388, not 0.387939453125)
    kinds = [_FLOAT_TYPES.get(str(field.type)) for field in head.schema]
    for row in head.slice(0, max_rows).to_pylist():
        cells = [
            _cell(str(kind(v)) if kind is not None and isinstance(v, float) else v)
            for v, kind in zip(row.values(), kinds, strict=True)
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if head.num_rows == 0:
        lines.append("\n_(no rows)_")
    return "\n".join(lines)


def written_summary(
    path: str,
    row_count: int,
    size_bytes: int,
    schema: pa.Schema,
    head: pa.Table,
    sha256: str | None = None,
) -> dict[str, Any]:
    """What one write produced, as plain values (`io_managers.parquet.output_metadata` turns them into
    Dagster metadata): rows, path, bytes, schema, a Markdown preview of the first rows and, for a single
    file, its content checksum `sha256`."""
    summary = {
        "row_count": row_count,
        "path": path,
        "size_bytes": size_bytes,
        "schema": schema,
        "preview": markdown_preview(head),
    }
    if sha256 is not None:
        summary["sha256"] = sha256
    return summary


# --------------------------------------------------------------------------------------------------
# Segmented partitions
# --------------------------------------------------------------------------------------------------

MANIFEST = "_manifest.json"
MANIFEST_FORMAT = 1
DEBRIS_AGE_S = 3600.0  # a file no manifest lists (a crashed write's) is deleted once this old
SWAP_ATTEMPTS = 50  # conditional manifest swaps a write tries while other writers of the partition win


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP: Any = _Keep()  # a SegmentedTable value: reuse the stored segment of that name (no read, no write)


@dataclass(frozen=True)
class SegmentedTable:
    """One table partition as named segments, stored as one Parquet file each plus a manifest.

    `segments` maps a segment name to its data (any form `write_parquet_atomic` takes; cast to `schema`)
    or to `KEEP`, which reuses the segment of that name the partition's manifest lists (see
    `stored_segments`). Names are the caller's content keys: same name, same rows. They must be safe
    file-name parts (letters, digits, `_ . -`). The mapping's order is the order readers see.
    """

    schema: pa.Schema
    segments: Mapping[str, Any]


def _schema_text(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode("ascii")


def _schema_from_text(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def _name_of(path: str) -> str:
    return path.rstrip("/").rpartition("/")[2]


def read_manifest(folder: str) -> dict[str, Any] | None:
    """The manifest of a segmented partition folder (local path or URL); None when it has none.

    Format: `{"format": 1, "version": n, "rows": total, "columns": [[name, type], ...], "schema": <base64
    Arrow IPC schema>, "segments": [{"name", "file", "rows", "bytes", "sha256"}, ...], "retained": [...]}`.
    `version` counts the writes of the partition (each manifest is its predecessor's + 1; missing before
    it was recorded: 0).
    `segments` is the table, in order; `retained` lists the previous manifest's segments that are no
    longer part of it, kept for one more write so readers that resolved the previous manifest can finish.
    `sha256` (the file's content checksum) is missing from entries written before it was recorded.
    """
    raw = _manifest_bytes(folder)[0]
    return None if raw is None else _parse_manifest(folder, raw)


def _parse_manifest(folder: str, raw: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
        valid = (
            manifest.get("format") == MANIFEST_FORMAT
            and isinstance(manifest.get("segments"), list)
            and isinstance(manifest.get("schema"), str)
            and all(_valid_entry(e) for e in manifest["segments"] + manifest.get("retained", []))
        )
    except (ValueError, AttributeError, TypeError):
        valid = False
    if not valid:
        raise ValueError(
            f"{folder.rstrip('/')}/{MANIFEST} is not a segment manifest of format {MANIFEST_FORMAT}: "
            "delete that folder and materialize the partition again."
        )
    return manifest


_SEGMENT_FILE = re.compile(r"^(?P<name>.+)\.[0-9a-f]{12}\.parquet$")


def _read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes | None:
    """The whole file in one read (on an object store, one GET: a consistent copy); None when absent."""
    try:
        return fs.cat_file(path)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


async def _s3_get(fs: Any, path: str) -> tuple[bytes | None, str | None]:
    """(content, ETag) of an S3 object from one GET, so the two always belong together; (None, None) when
    it does not exist."""
    bucket, key, _ = fs.split_path(path)
    try:
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    except FileNotFoundError:
        return None, None
    try:
        return await resp["Body"].read(), resp["ETag"]
    finally:
        resp["Body"].close()


def _manifest_bytes(folder: str) -> tuple[bytes | None, Any]:
    """(raw manifest or None, the version a conditional swap compares against: `_swap_manifest`)."""
    fs, fspath = _fs(folder)
    path = f"{fspath.rstrip('/')}/{MANIFEST}"
    if _is_s3(fs):
        return fsspec.asyn.sync(fs.loop, _s3_get, fs, path)
    raw = _read_bytes(fs, path)
    return raw, raw


def _precondition_failed(exc: OSError) -> bool:
    """Whether an S3 write failed only because its condition did not hold (another writer came first)."""
    if isinstance(exc, FileExistsError):  # If-None-Match: * on an object that exists
        return True
    response = getattr(exc.__cause__, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = response.get("Error", {}).get("Code")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


@contextlib.contextmanager
def _folder_lock(folder: str) -> Iterator[None]:
    """An exclusive advisory lock on a local folder (flock on the folder itself: no lock file to list,
    sweep or leave behind); a no-op where flock does not exist."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _swap_manifest(folder: str, payload: bytes, version: Any) -> bool:
    """Replace the manifest of `folder` with `payload` if it is still at `version` (from `_manifest_bytes`);
    False, changing nothing, when another writer replaced it since.

    S3: one conditional PUT (`If-Match: <ETag>`, or `If-None-Match: *` for the first manifest), which the
    store checks and applies atomically. Local: the check and the rename under an exclusive lock of the
    folder. Other filesystems (memory://, one process): written as is.
    """
    fs, fspath = _fs(folder)
    path = f"{fspath.rstrip('/')}/{MANIFEST}"
    if _is_s3(fs):
        condition = {"IfMatch": version} if version is not None else {"mode": "create"}
        try:
            fs.pipe_file(path, payload, **condition)
        except FileNotFoundError:  # If-Match on a manifest deleted since (a switch to the single-file layout)
            if version is None:
                raise
            return False
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            raise
        return True
    if _is_local(fs):
        with _folder_lock(fspath):
            if _read_bytes(fs, path) != version:
                return False
            write_bytes_atomic(path, payload)
        return True
    write_bytes_atomic(f"{folder.rstrip('/')}/{MANIFEST}", payload)
    return True


def _valid_entry(entry: Any) -> bool:
    """A manifest entry names a segment file inside its folder (no path, no glob) with integer counts."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        return False
    match = _SEGMENT_FILE.match(entry.get("file") or "") if isinstance(entry.get("file"), str) else None
    try:
        check_storage_key(entry["name"], "segment name")
    except ValueError:
        return False
    counts = all(
        isinstance(entry.get(k), int) and not isinstance(entry.get(k), bool) for k in ("rows", "bytes")
    )
    checksum = "sha256" not in entry or is_sha256(entry["sha256"])
    return match is not None and match.group("name") == entry["name"] and counts and checksum


def schema_of_manifest(manifest: dict[str, Any]) -> pa.Schema:
    """The Arrow schema a segment manifest records."""
    return _schema_from_text(manifest["schema"])


def segment_files(folder: str) -> list[str] | None:
    """`<folder>/<file>` of each segment the manifest of `folder` lists, in order; None without a manifest."""
    manifest = read_manifest(folder)
    return None if manifest is None else _listed_files(folder, manifest)


def _listed_files(folder: str, manifest: dict[str, Any]) -> list[str]:
    return [f"{folder.rstrip('/')}/{e['file']}" for e in manifest["segments"]]


def stored_segments(
    base_path: str,
    table: str,
    partition: str,
    schema: pa.Schema | None = None,
    on_bad: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """Segments of a stored partition that `KEEP` can reuse: {name: file}, in manifest order.

    Empty when the partition is absent or a single file, or (given `schema`) was stored with another
    schema. A segment is trusted only when its file exists with the size and the content checksum the
    manifest recorded (an entry written before checksums were recorded: a readable Parquet footer
    instead); any other is left out, so the next write writes it again, and `on_bad` (if given) hears
    which file and why. Cost: every listed file is read once (about 1 GB/s).
    """
    folder = segments_path(base_path, table, partition)
    manifest = read_manifest(folder)
    if manifest is None or (schema is not None and not _schema_from_text(manifest["schema"]).equals(schema)):
        return {}
    fs, fspath = _fs(folder)
    sizes = {_name_of(info["name"]): info.get("size") for info in fs.ls(fspath, detail=True)}
    kept = {}
    for entry in manifest["segments"]:
        path = f"{folder}/{entry['file']}"
        if entry["file"] not in sizes:
            continue  # gone: written again, nothing to report
        try:
            problem = checksum_problem(path, entry, size=sizes[entry["file"]])
            if problem is None and "sha256" not in entry:  # recorded before checksums: the footer must read
                with fs.open(f"{fspath.rstrip('/')}/{entry['file']}", "rb") as fh:
                    pq.read_metadata(fh)
        except (OSError, pa.ArrowException) as exc:
            problem = f"unreadable ({type(exc).__name__}: {exc})"
        if problem is None:
            kept[entry["name"]] = path
        elif on_bad is not None:
            on_bad(f"Stored segment {path} is damaged ({problem}): it is written again.")
    return kept


def table_segments(base_path: str, table: str, partition: str) -> dict[str, str]:
    """{segment name: file} of a stored segmented partition, in manifest order (every segment it lists).

    FileNotFoundError (saying what to materialize) when the partition is not stored, ValueError when it is
    a single file.
    """
    folder = segments_path(base_path, table, partition)
    manifest = read_manifest(folder)
    if manifest is None:
        path = table_path(base_path, table, partition)
        if is_stored(path):
            raise ValueError(
                f"Table {table!r} partition {partition!r} is one Parquet file ({path}), not segments: "
                f"materialize {table} for partition {partition} again to store it in segments."
            )
        raise missing_table_error(table, partition, path)
    return {e["name"]: f"{folder}/{e['file']}" for e in manifest["segments"]}


def _segment_data(value: Any, schema: pa.Schema) -> StreamedTable:
    """A segment's data as a stream cast to the table's schema (the writer names any batch that cannot be)."""
    _, batches, table = _as_stream(value)
    return StreamedTable(schema, table.to_batches() if table is not None else batches or ())


def _file_head(path: str) -> pa.Table:
    fs, fspath = _fs(path)
    with fs.open(fspath, "rb") as f:
        return pa.Table.from_batches([next(pq.ParquetFile(f).iter_batches(batch_size=PREVIEW_ROWS))])


def _age_s(fs: fsspec.AbstractFileSystem, info: dict[str, Any], now: float) -> float:
    stamp = info.get("mtime") or info.get("created") or info.get("LastModified")  # LastModified: S3
    if stamp is None:
        try:
            stamp = fs.modified(info["name"]).timestamp()
        except (NotImplementedError, OSError, ValueError):
            return 0.0  # unknown age: keep it
    return now - (stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp))


def _delete_unneeded(
    fs: fsspec.AbstractFileSystem, fspath: str, manifest: dict[str, Any], previous: dict[str, Any]
) -> None:
    """Delete what no reader can need: segments the previous manifest only retained, and files no manifest
    lists once DEBRIS_AGE_S old (a younger one may be a concurrent write's)."""
    needed = {MANIFEST} | {e["file"] for e in manifest["segments"] + manifest["retained"]}
    superseded = {e["file"] for e in previous.get("retained", [])}
    now = time.time()
    for info in fs.ls(fspath, detail=True):
        name = _name_of(info["name"])
        if name in needed or info.get("type") != "file":
            continue
        if name in superseded or _age_s(fs, info, now) > DEBRIS_AGE_S:
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(info["name"])


def _remove_path(fs: fsspec.AbstractFileSystem, fspath: str, recursive: bool = False) -> None:
    with contextlib.suppress(FileNotFoundError):
        if fs.exists(fspath):
            fs.rm(fspath, recursive=recursive)


def write_segmented_atomic(folder: str, data: SegmentedTable) -> dict[str, Any]:
    """Write one segmented partition into `folder` and return what was written (`written_summary`).

    Order: each segment to write goes to a new file `<name>.<random>.parquet` (atomic, fsynced; on S3 one
    object upload); then the manifest is replaced (atomic rename; on S3 one PUT): before that readers see
    the previous table, after it the new one, never a mix; last, files no reader needs are deleted
    (`_delete_unneeded`) and so is the partition's single-file layout (`<folder>.parquet`), if it had
    one. A failure before the manifest swap leaves the previous table as it was. The manifest records
    each file's size and content checksum (`sha256`); a kept segment recorded without one gets it now.

    Two writers of one partition: the swap is conditional (`_swap_manifest`: S3's `If-Match` on the
    manifest's ETag, a folder lock locally), so a manifest replaces exactly the one it was built on. A
    writer that finds another's manifest in place rebuilds its own on that one (its `retained` then
    keeps the other writer's segments for readers that resolved them) and swaps again; the last to
    swap is the table, every write counts once in the manifest's `version`, and no write is lost from
    the retention chain unnoticed.
    """
    fs, fspath = _fs(folder)
    if _is_local(fs):
        folder = fspath = os.path.abspath(fspath)
        os.makedirs(fspath, exist_ok=True)
    else:
        folder, fspath = folder.rstrip("/"), fspath.rstrip("/")
        fs.makedirs(fspath, exist_ok=True)
    raw, version = _manifest_bytes(folder)
    previous = _parse_manifest(folder, raw) if raw is not None else {"segments": [], "retained": []}
    same_schema = "schema" in previous and _schema_from_text(previous["schema"]).equals(data.schema)
    stored = {e["name"]: e for e in previous["segments"]}
    entries: list[dict[str, Any]] = []
    head: pa.Table | None = None
    written_rows = written = 0
    for name, value in data.segments.items():
        check_storage_key(name, "segment name")
        if value is KEEP:
            if name not in stored or not same_schema:
                why = "is not in its manifest" if name not in stored else "was stored with another schema"
                raise ValueError(
                    f"Segment {name!r} of {folder} is marked KEEP but {why}: pass its data instead "
                    "(KEEP only the names stored_segments(..., schema) returns)."
                )
            entry = stored[name]
            if "sha256" not in entry:  # stored before checksums were recorded: record it now
                entry = {**entry, "sha256": file_sha256(f"{folder}/{entry['file']}")}
            entries.append(entry)
            continue
        w = _write_file_atomic(
            f"{folder}/{name}.{uuid.uuid4().hex[:12]}.parquet", _segment_data(value, data.schema)
        )
        entries.append(
            {"name": name, "file": _name_of(w.path), "rows": w.rows, "bytes": w.size, "sha256": w.sha256}
        )
        written, written_rows = written + 1, written_rows + w.rows
        if head is None and w.rows:
            head = w.head
    listed = {e["file"] for e in entries}
    for _attempt in range(SWAP_ATTEMPTS):
        fs, fspath = _fs(folder)  # fresh listings: another writer may have swept since
        present = {_name_of(p) for p in fs.ls(fspath, detail=False)}
        lost = sorted(listed - present)
        if lost:  # e.g. a concurrent write of this partition swept a file this write meant to keep
            raise FileNotFoundError(
                f"Segment file(s) {lost[:3]} of {folder} vanished before its manifest was replaced; the "
                "previous table is unchanged. Materialize the partition again (one run per partition at "
                "a time)."
            )
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": previous.get("version", 0) + 1,
            "rows": sum(e["rows"] for e in entries),
            "columns": [[f.name, str(f.type)] for f in data.schema],
            "schema": _schema_text(data.schema),
            "segments": entries,
            "retained": [e for e in previous["segments"] if e["file"] not in listed],
        }
        if _swap_manifest(folder, json.dumps(manifest, indent=1).encode(), version):
            break
        # another writer swapped first: build on its manifest (retain its segments) and swap again
        raw, version = _manifest_bytes(folder)
        previous = _parse_manifest(folder, raw) if raw is not None else {"segments": [], "retained": []}
        time.sleep(random.uniform(0.0, 0.05))
    else:
        raise TimeoutError(
            f"The manifest of {folder} changed under this write {SWAP_ATTEMPTS} times in a row (other "
            "writers of the same partition); the table is another writer's, this write is not in it. "
            "Materialize the partition again, one run per partition at a time."
        )
    _delete_unneeded(fs, fspath, manifest, previous)
    _remove_path(fs, f"{fspath}.parquet")
    if head is None:
        first = next((e for e in entries if e["rows"]), None)
        head = _file_head(f"{folder}/{first['file']}") if first else data.schema.empty_table()
    meta = written_summary(folder, manifest["rows"], sum(e["bytes"] for e in entries), data.schema, head)
    meta.update(
        {
            "segments": len(entries),
            "segments_written": written,
            "segments_kept": len(entries) - written,
            "rows_written": written_rows,
        }
    )
    return meta


def drop_segmented_layout(path: str) -> None:
    """After a single-file write at `<p>.parquet`: remove the segmented folder `<p>/` if it is one."""
    folder = path.removesuffix(".parquet")
    fs, fspath = _fs(folder)
    if fs.exists(f"{fspath.rstrip('/')}/{MANIFEST}"):
        _remove_path(fs, f"{fspath.rstrip('/')}/{MANIFEST}")  # readers now see the single file
        _remove_path(fs, fspath, recursive=True)


# --------------------------------------------------------------------------------------------------
# Reading and public helpers
# --------------------------------------------------------------------------------------------------


def scan_parquet_files(files: list[str], schema: pa.Schema | None = None) -> pl.LazyFrame:
    """One LazyFrame over Parquet files of one schema, in order (`schema` gives the columns of none).

    `scan_parquet` locally; elsewhere pyarrow reads them through fsspec.
    """
    if not files:
        if schema is None:
            raise ValueError("scan_parquet_files needs `schema` when there are no files.")
        frame = pl.from_arrow(schema.empty_table())
        assert isinstance(frame, pl.DataFrame)
        return frame.lazy()
    fs, _ = _fs(files[0])
    if _is_local(fs):
        return pl.scan_parquet([_fs(f)[1] for f in files], hive_partitioning=False, glob=False)
    tables = []
    for path in files:
        with fs.open(_fs(path)[1], "rb") as f:
            tables.append(pq.read_table(f))
    frame = pl.from_arrow(pa.concat_tables(tables) if len(tables) > 1 else tables[0])
    assert isinstance(frame, pl.DataFrame)
    return frame.lazy()


def scan_parquet_file(path: str) -> pl.LazyFrame:
    """LazyFrame over one Parquet file: `scan_parquet` locally, pyarrow through fsspec elsewhere."""
    fs, fspath = _fs(path)
    if not (os.path.isfile(fspath) if _is_local(fs) else fs.isfile(fspath)):
        raise FileNotFoundError(f"Parquet file {fspath if _is_local(fs) else path} does not exist.")
    return scan_parquet_files([path])


def _stored_layout(path: str) -> tuple[list[str], pa.Schema | None]:
    """(files, schema) of the table stored at single-file path `path` or in the segmented folder beside it.

    The folder wins when it has a manifest (the schema is then the manifest's). FileNotFoundError if neither.
    """
    folder = path.removesuffix(".parquet")
    manifest = read_manifest(folder)
    if manifest is not None:
        return _listed_files(folder, manifest), _schema_from_text(manifest["schema"])
    fs, fspath = _fs(path)
    if not (os.path.isfile(fspath) if _is_local(fs) else fs.isfile(fspath)):
        manifest = read_manifest(folder)  # a write may have switched the layout between the two looks
        if manifest is not None:
            return _listed_files(folder, manifest), _schema_from_text(manifest["schema"])
        raise FileNotFoundError(f"Parquet file {fspath if _is_local(fs) else path} does not exist.")
    return [path], None


def scan_table_path(path: str) -> pl.LazyFrame:
    """LazyFrame of the table at `table_path(...)`, in either layout (single file or segmented folder)."""
    files, schema = _stored_layout(path)
    return scan_parquet_files(files, schema)


def missing_table_error(table: str, partition: str | None, path: str) -> FileNotFoundError:
    if partition is None:
        return FileNotFoundError(f"Table {table!r} has no Parquet file at {path}: materialize {table} first.")
    return FileNotFoundError(
        f"Table {table!r} has no partition {partition!r} (expected {path}): "
        f"materialize {table} for partition {partition} first."
    )


def read_table(base_path: str, table: str, partition: str | None = None) -> pl.LazyFrame:
    """LazyFrame of one table partition (or the unpartitioned table) under `base_path`, in either layout."""
    path = table_path(base_path, table, partition)
    try:
        return scan_table_path(path)
    except FileNotFoundError:
        raise missing_table_error(table, partition, path) from None


TOKEN_COLUMNS = ("token", "char_start", "char_end")  # a token's text and offsets: the tokens table's


def with_tokens(token_activations: pl.LazyFrame, tokens: pl.LazyFrame) -> pl.LazyFrame:
    """token_activations in the wide shape (dataset, doc_id, token_index, token, char_start, char_end,
    feature, activation): each row joined with its token's row of the tokens table (doc_id, token_index),
    in token_activations' order. The DuckDB view token_activations_wide is the same join."""
    columns = token_activations.collect_schema().names()
    at = columns.index("token_index") + 1
    joined = token_activations.join(
        tokens.select("doc_id", "token_index", *TOKEN_COLUMNS),
        on=["doc_id", "token_index"],
        how="inner",
        maintain_order="left",
    )
    return joined.select(*columns[:at], *TOKEN_COLUMNS, *columns[at:])


def read_token_activations_wide(
    base_path: str, partition: str, features: Iterable[int] | None = None
) -> pl.LazyFrame:
    """One dataset's token_activations with its tokens' text and offsets (`with_tokens`); only the rows of
    `features` when given."""
    acts = read_table(base_path, "token_activations", partition)
    if features is not None:
        acts = acts.filter(pl.col("feature").is_in(list(features)))
    return with_tokens(acts, read_table(base_path, "tokens", partition))


def table_files(base_path: str, table: str, partition: str | None = None) -> list[str]:
    """The Parquet files of one table partition: its single file, or the segments its manifest lists."""
    path = table_path(base_path, table, partition)
    try:
        return _stored_layout(path)[0]
    except FileNotFoundError:
        raise missing_table_error(table, partition, path) from None


def write_table(base_path: str, table: str, partition: str | None, data: Any) -> dict[str, Any]:
    """Atomically write one table partition (same formats as the IO manager); returns its metadata.

    A `SegmentedTable` goes to the folder `segments_path(base_path, table, partition)`; anything else to
    the single file `table_path(...)`, and a segmented folder of the same partition is then removed.
    """
    if isinstance(data, SegmentedTable):
        if partition is None:
            raise ValueError(
                f"Table {table!r}: a SegmentedTable needs a partition; write unpartitioned tables whole."
            )
        return write_segmented_atomic(segments_path(base_path, table, partition), data)
    path = table_path(base_path, table, partition)
    meta = write_parquet_atomic(path, data)
    if partition is not None:
        drop_segmented_layout(path)
    return meta


def is_stored(path: str) -> bool:
    try:
        _stored_layout(path)
    except FileNotFoundError:
        return False
    return True


def table_exists(base_path: str, table: str, partition: str | None = None) -> bool:
    """Whether that table partition is stored (a single Parquet file, or a segmented folder's manifest)."""
    return is_stored(table_path(base_path, table, partition))
