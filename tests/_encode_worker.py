"""Subprocess helper for tests/defs/test_recovery.py (not collected: the name does not start with `test_`).

Runs the real product code in a separate process so a test can SIGKILL it mid-run, or run two of them
at once against one storage folder:

    python tests/_encode_worker.py cache <cache_root> <documents.parquet> <max_docs> [--die-at POINT:N]
        ActivationCache.encode_missing over the documents (columns doc_hash, text) with the embedded
        default reader, `max_docs` documents per chunk; prints one line per committed chunk. With
        `--die-at`, the process dies (exit 137, no cleanup) at that point of the N-th chunk's commit
        (`tests/_faults.py`, `install_kill_point`).
    python tests/_encode_worker.py dagster <data_dir> <dataset> [--assets a,b,c] [--refresh-seconds S]
        materialize the assets (default raw_documents,token_activations,pooled_embeddings) for one
        dataset partition, then evaluate warehouse_views_sensor for that run again and again for S
        seconds (what the daemon does after each successful run); prints a JSON summary as last line
        (`refresh_window` is in time.monotonic() seconds, comparable across processes on Linux).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "tests"))  # for _faults


def _cache(args: argparse.Namespace) -> int:
    import polars as pl

    from interp_assets.engine.activation_cache import ActivationCache
    from interp_assets.engine.activations import encode_texts
    from resources.sae_reader import SAEReaderResource

    if args.die_at:
        from _faults import install_kill_point

        point, _, chunk = args.die_at.partition(":")
        install_kill_point(point, int(chunk))
    reader = SAEReaderResource(device="cpu").get_reader()
    docs = pl.read_parquet(args.documents)
    cache = ActivationCache(args.cache_root, reader.fingerprint)
    print("loaded", flush=True)
    stats = cache.encode_missing(
        lambda texts: encode_texts(reader, texts),
        docs,
        max_docs=args.max_docs,
        on_chunk=lambda done, total: print(f"chunk {done}/{total}", flush=True),
    )
    print(json.dumps(stats.__dict__), flush=True)
    return 0


def _dagster(args: argparse.Namespace) -> int:
    from dagster import DagsterEventType, DagsterInstance, build_run_status_sensor_context, materialize

    from interp_assets.defs.assets import ALL_ASSETS
    from interp_assets.defs.sensors import warehouse_views_sensor
    from resources.local import local_resources

    data = Path(args.data_dir)
    resources = local_resources(data)
    storage, duckdb = resources["storage"], resources["duckdb"]
    by_name = {k.to_user_string(): a for a in ALL_ASSETS for k in a.keys}
    assets = [by_name[n] for n in args.assets.split(",")]
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("datasets", [args.dataset])
    print("starting", flush=True)
    started = time.monotonic()
    result = materialize(
        assets, partition_key=args.dataset, instance=instance, resources=resources, raise_on_error=False
    )
    summary: dict = {"success": result.success, "run_seconds": round(time.monotonic() - started, 2)}
    summary["checks"] = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    refreshes, errors, counts = 0, [], {}
    if result.success and args.refresh_seconds > 0:
        run = instance.get_run_by_id(result.run_id)
        (entry,) = instance.all_logs(result.run_id, of_type=DagsterEventType.RUN_SUCCESS)
        event = entry.dagster_event
        begin = time.monotonic()
        end = begin + args.refresh_seconds
        while time.monotonic() < end:
            context = build_run_status_sensor_context(
                sensor_name="warehouse_views_sensor",
                dagster_event=event,
                dagster_instance=instance,
                dagster_run=run,
                resources={"storage": storage, "duckdb": duckdb},
            )
            try:
                warehouse_views_sensor(context)
                refreshes += 1
            except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on any
                errors.append(f"{type(exc).__name__}: {exc}"[:500])
        counts = {"refreshes": refreshes, "refresh_window": [begin, time.monotonic()]}
    summary.update(counts, errors=errors[:5], n_errors=len(errors))
    print(json.dumps(summary), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    cache = sub.add_parser("cache")
    cache.add_argument("cache_root")
    cache.add_argument("documents")
    cache.add_argument("max_docs", type=int)
    cache.add_argument("--die-at", default="")
    dag = sub.add_parser("dagster")
    dag.add_argument("data_dir")
    dag.add_argument("dataset")
    dag.add_argument("--assets", default="raw_documents,token_activations,pooled_embeddings")
    dag.add_argument("--refresh-seconds", type=float, default=0.0)
    args = parser.parse_args()
    try:
        return _cache(args) if args.mode == "cache" else _dagster(args)
    except Exception:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
