"""A killed in-process run no longer blocks the model pool: its process is gone, so the next start ends it."""

import subprocess
import sys
import threading

from dagster import DagsterRunStatus, asset, instance_for_test, materialize
from dagster._core.test_utils import create_run_for_test

from interp_assets.defs.run_recovery import (
    RUN_HOST_TAG,
    RUN_PID_START_TAG,
    RUN_PID_TAG,
    local_run_tags,
    process_alive,
    recover_dead_local_runs,
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
