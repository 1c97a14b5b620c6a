"""The Dagster code location: assets, resources, IO managers, sensors, jobs and asset checks.

Loading this module imports neither torch nor sae_lens; the reader model loads on first use.
"""

import os
import sys
from pathlib import Path

from dagster import Definitions, EnvVar
from dagster_duckdb import DuckDBResource

from interp_assets.defs.assets import ALL_ASSETS
from interp_assets.defs.jobs import dataset_job, diff_job, embed_job, label_job
from interp_assets.defs.matching_assets import reader_assets, reader_jobs, reader_resources, reader_sensors
from interp_assets.defs.readers import load_readers, readers_file
from interp_assets.defs.sensors import (
    comparisons_sensor,
    landing_sensor,
    readers_file_sensor,
    warehouse_views_after_failure_sensor,
    warehouse_views_sensor,
)
from interp_assets.defs.shard_jobs import encode_shards_job
from interp_assets.storage.paths import data_dir
from io_managers.parquet import ParquetIOManager
from resources.llm import LLMResource
from resources.sae_reader import SAEReaderResource
from resources.storage import StorageResource

DATA_DIR = str(Path(data_dir()).resolve())
PARQUET_BASE = os.environ.get("INTERP_PARQUET_BASE", str(Path(DATA_DIR) / "parquet"))
# extra readers, each with its own lineage, and feature_matches (none unless the file declares readers);
# a bad readers file costs only the extra readers: readers_file_sensor's ticks fail with its error
try:
    READERS = load_readers(readers_file(Path(DATA_DIR) / "config"))
except ValueError as exc:
    READERS = {}
    print(
        f"Extra readers not loaded: {exc}\nEvery other asset is available; fix the file and reload the code "
        "location (readers_file_sensor reports the error on each tick until then).",
        file=sys.stderr,
    )


def _llm() -> LLMResource:
    """LLM labeler/scorer: enabled only when INTERP_LLM_BASE_URL and INTERP_LLM_MODEL are set."""
    return LLMResource(
        base_url=os.environ.get("INTERP_LLM_BASE_URL") or None,
        model=os.environ.get("INTERP_LLM_MODEL") or None,
        api_key=EnvVar("INTERP_LLM_API_KEY") if os.environ.get("INTERP_LLM_API_KEY") else None,
        max_calls=int(os.environ.get("INTERP_LLM_MAX_CALLS", "200")),
        max_concurrency=int(os.environ.get("INTERP_LLM_MAX_CONCURRENCY", "4")),
    )


def _sae_reader() -> SAEReaderResource:
    """The reader: the embedded default unless INTERP_MODEL / INTERP_SAE_* say otherwise."""
    env = os.environ
    return SAEReaderResource(
        model=env.get("INTERP_MODEL", "embedded:all-MiniLM-L6-v2"),
        sae_path=env.get("INTERP_SAE_PATH") or None,
        release=env.get("INTERP_SAE_RELEASE") or None,
        sae_id=env.get("INTERP_SAE_ID") or None,
        hook_name=env.get("INTERP_HOOK_NAME") or None,
        device=env.get("INTERP_DEVICE", "auto"),
        dtype=env.get("INTERP_DTYPE", "float32"),
        max_length=int(env.get("INTERP_MAX_LENGTH", "512")),
        token_budget=int(env.get("INTERP_TOKEN_BUDGET", "16384")),
        chat_template=env.get("INTERP_CHAT_TEMPLATE", "0") == "1",
        chat_role=env.get("INTERP_CHAT_ROLE", "user"),
        activation_dtype=env.get("INTERP_ACTIVATION_DTYPE", "float16"),
    )


def build_resources() -> dict:
    """All resources, configured from the environment."""
    return {
        "storage": StorageResource(
            data_dir=DATA_DIR,
            parquet_base_url=PARQUET_BASE,
            activation_cache_url=os.environ.get("INTERP_ACTIVATION_CACHE") or None,
        ),
        "parquet_io_manager": ParquetIOManager(base_path=PARQUET_BASE),
        "duckdb": DuckDBResource(database=str(Path(DATA_DIR) / "warehouse.duckdb")),
        "sae_reader": _sae_reader(),
        "llm": _llm(),
        **reader_resources(READERS, PARQUET_BASE),
    }


READER_JOBS = reader_jobs(READERS)

defs = Definitions(
    assets=[*ALL_ASSETS, *reader_assets(READERS)],
    jobs=[dataset_job, embed_job, label_job, diff_job, encode_shards_job, *READER_JOBS],
    sensors=[
        landing_sensor,
        comparisons_sensor,
        warehouse_views_sensor,
        warehouse_views_after_failure_sensor,
        readers_file_sensor,
        *reader_sensors(READER_JOBS),
    ],
    resources=build_resources(),
)
