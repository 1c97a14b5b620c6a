"""Resources for a local data folder: the embedded default reader on CPU and no LLM (tests, benchmarks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dagster_duckdb import DuckDBResource

from io_managers.parquet import ParquetIOManager
from resources.llm import LLMResource
from resources.sae_reader import SAEReaderResource
from resources.storage import StorageResource


def local_resources(data_dir: str | Path, **overrides: Any) -> dict[str, Any]:
    """Every resource the assets need, all state under `data_dir`; `overrides` replace entries by key."""
    data = Path(data_dir)
    return {
        "storage": StorageResource(data_dir=str(data)),
        "parquet_io_manager": ParquetIOManager(base_path=str(data / "parquet")),
        "duckdb": DuckDBResource(database=str(data / "warehouse.duckdb")),
        "sae_reader": SAEReaderResource(device="cpu"),
        "llm": LLMResource(),
    } | overrides
