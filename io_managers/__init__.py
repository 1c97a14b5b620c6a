"""IO managers of the platform."""

from io_managers.parquet import (
    KEEP,
    ParquetIOManager,
    SegmentedTable,
    StreamedTable,
    read_table,
    stored_segments,
    table_exists,
    table_files,
    table_segments,
    write_table,
)

__all__ = [
    "KEEP",
    "ParquetIOManager",
    "SegmentedTable",
    "StreamedTable",
    "read_table",
    "stored_segments",
    "table_exists",
    "table_files",
    "table_segments",
    "write_table",
]
