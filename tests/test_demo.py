"""What `make demo` prints (scripts/run_main_job.py): one line per step and a short summary, Dagster's
events and library output in a log file named at the end, and hints that work as printed.

The full demo takes about 45 s on a quiet 2-core machine (minutes under load), so the end-to-end test
runs the script on a drop that fails at its first step (same output path, no model loaded); the step
lines and the summary are checked on a small Dagster run and a small warehouse."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import polars as pl
from dagster import DagsterInstance, DynamicPartitionsDefinition, Output, asset, materialize

from interp_assets.storage.parquet import write_table
from interp_assets.warehouse import query, refresh_views

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("run_main_job", ROOT / "scripts" / "run_main_job.py")
run_main_job = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_main_job)

parts = DynamicPartitionsDefinition(name="demo_parts")


@asset(partitions_def=parts)
def documents():
    return Output(None, metadata={"dagster/row_count": 1234})


@asset(partitions_def=parts, deps=[documents])
def broken() -> None:
    raise ValueError("the drop has no 'text' column\nsecond line")


@asset(partitions_def=parts, deps=[broken])
def after_broken() -> None:
    return None


def test_one_line_per_step_with_partition_seconds_rows_or_the_error() -> None:
    from dagster import DagsterInstance

    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("demo_parts", ["sst2"])
    result = materialize(
        [documents, broken, after_broken], partition_key="sst2", instance=instance, raise_on_error=False
    )
    table = run_main_job.StepTable(["sst2", "a_long_partition_name"])
    lines = table.lines(result, "sst2")
    assert re.fullmatch(r"documents +sst2 +\d+\.\d +1,234", lines[0]), lines[0]
    failed = r"broken +sst2 +FAILED: ValueError: the drop has no 'text' column"
    assert re.fullmatch(failed, lines[1]), lines[1]
    assert re.fullmatch(r"after_broken +sst2 +not run: an upstream step failed", lines[2]), lines[2]
    assert len(lines) == 3
    header = table.header().split()
    assert header == ["step", "partition", "seconds", "rows"]
    assert table.header().index("seconds") == lines[0].index("sst2") + len("a_long_partition_name") + 1


@asset(partitions_def=parts, deps=[documents])
def stopped() -> None:
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the step runs (Dagster's handler is in place)
    threading.Event().wait(30)  # the interruption is raised here, long before


def test_an_interrupted_run_is_told_apart_from_a_failed_one() -> None:
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("demo_parts", ["sst2"])
    kinds = {}
    for name, selection in (("interrupted", [documents, stopped]), ("failed", [documents, broken])):
        result = materialize(selection, partition_key="sst2", instance=instance, raise_on_error=False)
        kinds[name] = run_main_job.interrupted(result)
        lines = run_main_job.StepTable(["sst2"]).lines(result, "sst2")
        if name == "interrupted":
            assert re.fullmatch(r"stopped +sst2 +INTERRUPTED", lines[-1]), lines
    assert kinds == {"interrupted": True, "failed": False}


def test_sigterm_stops_the_demo_within_seconds_and_starts_no_later_job(tmp_path: Path) -> None:
    """`kill` (SIGTERM) during the first job, with SIGINT ignored as in a background job: the script stops
    within seconds, says so, and starts no later job (before, only the running step failed and every
    later job ran on, failing for want of its input)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("INTERP_DATA_DIR", None)
    env.pop("DAGSTER_HOME", None)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "run_main_job.py"), "--data-dir", str(tmp_path / "data")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # what `command &` does
    )
    lines = []
    try:
        for line in proc.stdout:  # the step table's header: the jobs start now
            lines.append(line.rstrip("\n"))
            if line.startswith("step "):
                break
        threading.Event().wait(2)
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines += rest.splitlines()
    assert proc.returncode == run_main_job.INTERRUPTED_EXIT, "\n".join(lines) + err
    assert any(line.startswith("Interrupted") for line in lines), lines
    assert lines[-1].endswith(run_main_job.RESUME_HINT), lines
    assert not any(line.startswith(("feature_labels", "document_sae")) for line in lines), lines


def _warehouse(tmp_path: Path) -> str:
    base, key = str(tmp_path / "parquet"), "a__vs__b"
    report = {"comparison": key, "significant_a": 1, "significant_b": 2}
    report |= {"document_significant_a": 0, "document_significant_b": 1}
    write_table(base, "diff_reports", key, pl.DataFrame([report]))
    diff = pl.DataFrame(
        {
            "comparison": [key] * 4,
            "family": ["token", "token", "token", "document"],
            "feature": [7, 8, 9, 3],
            "freq_a": [0.1, 0.2, 0.5, 0.1],
            "freq_b": [0.5, 0.4, 0.1, 0.3],
            "freq_diff": [-0.4, -0.2, 0.4, -0.2],
            "q_value": [1e-9, 1e-3, 1e-4, 1e-2],
            "significant": [True, True, True, True],
            "direction": ["b", "b", "a", "b"],
        }
    )  # no `label` column: no document feature was labeled
    write_table(base, "diff_features", key, diff)
    labels = pl.DataFrame({"dataset": ["b"], "feature": [7], "label": ["sorry, apologies"]})
    write_table(base, "feature_labels", "b", labels)
    assoc = {"dataset": "b", "criterion": "escalated", "feature": 7, "statistic": "auc", "effect": 0.81}
    write_table(
        base, "feature_associations", "b", pl.DataFrame([assoc | {"q_value": 1e-5, "significant": True}])
    )
    db = str(tmp_path / "warehouse.duckdb")
    refresh_views(db, base, ["diff_reports", "diff_features", "feature_labels", "feature_associations"])
    return db


def test_summary_names_what_differs_and_the_strongest_criteria(tmp_path: Path) -> None:
    lines = run_main_job.summary_lines(_warehouse(tmp_path), ["a__vs__b"], "b", query)
    assert lines == [
        "",
        "a (A) vs b (B): 2 token features more frequent in B, 1 in A; document features: 1 in B, 0 in A",
        "  B token        7  0.100 -> 0.500  q 1.0e-09  sorry, apologies",
        "  B token        8  0.200 -> 0.400  q 1.0e-03",
        "  B document     3  0.100 -> 0.300  q 1.0e-02",
        "Criteria: features that go with metadata columns of b (strongest first)",
        "  escalated                  7  auc 0.810  q 1.0e-05  sorry, apologies",
    ]


def test_hints_work_from_anywhere_for_any_data_folder(tmp_path: Path) -> None:
    default = ROOT / "var"
    assert run_main_job.make_command("ui", default, ROOT) == "make ui"
    assert run_main_job.make_command("ui", tmp_path, ROOT) == f"make ui INTERP_DATA_DIR={tmp_path}"
    assert run_main_job.make_command("sql", default, tmp_path) == f"make -C {ROOT} sql"


def _dry_run(command: str) -> str:
    """What `make` would run for a printed `make ...` hint (setup assumed done: -o its targets)."""
    args = shlex.split(command.split("  #")[0])
    assert args[0] == "make", command
    setup = ["-o", ".venv/.installed", "-o", ".venv/bin/python"]
    # Under `make test` (.ci/run) the parent make's variables would make this one print "Entering directory".
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", *setup, *args[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return out.stdout


def test_demo_prints_few_lines_logs_the_rest_and_its_hints_work(tmp_path: Path) -> None:
    landing, data = tmp_path / "landing", tmp_path / "data"
    landing.mkdir()
    (landing / "broken.csv").write_text("title,body\nx,y\n")  # no text column: fails at raw_documents
    comparisons = tmp_path / "comparisons.json"
    comparisons.write_text(json.dumps([{"a": "broken", "b": "absent"}]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("INTERP_DATA_DIR", None)
    env.pop("DAGSTER_HOME", None)
    script = [sys.executable, str(ROOT / "scripts" / "run_main_job.py")]
    args = ["--landing", str(landing), "--comparisons", str(comparisons), "--data-dir", str(data)]
    out = subprocess.run(script + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = out.stdout.splitlines()
    assert out.returncode == 1, out.stdout + out.stderr  # a dataset failed
    assert out.stderr == ""  # warnings and Dagster's events went to the log
    assert len(lines) <= 40 and not any(" - DEBUG - " in line or "Warning" in line for line in lines)
    log = data / "logs" / "main_job.log"
    assert str(log) in lines[0] and lines[-3] == f"Log:     {log} (Dagster events, warnings, progress)"
    text = log.read_text()
    assert " - DEBUG - " in text and "STEP_FAILURE" in text
    assert re.match(r"raw_documents +broken +FAILED: .*text", lines[2]), lines
    assert any(line.startswith("Failed:  embed_job [broken]") for line in lines)

    ui, sql = lines[-2].removeprefix("Next:").strip(), lines[-1].strip()
    assert ui.startswith(f"make ui INTERP_DATA_DIR={data}  ")
    assert f'DAGSTER_HOME="{data}/dagster_home"' in _dry_run(ui) and 'bin/dg" dev' in _dry_run(ui)
    assert sql.startswith(f'make sql INTERP_DATA_DIR={data} Q="select count(*) from token_activations"')
    (command,) = _dry_run(sql).splitlines()
    assert command.startswith(".venv/bin/python -m interp_assets.warehouse")
    ran = subprocess.run(
        [sys.executable, *shlex.split(command)[1:-1], "select 42 as answer"],  # this run has no tables
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert ran.returncode == 0 and "42" in ran.stdout, ran.stderr


def _stop_process_group(proc: subprocess.Popen) -> None:
    """Stop `proc`'s process group (make, dg and the services it started): SIGTERM, then SIGKILL. Dagster
    treats SIGTERM as Ctrl-C, which a process started in the background with SIGINT ignored never sees."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.communicate(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue
    raise AssertionError(f"make ui (pid {proc.pid}) did not stop, even on SIGKILL")


def test_make_ui_starts_without_a_warning(tmp_path: Path) -> None:
    """`make ui` on a fresh data folder, up to "Launching Dagster services...": no warning on the way. In
    particular `dg dev` starts in $DAGSTER_HOME, since started in the repository root Dagster warns that
    ./dagster.yaml is ignored; and the instance reads the repository's settings from its copy there."""
    dropped = ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "DAGSTER_HOME", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    setup = ["-o", ".venv/.installed", "-o", ".venv/bin/python"]  # setup assumed done, as in _dry_run
    data = tmp_path / "data"
    ui = subprocess.Popen(
        ["make", "--no-print-directory", *setup, "ui", f"INTERP_DATA_DIR={data}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: make, dg and the services it starts
    )
    watchdog = threading.Timer(240, os.killpg, (ui.pid, signal.SIGKILL))  # if it never gets there
    watchdog.start()
    lines: list[str] = []
    try:
        for line in ui.stdout:
            lines.append(line.rstrip())
            if "Launching Dagster services" in line:
                break
    finally:
        watchdog.cancel()
        _stop_process_group(ui)
    assert any("Launching Dagster services" in line for line in lines), lines
    assert not [line for line in lines if "warn" in line.lower()], lines
    home = data / "dagster_home"
    assert (home / "dagster.yaml").read_text() == (ROOT / "dagster.yaml").read_text()
    with DagsterInstance.from_config(str(home)) as instance:  # what the UI's instance was given
        assert instance.run_monitoring_enabled
