"""One large dataset encoded in shards by one celery worker, then by two at once; prints a table, writes
results/sharded_encoding.json.

Issue #16 done-criterion: "a sharded dataset of 20,000 documents encoded by two workers gives the same
tables as one worker, in less wall time (benchmark, with the load average beside it)".

Real data: N distinct SST-2 train sentences (`../shared/data/sst2/train.tsv`, read at run time, shuffled
with a fixed seed) as one dataset. Per configuration (1 worker, then 2 workers), in a fresh data folder with
an empty activation cache and a fresh instance (SQLite, in a temporary DAGSTER_HOME, the `sae_model` pool
limited to the number of workers):

1. raw_documents is materialized in-process;
2. `encode_shards_job` runs on dagster-celery's executor (`dagster job execute`, INTERP_EXECUTOR=celery)
   with a real Redis broker and W workers (`dagster-celery worker start`, one process each, consuming the
   `sae_model` and `dagster` queues, OMP_NUM_THREADS=1: one torch thread per worker), the dataset cut into
   shards of --shard-documents (default: half of it, so 2 shards);
3. token_activations and pooled_embeddings are materialized in-process: every document comes from the
   cache (the model is not loaded), and the tables are compared with the 1-worker configuration's, row
   for row (sorted by doc_id, token_index, feature).

Times: the job's wall time (the `dagster job execute` process: orchestrator start, every step, the model
loaded once per worker), the shards' span (first shard step start to last shard step end, from the event
log) and each shard step's time; the 1-minute load average before and after each configuration (the
machine is shared: read the times beside it). Each worker loads the reader model in its first shard step,
so both configurations pay one load on the critical path.

Usage: python benchmarks/sharded_encoding.py [--n-docs 20000] [--shard-documents N] [--seed 0] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import polars as pl  # noqa: E402
import yaml  # noqa: E402
from dagster import DagsterEventType, DagsterInstance, materialize  # noqa: E402

from benchmarks._common import git_state, load_average, print_table, write_results  # noqa: E402
from benchmarks.incremental import load_sentences  # noqa: E402

SST2 = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"
RESULTS = ROOT / "benchmarks" / "results" / "sharded_encoding.json"
DATASET = "sst2_sharded"
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
SORT = {
    "activation_status": ["doc_id"],
    "token_activations": ["doc_id", "token_index", "feature"],
    "pooled_embeddings": ["doc_id", "feature"],
}


def prepare(data: Path, rows: list[dict]) -> None:
    (data / "landing").mkdir(parents=True)
    (data / "config").mkdir()
    with open(data / "landing" / f"{DATASET}.jsonl", "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    (data / "config" / "datasets.json").write_text(json.dumps({DATASET: {"text_column": "sentence"}}))


def by_name(*names: str) -> list:
    from interp_assets.defs.assets import ALL_ASSETS

    assets = {k.to_user_string(): a for a in ALL_ASSETS for k in a.keys}
    return [assets[n] for n in names]


def shard_windows(instance: DagsterInstance, run_id: str) -> list[tuple[str, float, float]]:
    starts, out = {}, []
    for entry in instance.all_logs(run_id):
        kind = entry.dagster_event.event_type if entry.dagster_event else None
        if entry.step_key and entry.step_key.startswith("encode_shard"):
            if kind == DagsterEventType.STEP_START:
                starts[entry.step_key] = entry.timestamp
            elif kind == DagsterEventType.STEP_SUCCESS:
                out.append((entry.step_key, starts[entry.step_key], entry.timestamp))
    return sorted(out)


def run_config(workers: int, rows: list[dict], args: argparse.Namespace, work: Path, redis: str) -> dict:
    from servers import VENV_BIN, celery_workers

    from resources.local import local_resources

    data, home = work / f"data_{workers}", work / f"home_{workers}"
    prepare(data, rows)
    home.mkdir()
    instance_yaml = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    instance_yaml["concurrency"]["pools"]["default_limit"] = workers
    (home / "dagster.yaml").write_text(yaml.safe_dump(instance_yaml))
    celery = {"broker": f"{redis}/0", "backend": f"{redis}/1", "config_source": {"task_acks_late": True}}
    executor = {"execution": {"config": celery}}
    plan = {"dataset": DATASET, "shard_documents": args.shard_documents}
    shards = {"ops": {"plan_shards": {"config": plan}}}
    (work / "celery.yaml").write_text(yaml.safe_dump(executor))
    (work / f"run_{workers}.yaml").write_text(yaml.safe_dump(executor | shards))
    env = dict(
        os.environ,
        DAGSTER_HOME=str(home),
        INTERP_DATA_DIR=str(data),
        INTERP_EXECUTOR="celery",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    dagster = str(VENV_BIN / "dagster")
    pool = [dagster, "instance", "concurrency", "set", "sae_model", str(workers)]
    subprocess.run(pool, env=env, check=True, capture_output=True)

    instance = DagsterInstance.from_config(str(home))
    resources = local_resources(data)
    instance.add_dynamic_partitions("datasets", [DATASET])
    ingest = materialize(
        by_name("raw_documents"),
        partition_key=DATASET,
        instance=instance,
        resources=resources,
        run_config=QUIET,
    )
    assert ingest.success

    load_before = load_average()
    names = [f"w{i + 1}" for i in range(workers)]
    with celery_workers(names, ["sae_model", "dagster"], work / "celery.yaml", env, work / f"logs_{workers}"):
        started = time.perf_counter()
        cmd = [dagster, "job", "execute", "-f", str(ROOT / "definitions.py"), "-d", str(ROOT)]
        cmd += ["-j", "encode_shards_job", "-c", str(work / f"run_{workers}.yaml")]
        with open(work / f"job_{workers}.log", "wb") as log:
            done = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
        job_s = time.perf_counter() - started
    load_after = load_average()
    if done.returncode:
        log = work / f"job_{workers}.log"
        raise SystemExit(f"encode_shards_job on {workers} worker(s) failed: {log.read_text()[-3000:]}")
    run = instance.get_runs(limit=1)[0]
    windows = shard_windows(instance, run.run_id)
    span = max(w[2] for w in windows) - min(w[1] for w in windows)

    started = time.perf_counter()
    tables = materialize(
        by_name("raw_documents", "token_activations", "pooled_embeddings"),
        partition_key=DATASET,
        instance=instance,
        resources=resources,
        selection=by_name("token_activations", "pooled_embeddings"),
        run_config=QUIET,
    )
    tables_s = time.perf_counter() - started
    meta = next(
        e
        for e in tables.asset_materializations_for_node("token_activations")
        if e.asset_key.path == ["token_activations"]
    ).metadata
    assert meta["encoded_now"].value == 0 and meta["reader_loaded"].value is False, "shards left documents"
    instance.dispose()
    return {
        "workers": workers,
        "torch_threads_per_worker": 1,
        "shards": len(windows),
        "job_wall_s": round(job_s, 1),
        "shards_span_s": round(span, 1),
        "shard_step_s": [round(w[2] - w[1], 1) for w in windows],
        "tables_from_cache_s": round(tables_s, 1),
        "load_avg_before": round(load_before, 2),
        "load_avg_after": round(load_after, 2),
        "data": str(data),
    }


def read_tables(data: Path) -> dict[str, pl.DataFrame]:
    from interp_assets.storage.parquet import read_table

    base = str(data / "parquet")
    return {t: read_table(base, t, DATASET).collect().sort(cols) for t, cols in SORT.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-docs", type=int, default=20_000)
    parser.add_argument("--shard-documents", type=int, default=None, help="default: half of --n-docs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    args.shard_documents = args.shard_documents or -(-args.n_docs // 2)
    rows = load_sentences(SST2, args.n_docs, args.seed)

    from servers import redis_server

    work = Path(tempfile.mkdtemp(prefix="interp-sharded-"))
    load_start = os.getloadavg()
    try:
        with redis_server() as redis:
            results = [run_config(w, rows, args, work, redis) for w in (1, 2)]
        one, two = (read_tables(Path(r["data"])) for r in results)
        equal = {t: one[t].equals(two[t]) for t in SORT}
        rows_per_table = {t: one[t].height for t in SORT}
    except BaseException as exc:  # pytest's Skipped (a missing binary) is a BaseException
        if type(exc).__name__ == "Skipped":
            raise SystemExit(f"cannot run: {exc}") from None
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r in results:
        r.pop("data")
    speedup = results[0]["job_wall_s"] / results[1]["job_wall_s"]
    print_table(
        results,
        [
            ("workers", "workers", "d"),
            ("shards", "shards", "d"),
            ("job wall s", "job_wall_s", ".1f"),
            ("shards span s", "shards_span_s", ".1f"),
            ("tables from cache s", "tables_from_cache_s", ".1f"),
            ("load before", "load_avg_before", ".2f"),
            ("load after", "load_avg_after", ".2f"),
        ],
        title=f"{args.n_docs:,} SST-2 sentences, shards of {args.shard_documents:,}, {os.cpu_count()} CPUs",
    )
    for r in results:
        print(f"  {r['workers']} worker(s): shard steps {r['shard_step_s']} s")
    print(f"job wall time, 1 worker / 2 workers: {speedup:.2f}x; tables equal row for row: {equal}")
    write_results(
        {
            "params": vars(args),
            "data": "distinct sentences of SST-2 train (../shared/data/sst2/train.tsv), shuffled (seed)",
            "reader": "embedded default (all-MiniLM-L6-v2 + resources/default_sae), device cpu, "
            "1 torch thread per worker",
            "executor": "dagster-celery 0.29.27, Redis broker and backend, one worker process each",
            "instance": "SQLite in a temporary DAGSTER_HOME, sae_model pool limit = workers",
            "cpu_count": os.cpu_count(),
            "load_avg_at_start": load_start,
            "load_avg_at_end": os.getloadavg(),
            "git": git_state(),
            "configurations": results,
            "speedup_job_wall": round(speedup, 2),
            "tables_equal": equal,
            "rows": rows_per_table,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
