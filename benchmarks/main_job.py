"""The whole main job on the demo, twice: into an empty data folder (cold) and again with nothing changed.

Runs `scripts/run_main_job.py` as a user does (a fresh process each time, warm venv), and reads back:
- wall_s: the process's wall time (interpreter start, imports and Dagster included);
- per-step seconds from Dagster's step events, and labels_scores_s = feature_labels + feature_scores;
- from the runs' materialization metadata: documents encoded, whether the reader model was loaded, labels
  and scores computed (not read from a cache), texts embedded.
Prints a table and writes `benchmarks/results/main_job.json`. With `--repeats N` the pair of runs is
repeated N times, each into its own empty folder; the JSON's "cold" and "unchanged" are then the runs of
median wall time, and "repeats" lists every run's wall time with the machine's matrix-multiply speed just
before it (`cpu_gflops`: shared VMs run at different speeds from hour to hour).

With `--baseline REV` every pair of runs is preceded by the same pair on git revision REV (checked out in
a temporary worktree, run with this venv): an interleaved comparison on the same machine at the same
time, which a shared VM's drift between sessions does not blur. The JSON then has "baseline" (REV, its
median runs and every run's wall time) beside the current tree's.

`document_family_s` is the document family's seconds in the run (document_embeddings + document_sae +
document_features); `document_family_added` what they add to the rest of the run (seconds over the run's
other seconds), for every repeat. `--dbpedia N` runs the job on two drops of N random DBpedia documents
each (from ../shared/data, written to a temporary landing folder) instead of the demo.

    python benchmarks/main_job.py [--repeats 3] [--baseline REV] [--dbpedia 1000 --out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    ROOT,
    cpu_gflops,
    cpu_model,
    git_state,
    load_average,
    print_table,
    write_results,
)

RESULTS = Path(__file__).resolve().parent / "results" / "main_job.json"
STEP_RE = re.compile(r'Finished execution of step "([^"]+)" in ([0-9.]+)(ms|s|m)')
LABEL_STEPS = ("feature_labels", "feature_scores")
DOCUMENT_STEPS = ("document_embeddings", "document_sae", "document_features")


def run_once(data_dir: Path, root: Path = ROOT, inputs: tuple[Path, Path] | None = None) -> dict:
    """Run the main job of the tree at `root` into `data_dir` (on `inputs`, (landing folder, comparisons
    file), instead of the demo's); wall time, per-step seconds (summed over partitions), metadata."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", INTERP_DATA_DIR=str(data_dir))
    extra = [] if inputs is None else ["--landing", str(inputs[0]), "--comparisons", str(inputs[1])]
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(root / "scripts" / "run_main_job.py"), "--data-dir", str(data_dir), *extra],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"the main job failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    steps: dict[str, float] = defaultdict(float)
    log = (data_dir / "logs" / "main_job.log").read_text()  # Dagster's events (the console has a summary)
    for name, value, unit in STEP_RE.findall(log):
        steps[name] += float(value) * {"ms": 1e-3, "s": 1.0, "m": 60.0}[unit]
    return {"wall_s": round(wall, 1), "steps_s": {k: round(v, 2) for k, v in sorted(steps.items())}}


def run_metadata(data_dir: Path, since: float) -> dict:
    """Totals over the materializations recorded after `since` (a timestamp)."""
    os.environ["DAGSTER_HOME"] = str(data_dir / "dagster_home")
    from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

    instance = DagsterInstance.get()
    totals = {"documents_encoded": 0, "reader_loads": 0, "labels_recomputed": 0, "scores_recomputed": 0}
    totals["texts_embedded"] = 0
    fields = {
        "token_activations": [("encoded_now", "documents_encoded"), ("reader_loaded", "reader_loads")],
        "feature_labels": [("labels_recomputed", "labels_recomputed")],
        "feature_scores": [
            ("scores_recomputed", "scores_recomputed"),
            ("texts_embedded_now", "texts_embedded"),
        ],
    }
    for asset, pairs in fields.items():
        records = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey(asset), after_timestamp=since), limit=1000
        ).records
        for record in records:
            metadata = record.asset_materialization.metadata
            for key, total in pairs:
                if key in metadata:
                    totals[total] += int(metadata[key].value)
    instance.dispose()
    return totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--repeats", type=int, default=1, help="pairs of runs, each into an empty folder")
    ap.add_argument("--baseline", help="a git revision whose pair of runs precedes each of this tree's")
    ap.add_argument("--dbpedia", type=int, default=0, help="two drops of this many DBpedia documents each")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1; got {args.repeats}")
    if args.dbpedia < 0:
        ap.error(f"--dbpedia must be a number of documents per drop; got {args.dbpedia}")
    with contextlib.ExitStack() as stack:
        inputs = None
        if args.dbpedia:
            inputs = dbpedia_inputs(Path(stack.enter_context(tempfile.TemporaryDirectory())), args.dbpedia)
        trees = {"current": ROOT}
        if args.baseline:
            trees = {"baseline": stack.enter_context(_worktree(args.baseline))} | trees
        pairs: dict[str, list[dict]] = {name: [] for name in trees}
        for repeat in range(args.repeats):
            for name, root in trees.items():
                pairs[name].append(
                    _pair(root, f"{repeat + 1}/{args.repeats}{' ' + name if args.baseline else ''}", inputs)
                )
    baseline = None
    if args.baseline:
        old = {phase: _median_run([p[phase] for p in pairs["baseline"]]) for phase in ("cold", "unchanged")}
        baseline = {"rev": args.baseline, "commit": _commit(args.baseline)} | old
        baseline["repeats"] = _repeats(pairs["baseline"])
    pairs = pairs["current"]
    what = f"2 x {args.dbpedia} DBpedia documents" if args.dbpedia else "the demo"
    results = {phase: _median_run([p[phase] for p in pairs]) for phase in ("cold", "unchanged")}
    rows = [
        {"phase": phase, **{k: v for k, v in run.items() if k != "steps_s"}} for phase, run in results.items()
    ]
    print_table(
        rows,
        [
            ("phase", "phase", "s"),
            ("wall s", "wall_s", ".1f"),
            ("labels+scores s", "labels_scores_s", ".1f"),
            ("share", "labels_scores_share", ".0%"),
            ("document family s", "document_family_s", ".1f"),
            ("share", "document_family_share", ".0%"),
            ("added", "document_family_added", ".0%"),
            ("docs encoded", "documents_encoded", "d"),
            ("reader loads", "reader_loads", "d"),
            ("labels recomputed", "labels_recomputed", "d"),
            ("scores recomputed", "scores_recomputed", "d"),
            ("texts embedded", "texts_embedded", "d"),
        ],
        title=f"\nMain job on {what} (scripts/run_main_job.py, a fresh process per run)",
    )
    slowest = sorted(results["cold"]["steps_s"].items(), key=lambda kv: -kv[1])[:8]
    print("\nSlowest steps (cold, seconds over partitions): " + ", ".join(f"{k} {v:.1f}" for k, v in slowest))
    repeats = _repeats(pairs)
    if len(pairs) > 1:
        print(
            "Every run: "
            + "; ".join(f"cold {r['cold_wall_s']} s, unchanged {r['unchanged_wall_s']} s" for r in repeats)
        )
    if baseline is not None:
        print(
            f"Baseline {args.baseline} (interleaved, median): cold {baseline['cold']['wall_s']} s, unchanged "
            f"{baseline['unchanged']['wall_s']} s; this tree: cold {results['cold']['wall_s']} s, unchanged "
            f"{results['unchanged']['wall_s']} s"
        )
    write_results(
        results
        | {"repeats": repeats}
        | ({"baseline": baseline} if baseline is not None else {})
        | {
            "inputs": what,
            "load_avg": load_average(),
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "git": git_state(),
        },
        args.out,
    )


def dbpedia_inputs(folder: Path, n_docs: int, seed: int = 0) -> tuple[Path, Path]:
    """Two drops of `n_docs` distinct random DBpedia documents each and their comparison, under `folder`."""
    from benchmarks.planted import DBPEDIA, load_dbpedia

    try:
        frame = load_dbpedia(DBPEDIA)
    except FileNotFoundError as exc:
        raise SystemExit(f"--dbpedia: {exc}") from exc
    texts = (
        frame.select(pl.col("text").str.strip_chars())
        .filter(pl.col("text") != "")
        .unique(maintain_order=True)
    )
    if texts.height < 2 * n_docs:
        raise SystemExit(
            f"--dbpedia {n_docs}: the sample has {texts.height} distinct texts, fewer than 2 x {n_docs}"
        )
    texts = texts.sample(2 * n_docs, seed=seed)
    landing = folder / "landing"
    landing.mkdir(parents=True)
    texts[:n_docs].write_parquet(landing / "dbpedia_a.parquet")
    texts[n_docs:].write_parquet(landing / "dbpedia_b.parquet")
    comparisons = folder / "comparisons.json"
    comparisons.write_text(json.dumps([{"a": "dbpedia_a", "b": "dbpedia_b"}]))
    return landing, comparisons


def _pair(root: Path, tag: str, inputs: tuple[Path, Path] | None = None) -> dict:
    """A cold run into an empty folder, then an unchanged one, of the tree at `root`."""
    pair = {}
    with tempfile.TemporaryDirectory(prefix="main_job_") as tmp:
        data_dir = Path(tmp) / "data"
        for phase in ("cold", "unchanged"):
            gflops = cpu_gflops()
            since = time.time()
            run = run_once(data_dir, root, inputs)
            run |= run_metadata(data_dir, since)
            run["labels_scores_s"] = round(sum(run["steps_s"].get(s, 0.0) for s in LABEL_STEPS), 1)
            run["labels_scores_share"] = round(run["labels_scores_s"] / run["wall_s"], 3)
            run["document_family_s"] = round(sum(run["steps_s"].get(s, 0.0) for s in DOCUMENT_STEPS), 1)
            run["document_family_share"] = round(run["document_family_s"] / run["wall_s"], 3)
            # what the family adds to the job without it (the measure: at most 20%)
            run["document_family_added"] = round(
                run["document_family_s"] / max(run["wall_s"] - run["document_family_s"], 1e-9), 3
            )
            run["cpu_gflops"] = gflops
            pair[phase] = run
            print(f"{tag} {phase}: {run['wall_s']} s ({gflops} GFLOP/s)", flush=True)
    return pair


def _repeats(pairs: list[dict]) -> list[dict]:
    return [
        {f"{phase}_wall_s": p[phase]["wall_s"] for phase in p}
        | {f"{phase}_cpu_gflops": p[phase]["cpu_gflops"] for phase in p}
        | {key: p["cold"][key] for key in ("labels_scores_s", "document_family_s", "document_family_added")}
        for p in pairs
    ]


def _commit(rev: str) -> str:
    return subprocess.run(
        ["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


@contextlib.contextmanager
def _worktree(rev: str) -> Iterator[Path]:
    """A temporary detached git worktree of `rev` (removed afterwards)."""
    tmp = Path(tempfile.mkdtemp(prefix="main_job_baseline_"))
    tree = tmp / "tree"
    made = subprocess.run(
        ["git", "worktree", "add", "--detach", str(tree), rev], cwd=ROOT, capture_output=True, text=True
    )
    if made.returncode != 0:
        raise SystemExit(f"--baseline {rev}: git could not check it out: {made.stderr.strip()}")
    try:
        yield tree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def _median_run(runs: list[dict]) -> dict:
    """The run of median wall time (the lower middle one of an even number)."""
    return sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2]


if __name__ == "__main__":
    main()
