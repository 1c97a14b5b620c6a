"""Cross-SAE feature matching on the embedded reader: do two SAEs trained on the same activations with
different seeds find the same features, and does a barely trained SAE not?

Layer-3 activations of the embedded all-MiniLM-L6-v2 over SST-2 train sentences and DBpedia `val`
descriptions (texts only) train three TopK SAEs of the same width with `train_topk_sae`: seed 0, seed 1,
and seed 2 stopped after a few steps (the "random" reference). Signatures are each feature's max activation
per held-out document (SST-2 dev and DBpedia `test`), and, for comparison, each feature's activation on
40,000 held-out tokens; `analysis.matching.match_features` matches seed 0's
features to each SAE one-to-one (Hungarian) with decoder cosines. Reported: the median signature
correlation of the better half of the one-to-one matches (the issue's criterion: above 0.8 for two seeds),
the same for the random reference and for seed 0 against itself (the identity).

    python benchmarks/matching.py                       # width 1,024, k 16, 30,000 + 5,000 texts, 4 epochs
    python benchmarks/matching.py --train-texts 1000 --epochs 0.5   # quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import sparse  # noqa: E402
from train_default_sae import extract_activations, read_sentences  # noqa: E402

from benchmarks._common import SHARED_DATA, git_state, load_average, print_table, write_results  # noqa: E402
from interp_assets.analysis.matching import match_features  # noqa: E402
from interp_assets.engine.reader_model import EMBEDDED_READER, load_reader_model  # noqa: E402
from interp_assets.engine.sae_training import train_topk_sae  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "matching.json"


def document_signatures(sae: object, acts: torch.Tensor, counts: list[int]) -> sparse.csr_matrix:
    """Each feature's max activation per document ([n_docs, d_sae], sparse)."""
    rows, start = [], 0
    with torch.no_grad():
        for n in counts:
            rows.append(sparse.csr_matrix(sae.encode(acts[start : start + n]).max(dim=0).values.numpy()))
            start += n
    return sparse.vstack(rows).tocsr()


def token_signatures(sae: object, acts: torch.Tensor) -> sparse.csr_matrix:
    """Each feature's activation per held-out token ([n_tokens, d_sae], sparse)."""
    with torch.no_grad():
        return sparse.csr_matrix(sae.encode(acts).numpy())


def better_half_median(matches: object) -> float:
    """Median correlation of the better half of the one-to-one matches (unmatched count as 0)."""
    corr = np.sort(matches["match_correlation"].fill_null(0.0).to_numpy())[::-1]
    return float(np.median(corr[: len(corr) // 2]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--train-texts", type=int, default=30000, help="SST-2 train sentences (plus 1/6 as many DBpedia)"
    )
    ap.add_argument(
        "--held-out", type=int, default=1500, help="SST-2 dev sentences (plus 1/3 as many DBpedia)"
    )
    ap.add_argument("--d-sae", type=int, default=1024)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--epochs", type=float, default=4.0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tokenizer, model = load_reader_model(EMBEDDED_READER)
    sst2, dbpedia = SHARED_DATA / "sst2", SHARED_DATA / "dbpedia" / "dbpedia.tsv"
    train_texts = read_sentences(sst2 / "train.tsv", args.train_texts) + read_sentences(
        dbpedia, args.train_texts // 6, "val"
    )
    held_texts = read_sentences(sst2 / "dev.tsv", args.held_out) + read_sentences(
        dbpedia, args.held_out // 3, "test"
    )
    train = extract_activations(tokenizer, model, train_texts, 3)
    counts: list[int] = []
    held = extract_activations(tokenizer, model, held_texts, 3, token_counts=counts)
    meta = {"model_name": EMBEDDED_READER, "hook_name": "blocks.3.hook_resid_post"}
    common = dict(d_sae=args.d_sae, k=args.k, batch_size=1024, lr=3e-3, metadata=meta)
    saes = {
        "seed 0": train_topk_sae(train, epochs=args.epochs, seed=0, **common)[0],
        "seed 1": train_topk_sae(train, epochs=args.epochs, seed=1, **common)[0],
        "barely trained (seed 2, 3 steps)": train_topk_sae(
            train, epochs=3 * 1024 / len(train), seed=2, **common
        )[0],
    }
    tokens = held[torch.randperm(held.shape[0], generator=torch.Generator().manual_seed(0))[:40_000]]
    signatures = {
        "documents (max per document)": {n: document_signatures(s, held, counts) for n, s in saes.items()},
        "tokens (40,000 held-out tokens)": {n: token_signatures(s, tokens) for n, s in saes.items()},
    }
    decoders = {name: sae.W_dec.detach().numpy() for name, sae in saes.items()}
    rows = []
    for over, per_sae in signatures.items():
        for other in saes:
            matches = match_features(
                per_sae["seed 0"], per_sae[other], decoder_a=decoders["seed 0"], decoder_b=decoders[other]
            )
            ordered = matches.sort("match_correlation", descending=True, nulls_last=True)
            half = ordered.head(matches.height // 2)
            rows.append(
                {
                    "signature": over,
                    "pair": f"seed 0 vs {other}",
                    "better_half_median_correlation": better_half_median(matches),
                    "better_half_median_decoder_cosine": float(half["decoder_cosine"].median()),
                    "identity_matches": int((matches["match_b"] == matches["feature_a"]).sum()),
                    "features": matches.height,
                }
            )
    print_table(
        rows,
        [
            ("signature", "signature", "s"),
            ("pair", "pair", "s"),
            ("median corr, better half", "better_half_median_correlation", ".3f"),
            ("median decoder cos, better half", "better_half_median_decoder_cosine", ".3f"),
            ("identity matches", "identity_matches", "d"),
        ],
        title=f"\nMatching {args.d_sae}-wide TopK SAEs (k {args.k}) on {len(held_texts):,} held-out "
        f"documents ({train.shape[0]:,} training tokens)",
    )
    write_results(
        {
            "params": {k: v for k, v in vars(args).items() if k != "out"},
            "train_tokens": int(train.shape[0]),
            "held_out_documents": len(held_texts),
            "pairs": rows,
            "seconds": round(time.perf_counter() - started, 1),
            "load_avg": load_average(),
            "cpus": os.cpu_count(),
            "git": git_state(),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
