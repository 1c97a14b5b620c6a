"""Waiting for work on other threads without going deaf to Ctrl-C.

A signal (Ctrl-C, SIGTERM, Dagster stopping a run) may be delivered to any thread, and Python acts on it
only when the main thread runs bytecode again; a main thread blocked on one long wait (`Future.result`,
`Executor.map`) hears it only when that wait ends. Waiting in short steps keeps it responsive.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, wait
from typing import Any

STEP_S = 0.25  # how long an interrupt may wait to be acted on


def results_when_done(futures: Sequence[Future]) -> list[Any]:
    """The results of `futures` in their order, once all are done (the first error is raised), waiting in
    steps of `STEP_S` so that an interrupt is raised here within a step."""
    pending = set(futures)
    while pending:
        _, pending = wait(pending, timeout=STEP_S)
    return [future.result() for future in futures]
