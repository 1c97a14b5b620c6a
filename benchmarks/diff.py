"""Benchmark of `interp_assets.analysis.diffing` at scale; prints a table, writes
benchmarks/results/diff.json.

Synthetic pooled_embeddings for two datasets (default 100k vs 100k documents, SAE width 16,384, about
300 active features per document with Zipf-like feature frequencies). B differs from A only in a few
planted features; the benchmark checks that exactly those come out on top.

Each measured case runs in a fresh child process so `ru_maxrss` (peak RSS of the process) is that
case's own peak:
- `diff_parquet`: `diff_features` over `pl.scan_parquet` of the two tables (what the asset does);
- `diff_memory`: both tables read into memory first, then `diff_features`; reports the RSS after the
  inputs are loaded and the peak delta of the diff itself;
- `paired`: `paired_diff_features` on a smaller case (default 20k pairs);
- `null_halves`: `split_halves_null` on dataset A (no feature may come out significant).

Usage: python benchmarks/diff.py [--docs 100000] [--width 16384] [--active 300] [--pairs 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import feature_frequencies, peak_rss_mb, pooled_table, rss_now_mb, write_results  # noqa: E402
from interp_assets.analysis.diffing import diff_features, paired_diff_features, split_halves_null  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "diff.json"

# (frequency rank of the feature, multiplier of its frequency in B)
PLANTED = [(30, 1.15), (300, 0.8), (1500, 1.6), (5000, 0.4), (9000, 3.0), (14000, 6.0)]


def generate(workdir: Path, docs: int, width: int, active: float, pairs: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    freq_a, ids = feature_frequencies(width, active, rng)
    freq_b = freq_a.copy()
    planted = []
    for rank, mult in PLANTED:
        if rank < width:
            f = int(ids[rank])
            freq_b[f] = min(freq_a[f] * mult, 0.95)
            planted.append({"feature": f, "freq_a": float(freq_a[f]), "freq_b": float(freq_b[f])})
    t = time.perf_counter()
    for name, freq, n in (("a", freq_a, docs), ("b", freq_b, docs)):
        df = pooled_table(n, freq, rng)
        df = df.with_columns(pl.lit(name).cast(pl.Categorical).alias("dataset")).select(
            "dataset", pl.exclude("dataset")
        )
        df.write_parquet(workdir / f"pooled_{name}.parquet", row_group_size=1_000_000)
        rows = df.height
        del df
    # paired case: the same prompts answered twice; B copies A's document with planted changes
    pa_df = pooled_table(pairs, freq_a, rng)
    pa_df.write_parquet(workdir / "paired_a.parquet")
    pb_df = pooled_table(pairs, freq_b, rng)
    pb_df.write_parquet(workdir / "paired_b.parquet")
    return {"planted": planted, "rows_per_side": rows, "generate_s": time.perf_counter() - t}


def child(case: str, workdir: Path, docs: int, width: int, pairs: int) -> dict:
    out: dict = {"case": case}
    pa_, pb_ = workdir / "pooled_a.parquet", workdir / "pooled_b.parquet"
    if case == "diff_parquet":
        out["rss_inputs_mb"] = rss_now_mb()
        out["peak_before_mb"] = peak_rss_mb()
        t = time.perf_counter()
        res = diff_features(pl.scan_parquet(pa_), docs, pl.scan_parquet(pb_), docs, n_features=width)
    elif case == "diff_memory":
        a, b = pl.read_parquet(pa_), pl.read_parquet(pb_)
        out["rss_inputs_mb"] = rss_now_mb()
        out["peak_before_mb"] = peak_rss_mb()
        t = time.perf_counter()
        res = diff_features(a, docs, b, docs, n_features=width)
    elif case == "paired":
        a, b = pl.read_parquet(workdir / "paired_a.parquet"), pl.read_parquet(workdir / "paired_b.parquet")
        prs = pl.DataFrame(
            {"doc_id_a": np.arange(pairs, dtype=np.int32), "doc_id_b": np.arange(pairs, dtype=np.int32)}
        )
        out["rss_inputs_mb"] = rss_now_mb()
        out["peak_before_mb"] = peak_rss_mb()
        t = time.perf_counter()
        res = paired_diff_features(a, b, prs, n_features=width)
    elif case == "null_halves":
        out["rss_inputs_mb"] = rss_now_mb()
        out["peak_before_mb"] = peak_rss_mb()
        t = time.perf_counter()
        res = split_halves_null(pl.scan_parquet(pa_), docs, seed=1, n_features=width)
    else:
        raise ValueError(case)
    out["seconds"] = time.perf_counter() - t
    out["peak_mb"] = peak_rss_mb()
    out["diff_delta_mb"] = max(0.0, out["peak_mb"] - out["rss_inputs_mb"])
    out["features_tested"] = res.height
    out["significant"] = int(res["significant"].sum())
    out["top_features"] = res["feature"].head(10).to_list()
    out["significant_features"] = res.filter("significant")["feature"].to_list()[:50]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--width", type=int, default=16_384)
    ap.add_argument("--active", type=float, default=300.0)
    ap.add_argument("--pairs", type=int, default=20_000)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "generate":
        print(json.dumps(generate(Path(args.workdir), args.docs, args.width, args.active, args.pairs)))
        return
    if args.child:
        print(json.dumps(child(args.child, Path(args.workdir), args.docs, args.width, args.pairs)))
        return

    def run_child(case: str, tmp: str) -> dict:
        # a fresh small parent for every child: ru_maxrss is inherited across fork/exec
        cmd = [
            sys.executable,
            __file__,
            "--child",
            case,
            "--workdir",
            tmp,
            "--docs",
            str(args.docs),
            "--width",
            str(args.width),
            "--active",
            str(args.active),
            "--pairs",
            str(args.pairs),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"benchmark child {case!r} failed:\n{proc.stderr}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory(prefix="bench_diff_") as tmp:
        gen = run_child("generate", tmp)
        planted = {p["feature"] for p in gen["planted"]}
        results = []
        for case in ("diff_parquet", "diff_memory", "paired", "null_halves"):
            r = run_child(case, tmp)
            if case == "null_halves":
                r["check"] = "pass" if r["significant"] == 0 else "FAIL: significant features on a null split"
            else:
                sig = r["significant_features"]
                found = [f for f in sig if f in planted]
                r["planted_found"] = len(found)
                r["planted_on_top"] = sig[: len(found)] == found
                r["false_positives"] = sorted(set(sig) - planted)
                # BH bounds the expected share of false discoveries (5%), not their number in one draw:
                # report them; require the planted features to rank above every other feature
                need_all = case != "paired"  # the paired case is small: report its power
                ok = r["planted_on_top"] and (len(found) == len(planted) or not need_all)
                r["check"] = ("pass" if ok else "FAIL") + f" ({len(found)}/{len(planted)} planted on top)"
            results.append(r)
    print(
        f"docs per side: {args.docs:,}  width: {args.width:,}  "
        f"pooled rows per side: {gen['rows_per_side']:,}  "
        f"(generated in {gen['generate_s']:.1f}s); paired case: {args.pairs:,} pairs"
    )
    header = (
        f"{'case':<14}{'seconds':>9}{'inputs MB':>11}{'peak MB':>9}{'delta MB':>10}"
        f"{'tested':>8}{'signif':>8}{'FP':>4}  check"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        fp = r["significant"] if r["case"] == "null_halves" else len(r["false_positives"])
        print(
            f"{r['case']:<14}{r['seconds']:>9.2f}{r['rss_inputs_mb']:>11.0f}{r['peak_mb']:>9.0f}"
            f"{r['diff_delta_mb']:>10.0f}{r['features_tested']:>8}{r['significant']:>8}{fp:>4}  {r['check']}"
        )
    payload = {
        "params": vars(args) | {"child": None, "workdir": None},
        "rows_per_side": gen["rows_per_side"],
        "generate_s": gen["generate_s"],
        "planted": gen["planted"],
        "cpu_count": os.cpu_count(),
        "polars": pl.__version__,
        "results": results,
    }
    write_results(payload, RESULTS)


if __name__ == "__main__":
    main()
