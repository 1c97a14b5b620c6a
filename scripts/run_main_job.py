"""The main job on the embedded default: ingest the demo drops, materialize the whole graph, then print one
line per step (asset, partition, seconds, rows) and a short summary: what differs between the compared
datasets, where the report is, and commands that work as printed. Dagster's events, library warnings and
progress bars go to a log file, named at the end (`--verbose` leaves them on the console instead).

Usage: python scripts/run_main_job.py [--landing demo/landing] [--data-dir var] [--verbose]"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[1]
LOG_NAME = "main_job.log"  # under <data_dir>/logs/, rewritten by every run
TOP_TOKEN, TOP_DOCUMENT, TOP_CRITERIA = 5, 2, 3  # summary rows: keeps the demo's output under 40 lines
INTERRUPTED_EXIT = 130  # what a shell reports for a command stopped by Ctrl-C
RESUME_HINT = "What was saved is intact: run the same command again to go on (finished steps are reused)."


@contextlib.contextmanager
def output_to(log_path: Path | None) -> Iterator[TextIO]:
    """Send everything written to stdout and stderr (Dagster's console logger, warnings, tqdm bars, C
    libraries) to `log_path`, and yield a stream to the real stdout for the lines meant for the reader.
    With `log_path` None nothing is redirected."""
    if log_path is None:
        yield sys.stdout
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    console = open(os.dup(1), "w", buffering=1, encoding="utf-8")  # closed below
    with open(log_path, "wb", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield console
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            console.close()


def _rows(metadata: dict[str, Any]) -> int | None:
    value = metadata.get("dagster/row_count")
    return None if value is None else int(value.value)


class StepTable:
    """One aligned line per step: asset, partition, seconds, rows (or what went wrong)."""

    def __init__(self, partitions: list[str]) -> None:
        self.width = max([len("partition"), *(len(p) for p in partitions)])

    def header(self) -> str:
        return f"{'step':<21} {'partition':<{self.width}} {'seconds':>7} {'rows':>10}"

    def line(
        self, asset: str, partition: str, seconds: float | None, rows: int | None, note: str = ""
    ) -> str:
        secs = "" if seconds is None else f"{seconds:.1f}"
        count = "" if rows is None else f"{rows:,}"
        line = f"{asset:<21} {partition:<{self.width}} {secs:>7} {count:>10}"
        return f"{line}  {note}" if note else line.rstrip()

    def lines(self, result: Any, partition: str) -> list[str]:
        """The lines of one `execute_in_process` result, in execution order."""
        seconds = {
            e.step_key: e.step_success_data.duration_ms / 1000 for e in result.get_step_success_events()
        }
        failed_checks: dict[str, list[str]] = {}
        for check in result.get_asset_check_evaluations():
            if not check.passed:
                failed_checks.setdefault(check.asset_key.to_user_string(), []).append(check.check_name)
        out = []
        for event in result.get_asset_materialization_events():
            asset = event.asset_key.to_user_string()
            if asset != event.step_key:  # a side table (document_rejects, ...): its step has its own line
                continue
            metadata = event.materialization.metadata
            notes = [f"check {name} failed" for name in failed_checks.get(asset, [])]
            if metadata.get("reused_stored_table") is not None:
                notes.insert(0, "unchanged")
            out.append(
                self.line(
                    asset,
                    event.partition or partition,
                    seconds.get(event.step_key),
                    _rows(metadata),
                    ", ".join(notes),
                )
            )
        from interp_assets.defs.run_recovery import step_was_interrupted

        stopped = interrupted(result)
        for event in result.get_step_failure_events():
            if step_was_interrupted(event):
                out.append(self.line(event.step_key, partition, None, None, "INTERRUPTED"))
                continue
            error = event.step_failure_data.error
            while error is not None and error.cause is not None:  # Dagster's wrapper -> the asset's error
                error = error.cause
            message = ((error.message if error else "") or "failed").strip().splitlines()[0]
            message = re.sub(r"^[\w.]+\.(\w+): ", r"\1: ", message)  # the error's class without its module
            out.append(self.line(event.step_key, partition, None, None, f"FAILED: {message}"))
        started = {e.step_key for e in result.all_events if e.is_step_start}
        for node in result.job_def.graph.nodes_in_topological_order:
            if node.name not in started:
                why = "the run was interrupted" if stopped else "an upstream step failed"
                out.append(self.line(node.name, partition, None, None, f"not run: {why}"))
        return out


def interrupted(result: Any) -> bool:
    """True when the run stopped because the process was told to stop (Ctrl-C, SIGTERM)."""
    from interp_assets.defs.run_recovery import run_was_interrupted

    return run_was_interrupted(result)


def stop_on_sigterm() -> None:
    """Make SIGTERM (`kill`, a service manager's stop) stop the script as Ctrl-C does. Dagster maps SIGTERM
    to SIGINT's handler around each run and leaves that mapping after it; in a background job SIGINT's
    handler is 'ignore', which would leave the script deaf to SIGTERM between runs."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def summary_lines(db: str, keys: list[str], criteria_of: str | None, query: Callable[..., Any]) -> list[str]:
    """What differs in each comparison (top features more frequent in B, both families) and the strongest
    criteria of dataset `criteria_of`; `query` is `interp_assets.warehouse.query`."""
    out: list[str] = []
    for key in keys:
        a, b = key.split("__vs__")
        report = query(db, "select * from diff_reports where comparison = ?", [key]).row(0, named=True)
        counts = (
            f"{report['significant_b']} token features more frequent in B, {report['significant_a']} in A"
        )
        if report.get("document_significant_b") is not None:
            counts += (
                f"; document features: {report['document_significant_b']} in B, "
                f"{report['document_significant_a']} in A"
            )
        out += ["", f"{a} (A) vs {b} (B): {counts}"]
        token = query(
            db,
            "select f.feature, f.freq_a, f.freq_b, f.q_value, l.label from diff_features f "
            "left join (select distinct on (feature) feature, label from feature_labels "
            "where dataset = ?) l using (feature) where comparison = ? and family = 'token' and "
            f"significant and direction = 'b' order by q_value, abs(freq_diff) desc limit {TOP_TOKEN}",
            [b, key],
        )
        document = query(  # `label` exists only once a report labeled document features
            db,
            "select * from diff_features where comparison = ? and family = 'document' and significant "
            f"and direction = 'b' order by q_value, abs(freq_diff) desc limit {TOP_DOCUMENT}",
            [key],
        )
        for family, frame in (("token", token), ("document", document)):
            for r in frame.iter_rows(named=True):
                out.append(
                    f"  B {family:<8} {r['feature']:>5}  {r['freq_a']:.3f} -> {r['freq_b']:.3f}  "
                    f"q {r['q_value']:.1e}  {r.get('label') or ''}".rstrip()
                )
    if criteria_of:
        criteria = query(
            db,
            "select a.criterion, a.feature, a.statistic, a.effect, a.q_value, l.label "
            "from feature_associations a left join (select distinct on (feature) feature, label "
            "from feature_labels where dataset = ?) l using (feature) where a.dataset = ? and "
            "a.significant qualify row_number() over (partition by a.criterion order by a.q_value) = 1 "
            f"order by a.q_value limit {TOP_CRITERIA}",
            [criteria_of, criteria_of],
        )
        if criteria.height:
            out.append(f"Criteria: features that go with metadata columns of {criteria_of} (strongest first)")
            for r in criteria.iter_rows(named=True):
                out.append(
                    f"  {r['criterion']:<22} {r['feature']:>5}  {r['statistic']} {r['effect']:.3f}  "
                    f"q {r['q_value']:.1e}  {r['label'] or ''}".rstrip()
                )
    return out


def make_command(target: str, data_dir: Path, cwd: Path) -> str:
    """`make <target>` as it works from a fresh shell in `cwd` for this data folder."""
    parts = ["make"]
    if cwd.resolve() != ROOT:
        parts += ["-C", shlex.quote(str(ROOT))]
    parts.append(target)
    if data_dir.resolve() != (ROOT / "var").resolve():
        parts.append(f"INTERP_DATA_DIR={shlex.quote(str(data_dir))}")
    return " ".join(parts)


def hint_lines(data_dir: Path, log_path: Path | None, cwd: Path) -> list[str]:
    """Where the log is and what to run next; every command works verbatim (a test runs them)."""
    sql = make_command("sql", data_dir, cwd) + ' Q="select count(*) from token_activations"'
    lines = [f"Log:     {log_path} (Dagster events, warnings, progress)"] if log_path else []
    return lines + [
        f"Next:    {make_command('ui', data_dir, cwd)}    # the Dagster UI for these runs: http://127.0.0.1:3000",
        f"         {sql}    # SQL over the DuckDB views; no Q: every view and its rows",
    ]


def run(args: argparse.Namespace, say: Callable[[str], None], log_path: Path | None) -> int:
    data_dir = Path(args.data_dir).resolve()
    import warnings

    from dagster import BetaWarning, DagsterInstance

    # data_version on Output is a beta parameter: the run needs it, the reader of this output does not
    warnings.filterwarnings("ignore", category=BetaWarning)

    from interp_assets.comparisons import load_comparisons
    from interp_assets.ingest import clash_error, copy_drop_files, printable_path, scan_drops
    from interp_assets.warehouse import ViewRefreshError, query, refresh_views

    landing = data_dir / "landing"
    (data_dir / "config").mkdir(parents=True, exist_ok=True)
    landing.mkdir(parents=True, exist_ok=True)
    for skipped in copy_drop_files(args.landing, landing):
        say(f"Skipped {printable_path(skipped)}: not a regular file (symbolic links are never followed).")
    shutil.copy(args.comparisons, data_dir / "config" / "comparisons.json")

    import definitions
    from interp_assets.defs.run_recovery import local_run_tags, recover_dead_local_runs

    defs = definitions.defs
    instance = DagsterInstance.get()
    for run_id in recover_dead_local_runs(instance):
        say(f"A killed earlier run {run_id} held the model pool: marked failed, its slot freed.")
    tags = local_run_tags()
    bad_names: dict = {}
    drops, clashes = scan_drops(landing, bad_names=bad_names)
    for name, paths in clashes.items():
        say(f"Skipped dataset {name!r}: {clash_error(name, paths)}")
    for name, error in bad_names.items():
        say(f"Skipped dataset {name!r}: {error}")
    names = [d.dataset for d in drops]
    instance.add_dynamic_partitions(
        "datasets", [n for n in names if not instance.has_dynamic_partition("datasets", n)]
    )
    comparisons = [
        c for c in load_comparisons(data_dir / "config" / "comparisons.json") if {c.a, c.b} <= set(names)
    ]
    keys = [c.key for c in comparisons]
    instance.add_dynamic_partitions(
        "comparisons", [k for k in keys if not instance.has_dynamic_partition("comparisons", k)]
    )
    steps = StepTable(names + keys)
    say(steps.header())
    failed: list[str] = []
    for job_name, partitions in (("embed_job", names), ("label_job", names), ("diff_job", keys)):
        job = defs.resolve_job_def(job_name)
        for partition in partitions:
            result = job.execute_in_process(
                partition_key=partition, instance=instance, raise_on_error=False, tags=tags
            )
            stop_on_sigterm()
            for line in steps.lines(result, partition):
                say(line)
            if interrupted(result):
                say(f"Interrupted: {job_name} [{partition}] was stopped; the jobs after it were not started.")
                say(RESUME_HINT)
                return INTERRUPTED_EXIT
            if not result.success:
                failed.append(f"{job_name} [{partition}]")

    from interp_assets.defs.assets import WAREHOUSE_TABLES

    db = data_dir / "warehouse.duckdb"
    try:
        counts = refresh_views(str(db), definitions.PARQUET_BASE, WAREHOUSE_TABLES)
    except ViewRefreshError as exc:  # the other views are current; say which failed and go on
        say(str(exc).splitlines()[0])
        counts = exc.counts
    reported = [k for k in keys if f"diff_job [{k}]" not in failed] if "diff_reports" in counts else []
    criteria_of = names[-1] if names and "feature_associations" in counts else None
    for line in summary_lines(str(db), reported, criteria_of, query):
        say(line)
    say("")
    for key in reported:
        say(
            f"Report:  {data_dir / 'reports' / (key + '.html')} (Markdown beside it; in the UI: diff_reports)"
        )
    if failed:
        say(
            f"Failed:  {', '.join(failed)}; the log and the UI have each run's error. Other datasets went on."
        )
    for line in hint_lines(data_dir, log_path, Path.cwd()):
        say(line)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--landing", default=str(ROOT / "demo" / "landing"), help="folder of drops to ingest")
    parser.add_argument("--comparisons", default=str(ROOT / "demo" / "comparisons.json"))
    parser.add_argument("--data-dir", default=os.environ.get("INTERP_DATA_DIR", str(ROOT / "var")))
    parser.add_argument(
        "--verbose", action="store_true", help="leave Dagster's events and library output on the console"
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from interp_assets.storage.paths import require_utf8_path

    try:
        fix = "Rename it or pass another --data-dir."
        require_utf8_path(Path(args.data_dir).resolve(), "data folder", fix)
    except ValueError as exc:
        print(f"Failed: {exc}", file=sys.stderr)
        return 2
    data_dir = Path(args.data_dir).resolve()
    os.environ["INTERP_DATA_DIR"] = str(data_dir)
    home = data_dir / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    log_path = None if args.verbose else data_dir / "logs" / LOG_NAME
    with output_to(log_path) as console:

        def say(line: str) -> None:
            print(line, file=console, flush=True)

        if log_path is not None:
            say(f"Running the demo's jobs; Dagster's events, warnings and progress go to {log_path}")
        stop_on_sigterm()
        try:
            return run(args, say, log_path)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM outside a run (between runs, refreshing the views)
            say(f"Interrupted. {RESUME_HINT}")
            return INTERRUPTED_EXIT
        except Exception as exc:  # the traceback is in the log; the console gets what and where
            traceback.print_exc()
            say(f"Failed: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}")
            if log_path is not None:
                say(f"Log:     {log_path} (the traceback and Dagster's events)")
            return 1


if __name__ == "__main__":
    raise SystemExit(main())
