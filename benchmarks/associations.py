"""Benchmark of interp_assets.analysis.associations at scale: prints a table, writes
results/associations.json.

Synthetic pooled_embeddings of one dataset (default 100k documents, SAE width 16,384, about 300 active
features per document with Zipf-like frequencies; the generator in benchmarks/_common.py) and a documents
table with metadata columns:
- `toxic` (10% True): six planted features fire more / less often in toxic documents;
- `score` (normal, 1% null): four planted features fire more often the higher the score;
- `coin` (50% True), `rare` (1% True), `reports` (Poisson(0.05) counts): unrelated to every feature,
  so nothing may come out significant (the last two exercise the mixture p-values).

Each case runs in a fresh child process so `ru_maxrss` is that case's own peak. `seconds` is wall
time of the call, `cpu_s` the CPU time of the process during it (the honest number on a shared
machine), `delta MB` the peak RSS above what the inputs already took.

Usage: python benchmarks/associations.py [--docs 100000] [--width 16384] [--active 300]
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
from interp_assets.analysis.associations import associations_for_column  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "associations.json"

# (frequency rank of the feature, multiplier of its frequency in toxic documents)
PLANTED_TOXIC = [(30, 1.15), (300, 0.8), (1500, 1.6), (5000, 0.4), (9000, 3.0), (14000, 6.0)]
# (frequency rank, gamma): P(active) = p * exp(gamma * score - gamma^2 / 2), mean-preserving
PLANTED_SCORE = [(60, 0.1), (600, 0.3), (3000, 0.5), (8000, 1.0)]

CASES = {
    # name: (column, kwargs, in_memory, planted set or None for a null column)
    "toxic_max_parquet": ("toxic", {}, False, "toxic"),
    "toxic_max_memory": ("toxic", {}, True, "toxic"),
    "toxic_mean_parquet": ("toxic", {"aggregation": "mean"}, False, "toxic"),
    "score_spearman": ("score", {}, False, "score"),
    "score_pearson": ("score", {"method": "pearson"}, False, "score"),
    "null_coin": ("coin", {}, False, None),
    "null_rare_label": ("rare", {}, False, None),
    "null_counts": ("reports", {}, False, None),
}


def generate(workdir: Path, docs: int, width: int, active: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    freq, ids = feature_frequencies(width, active, rng)
    pooled = pooled_table(docs, freq, rng)
    toxic = rng.random(docs) < 0.10
    score = rng.normal(size=docs)
    planted: dict[str, list[dict]] = {"toxic": [], "score": []}
    rows = []
    for name, spec in (("toxic", PLANTED_TOXIC), ("score", PLANTED_SCORE)):
        for rank, effect in spec:
            if rank >= width:
                continue
            f = int(ids[rank])
            p = freq[f]
            if name == "toxic":
                prob = np.where(toxic, min(p * effect, 0.95), p)
            else:
                prob = np.minimum(p * np.exp(effect * score - effect**2 / 2), 0.95)
            doc = np.flatnonzero(rng.random(docs) < prob).astype(np.int32)
            planted[name].append({"feature": f, "frequency": float(p), "effect": effect})
            rows.append((f, doc))
    replaced = [f for f, _ in rows]
    extra = pl.concat(
        [
            pl.DataFrame(
                {
                    "doc_id": doc,
                    "feature": np.full(doc.size, f, dtype=np.int32),
                    "max_activation": (rng.exponential(1.0, doc.size) + 0.01).astype(np.float32),
                    "active_tokens": (1 + rng.poisson(2.0, doc.size)).astype(np.int32),
                }
            )
            for f, doc in rows
        ]
    ).with_columns(
        sum_activation=(pl.col("max_activation") * pl.col("active_tokens") * 0.75).cast(pl.Float32)
    )
    doc_tokens = pooled.group_by("doc_id").agg(pl.col("doc_tokens").first())
    extra = extra.join(doc_tokens, on="doc_id", how="left").with_columns(pl.col("doc_tokens").fill_null(100))
    pooled = (
        pl.concat([pooled.filter(~pl.col("feature").is_in(replaced)), extra.select(pooled.columns)])
        .sort("doc_id", "feature")
        .with_columns(pl.lit("bench").alias("dataset"))
    )
    pooled.write_parquet(workdir / "pooled.parquet", row_group_size=1_000_000)
    score_col = pl.Series("score", score).scatter(rng.choice(docs, docs // 100, replace=False), None)
    pl.DataFrame(
        {
            "dataset": ["bench"] * docs,
            "doc_id": np.arange(docs, dtype=np.int32),
            "toxic": toxic,
            "score": score_col,
            "coin": rng.random(docs) < 0.5,
            "rare": rng.random(docs) < 0.01,
            "reports": rng.poisson(0.05, docs),
        }
    ).write_parquet(workdir / "documents.parquet")
    return {"planted": planted, "rows": pooled.height, "generate_s": time.perf_counter() - t}


def child(case: str, workdir: Path) -> dict:
    column, kwargs, in_memory, _ = CASES[case]
    docs = pl.read_parquet(workdir / "documents.parquet")
    pooled = (
        pl.read_parquet(workdir / "pooled.parquet")
        if in_memory
        else pl.scan_parquet(workdir / "pooled.parquet")
    )
    out: dict = {"case": case, "rss_inputs_mb": rss_now_mb()}
    t, c = time.perf_counter(), time.process_time()
    res = associations_for_column(pooled, docs, column, **kwargs)
    out["seconds"] = time.perf_counter() - t
    out["cpu_s"] = time.process_time() - c
    out["peak_mb"] = peak_rss_mb()
    out["delta_mb"] = max(0.0, out["peak_mb"] - out["rss_inputs_mb"])
    out["summary"] = res.metadata()
    table = res.table
    out["tests"] = table.group_by("test").len().sort("test").rows()
    out["significant_features"] = table.filter("significant")["feature"].to_list()[:50]
    out["top"] = table.head(8).select("feature", "n_active", "effect", "q_value", "test").rows()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--width", type=int, default=16_384)
    ap.add_argument("--active", type=float, default=300.0)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "generate":
        print(json.dumps(generate(Path(args.workdir), args.docs, args.width, args.active)))
        return
    if args.child:
        print(json.dumps(child(args.child, Path(args.workdir))))
        return

    def run_child(case: str, tmp: str) -> dict:
        cmd = [sys.executable, __file__, "--child", case, "--workdir", tmp, "--docs", str(args.docs),
               "--width", str(args.width), "--active", str(args.active)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"benchmark child {case!r} failed:\n{proc.stderr}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory(prefix="bench_assoc_") as tmp:
        gen = run_child("generate", tmp)
        results = []
        for case, (_, _, _, planted_key) in CASES.items():
            r = run_child(case, tmp)
            sig = r["significant_features"]
            if planted_key is None:
                r["check"] = "pass" if not sig else f"FAIL: {len(sig)} significant on a null column"
            else:
                planted = {p["feature"] for p in gen["planted"][planted_key]}
                found = [f for f in sig if f in planted]
                on_top = sig[: len(found)] == found
                r["false_positives"] = sorted(set(sig) - planted)
                ok = on_top and len(found) == len(planted)
                r["check"] = ("pass" if ok else "FAIL") + f" ({len(found)}/{len(planted)} planted on top)"
            results.append(r)
    print(
        f"documents: {args.docs:,}  width: {args.width:,}  pooled rows: {gen['rows']:,}  "
        f"(generated in {gen['generate_s']:.1f}s)  cpus: {os.cpu_count()}  load avg: {os.getloadavg()[0]:.1f}"
    )
    header = (
        f"{'case':<20}{'seconds':>8}{'cpu_s':>7}{'peak MB':>9}{'delta MB':>10}{'tested':>8}"
        f"{'skipped':>8}{'mixture':>8}{'signif':>7}{'FP':>4}  check"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        s = r["summary"]
        mixture = sum(n for t, n in r["tests"] if t.endswith("_mixture"))
        fp = len(r.get("false_positives", r["significant_features"]))
        print(
            f"{r['case']:<20}{r['seconds']:>8.2f}{r['cpu_s']:>7.1f}{r['peak_mb']:>9.0f}{r['delta_mb']:>10.0f}"
            f"{s['n_tested']:>8}{s['n_skipped_rare'] + s['n_skipped_constant']:>8}{mixture:>8}"
            f"{s['n_significant']:>7}{fp:>4}  {r['check']}"
        )
    payload = {
        "params": vars(args) | {"child": None, "workdir": None},
        "rows": gen["rows"],
        "generate_s": gen["generate_s"],
        "planted": gen["planted"],
        "cpu_count": os.cpu_count(),
        "load_average_1min_at_end": os.getloadavg()[0],
        "polars": pl.__version__,
        "numpy": np.__version__,
        "results": results,
    }
    write_results(payload, RESULTS)


if __name__ == "__main__":
    main()
