"""Runs whose process died: mark them failed and free their concurrency slots.

A run executed in-process (`scripts/run_main_job.py`, `Dataset.from_frame`, tests) that is killed
(SIGKILL, OOM, a closed laptop) stays STARTED in the instance and keeps its `sae_model` pool slot; only
the daemon's run monitoring could free it, and only for run launchers that report worker health (the
default launcher does not). Runs started with `local_run_tags()` (run_main_job.py and from_frame do)
record their process (host, pid and the pid's start time, so a reused pid is not mistaken for the run);
`recover_dead_local_runs` finds those whose process is gone and ends them.

Runs launched by the UI or the daemon run in a worker process that the code server starts on this machine
(Dagster's default launcher). `LocalProcessRunLauncher` is that launcher plus the worker health check run
monitoring needs (`dagster.yaml` selects it): the daemon then fails a run whose worker died, and frees its
pool slots `free_slots_after_run_end_seconds` later.
"""

from __future__ import annotations

import os
import re
import socket
from typing import Any

from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.launcher import DefaultRunLauncher
from dagster._core.launcher.base import CheckRunHealthResult, WorkerStatus
from dagster._core.storage.dagster_run import DagsterRun

RUN_HOST_TAG = "interp/host"
RUN_PID_TAG = "interp/pid"
RUN_PID_START_TAG = "interp/pid_start"
_UNFINISHED = [DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]


def _start_ticks(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, Linux `/proc`); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            stat = fh.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of stat: fields after the ")" of the command


def local_run_tags() -> dict[str, str]:
    """Tags that tie a run to this process, for `recover_dead_local_runs`."""
    pid = os.getpid()
    return {
        RUN_HOST_TAG: socket.gethostname(),
        RUN_PID_TAG: str(pid),
        RUN_PID_START_TAG: _start_ticks(pid) or "",
    }


def process_alive(pid: int, start_ticks: str | None = None) -> bool:
    """Whether process `pid` runs (and, given `start_ticks`, is the same process that recorded them)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    if start_ticks:
        now = _start_ticks(pid)
        return now is None or now == start_ticks
    return True


def recover_dead_local_runs(instance: DagsterInstance) -> list[str]:
    """Mark failed every unfinished run of this host whose recorded process is gone, and free its
    concurrency slots. Returns their run ids. Runs tagged by `local_run_tags` are judged by their tags; on
    a local (SQLite) instance, other started runs by the worker process Dagster recorded for them
    (`worker_health`: a `dagster.materialize` killed mid-run, a UI run killed with the UI). Runs on a
    shared instance without our tags are left to the daemon's run monitoring."""
    host = socket.gethostname()
    local = is_local_instance(instance)
    recovered = []
    for run in instance.get_runs(filters=RunsFilter(statuses=_UNFINISHED)):
        if RUN_PID_TAG in run.tags:
            if run.tags.get(RUN_HOST_TAG) != host:
                continue
            try:
                pid = int(run.tags.get(RUN_PID_TAG, ""))
            except ValueError:
                continue
            if pid == os.getpid() or process_alive(pid, run.tags.get(RUN_PID_START_TAG)):
                continue
            why = f"Process {pid} on {host} that ran this run ended without finishing it (killed?)"
        elif local and run.status == DagsterRunStatus.STARTED:
            health = worker_health(instance, run)
            if health.status != WorkerStatus.FAILED:
                continue
            why = f"Found by the next local run: {health.msg}"
        else:
            continue
        instance.report_run_failed(
            run, f"{why}; marked failed and its concurrency slots freed so later runs are not blocked."
        )
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        recovered.append(run.run_id)
    return recovered


def process_started_at(pid: int) -> float | None:
    """When process `pid` started, in seconds since the epoch (Linux `/proc`); None where unknown."""
    ticks = _start_ticks(pid)
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            boot = next(float(line.split()[1]) for line in fh if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None
    return None if ticks is None else boot + int(ticks) / os.sysconf("SC_CLK_TCK")


_STARTED = re.compile(r"^Started process for run \(pid: (\d+)\)")
_IN_PROCESS = re.compile(r"^Executing steps in process \(pid: (\d+)\)")


def is_local_instance(instance: DagsterInstance) -> bool:
    """Whether the instance's runs live in SQLite files (`$DAGSTER_HOME`): one machine's runs, so a pid
    recorded without a host is this machine's."""
    return type(instance.run_storage).__name__.startswith("Sqlite")


def run_worker_process(instance: DagsterInstance, run_id: str) -> tuple[int, float] | None:
    """(pid, when it was recorded) of the last worker process Dagster recorded starting `run_id` (its
    "Started process for run (pid: N)" engine event); None before one is recorded. On a local (SQLite)
    instance, a run executed in-process (`dagster.materialize`, `execute_in_process`) records its process
    only as "Executing steps in process (pid: N)": that one counts there too."""
    found = None
    in_process = None
    for entry in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        match = _STARTED.match(entry.message or "")
        if match:
            found = (int(match.group(1)), float(entry.timestamp))
        match = _IN_PROCESS.match(entry.message or "")
        if match:
            in_process = (int(match.group(1)), float(entry.timestamp))
    if found is None and in_process is not None and is_local_instance(instance):
        return in_process
    return found


def worker_health(instance: DagsterInstance, run: DagsterRun) -> CheckRunHealthResult:
    """RUNNING while the run's recorded worker process lives, FAILED once it is gone (or its pid now
    belongs to a process started after it was recorded), UNKNOWN before a worker is recorded."""
    worker = run_worker_process(instance, run.run_id)
    if worker is None:
        return CheckRunHealthResult(WorkerStatus.UNKNOWN, "no run worker process recorded yet")
    pid, recorded_at = worker
    started_at = process_started_at(pid)
    reused = started_at is not None and started_at > recorded_at + 2.0  # /proc times are in clock ticks
    if process_alive(pid) and not reused:
        return CheckRunHealthResult(WorkerStatus.RUNNING, f"run worker process {pid} is running")
    return CheckRunHealthResult(
        WorkerStatus.FAILED,
        f"run worker process {pid} of run {run.run_id} on {socket.gethostname()} is gone (killed, or out of "
        "memory) without finishing the run; its pool slots are freed free_slots_after_run_end_seconds after "
        "it is marked failed",
    )


class LocalProcessRunLauncher(DefaultRunLauncher):
    """Dagster's default launcher (each run in a worker process started by the code server on this
    machine) that also reports worker health, so run monitoring fails runs whose worker died instead of
    leaving them STARTED with their pool slots held. For code servers on this machine (`make ui`,
    `dagster dev`, `dagster-daemon run`); deployments on containers use their own launcher."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        return worker_health(self._instance, run)

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Any) -> LocalProcessRunLauncher:
        return cls(inst_data=inst_data)


def step_was_interrupted(event: Any) -> bool:
    """True for a step failure caused by the process being told to stop (Ctrl-C, SIGTERM, a kernel
    interrupt) rather than by an error."""
    # compared by name: Dagster's ErrorSource enum is not public API
    return getattr(event.step_failure_data.error_source, "name", None) == "INTERRUPT"


def run_was_interrupted(result: Any) -> bool:
    """True when an in-process run (`execute_in_process`, `materialize`) stopped because the process was
    told to stop: Dagster fails the running step as interrupted, or the run as terminated unexpectedly."""
    if any(step_was_interrupted(event) for event in result.get_step_failure_events()):
        return True
    return any(
        event.is_run_failure
        and getattr(getattr(event.event_specific_data, "failure_reason", None), "name", None)
        == "UNEXPECTED_TERMINATION"
        for event in result.all_events
    )
