"""IO managers of the platform."""

from io_managers.parquet import (
    ParquetIOManager,
    StreamedTable,
    read_table,
    table_exists,
    write_table,
)

__all__ = ["ParquetIOManager", "StreamedTable", "read_table", "table_exists", "write_table"]
