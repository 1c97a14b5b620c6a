"""Progress lines of long steps: at most every `every_s` seconds while work completes, once at the end."""

from interp_assets.progress import Progress


def test_reports_every_interval_and_once_at_the_end() -> None:
    now = [0.0]
    lines: list[str] = []
    p = Progress("encoding", 100, lines.append, every_s=10.0, clock=lambda: now[0])
    for done, t in [(10, 2.0), (20, 9.0), (30, 10.5), (40, 15.0), (70, 21.0), (100, 25.0)]:
        now[0] = t
        p.update(done)
    assert len(lines) == 3  # at 10.5 s, 21 s and the end
    assert lines[0] == "encoding: 30/100 documents (2.9/s, about 24 s left)"
    assert lines[-1] == "encoding: 100/100 documents (4.0/s, 25.0 s in all)"
    p.update(100)  # the end is said once
    assert len(lines) == 3


def test_nothing_to_do_says_nothing() -> None:
    lines: list[str] = []
    Progress("encoding", 0, lines.append).update(0)
    assert lines == []


def test_listeners_hear_every_update_and_bars_close_when_done() -> None:
    from interp_assets.progress import ProgressBars, listening

    heard: list[tuple] = []
    drawn: list = []

    class FakeBar:  # tqdm's interface as ProgressBars uses it
        def __init__(self, total: int, desc: str, unit: str) -> None:
            self.total, self.desc, self.n, self.closed = total, desc, 0, False
            drawn.append(self)

        def refresh(self) -> None:
            pass

        def close(self) -> None:
            self.closed = True

    bars = ProgressBars(tqdm=FakeBar)
    with listening(lambda *args: heard.append(args)), listening(bars):
        progress = Progress("encoding", 3, lambda line: None, every_s=1e9)
        for done in (1, 2, 3):
            progress.update(done)
    assert heard == [("encoding", d, 3, "documents") for d in (1, 2, 3)]  # every update, not only reports
    assert len(drawn) == 1 and drawn[0].n == 3 and drawn[0].closed
    Progress("after", 1, lambda line: None).update(1)  # outside the block: nobody listens
    assert len(heard) == 3
