"""Document SAE training: the stacked trainer against SAELens's SAETrainer, on real document embeddings.

`--n-docs` random DBpedia documents (`shared/data/dbpedia/dbpedia.tsv`) are embedded as document_embeddings
embeds them by default (the embedded MiniLM, mean-pooled hidden state 4, the layer its SAE reads). Their
document SAE members (document_sae's defaults: width and k by corpus size, seeds 0, 1, 2, the default step
budget) are trained two ways, interleaved `--repeats` times on the same machine:
- `sae_trainer`: one SAE per seed with SAELens's `SAETrainer` (`sae_training.train_topk_sae`), one after
  another: how document_sae trained them before the stacked trainer;
- `stacked`: all members at once (`sae_training.train_topk_saes`), what document_sae does now.
Recorded: seconds per repeat, each member's fraction of variance explained, and how far the stacked
members are from SAETrainer's: the largest weight difference relative to the largest weight, and the
cosine between each latent's decoder directions. The two take the same steps, so they differ by float
rounding only, which a TopK selection at a near-tie can carry a little way over thousands of steps.
Prints a table and writes `benchmarks/results/document_sae_training.json`.

    python benchmarks/document_sae_training.py                  # 2,000 documents, 2 repeats
    python benchmarks/document_sae_training.py --n-docs 500 --repeats 1   # quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks._common import (  # noqa: E402
    SHARED_DATA,
    cpu_gflops,
    git_state,
    load_average,
    print_table,
    write_results,
)
from benchmarks.planted import load_dbpedia  # noqa: E402
from interp_assets.defs.document_assets import reader_hook_index  # noqa: E402
from interp_assets.engine.documents import (  # noqa: E402
    DocumentSAEConfig,
    document_embeddings,
    document_sae_training_settings,
)
from interp_assets.engine.sae_training import (  # noqa: E402
    TOPK_PARAMS,
    evaluate_sae,
    train_topk_sae,
    train_topk_saes,
)
from resources.sae_reader import SAEReaderResource  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "document_sae_training.json"


def _relative_gap(mine: Any, reference: Any) -> float:
    """The largest absolute difference between two weight tensors, relative to the reference's largest."""
    return float((mine - reference).abs().max() / reference.abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-docs", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="which documents are drawn")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    import torch

    data = load_dbpedia(SHARED_DATA / "dbpedia" / "dbpedia.tsv")
    rows = np.random.default_rng(args.seed).choice(data.height, size=args.n_docs, replace=False)
    texts = data["text"].gather(rows).to_list()
    layer = reader_hook_index(SAEReaderResource(device="cpu"))  # the embedded default reader's SAE
    started = time.perf_counter()
    embeddings = document_embeddings(texts, layer=layer)
    embed_s = time.perf_counter() - started
    acts = torch.from_numpy(embeddings)

    config = DocumentSAEConfig()
    settings = document_sae_training_settings(args.n_docs, config)
    d_sae, k, batch = settings["d_sae"], settings["k"], settings["batch_size"]
    seeds = [config.seed + i for i in range(config.members)]

    runs = []
    for repeat in range(args.repeats):
        for method in ("sae_trainer", "stacked"):
            gflops = cpu_gflops()
            started = time.perf_counter()
            if method == "sae_trainer":
                saes = [train_topk_sae(acts, seed=seed, **settings)[0] for seed in seeds]
            else:
                saes = train_topk_saes(acts, seeds=seeds, **settings)[0]
            seconds = time.perf_counter() - started
            fve = [float(evaluate_sae(sae, acts)["fraction_variance_explained"]) for sae in saes]
            runs.append(
                {
                    "method": method,
                    "repeat": repeat,
                    "seconds": round(seconds, 2),
                    "cpu_gflops": gflops,
                    "fraction_variance_explained": [round(v, 5) for v in fve],
                    "saes": saes,
                }
            )
            print(f"{repeat + 1}/{args.repeats} {method}: {seconds:.1f} s ({gflops} GFLOP/s)", flush=True)

    reference = next(r["saes"] for r in runs if r["method"] == "sae_trainer")
    stacked = next(r["saes"] for r in runs if r["method"] == "stacked")
    weight_gap = max(
        _relative_gap(getattr(a, name).detach(), getattr(b, name).detach())
        for a, b in zip(stacked, reference, strict=True)
        for name in TOPK_PARAMS
    )
    import torch.nn.functional as F

    cosines = torch.cat(
        [
            F.cosine_similarity(a.W_dec.detach(), b.W_dec.detach(), dim=-1)
            for a, b in zip(stacked, reference, strict=True)
        ]
    )
    summary = []
    for method in ("sae_trainer", "stacked"):
        mine = [r for r in runs if r["method"] == method]
        summary.append(
            {
                "method": method,
                "median_s": float(np.median([r["seconds"] for r in mine])),
                "min_s": min(r["seconds"] for r in mine),
                "max_s": max(r["seconds"] for r in mine),
                "mean_fve": float(np.mean(mine[0]["fraction_variance_explained"])),
            }
        )
    speedup = summary[0]["median_s"] / summary[1]["median_s"]
    print()
    print_table(
        summary,
        [
            ("method", "method", "s"),
            ("median s", "median_s", ".1f"),
            ("min s", "min_s", ".1f"),
            ("max s", "max_s", ".1f"),
            ("mean FVE", "mean_fve", ".4f"),
        ],
        title=(
            f"{config.members} document SAE members (width {d_sae}, k {k}, {settings['epochs']:.0f} passes, "
            f"batch {batch}) on {args.n_docs:,} DBpedia documents"
        ),
    )
    print(f"stacked is {speedup:.2f}x faster; largest weight difference (relative): {weight_gap:.2e}")
    print(
        f"each latent's decoder direction, stacked vs SAETrainer (same seed, same index): cosine mean "
        f"{float(cosines.mean()):.4f}, min {float(cosines.min()):.4f}, "
        f"{float((cosines > 0.99).float().mean()):.1%} above 0.99"
    )
    for run in runs:
        del run["saes"]
    write_results(
        {
            "n_docs": args.n_docs,
            "layer": layer,
            "embed_s": round(embed_s, 2),
            "settings": {key: value for key, value in settings.items() if key != "metadata"},
            "members": config.members,
            "runs": runs,
            "summary": summary,
            "speedup": round(speedup, 3),
            "largest_relative_weight_difference": weight_gap,
            "decoder_cosine": {
                "mean": float(cosines.mean()),
                "min": float(cosines.min()),
                "share_above_0.99": float((cosines > 0.99).float().mean()),
            },
            "load_avg": load_average(),
            "git": git_state(),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
