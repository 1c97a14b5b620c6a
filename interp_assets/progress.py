"""Progress of a long step: done / total, rate and time left, reported at most every few seconds."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# in-process listeners (e.g. a notebook's progress bars): (what, done, total, unit) on every update
_LISTENERS: list[Callable[[str, int, int, str], None]] = []


@contextmanager
def listening(callback: Callable[[str, int, int, str], None]) -> Iterator[None]:
    """Call `callback(what, done, total, unit)` on every progress update made inside this block."""
    _LISTENERS.append(callback)
    try:
        yield
    finally:
        _LISTENERS.remove(callback)


class ProgressBars:
    """A listener that draws one tqdm bar per long step (in a notebook: tqdm's widget bars)."""

    def __init__(self, tqdm: Any = None) -> None:
        if tqdm is None:
            from tqdm.auto import tqdm
        self._tqdm = tqdm
        self.bars: dict[str, Any] = {}

    def __call__(self, what: str, done: int, total: int, unit: str) -> None:
        bar = self.bars.get(what)
        if bar is None:
            bar = self.bars[what] = self._tqdm(total=total, desc=what, unit=f" {unit}")
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()


class Progress:
    """Reports `what: done/total unit (rate/s, about N s left)` through `log`.

    `update(done)` reports when `every_s` seconds have passed since the last report, and once when done
    reaches total; so a long step says how far it is at least that often while work completes, and a
    short one says it once.
    """

    def __init__(
        self,
        what: str,
        total: int,
        log: Callable[[str], None],
        *,
        unit: str = "documents",
        every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what, self.total, self.log, self.unit, self.every_s, self.clock = (
            what,
            total,
            log,
            unit,
            every_s,
            clock,
        )
        self.started = self.last = clock()
        self.done = 0
        self.reports = 0

    def update(self, done: int) -> None:
        """Record that `done` of `total` are finished; report if it is time to."""
        finishing = done >= self.total and self.done < self.total
        self.done = done
        for listener in list(_LISTENERS):
            listener(self.what, done, self.total, self.unit)
        now = self.clock()
        if finishing or (done < self.total and now - self.last >= self.every_s):
            self.last = now
            self.reports += 1
            self.log(self.message(now))

    def message(self, now: float | None = None) -> str:
        """The progress line as of `now`."""
        elapsed = max((now if now is not None else self.clock()) - self.started, 1e-9)
        rate = self.done / elapsed
        line = f"{self.what}: {self.done:,}/{self.total:,} {self.unit} ({rate:,.1f}/s"
        if self.done < self.total and rate > 0:
            line += f", about {(self.total - self.done) / rate:,.0f} s left"
        elif self.done >= self.total:
            line += f", {elapsed:,.1f} s in all"
        return line + ")"
