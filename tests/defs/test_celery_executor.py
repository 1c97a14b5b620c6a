"""The main job on a distributed executor Dagster ships: dagster-celery with a real Redis broker and two
workers, instance storage in PostgreSQL, all started and stopped by the test (`servers.py`).

Two dataset partitions are launched at once (two `dagster job execute` processes, each the orchestrator
of its run); their steps run as celery tasks on two workers, the model steps on the `sae_model` queue, the
others on `dagster`; the `sae_model` pool (limit 2 here: two workers, as it would be two GPUs) lets the
two token_activations steps run at the same time and never more model steps than that. The tables equal
the same jobs run in-process on the repository's SQLite default. Skips only when the PostgreSQL or Redis
binaries (or dagster-celery) are missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import polars as pl
import pytest
import yaml
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, EventRecordsFilter, instance_for_test

from interp_assets.defs.shared import MODEL_POOL, MODEL_QUEUE
from interp_assets.storage.parquet import read_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from servers import VENV_BIN, celery_workers, postgres_server, redis_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
N_DOCS = 40
DATASETS = ("support_assistant_a", "support_assistant_b")
COMPARISON = "__vs__".join(DATASETS)
WORKERS = ["w1", "w2"]
POOL_LIMIT = 2  # one model step per worker at a time, as with one GPU per worker
JOBS = (("embed_job", DATASETS), ("label_job", DATASETS), ("diff_job", (COMPARISON,)))
# On celery embed_job runs in two op selections, each with one model step per run: with two model steps a
# run can take both slots of the pool before the other run asks, and the partitions would encode in turn.
PHASES = (
    ("embed_job", DATASETS, "raw_documents,token_activations,pooled_embeddings"),
    ("embed_job", DATASETS, "document_embeddings,feature_associations"),
    ("label_job", DATASETS, None),
    ("diff_job", (COMPARISON,), None),
)
SORT = {
    "raw_documents": ["doc_id"],
    "activation_status": ["doc_id"],
    "token_activations": ["doc_id", "token_index", "feature"],
    "pooled_embeddings": ["doc_id", "feature"],
    "document_embeddings": ["doc_id"],
}
DATASET_TABLES = (*SORT, "feature_associations", "feature_labels", "feature_scores")
COMPARISON_TABLES = ("diff_features",)
MODEL_STEPS = {  # the steps of these jobs in the sae_model pool
    "token_activations",
    "document_embeddings",
    "feature_labels",
    "feature_scores",
    "document_sae",
    "feature_effects",
}


def _readme_block(marker: str) -> dict:
    """The first ```yaml block after `marker` in the README."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(marker) :]
    start = section.index("```yaml") + len("```yaml")
    return yaml.safe_load(textwrap.dedent(section[start : section.index("```", start)]))


def _instance_config(pg: dict) -> dict:
    """The repository's dagster.yaml, the README's `storage: postgres:` block pointed at our server, and
    the pool limited to the number of workers."""
    config = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    storage = _readme_block("**Instance storage in PostgreSQL**")
    storage["storage"]["postgres"]["postgres_db"].update(
        hostname=pg["hostname"], port=pg["port"], db_name=pg["db_name"]
    )
    config["concurrency"]["pools"]["default_limit"] = POOL_LIMIT
    return config | storage


def _data(data: Path) -> None:
    landing = data / "landing"
    landing.mkdir(parents=True)
    lines = (ROOT / "demo/landing/support_assistant_a.jsonl").read_text().splitlines()[:N_DOCS]
    (landing / "support_assistant_a.jsonl").write_text("\n".join(lines) + "\n")
    pl.read_csv(ROOT / "demo/landing/support_assistant_b.csv").head(N_DOCS).write_csv(
        landing / "support_assistant_b.csv"
    )
    (data / "config").mkdir()
    shutil.copy(ROOT / "demo/comparisons.json", data / "config/comparisons.json")


def _tables(data: Path) -> dict[str, pl.DataFrame]:
    base = str(data / "parquet")
    tables = {}
    for table in DATASET_TABLES:
        for ds in DATASETS:
            frame = read_table(base, table, ds).collect()
            tables[f"{table}/{ds}"] = frame.sort(SORT.get(table, frame.columns[:4]))
    for table in COMPARISON_TABLES:
        tables[table] = read_table(base, table, COMPARISON).collect().sort(["family", "feature"])
    return tables


def _in_process(data: Path) -> dict[str, pl.DataFrame]:
    """The same jobs, in-process, on the repository's SQLite default (what scripts/run_main_job.py runs)."""
    import definitions
    from resources.local import local_resources

    defs = definitions.defs
    with instance_for_test(overrides=yaml.safe_load((ROOT / "dagster.yaml").read_text())) as instance:
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
        instance.add_dynamic_partitions("datasets", list(DATASETS))
        instance.add_dynamic_partitions("comparisons", [COMPARISON])
        for job_name, partitions in JOBS:
            job = defs.resolve_job_def(job_name)
            for partition in partitions:
                result = job.execute_in_process(
                    partition_key=partition, instance=instance, resources=local_resources(data)
                )
                assert result.success, f"{job_name} [{partition}] failed in-process"
    return _tables(data)


def _step_windows(instance: DagsterInstance, run_ids: list[str]) -> list[tuple[str, str, float, float]]:
    """(run id, step key, start, end) of every step of the runs, from their STEP_START / STEP_SUCCESS."""
    windows = []
    for run_id in run_ids:
        starts, ends = {}, {}
        for event in instance.all_logs(run_id):
            kind = event.dagster_event.event_type if event.dagster_event else None
            if kind == DagsterEventType.STEP_START:
                starts[event.step_key] = event.timestamp
            elif kind == DagsterEventType.STEP_SUCCESS:
                ends[event.step_key] = event.timestamp
        windows += [(run_id, key, starts[key], ends[key]) for key in ends]
    return windows


def _most_at_once(windows: list[tuple[str, str, float, float]]) -> int:
    edges = sorted([(w[2], 1) for w in windows] + [(w[3], -1) for w in windows])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


@pytest.fixture(scope="module")
def servers():
    with postgres_server() as pg, redis_server() as redis:
        yield pg, redis


def test_main_job_on_celery_workers_equals_in_process_sqlite(servers, tmp_path):
    pg, redis = servers
    started = time.monotonic()
    # the reference run (in-process, SQLite) goes on in a thread meanwhile: the celery runs spend much of
    # their time starting processes and waiting on one another, and the test takes a minute less
    _data(tmp_path / "in_process")
    reference: dict = {}
    thread = threading.Thread(
        target=lambda: reference.update(_in_process(tmp_path / "in_process")), name="in-process reference"
    )
    thread.start()
    home, data = tmp_path / "home", tmp_path / "celery"
    home.mkdir()
    _data(data)
    (home / "dagster.yaml").write_text(yaml.safe_dump(_instance_config(pg)))
    run_config = tmp_path / "celery.yaml"
    run_config.write_text(yaml.safe_dump(_readme_block("**Distributed executor (dagster-celery)**")))
    env = dict(
        os.environ,
        DAGSTER_HOME=str(home),
        INTERP_DATA_DIR=str(data),
        INTERP_EXECUTOR="celery",
        INTERP_CELERY_BROKER=f"{redis}/0",
        INTERP_CELERY_BACKEND=f"{redis}/1",
        HF_HUB_OFFLINE="1",
    )
    dagster = shutil.which("dagster", path=str(VENV_BIN))
    instance = DagsterInstance.from_config(str(home))
    try:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        instance.add_dynamic_partitions("datasets", list(DATASETS))
        instance.add_dynamic_partitions("comparisons", [COMPARISON])
        # the pool's row is created before runs start: with only `default_limit`, two runs starting at once
        # on a fresh instance both insert it, and one fails on PostgreSQL's unique constraint
        pool = [dagster, "instance", "concurrency", "set", MODEL_POOL, str(POOL_LIMIT)]
        subprocess.run(pool, env=env, check=True, capture_output=True, timeout=120)
        queues = [MODEL_QUEUE, "dagster"]
        with celery_workers(WORKERS, queues, run_config, env, tmp_path / "logs"):
            workers_up = time.monotonic() - started
            phase_s = []
            for job_name, partitions, selection in PHASES:
                procs = {}
                for partition in partitions:  # every partition of the job at once, one orchestrator each
                    cmd = [dagster, "job", "execute", "-f", str(ROOT / "definitions.py"), "-d", str(ROOT)]
                    cmd += ["-j", job_name, "-c", str(run_config), *(["-o", selection] if selection else [])]
                    cmd += ["--tags", json.dumps({"dagster/partition": partition})]
                    log = tmp_path / "logs" / f"{job_name}-{partition}.log"
                    with log.open("wb") as out:
                        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
                    procs[partition] = (proc, log)
                for partition, (proc, log) in procs.items():
                    assert proc.wait(timeout=400) == 0, f"{job_name} [{partition}]: {log.read_text()[-4000:]}"
                phase_s.append(round(time.monotonic() - started, 1))
        runs = instance.get_runs()
        assert len(runs) == 7 and all(r.status == DagsterRunStatus.SUCCESS for r in runs)

        # every step ran in a celery worker; model steps went to their own queue
        submitted = {}
        workers = {}
        for record in instance.get_event_records(EventRecordsFilter(DagsterEventType.ENGINE_EVENT)):
            entry = record.event_log_entry
            message = entry.dagster_event.message or ""
            if message.startswith("Submitting celery task"):
                submitted[(entry.run_id, entry.step_key)] = message.rsplit('"', 2)[1]
            elif "Executing steps" in message:  # "[CeleryExecutor] Executing steps ... in celery worker"
                meta = entry.dagster_event.engine_event_data.metadata
                workers[(entry.run_id, entry.step_key)] = meta["Celery worker"].value.split("@")[0]
        assert submitted and submitted.keys() == workers.keys()
        for (_, step), queue in submitted.items():
            expected = MODEL_QUEUE if step in MODEL_STEPS else "dagster"
            assert queue == expected, (step, queue)
        assert set(workers.values()) == set(WORKERS), workers  # both workers took tasks

        # the two datasets' token_activations ran at the same time, on the two workers (one task at a time
        # each); the pool bounded model steps to its limit across all runs
        windows = _step_windows(instance, [r.run_id for r in runs])
        encode = [w for w in windows if w[1] == "token_activations"]
        assert len(encode) == 2 and _most_at_once(encode) == 2, encode
        assert {workers[w[:2]] for w in encode} == set(WORKERS), workers
        model = [w for w in windows if w[1] in MODEL_STEPS]
        assert _most_at_once(model) <= POOL_LIMIT, model
        info = instance.event_log_storage.get_concurrency_info(MODEL_POOL)
        assert info.slot_count == POOL_LIMIT and info.active_slot_count == 0
        on_celery = _tables(data)
        celery_s = time.monotonic() - started
    finally:
        instance.dispose()

    thread.join(timeout=600)
    embedded = reference
    assert embedded, "the in-process reference run failed (see the captured log above)"
    assert on_celery.keys() == embedded.keys()
    for name, frame in on_celery.items():
        assert frame.height > 0, name
        assert frame.equals(embedded[name]), f"{name} differs between the celery and the in-process run"
    print(
        f"celery: workers up after {workers_up:.1f} s, phases done after {phase_s} s, "
        f"checked {celery_s:.1f} s; "
        f"with the in-process run {time.monotonic() - started:.1f} s"
    )
