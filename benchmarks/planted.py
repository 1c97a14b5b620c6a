"""Planted-difference benchmark on DBpedia, through the assets: does the diff find a topic that makes up
a realistic share of one dataset, in each feature family, and does the null stay clean?

Data: `shared/data/dbpedia/dbpedia.tsv` (entity descriptions, 14 categories). For each category X:
A = `--n-docs` documents drawn from the other 13 categories; B = another `--n-docs` from them with a
fraction r replaced by documents of X, for each r in `--rates`. Null: `--null-splits` random half-splits
of one 2 x `--n-docs` sample of all categories.

Every dataset goes through raw_documents -> token_activations -> pooled_embeddings ->
document_embeddings, every comparison through document_sae -> document_features -> diff_reports
(`dagster.materialize`, embedded reader on CPU; labels and scores of the token family are not run).
Per (family, category, rate), from the stored diff_features:
- significant_b: features significant toward B (q < 0.05);
- precision_at_5: share of the report's top-5 B-direction features whose top-20 B documents (by
  activation) are at least 80% X; top_feature_purity: that share of X for the first of them;
- detected: some top-5 B feature is significant with top-20 purity >= 0.8.
Null, two ways: the 20 splits as materialized (does any feature come out significant?), and
`--relabellings` random relabellings of the null sample's stored features (its document SAE is trained on
the same 2 x `--n-docs` documents whichever way they are split), diffed with the report's settings: the
share with any significant feature estimates each family's family-wise error rate under a true null, with
a Wilson 95% interval (20 splits alone cannot tell 2% from 8%).
Prints the curve and writes `benchmarks/results/planted.json`.

    python benchmarks/planted.py                       # 14 categories x {1, 3, 8, 15}%, 20 null splits
    python benchmarks/planted.py --categories Album,Plant --rates 0.08 --null-splits 2   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from dagster import DagsterInstance, materialize  # noqa: E402

from benchmarks._common import SHARED_DATA, git_state, load_average, print_table, write_results  # noqa: E402
from interp_assets.analysis import diffing  # noqa: E402
from interp_assets.analysis.reports import top_features  # noqa: E402
from interp_assets.comparisons import comparison_key  # noqa: E402
from interp_assets.defs.analysis_assets import DiffReportsConfig  # noqa: E402
from interp_assets.defs.assets import ALL_ASSETS  # noqa: E402
from interp_assets.storage.parquet import read_table  # noqa: E402
from resources.local import local_resources  # noqa: E402

DBPEDIA = SHARED_DATA / "dbpedia" / "dbpedia.tsv"
RESULTS = Path(__file__).resolve().parent / "results" / "planted.json"
DATASET_ASSETS = ["raw_documents", "token_activations", "pooled_embeddings", "document_embeddings"]
COMPARISON_ASSETS = ["document_sae", "document_features", "diff_reports"]
PURITY = 0.8
TOP_DOCS = 20
TOP_FEATURES = 5


def load_dbpedia(path: Path) -> pl.DataFrame:
    """The DBpedia sample: text and category of every row with both."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the benchmark reads the shared DBpedia sample there.")
    frame = pl.read_csv(path, separator="\t", quote_char=None, infer_schema_length=0)
    return frame.select("text", "category").filter(
        (pl.col("text").str.len_chars() > 0) & pl.col("category").is_not_null()
    )


def plan(
    data: pl.DataFrame, categories: list[str], rates: list[float], n_docs: int, null_splits: int, seed: int
) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Datasets (name -> row indices into `data`) and comparisons (a, b, family-free case description)."""
    rng = np.random.default_rng(seed)
    cats = data["category"].to_numpy()
    datasets: dict[str, np.ndarray] = {}
    cases: list[dict] = []
    for x in categories:
        others = rng.permutation(np.flatnonzero(cats != x))
        own = np.flatnonzero(cats == x)
        slug = x.lower()
        datasets[f"{slug}_a"] = others[:n_docs]
        for rate in rates:
            k = round(rate * n_docs)
            planted = rng.choice(own, size=k, replace=False)
            name = f"{slug}_b{round(rate * 1000):03d}"
            datasets[name] = np.r_[others[n_docs : 2 * n_docs - k], planted]
            cases.append({"a": f"{slug}_a", "b": name, "category": x, "rate": rate})
    sample = rng.choice(len(cats), size=2 * n_docs, replace=False)
    for split in range(null_splits):
        perm = rng.permutation(sample)
        datasets[f"null{split:02d}_a"] = perm[:n_docs]
        datasets[f"null{split:02d}_b"] = perm[n_docs:]
        cases.append({"a": f"null{split:02d}_a", "b": f"null{split:02d}_b", "split": split})
    return datasets, cases


def run_assets(
    data_dir: Path,
    data: pl.DataFrame,
    datasets: dict[str, np.ndarray],
    cases: list[dict],
    run_config: dict | None = None,
) -> dict:
    """Materialize every dataset's and comparison's assets; seconds per stage."""
    landing = data_dir / "landing"
    landing.mkdir(parents=True, exist_ok=True)
    for name, rows in datasets.items():
        data[rows.tolist()].write_parquet(landing / f"{name}.parquet")
    (data_dir / "config").mkdir(exist_ok=True)
    (data_dir / "config" / "comparisons.json").write_text(
        json.dumps([{"a": c["a"], "b": c["b"]} for c in cases])
    )
    instance = DagsterInstance.ephemeral()
    resources = local_resources(data_dir)
    by_name = {k.path[-1]: a for a in ALL_ASSETS for k in a.keys}
    keys = [comparison_key(c["a"], c["b"]) for c in cases]
    seconds = {}
    for kind, partitions, assets in (
        ("datasets", list(datasets), DATASET_ASSETS),
        ("comparisons", keys, COMPARISON_ASSETS),
    ):
        instance.add_dynamic_partitions(kind, partitions)
        seconds[kind] = 0.0
        for i, partition in enumerate(partitions):
            start = time.perf_counter()
            result = materialize(
                [by_name[n] for n in assets],
                partition_key=partition,
                instance=instance,
                resources=resources,
                run_config=run_config if kind == "comparisons" else None,
            )
            if not result.success:
                raise RuntimeError(f"{kind} {partition}: materialization failed")
            seconds[kind] += time.perf_counter() - start
            took = time.perf_counter() - start
            print(f"  {kind} {i + 1}/{len(partitions)} {partition}: {took:.1f} s", flush=True)
    return seconds


def top_documents(base: str, family: str, key: str, dataset: str, feature: int) -> list[int]:
    """doc_ids of the `TOP_DOCS` documents of `dataset` where `feature` is strongest."""
    if family == "token":
        frame = read_table(base, "pooled_embeddings", dataset).select("doc_id", "feature", "max_activation")
    else:
        frame = (
            read_table(base, "document_features", key)
            .filter(pl.col("dataset") == dataset)
            .select("doc_id", "feature", pl.col("activation").alias("max_activation"))
        )
    top = frame.filter(pl.col("feature") == feature).sort("max_activation", descending=True).head(TOP_DOCS)
    return top.collect()["doc_id"].to_list()


def evaluate(data_dir: Path, cases: list[dict]) -> tuple[list[dict], list[dict]]:
    """Per (family, case): significant_b, purity of the top features, precision@5, detected; null counts."""
    base = str(data_dir / "parquet")
    results, nulls = [], []
    categories = {}
    for case in cases:
        key = comparison_key(case["a"], case["b"])
        diff = read_table(base, "diff_features", key).collect()
        if case["b"] not in categories:
            categories[case["b"]] = dict(
                read_table(base, "raw_documents", case["b"])
                .select("doc_id", "category")
                .collect()
                .iter_rows()
            )
        for family in ("token", "document"):
            part = diff.filter(pl.col("family") == family)
            significant_b = part.filter(pl.col("significant") & (pl.col("direction") == "b")).height
            if "split" in case:
                nulls.append(
                    {"family": family, "split": case["split"], "significant": int(part["significant"].sum())}
                )
                continue
            top = top_features(part, TOP_FEATURES)["b"]
            purities = []
            for feature in top["feature"].to_list():
                docs = top_documents(base, family, key, case["b"], int(feature))
                purities.append(float(np.mean([categories[case["b"]][d] == case["category"] for d in docs])))
            label = top["label"][0] if "label" in top.columns and top.height else None
            results.append(
                {
                    "family": family,
                    "category": case["category"],
                    "rate": case["rate"],
                    "significant_b": significant_b,
                    "top_feature": int(top["feature"][0]) if top.height else None,
                    "top_feature_label": label,
                    "top_feature_purity": purities[0] if purities else 0.0,
                    "precision_at_5": float(np.mean([p >= PURITY for p in purities])) if purities else 0.0,
                    "detected": any(p >= PURITY for p in purities),
                }
            )
    return results, nulls


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion `hits / n`."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def family_values(base: str, family: str, key: str, a: str, b: str, n_a: int) -> tuple[pl.DataFrame, int]:
    """Both datasets' `(row, feature, max_activation)` of one feature family, rows numbered 0..n_a+n_b-1
    (A's `n_a` documents first), and the family's feature count."""
    if family == "token":
        parts = [
            read_table(base, "pooled_embeddings", ds).select("doc_id", "feature", "max_activation").collect()
            for ds in (a, b)
        ]
        n_features = int(read_table(base, "diff_reports", key).select("features_tested").collect().item())
    else:
        features = read_table(base, "document_features", key).collect()
        parts = [
            features.filter(pl.col("dataset") == ds).select(
                "doc_id", "feature", pl.col("activation").alias("max_activation")
            )
            for ds in (a, b)
        ]
        n_features = int(read_table(base, "document_sae", key).select("n_features").collect().item())
    parts[1] = parts[1].with_columns(pl.col("doc_id") + n_a)
    table = pl.concat(parts).select(pl.col("doc_id").cast(pl.Int64).alias("row"), "feature", "max_activation")
    return table, n_features


def relabelled_null(base: str, case: dict, family: str, relabellings: int, seed: int) -> dict:
    """Share of random relabellings of one null split's documents with any significant feature (the
    family-wise error rate under a true null), diffed with the report's default settings."""
    key = comparison_key(case["a"], case["b"])
    n_a, n_b = (read_table(base, "raw_documents", case[s]).select(pl.len()).collect().item() for s in "ab")
    table, n_features = family_values(base, family, key, case["a"], case["b"], n_a)
    config = DiffReportsConfig()
    rows = table["row"].to_numpy()
    rng = np.random.default_rng(seed)
    with_any = 0
    for _ in range(relabellings):
        position = np.empty(n_a + n_b, dtype=np.int64)
        position[rng.permutation(n_a + n_b)] = np.arange(n_a + n_b)
        new = position[rows]
        in_a = new < n_a
        side_a = table.filter(pl.Series(in_a)).with_columns(doc_id=pl.Series(new[in_a]))
        side_b = table.filter(pl.Series(~in_a)).with_columns(doc_id=pl.Series(new[~in_a] - n_a))
        diff = diffing.diff_features(
            side_a.drop("row"),
            n_a,
            side_b.drop("row"),
            n_b,
            alpha=config.alpha,
            n_features=n_features,
            firing=config.firing,
            within_feature=config.within_feature,
        )
        with_any += bool(diff["significant"].any())
    low, high = wilson_interval(with_any, relabellings)
    return {
        "family": family,
        "relabellings": relabellings,
        "with_any": with_any,
        "family_wise_error": with_any / relabellings,
        "ci_low": float(low),
        "ci_high": float(high),
    }


def summarize(results: list[dict], nulls: list[dict], rates: list[float]) -> list[dict]:
    """Per family and rate: detected categories, mean precision@5, median significant B features; per
    family, null splits with any significant feature. Then the report as a whole ("either": the report
    shows both families, so a category counts when either family detects it; a null split counts when
    either family has a significant feature)."""
    rows = []
    for family in ("token", "document"):
        for rate in rates:
            part = [r for r in results if r["family"] == family and r["rate"] == rate]
            rows.append(
                {
                    "family": family,
                    "rate": f"{rate:.0%}",
                    "detected": f"{sum(r['detected'] for r in part)}/{len(part)}",
                    "mean_precision_at_5": float(np.mean([r["precision_at_5"] for r in part]))
                    if part
                    else None,
                    "median_significant_b": float(np.median([r["significant_b"] for r in part]))
                    if part
                    else None,
                }
            )
        fam = [n for n in nulls if n["family"] == family]
        rows.append(
            {
                "family": family,
                "rate": "null",
                "detected": f"{sum(n['significant'] > 0 for n in fam)}/{len(fam)} splits with any",
                "mean_precision_at_5": None,
                "median_significant_b": float(np.median([n["significant"] for n in fam])) if fam else None,
            }
        )
    for rate in rates:
        found: dict[str, bool] = {}
        for r in results:
            if r["rate"] == rate:
                found[r["category"]] = found.get(r["category"], False) or r["detected"]
        rows.append(
            {
                "family": "either",
                "rate": f"{rate:.0%}",
                "detected": f"{sum(found.values())}/{len(found)}",
                "mean_precision_at_5": None,
                "median_significant_b": None,
            }
        )
    by_split: dict[int, int] = {}
    for n in nulls:
        by_split[n["split"]] = by_split.get(n["split"], 0) + n["significant"]
    rows.append(
        {
            "family": "either",
            "rate": "null",
            "detected": f"{sum(v > 0 for v in by_split.values())}/{len(by_split)} splits with any",
            "mean_precision_at_5": None,
            "median_significant_b": float(np.median(list(by_split.values()))) if by_split else None,
        }
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="0.01,0.03,0.08,0.15")
    ap.add_argument("--categories", default="", help="comma-separated; default: all 14")
    ap.add_argument("--n-docs", type=int, default=1000)
    ap.add_argument("--null-splits", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--relabellings",
        type=int,
        default=500,
        help="random relabellings of the first null split, per family (0: skip the error-rate estimate)",
    )
    ap.add_argument("--data-dir", default="", help="keep the run's data here (default: a temporary folder)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument(
        "--lexical-dims",
        type=int,
        default=None,
        help="document_sae's lexical profile width (default: the asset's default; 0: embedding alone)",
    )
    args = ap.parse_args()
    started = time.perf_counter()
    data = load_dbpedia(DBPEDIA)
    categories = [c for c in args.categories.split(",") if c] or sorted(data["category"].unique().to_list())
    rates = [float(r) for r in args.rates.split(",")]
    datasets, cases = plan(data, categories, rates, args.n_docs, args.null_splits, args.seed)
    with tempfile.TemporaryDirectory(prefix="planted_") as tmp:
        data_dir = Path(args.data_dir or tmp)
        run_config = (
            {"ops": {"document_sae": {"config": {"lexical_dims": args.lexical_dims}}}}
            if args.lexical_dims is not None
            else None
        )
        seconds = run_assets(data_dir, data, datasets, cases, run_config)
        results, nulls = evaluate(data_dir, cases)
        null_case = next((c for c in cases if "split" in c), None)
        error_rates = (
            [
                relabelled_null(str(data_dir / "parquet"), null_case, family, args.relabellings, args.seed)
                for family in ("token", "document")
            ]
            if null_case and args.relabellings > 0
            else []
        )
    summary = summarize(results, nulls, rates)
    print_table(
        summary,
        [
            ("family", "family", "s"),
            ("rate", "rate", "s"),
            ("detected", "detected", "s"),
            ("mean precision@5", "mean_precision_at_5", ".2f"),
            ("median significant B", "median_significant_b", ".1f"),
        ],
        title=f"\nPlanted topic in B ({args.n_docs} documents per side, {len(categories)} categories)",
    )
    if error_rates:
        print_table(
            error_rates,
            [
                ("family", "family", "s"),
                ("relabellings", "relabellings", "d"),
                ("with any significant", "with_any", "d"),
                ("family-wise error", "family_wise_error", ".3f"),
                ("95% low", "ci_low", ".3f"),
                ("95% high", "ci_high", ".3f"),
            ],
            title="\nNull by relabelling the first null split (nominal: BH at q = 0.05, so at most 0.05)",
        )
    write_results(
        {
            # where the data was kept is this machine's business, not the result's
            "params": {k: v for k, v in vars(args).items() if k not in ("data_dir", "out")}
            | {"categories": categories},
            "cases": results,
            "null": nulls,
            "null_relabelled": error_rates,
            "summary": summary,
            "seconds": seconds | {"total": round(time.perf_counter() - started, 1)},
            "load_avg": load_average(),
            "cpus": os.cpu_count(),
            "git": git_state(),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
