"""Labeling and scoring many features on a large dataset: 200 features on 10,000 documents.

The first `--n-docs` SST-2 train sentences are encoded by the embedded reader + SAE and pooled (setup, not
timed as scoring). The documents' sentence embeddings are computed once, as the document_embeddings asset
and the hard negatives do (timed separately: `document_embeddings_s`). Then, as feature_labels and
feature_scores do: `--n-features` features spread over the frequency ranks are labeled offline
(`label_features`) and scored on held-out documents (`score_features`, embedding scorer) with every text
going through an embeddings cache that already holds the documents (the assets' shared cache), so only
excerpts that are not whole documents are embedded. Prints a table and writes
`benchmarks/results/score_scale.json`.

    python benchmarks/score_scale.py                 # 200 features, 10,000 documents
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import cpu_model, git_state, load_average, print_table, write_results  # noqa: E402
from benchmarks.label_scores import (  # noqa: E402
    choose_features,
    load_default_reader,
    load_sst2,
    pooled_from_activations,
    sae_token_activations,
)
from interp_assets.labels.embedding import sentence_embeddings  # noqa: E402
from interp_assets.labels.labeling import label_features  # noqa: E402
from interp_assets.labels.scoring import score_features  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "score_scale.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-docs", type=int, default=10_000)
    ap.add_argument("--n-features", type=int, default=200)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    times: dict[str, float] = {}

    t = time.perf_counter()
    docs = load_sst2(n_docs=args.n_docs, min_words=1)
    acts, status = sae_token_activations(docs, load_default_reader())
    pooled, n_encoded = pooled_from_activations(acts, status)
    features = choose_features(pooled, n_encoded, args.n_features, "spread", min_docs=60)
    acts = acts.filter(acts["feature"].is_in(features))
    times["setup_encode_s"] = time.perf_counter() - t

    t = time.perf_counter()
    texts = docs["text"].to_list()
    vectors = sentence_embeddings(texts)
    cache = dict(zip(texts, vectors, strict=True))
    times["document_embeddings_s"] = time.perf_counter() - t

    embedded = [0]

    def embed(batch: list[str]) -> np.ndarray:
        missing = [x for x in dict.fromkeys(batch) if x not in cache]
        if missing:
            cache.update(zip(missing, sentence_embeddings(missing), strict=True))
            embedded[0] += len(missing)
        return np.stack([cache[x] for x in batch])

    t = time.perf_counter()
    labels = label_features(acts, docs, features, dataset="sst2", sae_id="bench", embeddings=vectors)
    times["label_s"] = time.perf_counter() - t
    t = time.perf_counter()
    scores = score_features(labels, acts, docs, embeddings=vectors, embed=embed)
    times["score_s"] = time.perf_counter() - t

    row = {
        "documents": docs.height,
        "features": len(features),
        "scored": scores.height,
        "label_s": round(times["label_s"], 1),
        "score_s": round(times["score_s"], 1),
        "label_score_s": round(times["label_s"] + times["score_s"], 1),
        "texts_embedded": embedded[0],
        "document_embeddings_s": round(times["document_embeddings_s"], 1),
        "beats_length_baseline": float(scores["beats_length_baseline"].mean() or 0.0),
    }
    print_table(
        [row],
        [
            ("documents", "documents", ",d"),
            ("features", "features", "d"),
            ("scored", "scored", "d"),
            ("label s", "label_s", ".1f"),
            ("score s", "score_s", ".1f"),
            ("label+score s", "label_score_s", ".1f"),
            ("texts embedded", "texts_embedded", ",d"),
            ("doc embeddings s", "document_embeddings_s", ".1f"),
            ("beat length", "beats_length_baseline", ".0%"),
        ],
        title="\nLabel and score features on a large dataset (offline labeler, embedding scorer)",
    )
    write_results(
        {
            "params": {k: v for k, v in vars(args).items() if k != "out"},
            "result": row,
            "seconds": {k: round(v, 1) for k, v in times.items()},
            "target": {"label_score_s_at_most": 60.0, "met": row["label_score_s"] <= 60.0},
            "load_avg": load_average(),
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "git": git_state(),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
