"""Clustering benchmark on DBpedia: do document clusters on document-level features recover the categories?

Data: `--n-docs` documents (default 2,800) drawn at random (`--seed`) from `shared/data/dbpedia/dbpedia.tsv`
(entity descriptions, 14 categories). One dataset goes through raw_documents -> token_activations ->
pooled_embeddings -> document_embeddings (`dagster.materialize`, embedded all-MiniLM-L6-v2 reader on CPU).
A document SAE is trained on the document embeddings label-blind, as document_sae trains it
(`engine.documents.train_document_sae`, width and k by corpus size, default steps), for each of
`--sae-seeds`, and its features encoded (`encode_documents`: the k active features of every document).

Documents are clustered into 14 clusters, the number of categories, given (not searched); the categories
are used only to score the clusters: adjusted Rand index (ARI), 1 = the categories exactly, 0 = chance.
Every clustering uses the defaults of `analysis.clustering` (log1p, TF-IDF weights, unit rows, spherical
k-means, 10 restarts), for each of `--cluster-seeds`:
- document features: `document_clusters` on every document-SAE feature (the headline; target ARI >= 0.5),
  for one SAE per seed and for the ensemble of member SAEs document_sae trains by default;
- embeddings: `spherical_kmeans` on the MiniLM sentence embeddings the document SAE reads (reference);
- token-SAE features: the `document_clusters` asset (family token, every feature of the embedded default
  SAE, max-pooled per document), materialized like any asset (reference).
Prints a table and writes `benchmarks/results/clustering.json`.

    python benchmarks/clustering.py                      # 2,800 documents, SAE seeds 0-2, cluster seeds 0-2
    python benchmarks/clustering.py --n-docs 1000 --sae-seeds 0 --cluster-seeds 0   # quick look
"""

from __future__ import annotations

import argparse
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

from benchmarks._common import (  # noqa: E402
    SHARED_DATA,
    git_state,
    load_average,
    peak_rss_mb,
    print_table,
    write_results,
)
from benchmarks.planted import load_dbpedia  # noqa: E402
from interp_assets.analysis.clustering import (  # noqa: E402
    adjusted_rand_index,
    document_clusters,
    spherical_kmeans,
)
from interp_assets.defs.assets import ALL_ASSETS  # noqa: E402
from interp_assets.engine.documents import (  # noqa: E402
    DocumentSAEConfig,
    document_sae_size,
    encode_documents,
    train_document_sae,
    train_document_saes,
)
from interp_assets.storage.parquet import read_table  # noqa: E402
from resources.local import local_resources  # noqa: E402

DBPEDIA = SHARED_DATA / "dbpedia" / "dbpedia.tsv"
RESULTS = Path(__file__).resolve().parent / "results" / "clustering.json"
DATASET = "dbpedia_sample"
DATASET_ASSETS = ["raw_documents", "token_activations", "pooled_embeddings", "document_embeddings"]
N_CLUSTERS = 14  # the number of DBpedia categories: given to every clustering, never searched


def cluster_purity(clusters: np.ndarray, categories: np.ndarray) -> list[dict]:
    """Per cluster: size, its most common category and that category's share of the cluster."""
    out = []
    for c in np.unique(clusters):
        cats, counts = np.unique(categories[clusters == c], return_counts=True)
        out.append(
            {
                "cluster": int(c),
                "size": int(counts.sum()),
                "majority": str(cats[np.argmax(counts)]),
                "purity": float(counts.max() / counts.sum()),
            }
        )
    return out


def summarize(name: str, what: str, aris: list[float], seconds: float, **extra) -> dict:
    return {
        "representation": name,
        "what": what,
        "ari_mean": float(np.mean(aris)),
        "ari_min": float(np.min(aris)),
        "ari_max": float(np.max(aris)),
        "runs": len(aris),
        "cluster_seconds": seconds / len(aris),
        "aris": aris,
    } | extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-docs", type=int, default=2800)
    ap.add_argument("--seed", type=int, default=0, help="which documents are drawn")
    ap.add_argument("--sae-seeds", default="0,1,2", help="document SAE training seeds")
    ap.add_argument("--cluster-seeds", default="0,1,2", help="spherical k-means seeds")
    ap.add_argument("--data-dir", default="", help="keep the run's data here (default: a temporary folder)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    sae_seeds = [int(s) for s in args.sae_seeds.split(",") if s]
    cluster_seeds = [int(s) for s in args.cluster_seeds.split(",") if s]
    started = time.perf_counter()
    data = load_dbpedia(DBPEDIA)
    rows = np.sort(np.random.default_rng(args.seed).choice(data.height, size=args.n_docs, replace=False))
    sample = data[rows.tolist()]
    seconds: dict[str, float] = {}
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="clustering_") as tmp:
        data_dir = Path(args.data_dir or tmp)
        (data_dir / "landing").mkdir(parents=True, exist_ok=True)
        sample.write_parquet(data_dir / "landing" / f"{DATASET}.parquet")
        instance = DagsterInstance.ephemeral()
        resources = local_resources(data_dir)
        by_name = {k.path[-1]: a for a in ALL_ASSETS for k in a.keys}
        instance.add_dynamic_partitions("datasets", [DATASET])
        t = time.perf_counter()
        assets = [by_name[n] for n in DATASET_ASSETS]
        ok = materialize(assets, partition_key=DATASET, instance=instance, resources=resources).success
        if not ok:
            raise RuntimeError("materializing the dataset's assets failed")
        seconds["assets_through_document_embeddings"] = time.perf_counter() - t
        base = str(data_dir / "parquet")
        docs = read_table(base, "raw_documents", DATASET).select("doc_id", "category").collect()
        category = dict(docs.iter_rows())
        frame = read_table(base, "document_embeddings", DATASET).sort("doc_id").collect()
        doc_ids = frame["doc_id"].to_numpy()
        truth = np.array([category[int(d)] for d in doc_ids])
        embeddings = np.asarray(frame["embedding"].to_list(), dtype=np.float32)

        # document-level features: a document SAE per training seed, clustered with each k-means seed
        d_sae, k = document_sae_size(len(doc_ids))
        aris, cluster_time, saes, purity = [], 0.0, [], None
        for sae_seed in sae_seeds:
            t = time.perf_counter()
            sae, report = train_document_sae(embeddings, DocumentSAEConfig(seed=sae_seed))
            seconds[f"document_sae_seed{sae_seed}"] = time.perf_counter() - t
            row, feature, activation = encode_documents(sae, embeddings)
            pooled = pl.DataFrame(
                {"doc_id": doc_ids[row].astype(np.int32), "feature": feature, "max_activation": activation}
            )
            saes.append(
                {
                    "seed": sae_seed,
                    "fraction_variance_explained": report["fraction_variance_explained"],
                    "dead_feature_fraction": report["dead_feature_fraction"],
                    "features_alive": int(np.unique(feature).size),
                }
            )
            for seed in cluster_seeds:
                t = time.perf_counter()
                result = document_clusters(pooled, N_CLUSTERS, doc_ids=doc_ids, n_features=d_sae, seed=seed)
                cluster_time += time.perf_counter() - t
                got = result.documents.sort("doc_id")["cluster"].to_numpy()
                aris.append(adjusted_rand_index(got, truth))
                if purity is None:
                    purity = cluster_purity(got, truth)
        results.append(
            summarize(
                "document features",
                f"document SAE (d_sae {d_sae}, k {k}), SAE seeds {sae_seeds} x k-means seeds {cluster_seeds}",
                aris,
                cluster_time,
                sae=saes,
                clusters_first_run=purity,
            )
        )

        # document-level features as document_sae stores them: an ensemble of members (seeds seed..seed+2),
        # every member's k features per document
        aris, cluster_time, members = [], 0.0, DocumentSAEConfig().members
        for sae_seed in sae_seeds:
            t = time.perf_counter()
            ensemble, report = train_document_saes(embeddings, DocumentSAEConfig(seed=sae_seed))
            seconds[f"document_sae_ensemble_seed{sae_seed}"] = time.perf_counter() - t
            row, feature, activation = encode_documents(ensemble, embeddings)  # member i: i * d_sae + f
            pooled = pl.DataFrame(
                {"doc_id": doc_ids[row].astype(np.int32), "feature": feature, "max_activation": activation}
            )
            for seed in cluster_seeds:
                t = time.perf_counter()
                result = document_clusters(
                    pooled, N_CLUSTERS, doc_ids=doc_ids, n_features=report["n_features"], seed=seed
                )
                cluster_time += time.perf_counter() - t
                got = result.documents.sort("doc_id")["cluster"].to_numpy()
                aris.append(adjusted_rand_index(got, truth))
        results.append(
            summarize(
                "document features (ensemble)",
                f"document_sae's default: {members} member SAEs (d_sae {d_sae}, k {k} each), "
                f"base seeds {sae_seeds} x k-means seeds {cluster_seeds}",
                aris,
                cluster_time,
            )
        )

        # reference: the sentence embeddings the document SAE reads
        aris, cluster_time = [], 0.0
        for seed in cluster_seeds:
            t = time.perf_counter()
            got, _, _ = spherical_kmeans(embeddings, N_CLUSTERS, seed=seed)
            cluster_time += time.perf_counter() - t
            aris.append(adjusted_rand_index(got, truth))
        results.append(
            summarize("embeddings", "MiniLM sentence embeddings (384), spherical k-means", aris, cluster_time)
        )

        # reference: token-level SAE features, through the document_clusters asset
        aris, cluster_time, unclustered = [], 0.0, []
        for seed in cluster_seeds:
            config = {"n_clusters": N_CLUSTERS, "seed": seed, "family": "token"}
            t = time.perf_counter()
            ok = materialize(
                [by_name["document_clusters"]],
                partition_key=DATASET,
                instance=instance,
                resources=resources,
                run_config={"ops": {"document_clusters": {"config": config}}},
            ).success
            if not ok:
                raise RuntimeError("materializing document_clusters failed")
            cluster_time += time.perf_counter() - t
            table = read_table(base, "document_clusters", DATASET).collect().sort("doc_id")
            unclustered.append(int(table["cluster"].null_count()))
            table = table.filter(pl.col("cluster").is_not_null())
            got = table["cluster"].to_numpy()
            aris.append(adjusted_rand_index(got, np.array([category[int(d)] for d in table["doc_id"]])))
        n_token = read_table(base, "pooled_embeddings", DATASET).select(pl.col("feature").n_unique())
        n_token = n_token.collect().item()
        results.append(
            summarize(
                "token-SAE features",
                f"embedded default SAE, {n_token} features firing, max-pooled; the document_clusters asset",
                aris,
                cluster_time,
                unclustered_documents=unclustered,
            )
        )

    print_table(
        results,
        [
            ("features clustered", "representation", "s"),
            ("ARI mean", "ari_mean", ".3f"),
            ("min", "ari_min", ".3f"),
            ("max", "ari_max", ".3f"),
            ("runs", "runs", "d"),
            ("s / clustering", "cluster_seconds", ".2f"),
        ],
        title=f"\nDBpedia, {args.n_docs} documents, {N_CLUSTERS} clusters (given) vs the 14 categories: ARI",
    )
    seconds["total"] = time.perf_counter() - started
    write_results(
        {
            "params": {k: v for k, v in vars(args).items() if k not in ("data_dir", "out")}
            | {"n_clusters": N_CLUSTERS, "categories": int(np.unique(truth).size)},
            "target": {"representation": "document features", "ari_mean_at_least": 0.5},
            "results": results,
            "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "load_avg": load_average(),
            "cpus": os.cpu_count(),
            "git": git_state(),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
