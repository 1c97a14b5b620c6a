"""A killed in-process run no longer blocks the model pool: its process is gone, so the next start ends it."""

import os
import subprocess
import sys
import threading
import time

from dagster import DagsterRunStatus, asset, instance_for_test, materialize
from dagster._core.events import EngineEventData
from dagster._core.launcher.base import WorkerStatus
from dagster._core.test_utils import create_run_for_test

from interp_assets.defs.run_recovery import (
    RUN_HOST_TAG,
    RUN_PID_START_TAG,
    RUN_PID_TAG,
    LocalProcessRunLauncher,
    local_run_tags,
    process_alive,
    process_started_at,
    recover_dead_local_runs,
    run_worker_process,
)
from interp_assets.defs.shared import MODEL_POOL

POOLS = {"concurrency": {"pools": {"default_limit": 1}}}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _run_holding_the_pool(instance, tags: dict[str, str]) -> str:
    run = create_run_for_test(instance, job_name="embed_job", tags=tags, status=DagsterRunStatus.STARTED)
    instance.event_log_storage.initialize_concurrency_limit_to_default(MODEL_POOL)
    claim = instance.event_log_storage.claim_concurrency_slot(MODEL_POOL, run.run_id, "token_activations")
    assert claim.is_claimed
    return run.run_id


def test_a_dead_run_is_failed_and_its_pool_slot_freed_so_the_next_model_step_runs() -> None:
    with instance_for_test(overrides=POOLS) as instance:
        tags = local_run_tags() | {RUN_PID_TAG: str(_dead_pid()), RUN_PID_START_TAG: ""}
        dead = _run_holding_the_pool(instance, tags)
        assert instance.event_log_storage.get_concurrency_info(MODEL_POOL).active_slot_count == 1

        assert recover_dead_local_runs(instance) == [dead]
        assert instance.get_run_by_id(dead).status == DagsterRunStatus.FAILURE
        assert instance.event_log_storage.get_concurrency_info(MODEL_POOL).active_slot_count == 0
        assert recover_dead_local_runs(instance) == []  # nothing left to recover

        @asset(pool=MODEL_POOL)
        def needs_the_model() -> int:
            return 1

        done = []
        worker = threading.Thread(
            target=lambda: done.append(materialize([needs_the_model], instance=instance))
        )
        worker.start()
        worker.join(timeout=240)  # generous: a loaded 2-core machine; blocked means forever
        assert done and done[0].success, "the model step stayed blocked by the dead run's slot"


def test_runs_of_live_processes_and_untagged_runs_are_left_alone() -> None:
    with instance_for_test(overrides=POOLS) as instance:
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            live = local_run_tags() | {RUN_PID_TAG: str(sleeper.pid), RUN_PID_START_TAG: ""}
            live_run = create_run_for_test(
                instance, job_name="embed_job", tags=live, status=DagsterRunStatus.STARTED
            )
            other_host = {RUN_HOST_TAG: "elsewhere", RUN_PID_TAG: str(_dead_pid())}
            far = create_run_for_test(
                instance, job_name="embed_job", tags=other_host, status=DagsterRunStatus.STARTED
            )
            untagged = create_run_for_test(instance, job_name="embed_job", status=DagsterRunStatus.STARTED)
            assert recover_dead_local_runs(instance) == []
            for run in (live_run, far, untagged):
                assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.STARTED
        finally:
            sleeper.kill()


def test_a_reused_pid_is_not_mistaken_for_the_run_process() -> None:
    tags = local_run_tags()
    pid = int(tags[RUN_PID_TAG])
    assert process_alive(pid, tags[RUN_PID_START_TAG])
    assert not process_alive(pid, "1")  # same pid, another start time: another process
    assert not process_alive(_dead_pid())


# ------------------------------------------------------------------ runs launched by the UI / daemon

LAUNCHER = {"run_launcher": {"module": "interp_assets.defs.run_recovery", "class": "LocalProcessRunLauncher"}}


def _record_worker(instance, run, pid: int) -> None:
    """What Dagster's run worker records when it starts (`dagster api execute_run`, the code server)."""
    instance.report_engine_event(
        f"Started process for run (pid: {pid}).", run, EngineEventData.in_process(pid)
    )


def test_the_launcher_reports_a_run_whose_worker_process_died_as_failed() -> None:
    with instance_for_test(overrides=POOLS | LAUNCHER) as instance:
        assert isinstance(instance.run_launcher, LocalProcessRunLauncher)
        assert instance.run_launcher.supports_check_run_worker_health
        run = create_run_for_test(instance, job_name="dataset_job", status=DagsterRunStatus.STARTED)
        assert instance.run_launcher.check_run_worker_health(run).status == WorkerStatus.UNKNOWN
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        try:
            _record_worker(instance, run, worker.pid)
            assert run_worker_process(instance, run.run_id)[0] == worker.pid
            assert instance.run_launcher.check_run_worker_health(run).status == WorkerStatus.RUNNING
        finally:
            worker.kill()
            worker.wait()
        health = instance.run_launcher.check_run_worker_health(run)
        assert (
            health.status == WorkerStatus.FAILED
            and str(worker.pid) in health.msg
            and run.run_id in health.msg
        )


def test_a_pid_taken_by_a_process_started_after_the_worker_was_recorded_is_not_the_worker(
    monkeypatch,
) -> None:
    from interp_assets.defs import run_recovery

    with instance_for_test(overrides=LAUNCHER) as instance:
        run = create_run_for_test(instance, job_name="dataset_job", status=DagsterRunStatus.STARTED)
        _record_worker(instance, run, 1)  # pid 1 (init): alive, and started long before the record
        assert process_started_at(1) < time.time() - 5
        assert instance.run_launcher.check_run_worker_health(run).status == WorkerStatus.RUNNING
        # the worker died and its pid went to a process that started after the worker was recorded
        monkeypatch.setattr(run_recovery, "process_started_at", lambda pid: time.time() + 60)
        assert instance.run_launcher.check_run_worker_health(run).status == WorkerStatus.FAILED


def test_a_killed_materialize_on_a_local_instance_is_recovered_by_the_next_start() -> None:
    """`dagster.materialize(..., instance=<a DAGSTER_HOME instance>)` tags nothing; its run records only
    "Executing steps in process (pid: N)". On a local (SQLite) instance that pid is judged like a worker's."""
    with instance_for_test(overrides=POOLS) as instance:
        dead = _run_holding_the_pool(instance, {})
        run = instance.get_run_by_id(dead)
        instance.report_engine_event(f"Executing steps in process (pid: {_dead_pid()})", run)
        alive = create_run_for_test(instance, job_name="embed_job", status=DagsterRunStatus.STARTED)
        instance.report_engine_event(f"Executing steps in process (pid: {os.getpid()})", alive)
        assert run_worker_process(instance, dead) is not None
        assert recover_dead_local_runs(instance) == [dead]  # the live one is left alone
        assert instance.get_run_by_id(dead).status == DagsterRunStatus.FAILURE
        assert instance.get_run_by_id(alive.run_id).status == DagsterRunStatus.STARTED
        assert instance.event_log_storage.get_concurrency_info(MODEL_POOL).active_slot_count == 0
        messages = [e.message or "" for e in instance.all_logs(dead)]
        assert any("is gone (killed" in m and "marked failed" in m for m in messages), messages[-3:]
