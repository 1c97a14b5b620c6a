"""How much content do evidence and held-out documents share, by document vs by content group?

Loads SST-2 train (all phrases) and DBpedia, times `content_index` on each, and for word-rule features
(feature f fires on one frequent word; a transparent stand-in for SAE features) splits every feature's
documents twice: by document (each document its own group, the split before content groups) and by
content group (`split_features` as the assets run it). For each split it counts held-out documents that
share a normalized sentence, an 8-word shingle, an identical text or a contained text (>= 4 words) with
that feature's evidence, separately for non-boilerplate and boilerplate-only overlaps.

    python benchmarks/content_split.py        # -> benchmarks/results/content_split.json
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
from scipy.sparse import csr_matrix

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import git_state, load_average, write_results  # noqa: E402
from interp_assets.labels.content_split import ContentIndex, content_index  # noqa: E402
from interp_assets.labels.evidence import split_features, text_hash  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WORDS = ("film", "movie", "story", "funny", "love", "best", "characters", "performance", "comedy", "bad")
DBPEDIA_WORDS = (
    "school",
    "born",
    "river",
    "album",
    "species",
    "company",
    "village",
    "film",
    "church",
    "team",
)


def load(name: str) -> pl.DataFrame:
    if name == "sst2":
        texts = pl.read_csv(DATA / "sst2" / "train.tsv", separator="\t", quote_char=None)["sentence"]
    else:
        texts = pl.read_csv(DATA / "dbpedia" / "dbpedia.tsv", separator="\t", quote_char=None)["text"]
    texts = texts.cast(pl.String).fill_null("")
    return pl.DataFrame(
        {
            "doc_id": pl.Series(range(texts.len()), dtype=pl.Int32),
            "doc_hash": [text_hash(t) for t in texts],
            "text": texts,
        }
    )


def word_activations(docs: pl.DataFrame, words: tuple[str, ...]) -> pl.DataFrame:
    rows = []
    for doc_id, text in zip(docs["doc_id"], docs["text"], strict=True):
        lowered = text.lower()
        for f, word in enumerate(words):
            for k, m in enumerate(re.finditer(rf"\b{word}\b", lowered)):
                rows.append((doc_id, f, 1.0 + (doc_id * 7 + k) % 5, m.start(), m.end()))
    schema = ["doc_id", "feature", "activation", "char_start", "char_end"]
    return pl.DataFrame(rows, schema=schema, orient="row").with_columns(
        pl.col("doc_id", "feature", "char_start", "char_end").cast(pl.Int32),
        pl.col("activation").cast(pl.Float32),
    )


def overlaps(index: ContentIndex, splits: dict) -> dict[str, int]:
    """Held-out documents (and positives) sharing content with their feature's evidence."""
    out = {"heldout": 0, "heldout_overlap": 0, "heldout_overlap_boilerplate_only": 0, "positive_overlap": 0}
    for split in splits.values():
        ho = np.array(split.heldout_doc_ids, dtype=np.int64)  # doc_id == row here
        pos = np.array(split.heldout_positive, dtype=np.int64)
        strict = index.shares(split.evidence_doc_ids)
        content = index.shares(split.evidence_doc_ids, boilerplate=False)
        out["heldout"] += ho.size
        out["heldout_overlap"] += int(content[ho].sum())
        out["heldout_overlap_boilerplate_only"] += int((strict & ~content)[ho].sum())
        out["positive_overlap"] += int(content[pos].sum())
    return out


def run(name: str, words: tuple[str, ...]) -> dict:
    docs = load(name)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        index = content_index(docs["text"])
        times.append(time.perf_counter() - start)
    sizes = np.bincount(index.group)
    acts = word_activations(docs, words)
    features = list(range(len(words)))
    no_keys = csr_matrix((docs.height, 0), dtype=np.float32)
    doc_level = ContentIndex(np.arange(docs.height), no_keys, np.zeros(0, dtype=bool))
    before = split_features(acts, docs, features, content=doc_level)
    start = time.perf_counter()
    after = split_features(acts, docs, features, content=index)
    split_s = time.perf_counter() - start
    return {
        "documents": docs.height,
        "content_index_s": round(min(times), 3),
        "groups": int(sizes.size),
        "documents_in_shared_groups": int((sizes[index.group] > 1).sum()),
        "largest_group": int(sizes.max()),
        "boilerplate_keys": index.n_boilerplate_keys,
        "features": len(features),
        "split_s_10_features": round(split_s, 3),
        "by_document": overlaps(index, before),
        "by_content": overlaps(index, after)
        | {"heldout_dropped": sum(s.heldout_dropped for s in after.values())},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "content_split.json"))
    args = parser.parse_args(argv)
    results = {"sst2_train": run("sst2", WORDS), "dbpedia": run("dbpedia", DBPEDIA_WORDS)}
    for name, r in results.items():
        print(name, r)
    write_results(results | {"git": git_state(), "load_average": load_average()}, args.out)


if __name__ == "__main__":
    main()
