"""Instance storage in PostgreSQL (dagster-postgres): a throwaway server started by the test in a temporary
folder on 127.0.0.1, the repository's dagster.yaml plus a `storage: postgres:` block, the demo's chain for
two small datasets (tables equal to a run on the repository's SQLite default), and the
`sae_model` concurrency pool held and freed there, and the daemon with a queued run coordinator launching
the landing sensor's run. Skips only when the PostgreSQL binaries are missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
import yaml
from dagster import AssetKey, DagsterInstance, DagsterRunStatus, asset, instance_for_test, materialize
from dagster._core.test_utils import create_run_for_test

from interp_assets.defs.assets import ALL_ASSETS
from interp_assets.defs.run_recovery import (
    RUN_PID_START_TAG,
    RUN_PID_TAG,
    local_run_tags,
    recover_dead_local_runs,
)
from interp_assets.defs.shared import MODEL_POOL
from interp_assets.storage.parquet import read_table
from resources.local import local_resources

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from servers import create_database, postgres_server, stop_group  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
N_DOCS = 40
DATASETS = ("support_assistant_a", "support_assistant_b")
TABLES = ("raw_documents", "token_activations", "pooled_embeddings", "activation_status")
SORT = {
    "raw_documents": ["doc_id"],
    "activation_status": ["doc_id"],
    "token_activations": ["doc_id", "token_index", "feature"],
    "pooled_embeddings": ["doc_id", "feature"],
}


@pytest.fixture(scope="module")
def postgres() -> Iterator[dict]:
    """A PostgreSQL server of our own (`servers.postgres_server`), for this module's tests."""
    with postgres_server() as pg:
        yield pg


def _readme_storage_block() -> dict:
    """The `storage:` block the README's "Scaling out" section shows."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("**Instance storage in PostgreSQL**") :]
    block = section[
        section.index("```yaml") + len("```yaml") : section.index("```", section.index("```yaml") + 7)
    ]
    return yaml.safe_load(textwrap.dedent(block))


def _instance_config(pg: dict) -> dict:
    """The repository's dagster.yaml plus the README's `storage: postgres:` block, pointed at our server
    (user and password through the environment, as the README has them)."""
    config = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    storage = _readme_storage_block()
    db = storage["storage"]["postgres"]["postgres_db"]
    assert db["username"] == {"env": "DAGSTER_PG_USER"} and db["password"] == {"env": "DAGSTER_PG_PASSWORD"}
    db.update(hostname=pg["hostname"], port=pg["port"], db_name=pg["db_name"])
    return config | storage


def _small_demo(landing: Path) -> None:
    landing.mkdir(parents=True)
    lines = (ROOT / "demo/landing/support_assistant_a.jsonl").read_text().splitlines()[:N_DOCS]
    (landing / "support_assistant_a.jsonl").write_text("\n".join(lines) + "\n")
    pl.read_csv(ROOT / "demo/landing/support_assistant_b.csv").head(N_DOCS).write_csv(
        landing / "support_assistant_b.csv"
    )


def _run_chain(instance: DagsterInstance, data: Path) -> dict[str, pl.DataFrame]:
    """raw_documents -> token_activations -> pooled_embeddings, then feature_associations, feature_labels
    and feature_scores for both datasets, then diff_reports of A vs B (the token family: document_sae is
    left out, it trains an SAE); returns every table that was written, sorted."""
    (data / "config").mkdir()
    shutil.copy(ROOT / "demo/comparisons.json", data / "config/comparisons.json")
    instance.add_dynamic_partitions("datasets", list(DATASETS))
    resources = local_resources(data)
    by_name = {k.to_user_string(): a for a in ALL_ASSETS for k in a.keys}
    embed = [by_name[n] for n in ("raw_documents", "token_activations", "pooled_embeddings")]
    label = [by_name[n] for n in ("feature_associations", "feature_labels", "feature_scores")]
    for ds in DATASETS:
        assert materialize(embed, partition_key=ds, instance=instance, resources=resources).success
    for ds in DATASETS:
        run = materialize(
            embed + label, partition_key=ds, instance=instance, resources=resources, selection=label
        )
        assert run.success
    key = "__vs__".join(DATASETS)
    instance.add_dynamic_partitions("comparisons", [key])
    diff = materialize([by_name["diff_reports"]], partition_key=key, instance=instance, resources=resources)
    assert diff.success
    base = data / "parquet"
    tables: dict[str, pl.DataFrame] = {}
    for table in (*TABLES, "feature_labels", "feature_scores", "feature_associations"):
        for ds in DATASETS:
            frame = read_table(str(base), table, ds).collect()
            tables[f"{table}/{ds}"] = frame.sort(SORT.get(table, frame.columns[:4]))
    diff_features = read_table(str(base), "diff_features", key).collect()
    tables["diff_features"] = diff_features.sort(["family", "feature"])
    return tables


def test_main_chain_on_postgres_equals_the_sqlite_default(postgres, tmp_path):
    started = time.monotonic()
    for name in ("pg", "sqlite"):
        _small_demo(tmp_path / name / "landing")
    with instance_for_test(overrides=_instance_config(postgres)) as pg:
        assert type(pg.run_storage).__name__ == "PostgresRunStorage"
        assert type(pg.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(pg.schedule_storage).__name__ == "PostgresScheduleStorage"
        on_postgres = _run_chain(pg, tmp_path / "pg")
        runs = pg.get_runs()
        assert len(runs) == 5 and all(r.status == DagsterRunStatus.SUCCESS for r in runs)
        info = pg.event_log_storage.get_concurrency_info(MODEL_POOL)
        assert info.slot_count == 1 and info.active_slot_count == 0  # the model steps took and gave back
        materialized = pg.get_latest_materialization_event(AssetKey("raw_documents"))
        assert materialized is not None
    with instance_for_test(overrides=yaml.safe_load((ROOT / "dagster.yaml").read_text())) as sqlite:
        assert type(sqlite.run_storage).__name__ == "SqliteRunStorage"
        embedded = _run_chain(sqlite, tmp_path / "sqlite")
    assert on_postgres.keys() == embedded.keys()
    for name, frame in on_postgres.items():
        assert frame.height > 0, name
        assert frame.equals(embedded[name]), f"{name} differs between the PostgreSQL and the SQLite run"
    print(f"chain on PostgreSQL and on SQLite: {time.monotonic() - started:.1f} s")


def test_sae_model_pool_holds_and_frees_slots_on_postgres(postgres, tmp_path):
    """A live run holding the pool's one slot blocks a model step; once that run is recognized as dead
    (run_recovery, as run_main_job.py does at start) its slot is freed and the step runs."""
    pg_conf = postgres | {"db_name": "pool"}
    create_database(postgres, "pool")
    with instance_for_test(overrides=_instance_config(pg_conf)) as instance:
        dead = subprocess.Popen(["true"])
        dead.wait()
        tags = local_run_tags() | {RUN_PID_TAG: str(dead.pid), RUN_PID_START_TAG: ""}
        holder = create_run_for_test(
            instance, job_name="embed_job", tags=tags, status=DagsterRunStatus.STARTED
        )
        instance.event_log_storage.initialize_concurrency_limit_to_default(MODEL_POOL)
        claim = instance.event_log_storage.claim_concurrency_slot(
            MODEL_POOL, holder.run_id, "token_activations"
        )
        assert claim.is_claimed
        assert instance.event_log_storage.get_concurrency_info(MODEL_POOL).active_slot_count == 1

        @asset(pool=MODEL_POOL)
        def needs_the_model() -> int:
            return 1

        done: list = []
        worker = threading.Thread(
            target=lambda: done.append(materialize([needs_the_model], instance=instance))
        )
        worker.start()
        worker.join(timeout=5)
        assert not done, "the model step ran while another run held the sae_model pool's only slot"
        assert recover_dead_local_runs(instance) == [holder.run_id]
        assert instance.get_run_by_id(holder.run_id).status == DagsterRunStatus.FAILURE
        worker.join(timeout=240)  # generous: a loaded 2-core machine
        assert done and done[0].success, "the model step stayed blocked after the slot was freed"
        assert instance.event_log_storage.get_concurrency_info(MODEL_POOL).active_slot_count == 0


def test_daemon_and_queued_runs_on_postgres(postgres, tmp_path):
    """The deployment path: a drop lands, `dagster-daemon run` (sensors + the queued run coordinator) on a
    PostgreSQL instance sees it, queues dataset_job for the new partition, dequeues and launches it in its
    own process; the run succeeds and the dataset's tables are written."""
    create_database(postgres, "daemon")
    home, data = tmp_path / "home", tmp_path / "data"
    home.mkdir()
    config = _instance_config(postgres | {"db_name": "daemon"})
    config["run_coordinator"] = {
        "module": "dagster._core.run_coordinator",
        "class": "QueuedRunCoordinator",
    }
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(
        yaml.safe_dump(
            {
                "load_from": [
                    {
                        "python_file": {
                            "relative_path": str(ROOT / "definitions.py"),
                            "working_directory": str(ROOT),
                        }
                    }
                ]
            }
        )
    )
    (data / "landing").mkdir(parents=True)
    lines = (ROOT / "demo/landing/support_assistant_a.jsonl").read_text().splitlines()[:N_DOCS]
    (data / "landing" / "support_assistant_a.jsonl").write_text("\n".join(lines) + "\n")
    env = dict(os.environ, DAGSTER_HOME=str(home), INTERP_DATA_DIR=str(data), HF_HUB_OFFLINE="1")
    daemon_bin = shutil.which("dagster-daemon", path=str(Path(sys.executable).parent))
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115 (closed below)
    daemon = subprocess.Popen(
        [daemon_bin, "run", "-w", str(workspace)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its code server and run processes share its group: stopped together
    )
    started = time.monotonic()
    try:
        instance = DagsterInstance.from_config(str(home))
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        deadline = time.monotonic() + 400  # generous: three processes import Dagster on a loaded 2-core box
        runs = []
        while time.monotonic() < deadline:
            runs = instance.get_runs()
            if runs and all(r.is_finished for r in runs) and any(r.job_name == "dataset_job" for r in runs):
                break
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
            time.sleep(2)
        dataset_runs = [r for r in runs if r.job_name == "dataset_job"]
        assert dataset_runs, (
            f"no dataset_job run after 400 s: {(tmp_path / 'daemon.log').read_text()[-3000:]}"
        )
        run = dataset_runs[0]
        assert run.tags.get("dagster/partition") == "support_assistant_a"
        assert run.status == DagsterRunStatus.SUCCESS, (tmp_path / "daemon.log").read_text()[-3000:]
        kinds = {e.dagster_event.event_type_value for e in instance.all_logs(run.run_id) if e.dagster_event}
        assert {"PIPELINE_ENQUEUED", "PIPELINE_STARTING", "PIPELINE_SUCCESS"} <= kinds, kinds
        status = read_table(str(data / "parquet"), "activation_status", "support_assistant_a").collect()
        assert status.height == N_DOCS and (status["status"] == "encoded").all()
        assert instance.event_log_storage.get_concurrency_info(MODEL_POOL).active_slot_count == 0
        instance.dispose()
        print(f"daemon, queued run on PostgreSQL: {time.monotonic() - started:.1f} s")
    finally:
        stop_group(daemon)
        log.close()
