"""The notebook's way in from a DataFrame: the frame becomes a drop and goes through the same assets.

`interp_assets.notebook.Dataset.from_frame` calls `materialize_frame` (imported only then, so importing the
notebook API stays free of Dagster): the frame is written to `<data_dir>/landing/<name>.parquet` and
raw_documents, token_activations and pooled_embeddings are materialized for partition `<name>`, with the
same engine, activation cache and storage as any other dataset. A notebook dataset is an asset partition.
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
from dagster import DagsterInstance, materialize

from interp_assets.defs.assets import ALL_ASSETS
from interp_assets.defs.partitions import datasets_partitions
from interp_assets.defs.run_recovery import local_run_tags, recover_dead_local_runs, run_was_interrupted
from interp_assets.storage.parquet import write_parquet_atomic
from interp_assets.storage.paths import check_storage_key
from resources.local import local_resources
from resources.sae_reader import SAEReaderResource

FRAME_ASSETS = ("raw_documents", "token_activations", "pooled_embeddings")


def materialize_frame(
    frame: pl.DataFrame,
    name: str,
    *,
    text_column: str,
    data_dir: str | os.PathLike[str],
    reader: SAEReaderResource | None = None,
    instance: DagsterInstance | None = None,
) -> None:
    """Store `frame` as dataset `name`'s drop and materialize its documents and features.

    Uses the Dagster instance of `DAGSTER_HOME` when set (the runs show in the UI), else an ephemeral
    one. Raises RuntimeError naming the failed step and its error when a step fails, KeyboardInterrupt when
    the run was interrupted (a kernel interrupt, Ctrl-C).
    """
    check_storage_key(name, "dataset name")
    data = Path(data_dir)
    landing = data / "landing"
    landing.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(str(landing / f"{name}.parquet"), frame.to_arrow())
    if instance is None:
        instance = DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else DagsterInstance.ephemeral()
    recover_dead_local_runs(instance)  # a killed notebook run must not hold the model pool
    if not instance.has_dynamic_partition(datasets_partitions.name, name):
        instance.add_dynamic_partitions(datasets_partitions.name, [name])
    resources = local_resources(data, sae_reader=reader or SAEReaderResource())
    by_name = {k.to_user_string(): a for a in ALL_ASSETS for k in a.keys}
    result = materialize(
        [by_name[n] for n in FRAME_ASSETS],
        partition_key=name,
        instance=instance,
        resources=resources,
        run_config={"ops": {"raw_documents": {"config": {"text_column": text_column}}}},
        raise_on_error=False,
        tags=local_run_tags(),
    )
    if run_was_interrupted(result):  # a kernel interrupt stops the call, as it does any other cell
        raise KeyboardInterrupt(
            f"Dataset {name!r} from a DataFrame: interrupted; what was saved is kept, and calling "
            "from_frame again goes on from there."
        )
    if not result.success:
        failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        detail = (
            f"{failures[0].step_key}: {failures[0].step_failure_data.error.message.strip()}"
            if failures
            else "see the run's logs"
        )
        raise RuntimeError(f"Dataset {name!r} from a DataFrame could not be computed ({detail}).")
