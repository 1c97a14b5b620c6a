"""Do label scores separate good labels from bad ones? Real labels vs labels swapped between features.

For each feature: label it from its evidence split (offline, or an LLM when configured), then score on
its held-out split (a) its own label and (b) the label of another feature (a derangement of the
features). A score that means something gives (a) clearly above (b). Prints a table, writes JSON.

Inputs are function arguments (`token_activations`, `documents`), so the real activation engine can be
plugged in; the command line uses transparent rule-based features on SST-2 until then:

    python benchmarks/label_scores.py --n-docs 5000 --out benchmarks/results/label_scores.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from interp_assets.embedding import sentence_embeddings  # noqa: E402
from interp_assets.labeling import ChatClient, label_features, text_hash  # noqa: E402
from interp_assets.scoring import score_features  # noqa: E402
from resources.reader_model import EMBEDDED_READER, load_tokenizer  # noqa: E402

SST2_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"

# Rule-based "features": each fires on the tokens of one word family (a transparent stand-in for SAE
# features, with a known right answer).
WORD_FAMILIES: dict[int, tuple[str, ...]] = {
    0: ("bad", "worst", "awful", "terrible", "boring", "dull", "mess", "stupid", "waste", "tedious"),
    1: ("funny", "hilarious", "laugh", "laughs", "comedy", "humor", "witty", "jokes", "comic"),
    2: ("music", "song", "songs", "soundtrack", "musical", "singing", "dance"),
    3: ("family", "mother", "father", "kids", "children", "son", "daughter", "parents"),
    4: ("love", "romance", "romantic", "heart", "passion"),
    5: ("horror", "scary", "thriller", "suspense", "creepy", "frightening"),
    6: ("actor", "actors", "performance", "performances", "cast", "actress", "acting"),
    7: ("director", "directed", "filmmaker", "filmmakers", "direction"),
    8: ("story", "plot", "script", "narrative", "screenplay", "storytelling"),
    9: ("beautiful", "beautifully", "gorgeous", "stunning", "lovely", "visually"),
}


def load_sst2(
    path: str | Path = SST2_TRAIN, n_docs: int = 2000, *, min_words: int = 6, dataset: str = "sst2"
) -> pl.DataFrame:
    """raw_documents-shaped frame: the first `n_docs` distinct SST-2 sentences of >= `min_words` words."""
    path = Path(path)
    frame = pl.read_csv(path, separator="\t", quote_char=None, schema_overrides={"sentence": pl.String})
    frame = (
        frame.with_row_index("source_row", offset=2)
        .with_columns(pl.col("sentence").str.strip_chars().alias("text"))
        .filter(pl.col("text").str.count_matches(r"\S+") >= min_words)
        .unique("text", keep="first", maintain_order=True)
        .head(n_docs)
    )
    return frame.select(
        pl.lit(dataset).alias("dataset"),
        pl.int_range(pl.len(), dtype=pl.Int32).alias("doc_id"),
        pl.col("text").map_elements(text_hash, return_dtype=pl.String).alias("doc_hash"),
        "text",
        pl.lit(path.name).alias("source_file"),
        pl.col("source_row").cast(pl.Int64),
        pl.col("label").cast(pl.Int64),
    )


def rule_based_activations(
    documents: pl.DataFrame,
    families: Mapping[int, Sequence[str]] = WORD_FAMILIES,
    *,
    model: str = EMBEDDED_READER,
) -> pl.DataFrame:
    """token_activations where feature f fires on every token of a word in `families[f]`.

    Tokens and offsets come from the reader model's tokenizer; the activation is higher for words
    earlier in the family list (1.0 .. 2.0) and varies a little with the position in the text.
    """
    tokenizer = load_tokenizer(model)
    lookup = {w: (f, 1.0 + (len(ws) - i) / len(ws)) for f, ws in families.items() for i, w in enumerate(ws)}
    texts = documents["text"].to_list()
    encoded = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=True, truncation=True)
    rows: dict[str, list] = {
        k: [] for k in ("doc_id", "token_index", "token", "char_start", "char_end", "feature", "activation")
    }
    for doc_id, text, ids, offsets in zip(
        documents["doc_id"].to_list(), texts, encoded["input_ids"], encoded["offset_mapping"], strict=True
    ):
        tokens = tokenizer.convert_ids_to_tokens(ids)
        for m in re.finditer(r"\w+", text):
            hit = lookup.get(m.group().lower())
            if hit is None:
                continue
            feature, strength = hit
            for t, (s, e) in enumerate(offsets):
                if e > s and s < m.end() and e > m.start():
                    rows["doc_id"].append(doc_id)
                    rows["token_index"].append(t)
                    rows["token"].append(tokens[t])
                    rows["char_start"].append(s)
                    rows["char_end"].append(e)
                    rows["feature"].append(feature)
                    rows["activation"].append(strength * (1.0 - 0.2 * s / max(1, len(text))))
    return pl.DataFrame(rows).select(
        pl.lit(documents["dataset"][0] if "dataset" in documents.columns else "").alias("dataset"),
        pl.col("doc_id").cast(pl.Int32),
        pl.col("token_index").cast(pl.Int32),
        pl.col("token").cast(pl.String),
        pl.col("char_start").cast(pl.Int32),
        pl.col("char_end").cast(pl.Int32),
        pl.col("feature").cast(pl.Int32),
        pl.col("activation").cast(pl.Float32),
    )


def swapped_labels(labels: pl.DataFrame) -> tuple[pl.DataFrame, pl.Series]:
    """Each feature gets the label and description of the next feature (cyclically): a wrong label.

    Returns the swapped labels and, per row, the feature whose label it now carries.
    """
    rolled = labels.select(
        pl.col("label").shift(-1).fill_null(pl.col("label").first()),
        pl.col("description").shift(-1).fill_null(pl.col("description").first()),
        pl.col("feature").shift(-1).fill_null(pl.col("feature").first()).alias("label_of"),
    )
    return labels.with_columns(rolled["label"], rolled["description"]), rolled["label_of"]


def memoized_embeddings() -> Callable[[list[str]], np.ndarray]:
    """`sentence_embeddings` that embeds each distinct text once (real and swapped runs share excerpts)."""
    memo: dict[str, np.ndarray] = {}

    def embed(texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in memo]
        if missing:
            memo.update(zip(missing, sentence_embeddings(missing), strict=True))
        return np.stack([memo[t] for t in texts]) if texts else sentence_embeddings([])

    return embed


def run_benchmark(
    token_activations: pl.DataFrame,
    documents: pl.DataFrame,
    features: Sequence[int],
    *,
    dataset: str = "sst2",
    sae_id: str = "rule-based",
    llm: ChatClient | None = None,
    embeddings: np.ndarray | None = None,
    n_evidence: int = 20,
    n_holdout: int = 40,
    seed: int = 0,
    n_boot: int = 1000,
) -> pl.DataFrame:
    """Per feature and scoring method: F1/AUC/balanced accuracy of the real label and of a swapped one."""
    if len(features) < 2:
        raise ValueError("the benchmark needs at least two features to swap labels between.")
    params = dict(n_evidence=n_evidence, n_holdout=n_holdout, seed=seed, embeddings=embeddings)
    labels = label_features(
        token_activations, documents, features, dataset=dataset, sae_id=sae_id, llm=llm, **params
    )
    swapped, label_of = swapped_labels(labels)
    common = dict(llm=llm, n_boot=n_boot, embed=memoized_embeddings(), **params)
    real = score_features(labels, token_activations, documents, **common)
    wrong = score_features(swapped, token_activations, documents, **common)
    keep = ["feature", "method", "f1", "auc", "balanced_accuracy", "f1_ci_low", "f1_ci_high", "n_examples"]
    joined = real.select(keep).join(
        wrong.select(keep[:6]), on=["feature", "method"], suffix="_swapped", how="inner"
    )
    names = labels.select("feature", "label", "source").with_columns(
        pl.Series("swapped_label", swapped["label"]), pl.Series("swapped_from", label_of)
    )
    return names.join(joined, on="feature").sort(["method", "feature"])


def summarize(result: pl.DataFrame) -> pl.DataFrame:
    """Per method: mean real vs swapped F1 / balanced accuracy / AUC and how often the real label wins."""
    return (
        result.group_by("method")
        .agg(
            pl.len().alias("features"),
            pl.col("f1").mean().alias("f1_real"),
            pl.col("f1_swapped").mean(),
            pl.col("balanced_accuracy").mean().alias("bacc_real"),
            pl.col("balanced_accuracy_swapped").mean().alias("bacc_swapped"),
            pl.col("auc").mean().alias("auc_real"),
            pl.col("auc_swapped").mean(),
            (pl.col("auc") > pl.col("auc_swapped")).mean().alias("real_auc_wins"),
            (pl.col("f1_ci_low") > pl.col("f1_swapped")).mean().alias("real_f1_ci_above_swapped"),
        )
        .sort("method")
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SST2_TRAIN), help="SST-2 train.tsv")
    parser.add_argument("--n-docs", type=int, default=5000)
    parser.add_argument("--hard-negatives", action="store_true", help="embed documents for hard negatives")
    parser.add_argument("--out", default="benchmarks/results/label_scores.json")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    documents = load_sst2(args.data, args.n_docs)
    acts = rule_based_activations(documents)
    embeddings = sentence_embeddings(documents["text"].to_list()) if args.hard_negatives else None
    t1 = time.perf_counter()
    result = run_benchmark(acts, documents, sorted(WORD_FAMILIES), embeddings=embeddings)
    t2 = time.perf_counter()
    summary = summarize(result)
    with pl.Config(tbl_rows=100, tbl_cols=20, fmt_str_lengths=40, tbl_width_chars=200):
        print(
            result.select(
                "feature",
                "method",
                "label",
                "swapped_label",
                "f1",
                "f1_swapped",
                "balanced_accuracy",
                "balanced_accuracy_swapped",
                "auc",
                "auc_swapped",
            )
        )
        print(summary)
    print(f"documents {documents.height}, setup {t1 - t0:.1f} s, label+score {t2 - t1:.1f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "documents": documents.height,
                "hard_negatives": bool(args.hard_negatives),
                "features": result.to_dicts(),
                "summary": summary.to_dicts(),
                "seconds": {"setup": round(t1 - t0, 2), "label_and_score": round(t2 - t1, 2)},
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
