"""The Parquet IO manager: Dagster's handle on the tables of `interp_assets.storage.parquet`.

Layout, writes and reads are `interp_assets.storage.parquet`'s (atomic, streaming, segmented partitions,
local or fsspec URLs); this module maps asset keys and partitions to paths and turns what a write
produced into Dagster metadata.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import polars as pl
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
from pydantic import Field, PrivateAttr

from interp_assets.storage.parquet import (
    SegmentedTable,
    drop_segmented_layout,
    is_stored,
    missing_table_error,
    scan_table_path,
    write_parquet_atomic,
    write_segmented_atomic,
)
from interp_assets.storage.paths import check_storage_key, table_path

if TYPE_CHECKING:
    from upath import UPath

_UNSAFE_COMPONENT = re.compile(r"[^A-Za-z0-9_.\-]")


COLUMN_SCHEMA = "dagster/column_schema"


def _described(schema: Any) -> dict[str, str]:
    """Column name -> description of a definition's `dagster/column_schema` (empty if none)."""
    schema = getattr(schema, "schema", schema)  # a TableSchemaMetadataValue or a TableSchema
    if not isinstance(schema, TableSchema):
        return {}
    return {c.name: c.description for c in schema.columns if c.description}


def output_metadata(summary: dict[str, Any], described: Any = None) -> dict[str, Any]:
    """Dagster output metadata of one write (`interp_assets.storage.parquet.written_summary` plus extras).

    The column schema is the written one (names and stored types); `described`, the asset's definition
    `dagster/column_schema`, lends it the column descriptions, so the catalog keeps them after a run.
    """
    plain = ("row_count", "path", "size_bytes", "schema", "preview")
    extra = {k: v for k, v in summary.items() if k not in plain}
    meanings = _described(described)
    columns = [TableColumn(f.name, str(f.type), meanings.get(f.name)) for f in summary["schema"]]
    return {
        "row_count": summary["row_count"],
        "dagster/row_count": summary["row_count"],
        "path": MetadataValue.path(summary["path"]),
        "size_bytes": summary["size_bytes"],
        COLUMN_SCHEMA: MetadataValue.table_schema(TableSchema(columns=columns)),
        "preview": MetadataValue.md(summary["preview"]),
        **extra,
    }


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
    (streamed), `StreamedTable(schema, batches)`, `SegmentedTable` (partitioned assets only: a folder of
    segments plus a manifest, `write_segmented_atomic`), or `None` (nothing written). Writes are atomic.
    Reads: a `polars.LazyFrame` over either layout; `{partition_key: LazyFrame}` for inputs spanning
    several partitions (see `wants_partition_dict`), also when only one partition exists.
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
        if isinstance(obj, SegmentedTable):
            meta = write_segmented_atomic(str(path).removesuffix(".parquet"), obj)
        else:
            meta = write_parquet_atomic(str(path), obj)
            drop_segmented_layout(str(path))
        context.add_output_metadata(output_metadata(meta, context.definition_metadata.get(COLUMN_SCHEMA)))

    def load_from_path(self, context: InputContext, path: UPath) -> pl.LazyFrame:
        try:
            return scan_table_path(str(path))
        except FileNotFoundError:
            if not context.has_asset_key:
                raise
            partition = path.name.removesuffix(".parquet") if context.has_asset_partitions else None
            raise missing_table_error(_asset_name(context), partition, str(path)) from None

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
        elif isinstance(obj, SegmentedTable):
            raise ValueError(
                f"{context.get_identifier()}: a SegmentedTable is stored per partition; give the asset a "
                "partitions_def or return a single table."
            )
        else:
            path = self._get_path(context)
        if isinstance(obj, SegmentedTable):
            context.log.debug(f"Writing segments into {str(path).removesuffix('.parquet')}/ ...")
        else:
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
            paths = list(self._get_paths_for_partitions(context).values())
        else:
            paths = [self._get_path(context)]
        return all(is_stored(str(p)) for p in paths)
