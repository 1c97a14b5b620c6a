"""IO managers of the platform: Dagster's handle on the Parquet tables (`interp_assets.storage`)."""

from io_managers.parquet import ParquetIOManager

__all__ = ["ParquetIOManager"]
