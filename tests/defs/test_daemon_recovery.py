"""A run the daemon launched (as the UI's runs are), SIGKILLed mid-step together with the daemon and its
code server (a killed `make ui`): nothing is left to notice, and the run stays STARTED holding the
`sae_model` slot. With the repository's dagster.yaml (LocalProcessRunLauncher + run monitoring), the next
`dagster-daemon` fails that run, says which run and why, frees its slot, and the next run goes through
with no manual step.

Real processes throughout: the daemon, its code server, the run workers; SQLite instance storage in a
temporary DAGSTER_HOME. Monitoring intervals are shortened for the test (30 s and 60 s in dagster.yaml)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance, DagsterRunStatus

from interp_assets.defs.run_recovery import run_worker_process
from interp_assets.defs.shared import MODEL_POOL

ROOT = Path(__file__).resolve().parents[2]
SST2 = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"


def _drop(landing: Path, name: str, start: int, n: int) -> None:
    lines = [line.split("\t")[0] for line in SST2.read_text(encoding="utf-8").splitlines()[1 + start :]][:n]
    path = landing / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines), encoding="utf-8")
    os.utime(path, (1, 1))  # old enough for the landing sensor's settle time


def _wait(what: str, predicate, log: Path, daemon: subprocess.Popen, timeout_s: float = 400):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        assert daemon.poll() is None, f"the daemon exited:\n{log.read_text()[-3000:]}"
        time.sleep(1)
    pytest.fail(f"{what}: not within {timeout_s} s\n{log.read_text()[-3000:]}")


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the daemon's process group (its code server and run workers too), SIGKILL after 60 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_the_daemon_fails_a_run_whose_worker_was_killed_and_frees_its_model_slot(tmp_path: Path) -> None:
    if not SST2.is_file():
        pytest.skip(f"shared SST-2 data not found at {SST2} (expected beside the repository clone)")
    home, data = tmp_path / "home", tmp_path / "data"
    home.mkdir()
    config = yaml.safe_load((ROOT / "dagster.yaml").read_text())  # the repository's: launcher, monitoring
    assert config["run_launcher"]["class"] == "LocalProcessRunLauncher"
    config["run_monitoring"].update(poll_interval_seconds=2, free_slots_after_run_end_seconds=1)
    config["run_coordinator"] = {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator"}
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    workspace = tmp_path / "workspace.yaml"
    location = {"relative_path": str(ROOT / "definitions.py"), "working_directory": str(ROOT)}
    workspace.write_text(yaml.safe_dump({"load_from": [{"python_file": location}]}))
    (data / "landing").mkdir(parents=True)
    _drop(data / "landing", "long", 0, 20_000)  # long enough to be killed mid-encode
    env = dict(os.environ, DAGSTER_HOME=str(home), INTERP_DATA_DIR=str(data), HF_HUB_OFFLINE="1")
    daemon_bin = shutil.which("dagster-daemon", path=str(Path(sys.executable).parent))
    log_path = tmp_path / "daemon.log"
    log = log_path.open("ab")

    def start_daemon() -> subprocess.Popen:
        return subprocess.Popen(
            [daemon_bin, "run", "-w", str(workspace)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its code server and run workers share its group
        )

    # create the instance's SQLite storage before the daemon opens it (two processes migrating it at once
    # race on its version table)
    instance = DagsterInstance.from_config(str(home))
    instance.get_runs()
    instance.event_log_storage.get_concurrency_info(MODEL_POOL)
    instance.all_instigator_state()
    daemon = start_daemon()
    try:

        def encoding_run():
            for run in instance.get_runs():
                if run.status != DagsterRunStatus.STARTED or run.tags.get("dagster/partition") != "long":
                    continue
                worker = run_worker_process(instance, run.run_id)
                slots = instance.event_log_storage.get_concurrency_info(MODEL_POOL).active_slot_count
                if worker and slots == 1:  # token_activations holds the model slot
                    return run, worker[0]
            return None

        run, pid = _wait("the daemon's run encoding 'long'", encoding_run, log_path, daemon)
        os.killpg(daemon.pid, signal.SIGKILL)  # the daemon, its code server and the run worker, at once
        daemon.wait()
        time.sleep(3)
        assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.STARTED  # nobody noticed
        assert instance.event_log_storage.get_concurrency_info(MODEL_POOL).active_slot_count == 1
        daemon = start_daemon()

        def failed():
            found = instance.get_run_by_id(run.run_id)
            return found if found.status == DagsterRunStatus.FAILURE else None

        _wait("the killed run marked failed", failed, log_path, daemon, timeout_s=120)
        messages = [e.message for e in instance.all_logs(run.run_id) if e.message]
        assert any(f"run worker process {pid}" in m and "is gone" in m for m in messages), messages[-5:]
        assert f"Marking run {run.run_id} as failed" in log_path.read_text(
            errors="replace"
        )  # the daemon says

        def slot_freed():  # by the daemon, free_slots_after_run_end_seconds after the run ended
            return instance.event_log_storage.get_concurrency_info(MODEL_POOL).active_slot_count == 0

        _wait("its model slot freed", slot_freed, log_path, daemon, timeout_s=120)

        _drop(data / "landing", "next", 30_000, 20)  # the next run goes through, nobody intervening

        def next_done():
            runs = [r for r in instance.get_runs() if r.tags.get("dagster/partition") == "next"]
            return runs[0] if runs and runs[0].is_finished else None

        done = _wait("the next dataset's run", next_done, log_path, daemon)
        assert done.status == DagsterRunStatus.SUCCESS, log_path.read_text()[-3000:]
    finally:
        instance.dispose()
        _stop_group(daemon)
        log.close()
