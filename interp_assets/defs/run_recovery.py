"""Runs whose process died: mark them failed and free their concurrency slots.

A run executed in-process (`scripts/run_main_job.py`, `Dataset.from_frame`, tests) that is killed
(SIGKILL, OOM, a closed laptop) stays STARTED in the instance and keeps its `sae_model` pool slot; only
the daemon's run monitoring could free it, and only for run launchers that report worker health (the
default launcher does not). Runs started with `local_run_tags()` (run_main_job.py and from_frame do)
record their process (host, pid and the pid's start time, so a reused pid is not mistaken for the run);
`recover_dead_local_runs` finds those whose process is gone and ends them.
"""

from __future__ import annotations

import os
import socket

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

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
    concurrency slots. Returns their run ids. Runs without our tags (launched by the daemon or the UI)
    are left to Dagster's run monitoring."""
    host = socket.gethostname()
    recovered = []
    for run in instance.get_runs(filters=RunsFilter(statuses=_UNFINISHED, tags={RUN_HOST_TAG: host})):
        try:
            pid = int(run.tags.get(RUN_PID_TAG, ""))
        except ValueError:
            continue
        if pid == os.getpid() or process_alive(pid, run.tags.get(RUN_PID_START_TAG)):
            continue
        instance.report_run_failed(
            run,
            f"Process {pid} on {host} that ran this run ended without finishing it (killed?); marked failed "
            "and its concurrency slots freed so later runs are not blocked.",
        )
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        recovered.append(run.run_id)
    return recovered
