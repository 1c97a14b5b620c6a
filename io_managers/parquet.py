"""Parquet IO manager on pyarrow: atomic, streaming writes; lazy Polars reads.

Layout (the same as `interp_assets.paths.table_path`):
`<base>/<asset_name>/<partition>.parquet`, unpartitioned `<base>/<asset_name>.parquet`,
where `asset_name` is the last component of the asset key path. `base_path` is a local path or an
fsspec URL (`s3://...`, `memory://...`).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from dagster import (
    ConfigurableIOManager,
    DagsterInvariantViolationError,
    InitResourceContext,
    InputContext,
    MetadataValue,
    OutputContext,
    TableColumn,
    TableSchema,
    UPathIOManager,
)
from dagster._core.storage.upath_io_manager import is_dict_type
from fsspec.implementations.local import LocalFileSystem
from pydantic import Field, PrivateAttr

from interp_assets.paths import check_storage_key, table_path

if TYPE_CHECKING:
    from upath import UPath

PREVIEW_ROWS = 5
PREVIEW_CELL_CHARS = 60
ROW_GROUP_ROWS = 128 * 1024
ROW_GROUP_BYTES = 64 * 1024 * 1024

_FLOAT_PHYSICAL = ("FLOAT", "DOUBLE")
_HAS_BYTE_STREAM_SPLIT = "use_byte_stream_split" in inspect.signature(pq.ParquetWriter.__init__).parameters
_UNSAFE_COMPONENT = re.compile(r"[^A-Za-z0-9_.\-]")


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
    with pq.ParquetWriter(sink, schema, compression="zstd", **_encoding_options(schema)) as writer:
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
    return fsspec.core.url_to_fs(path)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _tmp_name(final: str) -> str:
    head, _, name = final.rpartition("/")
    return f"{head}/.{name}.{uuid.uuid4().hex}.tmp"


def _fsync_local(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_parquet_atomic(path: str, data: Any) -> dict[str, Any]:
    """Write `data` to `path` atomically (temp file in the same folder, then rename) and return metadata.

    A failure mid-write leaves the previous file untouched and no temp file behind.
    """
    schema, batches, table = _as_stream(data)
    fs, fspath = _fs(path)
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
            os.replace(tmp, fspath)
            with contextlib.suppress(OSError):
                _fsync_local(os.path.dirname(fspath))
            size = os.path.getsize(fspath)
            shown_path = fspath
        else:
            with fs.open(tmp, "wb") as f:
                rows, head = _write_stream(f, schema, batches, table, path)
            fs.mv(tmp, fspath)
            size = fs.size(fspath)
            shown_path = path
    except BaseException:
        with contextlib.suppress(Exception):
            if _is_local(fs):
                os.remove(tmp)
            elif fs.exists(tmp):
                fs.rm(tmp)
        raise
    return table_metadata(shown_path, rows, size, schema, head)


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


def markdown_preview(head: pa.Table, max_rows: int = PREVIEW_ROWS) -> str:
    """First `max_rows` rows as a Markdown table; cells truncated, `|` and newlines escaped."""
    names = [_cell(n) for n in head.column_names]
    if not names:
        return "_(no columns)_"
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for row in head.slice(0, max_rows).to_pylist():
        lines.append("| " + " | ".join(_cell(v) for v in row.values()) + " |")
    if head.num_rows == 0:
        lines.append("\n_(no rows)_")
    return "\n".join(lines)


def table_metadata(
    path: str, row_count: int, size_bytes: int, schema: pa.Schema, head: pa.Table
) -> dict[str, Any]:
    """Output metadata of one written Parquet file."""
    columns = [TableColumn(name=f.name, type=str(f.type)) for f in schema]
    return {
        "row_count": row_count,
        "dagster/row_count": row_count,
        "path": MetadataValue.path(path),
        "size_bytes": size_bytes,
        "dagster/column_schema": MetadataValue.table_schema(TableSchema(columns=columns)),
        "preview": MetadataValue.md(markdown_preview(head)),
    }


# --------------------------------------------------------------------------------------------------
# Reading and public helpers
# --------------------------------------------------------------------------------------------------


def scan_parquet_file(path: str) -> pl.LazyFrame:
    """LazyFrame over one Parquet file: `scan_parquet` locally, pyarrow through fsspec elsewhere."""
    fs, fspath = _fs(path)
    if _is_local(fs):
        if not os.path.isfile(fspath):
            raise FileNotFoundError(f"Parquet file {fspath} does not exist.")
        return pl.scan_parquet(fspath)
    if not fs.isfile(fspath):
        raise FileNotFoundError(f"Parquet file {path} does not exist.")
    with fs.open(fspath, "rb") as f:
        table = pq.read_table(f)
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame.lazy()


def _missing(table: str, partition: str | None, path: str) -> FileNotFoundError:
    if partition is None:
        return FileNotFoundError(f"Table {table!r} has no Parquet file at {path}: materialize {table} first.")
    return FileNotFoundError(
        f"Table {table!r} has no partition {partition!r} (expected {path}): "
        f"materialize {table} for partition {partition} first."
    )


def read_table(base_path: str, table: str, partition: str | None = None) -> pl.LazyFrame:
    """LazyFrame of one table partition (or the unpartitioned table) under `base_path`."""
    path = table_path(base_path, table, partition)
    try:
        return scan_parquet_file(path)
    except FileNotFoundError:
        raise _missing(table, partition, path) from None


def write_table(base_path: str, table: str, partition: str | None, data: Any) -> dict[str, Any]:
    """Atomically write one table partition (same formats as the IO manager); returns its metadata."""
    return write_parquet_atomic(table_path(base_path, table, partition), data)


def table_exists(base_path: str, table: str, partition: str | None = None) -> bool:
    """Whether the Parquet file of that table partition exists."""
    fs, fspath = _fs(table_path(base_path, table, partition))
    return fs.isfile(fspath)


# --------------------------------------------------------------------------------------------------
# The IO manager
# --------------------------------------------------------------------------------------------------


def _asset_name(context: InputContext | OutputContext) -> str:
    name = context.asset_key.path[-1]
    return check_storage_key(name, f"asset name (last component of {context.asset_key.to_user_string()})")


def _partition_mapping(context: InputContext) -> Any:
    """The (explicit or inferred) partition mapping of this input, or None when not knowable."""
    try:
        step = context.step_context
    except DagsterInvariantViolationError:
        return None
    assets_def = step.job_def.asset_layer.get_assets_def_for_node(step.node_handle)
    if assets_def is None:
        from dagster import AllPartitionMapping

        return AllPartitionMapping()  # an op reading a partitioned asset reads all of it
    downstream_key = next(iter(assets_def.keys))
    return assets_def.infer_partition_mapping(downstream_key, context.asset_key, context.asset_partitions_def)


def wants_partition_dict(context: InputContext) -> bool:
    """Whether the input asked for `{partition_key: value}` even if only one partition exists.

    True for a `dict[...]` annotation, an `AllPartitionMapping` (explicit, or inferred for an
    unpartitioned downstream), a `SpecificPartitionsPartitionMapping` of several keys and a
    `TimeWindowPartitionMapping` spanning several windows.
    """
    from dagster import AllPartitionMapping, SpecificPartitionsPartitionMapping, TimeWindowPartitionMapping

    if is_dict_type(context.dagster_type.typing_type):
        return True
    mapping = _partition_mapping(context)
    if isinstance(mapping, AllPartitionMapping):
        return True
    if isinstance(mapping, SpecificPartitionsPartitionMapping):
        return len(mapping.partition_keys) > 1
    if isinstance(mapping, TimeWindowPartitionMapping):
        return mapping.start_offset != mapping.end_offset
    return False


class ParquetIOManager(ConfigurableIOManager, UPathIOManager):
    """Stores asset outputs as Parquet under `base_path`, layout `interp_assets.paths.table_path`.

    Writes: `pyarrow.Table`, `polars.DataFrame`/`LazyFrame`, an iterable of `pyarrow.RecordBatch`
    (streamed), `StreamedTable(schema, batches)`, or `None` (nothing written). Writes are atomic.
    Reads: a `polars.LazyFrame`; `{partition_key: LazyFrame}` for inputs spanning several partitions
    (see `wants_partition_dict`), also when only one partition exists.
    """

    base_path: str = Field(description="Local folder or fsspec URL (s3://..., memory://...) of the tables.")

    _base_path: Any = PrivateAttr(default=None)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        from upath import UPath

        self._base_path = UPath(self.base_path)

    # Paths: always `table_path(base_path, asset_name, partition)`.
    def _op_output_path(self, context: InputContext | OutputContext) -> UPath:
        from upath import UPath

        parts = [_UNSAFE_COMPONENT.sub("_", p) or "_" for p in context.get_identifier()]
        return UPath(f"{self.base_path.rstrip('/')}/_op_outputs/{'/'.join(parts)}.parquet")

    def _get_path(self, context: InputContext | OutputContext) -> UPath:
        from upath import UPath

        if not context.has_asset_key:
            return self._op_output_path(context)
        return UPath(table_path(self.base_path, _asset_name(context)))

    def _get_paths_for_partitions(self, context: InputContext | OutputContext) -> dict[str, UPath]:
        from upath import UPath

        name = _asset_name(context)
        keys = context.asset_partition_keys
        return {key: UPath(table_path(self.base_path, name, str(key))) for key in keys}

    def _get_multipartition_backcompat_paths(self, context: InputContext | OutputContext) -> dict[str, UPath]:
        return {}

    def dump_to_path(self, context: OutputContext, obj: Any, path: UPath) -> None:
        context.add_output_metadata(write_parquet_atomic(str(path), obj))

    def load_from_path(self, context: InputContext, path: UPath) -> pl.LazyFrame:
        try:
            return scan_parquet_file(str(path))
        except FileNotFoundError:
            if not context.has_asset_key:
                raise
            partition = path.name.removesuffix(".parquet") if context.has_asset_partitions else None
            raise _missing(_asset_name(context), partition, str(path)) from None

    def handle_output(self, context: OutputContext, obj: Any) -> None:
        if obj is None:
            context.log.debug("ParquetIOManager: output is None, nothing written.")
            return
        if context.has_asset_key and context.has_asset_partitions:
            paths = self._get_paths_for_partitions(context)
            if len(paths) != 1:
                asset = context.asset_key.to_user_string()
                raise ValueError(
                    f"ParquetIOManager writes one partition per output, but {asset} got {len(paths)} "
                    f"({sorted(paths)[:3]}...): launch the backfill as one run per partition."
                )
            path = next(iter(paths.values()))
        else:
            path = self._get_path(context)
        context.log.debug(self.get_writing_output_log_message(path))
        self.dump_to_path(context=context, obj=obj, path=path)

    def load_input(self, context: InputContext) -> pl.LazyFrame | dict[str, pl.LazyFrame] | None:
        if not context.has_asset_key or not context.has_asset_partitions:
            return self._load_single_input(self._get_path(context), context)
        keys = context.asset_partition_keys
        as_dict = wants_partition_dict(context)
        if not keys:
            return {} if as_dict else None
        loaded = self._load_partitions(context)
        # UPathIOManager returns the bare object when exactly one partition is requested.
        if as_dict and not isinstance(loaded, dict):
            return {} if loaded is None else {keys[0]: loaded}
        return loaded

    def has_output(self, context: OutputContext) -> bool:
        if context.has_asset_key and context.has_asset_partitions:
            return all(self.path_exists(p) for p in self._get_paths_for_partitions(context).values())
        return self.path_exists(self._get_path(context))
