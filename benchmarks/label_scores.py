"""Do label scores separate good labels from bad ones? Real labels vs labels swapped between features.

For each feature: label it from its evidence split (offline, or an LLM when configured), then score on
its held-out split (a) its own label and (b) labels of other features (derangements of the features).
A score that means something gives (a) clearly above (b). Prints tables, writes JSON.

Default: REAL SAE features on two corpora: the first `--n-docs` SST-2 train sentences (>= 6 words) and a
seeded sample of `--dbpedia-docs` DBpedia val documents, encoded by the embedded reader + SAE
(`resources.sae_reader.load_reader()` defaults, `interp_assets.engine.activations.encode_texts` in chunks)
and pooled with `interp_assets.engine.pooling.pool_token_activations`. Three feature selections per
corpus: `frequent` = the `--n-features` most frequent features, by
`interp_assets.labels.feature_selection.select_features` (what the feature_labels asset labels),
`spread` = features evenly spaced over the frequency ranks of those active in 100 documents to 90% of
them, and `report_top10` = the 10 features a diff report of the corpus's two largest classes (SST-2
label, DBpedia category) lists first. Labels come from `label_features` (offline labeler) and scores from
`score_features` (embedding scorer) with the asset's split: 20 evidence / 40 held-out documents, hard
negatives from document embeddings. Each feature's real-label score is compared with the mean score of
the labels it gets under `--swaps` seeded random derangements: mean, share of features where real >
swapped, one-sided paired Wilcoxon signed-rank p-value, per metric (AUC, balanced accuracy, F1). Also:
the share of features whose label beats the length-only baseline (`length_baseline_auc`: excerpt length
alone, direction fitted on the evidence), the number of stopword labels (`is_stopword_label`), and on
DBpedia, for features whose top documents are >= 80% one category, the share whose label names a word of
that category's vocabulary (`CATEGORY_VOCABULARY`, held only here).

    python benchmarks/label_scores.py                          # -> results/label_scores.json
    python benchmarks/label_scores.py --corpus sst2 --no-hard-negatives \
        --out benchmarks/results/label_scores_no_hard_negatives.json
    python benchmarks/label_scores.py --features rule-based    # -> results/label_scores_rule_based.json

`--features rule-based` keeps the transparent word-family stand-in features on SST-2 (a known right answer).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import write_results  # noqa: E402
from interp_assets.engine.activations import encode_texts, iter_chunks  # noqa: E402
from interp_assets.engine.pooling import pool_token_activations  # noqa: E402
from interp_assets.engine.reader_model import EMBEDDED_READER, load_tokenizer  # noqa: E402
from interp_assets.labels.embedding import sentence_embeddings  # noqa: E402
from interp_assets.labels.evidence import text_hash  # noqa: E402
from interp_assets.labels.feature_selection import select_features  # noqa: E402
from interp_assets.labels.labeling import ChatClient, is_stopword_label, label_features  # noqa: E402
from interp_assets.labels.scoring import HEADLINE_METRIC, score_features  # noqa: E402

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


def _raw_documents(frame: pl.DataFrame, dataset: str, path: Path, metadata: pl.Expr) -> pl.DataFrame:
    """`frame` (text, source_row) in raw_documents' shape, doc_id in row order, plus one `metadata` column."""
    return frame.select(
        pl.lit(dataset).alias("dataset"),
        pl.int_range(pl.len(), dtype=pl.Int32).alias("doc_id"),
        pl.col("text").map_elements(text_hash, return_dtype=pl.String).alias("doc_hash"),
        "text",
        pl.lit(path.name).alias("source_file"),
        pl.col("source_row").cast(pl.Int64),
        metadata,
    )


def load_sst2(
    path: str | Path = SST2_TRAIN,
    n_docs: int | None = 2000,
    *,
    min_words: int = 6,
    dataset: str = "sst2",
    label: int | None = None,
    seed: int | None = None,
    exclude: Callable[[str], bool] | None = None,
) -> pl.DataFrame:
    """raw_documents-shaped frame: the first `n_docs` distinct SST-2 sentences of >= `min_words` words.

    `label` keeps one class (0 negative, 1 positive); `seed` takes a seeded random sample of `n_docs`
    (in file order) instead of the first ones; `exclude(text)` drops texts (e.g. overlap with another
    split). `n_docs=None` keeps every sentence.
    """
    path = Path(path)
    frame = pl.read_csv(path, separator="\t", quote_char=None, schema_overrides={"sentence": pl.String})
    frame = (
        frame.with_row_index("source_row", offset=2)
        .with_columns(pl.col("sentence").str.strip_chars().alias("text"))
        .filter(pl.col("text").str.count_matches(r"\S+") >= min_words)
        .unique("text", keep="first", maintain_order=True)
    )
    if label is not None:
        frame = frame.filter(pl.col("label") == label)
    if exclude is not None:
        frame = frame.filter(~pl.col("text").map_elements(exclude, return_dtype=pl.Boolean))
    if n_docs is not None and seed is not None and frame.height > n_docs:
        frame = frame.sample(n_docs, seed=seed).sort("source_row")
    elif n_docs is not None:
        frame = frame.head(n_docs)
    return _raw_documents(frame, dataset, path, pl.col("label").cast(pl.Int64))


DBPEDIA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dbpedia" / "dbpedia.tsv"

# Words of each DBpedia category's vocabulary or description, held only here: an offline label of a
# feature whose top documents are mostly one category "names the category" when one of its words equals
# one of these or starts with one of 4+ letters (album -> albums). Written before looking at any label;
# generic biography and place words (born, located, found) are left out.
CATEGORY_VOCABULARY: dict[str, tuple[str, ...]] = {
    "Company": tuple(
        "company companies corporation firm business headquarter subsidiary brand product manufactur "
        "industry industrial services inc ltd acquired retail bank airline software operates employees "
        "founded owned store chain".split()
    ),
    "EducationalInstitution": tuple(
        "school university college academy student education campus institute faculty secondary pupils "
        "grade teaching degree founded".split()
    ),
    "Artist": tuple(
        "artist singer musician songwriter band album music painter rapper guitar vocalist composer song "
        "recording producer performer actor actress records painting art".split()
    ),
    "Athlete": tuple(
        "player football league team season club played cup olympic champion professional baseball "
        "basketball hockey soccer goal match race athlete midfielder defender forward national sport "
        "coach games tournament nfl nhl mlb medal swimmer cyclist runner wrestler boxer tennis".split()
    ),
    "OfficeHolder": tuple(
        "politician minister member elected party served president parliament senate senator governor "
        "election office government council political democrat republican assembly mayor judge "
        "representative legislat politics ambassador secretary house congress".split()
    ),
    "MeanOfTransportation": tuple(
        "ship aircraft car vehicle navy naval launched built engine locomotive vessel boat automobile "
        "railway motor produced fleet flight hms uss submarine destroyer cruiser airplane plane "
        "manufactur sedan truck".split()
    ),
    "Building": tuple(
        "building built house church hotel historic tower architect constructed construction temple "
        "castle museum hospital station register places street floor structure mansion style listed "
        "storey story cathedral mosque".split()
    ),
    "NaturalPlace": tuple(
        "river mountain lake mount island peak range valley creek tributary elevation park glacier bay "
        "forest hill flows sea volcano canyon waterfall summit metres feet coast reserve".split()
    ),
    "Village": tuple(
        "village population district county municipality province census gmina town region administrative "
        "commune kilometres km rural voivodeship poland iran east west north south lies".split()
    ),
    "Animal": tuple(
        "species genus family moth snail beetle bird fish marine gastropod mollus insect endemic habitat "
        "spider frog wingspan larva animal lizard subfamily sea".split()
    ),
    "Plant": tuple(
        "species plant genus flowering family native tree shrub leaves flower grows endemic herb orchid "
        "fern habitat perennial grass cultivat seed threatened forest".split()
    ),
    "Album": tuple(
        "album released records song single studio band track label recorded music ep chart debut live "
        "compilation release billboard singer rock hop rapper".split()
    ),
    "Film": tuple(
        "film directed starring movie stars comedy drama released produced director written cast "
        "screenplay documentary horror thriller box animated actor actress".split()
    ),
    "WrittenWork": tuple(
        "novel book written published author magazine newspaper series story stories fiction edition "
        "publisher comic journal writer poem poetry literary isbn volume issue daily weekly".split()
    ),
}


def load_dbpedia(
    path: str | Path = DBPEDIA, n_docs: int | None = 2500, *, split: str = "val", seed: int = 0
) -> pl.DataFrame:
    """raw_documents-shaped frame of DBpedia's `split` rows (columns text, category): a seeded sample of
    `n_docs` distinct texts in file order (all with `n_docs=None`), with their `category`."""
    path = Path(path)
    frame = (
        pl.read_csv(path, separator="\t", quote_char=None, schema_overrides={"text": pl.String})
        .with_row_index("source_row", offset=2)
        .filter(pl.col("split") == split)
        .with_columns(pl.col("text").str.strip_chars())
        .filter(pl.col("text") != "")
        .unique("text", keep="first", maintain_order=True)
    )
    if n_docs is not None and frame.height > n_docs:
        frame = frame.sample(n_docs, seed=seed).sort("source_row")
    return _raw_documents(frame, "dbpedia", path, pl.col("category").cast(pl.String))


def names_category(label: str, category: str) -> bool:
    """Whether `label` names a word of `category`'s vocabulary (`CATEGORY_VOCABULARY`)."""
    vocabulary = CATEGORY_VOCABULARY[category]
    words = re.findall(r"[a-z]+", label.lower())
    return any(w == v or (len(v) >= 4 and w.startswith(v)) for w in words for v in vocabulary)


def category_labels(
    labels: pl.DataFrame,
    documents: pl.DataFrame,
    token_activations: pl.DataFrame,
    *,
    min_share: float = 0.8,
    column: str = "category",
) -> pl.DataFrame:
    """Per labeled feature: the majority `column` value of its top documents (the evidence positives the
    labeler saw), its share, and for features with share >= `min_share` whether the label names it."""
    value = dict(zip(documents["doc_id"].to_list(), documents[column].to_list(), strict=True))
    fired = token_activations.select("feature", "doc_id").unique()
    fired_by_feature: dict[int, set[int]] = {}
    for f, d in fired.iter_rows():
        fired_by_feature.setdefault(int(f), set()).add(int(d))
    rows = []
    for r in labels.iter_rows(named=True):
        fired_docs = fired_by_feature.get(int(r["feature"]), set())
        tops = [value[d] for d in r["evidence_doc_ids"] if d in fired_docs and d in value]
        counts = {v: tops.count(v) for v in sorted(set(tops))}
        best = max(counts, key=lambda k: counts[k]) if counts else None
        share = counts[best] / len(tops) if best is not None else 0.0
        named = names_category(r["label"], best) if best is not None and share >= min_share else None
        rows.append(
            {
                "feature": r["feature"],
                "label": r["label"],
                "top_category": best,
                "top_category_share": share,
                "names_category": named,
            }
        )
    schema = {
        "feature": pl.Int32,
        "label": pl.String,
        "top_category": pl.String,
        "top_category_share": pl.Float64,
        "names_category": pl.Boolean,
    }
    return pl.DataFrame(rows, schema=schema)


def report_features(pooled: pl.DataFrame, documents: pl.DataFrame, column: str, n: int = 10) -> list[int]:
    """The `n` features a diff report of the two largest `column` classes lists first: the largest
    absolute difference in document frequency (what the report's top-features tables show)."""
    classes = documents.group_by(column).len().sort(["len", column], descending=[True, False])[column]
    a, b = classes[0], classes[1]
    sizes = {v: documents.filter(pl.col(column) == v).height for v in (a, b)}
    by_doc = documents.select("doc_id", column).filter(pl.col(column).is_in([a, b]))
    freq = (
        pooled.select("doc_id", "feature")
        .unique()
        .join(by_doc, on="doc_id")
        .group_by("feature")
        .agg(
            ((pl.col(column) == a).sum() / sizes[a]).alias("fa"),
            ((pl.col(column) == b).sum() / sizes[b]).alias("fb"),
        )
        .with_columns((pl.col("fa") - pl.col("fb")).abs().alias("diff"))
        .sort(["diff", "feature"], descending=[True, False])
    )
    return freq["feature"].head(n).to_list()


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


# --------------------------------------------------------------------------------------------------
# Real SAE features: the activation engine of the token_activations asset


def load_default_reader(device: str = "cpu") -> Any:
    """The embedded default reader: `resources.sae_reader.load_reader()` (MiniLM + resources/default_sae)."""
    from interp_assets.engine.reader import load_reader

    return load_reader(device=device)


def sae_token_activations(
    documents: pl.DataFrame,
    reader: Any,
    *,
    chunk_docs: int = 1000,
    chunk_chars: int = 200_000,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Encode `documents` (raw_documents frame) with `encode_texts`, chunk by chunk.

    Returns the token_activations table (README schema; activation as float32) and the per-document
    status (doc_id, n_tokens, pooled_tokens, truncated, status `encoded`/`rejected`, reason).
    """
    texts = documents["text"].to_list()
    doc_ids = documents["doc_id"].to_numpy().astype(np.int32)
    dataset = str(documents["dataset"][0]) if "dataset" in documents.columns and documents.height else ""
    frames: list[pl.DataFrame] = []
    status: list[pl.DataFrame] = []
    for rng in iter_chunks(len(texts), [len(t) for t in texts], chunk_docs, chunk_chars):
        enc = encode_texts(reader, [texts[i] for i in rng])
        table = enc.activations
        i = table.schema.get_field_index("activation")
        table = table.set_column(i, "activation", table.column("activation").cast(pa.float32()))
        ids = doc_ids[rng.start : rng.stop]
        frame = pl.from_arrow(table)
        frames.append(
            frame.select(
                pl.lit(dataset).alias("dataset"),
                pl.Series("doc_id", ids[frame["doc_index"].to_numpy()], dtype=pl.Int32),
                pl.col("token_index").cast(pl.Int32),
                pl.col("token").cast(pl.String),
                pl.col("char_start").cast(pl.Int32),
                pl.col("char_end").cast(pl.Int32),
                pl.col("feature").cast(pl.Int32),
                pl.col("activation").cast(pl.Float32),
            )
        )
        status.append(
            pl.DataFrame(
                {
                    "doc_id": ids,
                    "n_tokens": enc.n_tokens.astype(np.int32),
                    "pooled_tokens": enc.pooled_tokens.astype(np.int32),
                    "truncated": enc.truncated,
                    "status": ["rejected" if j in enc.errors else "encoded" for j in range(len(rng))],
                    "reason": [enc.errors.get(j) for j in range(len(rng))],
                },
                schema_overrides={"reason": pl.String},
            )
        )
        if progress is not None:
            progress(rng.stop, len(texts))
    if not frames:
        raise ValueError("no documents to encode.")
    return pl.concat(frames), pl.concat(status)


def pooled_from_activations(
    token_activations: pl.DataFrame, status: pl.DataFrame
) -> tuple[pl.DataFrame, int]:
    """pooled_embeddings (the asset's pooling function) and the number of encoded documents."""
    encoded = status.filter(pl.col("status") == "encoded")
    pooled = pool_token_activations(token_activations, encoded.select("doc_id", "pooled_tokens"))
    return pooled, encoded.height


def choose_features(
    pooled: pl.DataFrame,
    n_docs: int,
    n: int,
    selection: str = "frequent",
    *,
    min_docs: int = 100,
    max_fraction: float = 0.9,
) -> list[int]:
    """Features to benchmark.

    `frequent`: the `n` most frequent, by the feature_labels asset's own `select_features`.
    `spread`: `n` features evenly spaced over the frequency ranks of the features active in at least
    `min_docs` documents (enough for the evidence and held-out splits) and at most `max_fraction` of them
    (enough negatives).
    """
    if selection == "frequent":
        return select_features(pooled, n_docs, n_frequent=n)["feature"].to_list()
    if selection != "spread":
        raise ValueError(f"selection must be 'frequent' or 'spread'; got {selection!r}.")
    counts = (
        pooled.group_by("feature")
        .agg(pl.len().alias("docs"))
        .filter((pl.col("docs") >= min_docs) & (pl.col("docs") <= max_fraction * n_docs))
        .sort(["docs", "feature"], descending=[True, False])
    )
    if counts.height <= n:
        return sorted(counts["feature"].to_list())
    ranks = np.unique(np.linspace(0, counts.height - 1, n).round().astype(int))
    return sorted(counts["feature"].gather(ranks).to_list())


# --------------------------------------------------------------------------------------------------
# Real vs swapped labels


def swapped_labels(
    labels: pl.DataFrame, order: Sequence[int] | None = None
) -> tuple[pl.DataFrame, pl.Series]:
    """Each feature (row i) gets the label and description of row `order[i]`: a wrong label.

    The default order is cyclic (row i gets the next row's label). Returns the swapped labels and, per
    row, the feature whose label it now carries.
    """
    n = labels.height
    idx = np.asarray(order if order is not None else (np.arange(n) + 1) % max(n, 1), dtype=np.int64)
    if idx.shape != (n,) or (n and (idx.min() < 0 or idx.max() >= n)):
        raise ValueError(f"order must be a permutation of the {n} label rows.")
    rolled = labels.select(
        pl.col("label").gather(idx),
        pl.col("description").gather(idx),
        pl.col("feature").gather(idx).alias("label_of"),
    )
    return labels.with_columns(rolled["label"], rolled["description"]), rolled["label_of"]


def random_derangements(labels: Sequence[str], n: int, seed: int = 0, tries: int = 2000) -> list[np.ndarray]:
    """`n` seeded random derangements of the label rows: no row keeps its own label, and (where possible)
    no row gets a label whose text equals its own (two features can carry the same offline label)."""
    size = len(labels)
    if size < 2:
        raise ValueError("derangements need at least two labels.")
    rng = np.random.default_rng(seed)
    text = np.array(labels, dtype=object)
    out = []
    for _ in range(n):
        best, best_same = (np.arange(size) + 1) % size, size + 1
        for _ in range(tries):
            perm = rng.permutation(size)
            if (perm == np.arange(size)).any():
                continue
            same = int((text[perm] == text).sum())
            if same < best_same:
                best, best_same = perm, same
            if same == 0:
                break
        out.append(best)
    return out


def memoized_embeddings() -> Callable[[list[str]], np.ndarray]:
    """`sentence_embeddings` that embeds each distinct text once (real and swapped runs share excerpts)."""
    memo: dict[str, np.ndarray] = {}

    def embed(texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in memo]
        if missing:
            memo.update(zip(missing, sentence_embeddings(missing), strict=True))
        return np.stack([memo[t] for t in texts]) if texts else sentence_embeddings([])

    return embed


SCORE_COLUMNS = ["f1", "auc", "balanced_accuracy", "f1_ci_low"]


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
    swaps: int | Sequence[Sequence[int]] | None = None,
    swap_seed: int = 0,
    embed: Callable[[list[str]], np.ndarray] | None = None,
) -> pl.DataFrame:
    """Per feature and scoring method: F1/AUC/balanced accuracy of the real label and of swapped ones.

    `swaps`: None = one cyclic swap; an int k = k seeded random derangements (`random_derangements`);
    or explicit permutations of the label rows (`swapped_labels`). The `*_swapped` columns are the mean
    over the swaps (`n_swaps`); `swapped_label`/`swapped_from` show the first.
    """
    if len(features) < 2:
        raise ValueError("the benchmark needs at least two features to swap labels between.")
    params = dict(n_evidence=n_evidence, n_holdout=n_holdout, seed=seed, embeddings=embeddings)
    labels = label_features(
        token_activations, documents, features, dataset=dataset, sae_id=sae_id, llm=llm, **params
    )
    if swaps is None:
        orders: list[Any] = [None]
    elif isinstance(swaps, int):
        orders = random_derangements(labels["label"].to_list(), swaps, seed=swap_seed)
    else:
        orders = list(swaps)
    common = dict(llm=llm, n_boot=n_boot, embed=embed or memoized_embeddings(), **params)
    real = score_features(labels, token_activations, documents, **common)
    wrong_parts = []
    names = labels.select("feature", "label", "source")
    for k, order in enumerate(orders):
        swapped, label_of = swapped_labels(labels, order)
        if k == 0:
            names = names.with_columns(
                pl.Series("swapped_label", swapped["label"]), pl.Series("swapped_from", label_of)
            )
        wrong = score_features(swapped, token_activations, documents, **common)
        wrong_parts.append(wrong.select("feature", "method", *SCORE_COLUMNS))
    wrong = (
        pl.concat(wrong_parts)
        .group_by("feature", "method")
        .agg(*(pl.col(c).mean().alias(f"{c}_swapped") for c in SCORE_COLUMNS), pl.len().alias("n_swaps"))
    )
    keep = [
        "feature",
        "method",
        *SCORE_COLUMNS,
        "f1_ci_high",
        "n_examples",
        "length_baseline_auc",
        "beats_length_baseline",
    ]
    joined = real.select(keep).join(wrong, on=["feature", "method"], how="inner")
    names = names.join(labels.select("feature", "evidence_doc_ids"), on="feature")
    return names.join(joined, on="feature").sort(["method", "feature"])


def _wilcoxon_greater(x: np.ndarray, y: np.ndarray) -> float | None:
    """One-sided paired Wilcoxon signed-rank p-value for x > y (None when every difference is zero)."""
    from scipy.stats import wilcoxon

    d = x - y
    if d.size == 0 or not np.any(d != 0):
        return None
    return float(wilcoxon(x, y, alternative="greater").pvalue)


def summarize(result: pl.DataFrame) -> pl.DataFrame:
    """Per method: mean/median real vs swapped F1 / balanced accuracy / AUC, how often the real label wins,
    and one-sided paired Wilcoxon signed-rank p-values (real > swapped) over features."""
    rows = []
    for method in sorted(result["method"].unique().to_list()):
        r = result.filter(pl.col("method") == method)
        row: dict[str, Any] = {"method": method, "features": r.height}
        for metric, short in (("f1", "f1"), ("balanced_accuracy", "bacc"), ("auc", "auc")):
            pair = r.select(metric, f"{metric}_swapped").drop_nulls()
            x, y = pair[metric].to_numpy(), pair[f"{metric}_swapped"].to_numpy()
            row |= {
                f"{short}_real": float(x.mean()) if x.size else None,
                f"{short}_swapped": float(y.mean()) if y.size else None,
                f"{short}_real_median": float(np.median(x)) if x.size else None,
                f"{short}_swapped_median": float(np.median(y)) if y.size else None,
                f"real_{short}_wins": float((x > y).mean()) if x.size else None,
                f"{short}_wilcoxon_p": _wilcoxon_greater(x, y),
            }
        ci = r.select("f1_ci_low", "f1_swapped").drop_nulls()
        row["real_f1_ci_above_swapped"] = float((ci["f1_ci_low"] > ci["f1_swapped"]).mean())
        pvalues = {m: row[f"{m}_wilcoxon_p"] for m in ("auc", "bacc", "f1") if row[f"{m}_real"] is not None}
        row["best_separating_metric"] = min(
            pvalues, key=lambda m: pvalues[m] if pvalues[m] is not None else 1
        )
        beats = r["beats_length_baseline"].drop_nulls() if "beats_length_baseline" in r.columns else None
        row["beats_length_share"] = float(beats.mean()) if beats is not None and beats.len() else None
        if "length_baseline_auc" in r.columns:
            row["length_baseline_auc_mean"] = r["length_baseline_auc"].mean()
        row["stopword_labels"] = sum(is_stopword_label(lab) for lab in r["label"].to_list())
        rows.append(row)
    return pl.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# Command line


PRINT_COLUMNS = (
    "feature",
    "doc_freq",
    "label",
    "swapped_label",
    "f1",
    "f1_swapped",
    "balanced_accuracy",
    "auc",
    "auc_swapped",
    "length_baseline_auc",
)
SUMMARY_COLUMNS = (
    "corpus",
    "selection",
    "features",
    "auc_real",
    "auc_swapped",
    "real_auc_wins",
    "auc_wilcoxon_p",
    "bacc_real",
    "bacc_swapped",
    "bacc_wilcoxon_p",
    "f1_real",
    "f1_swapped",
    "f1_wilcoxon_p",
    "best_separating_metric",
    "length_baseline_auc_mean",
    "beats_length_share",
    "stopword_labels",
    "category_pure_features",
    "category_named_share",
)


def corpus_documents(corpus: str, args: argparse.Namespace) -> tuple[pl.DataFrame, str]:
    """The benchmark's documents of `corpus` and the column its report features are chosen by."""
    if corpus == "sst2":
        return load_sst2(args.data, args.n_docs), "label"
    return load_dbpedia(args.dbpedia, args.dbpedia_docs), "category"


def run_corpus(
    corpus: str, args: argparse.Namespace, hard: bool, reader: Any, embed: Callable[[list[str]], np.ndarray]
) -> tuple[dict[str, Any], list[pl.DataFrame]]:
    """Label and score the feature selections of one corpus; its JSON record and summary rows."""
    t0 = time.perf_counter()
    documents, class_column = corpus_documents(corpus, args)
    info: dict[str, Any] = {"documents": documents.height}
    if args.features == "sae":
        acts, status = sae_token_activations(
            documents, reader, progress=lambda d, n: print(f"encoded {d}/{n}", end="\r", flush=True)
        )
        pooled, n_encoded = pooled_from_activations(acts, status)
        selections = {
            name: choose_features(pooled, n_encoded, args.n_features, name) for name in args.selection
        }
        selections["report_top10"] = report_features(pooled, documents, class_column, 10)
        doc_freq = pooled.group_by("feature").agg((pl.len() / n_encoded).alias("doc_freq"))
        sae_id = reader.fingerprint
        info |= {
            "encoded_documents": n_encoded,
            "tokens_pooled": int(status["pooled_tokens"].sum()),
            "activations": acts.height,
            "report_features_by": f"largest |document frequency difference| between the two largest "
            f"{class_column} classes",
        }
    else:
        acts = rule_based_activations(documents)
        selections = {"word_families": sorted(WORD_FAMILIES)}
        doc_freq = acts.group_by("feature").agg(
            (pl.col("doc_id").n_unique() / documents.height).alias("doc_freq")
        )
        sae_id = "rule-based"
    embeddings = sentence_embeddings(documents["text"].to_list()) if hard else None
    info["seconds_setup"] = round(time.perf_counter() - t0, 2)
    runs: dict[str, Any] = {}
    summaries = []
    for name, features in selections.items():
        ts = time.perf_counter()
        result = run_benchmark(
            acts,
            documents,
            features,
            dataset=corpus,
            sae_id=sae_id,
            embeddings=embeddings,
            swaps=args.swaps if args.swaps > 0 else None,
            swap_seed=args.seed,
            embed=embed,
        )
        result = result.join(doc_freq, on="feature", how="left")
        summary = summarize(result).with_columns(
            pl.lit(corpus).alias("corpus"), pl.lit(name).alias("selection")
        )
        record: dict[str, Any] = {}
        if "category" in documents.columns:
            cats = category_labels(result.filter(pl.col("method") == "embedding"), documents, acts)
            pure = cats.filter(pl.col("names_category").is_not_null())
            summary = summary.with_columns(
                pl.lit(pure.height).alias("category_pure_features"),
                pl.lit(pure["names_category"].mean() if pure.height else None, dtype=pl.Float64).alias(
                    "category_named_share"
                ),
            )
            record["category_pure"] = pure.to_dicts()
        summaries.append(summary)
        runs[name] = record | {
            "features": result.drop("evidence_doc_ids").to_dicts(),
            "summary": summary.to_dicts(),
            "first_swap_label_equal_to_real": int((result["label"] == result["swapped_label"]).sum()),
            "seconds_label_and_score": round(time.perf_counter() - ts, 2),
        }
        with pl.Config(tbl_rows=200, tbl_cols=20, fmt_str_lengths=40, tbl_width_chars=230, float_precision=3):
            print(f"\n== {corpus} {name}: {len(features)} features ==")
            print(result.select(PRINT_COLUMNS))
    info["seconds_total"] = round(time.perf_counter() - t0, 2)
    return info | {"runs": runs}, summaries


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", nargs="+", choices=("sst2", "dbpedia"), default=["sst2", "dbpedia"])
    parser.add_argument("--data", default=str(SST2_TRAIN), help="SST-2 train.tsv")
    parser.add_argument("--dbpedia", default=str(DBPEDIA), help="DBpedia tsv (text, category, split)")
    parser.add_argument("--features", choices=("sae", "rule-based"), default="sae")
    parser.add_argument(
        "--selection",
        nargs="+",
        choices=("frequent", "spread"),
        default=["frequent", "spread"],
        help="which SAE features (each selection is one benchmark run over the same encoded documents)",
    )
    parser.add_argument("--n-features", type=int, default=60)
    parser.add_argument("--n-docs", type=int, default=5000, help="SST-2 sentences")
    parser.add_argument("--dbpedia-docs", type=int, default=2500, help="DBpedia val documents")
    parser.add_argument(
        "--swaps", type=int, default=5, help="random derangements per feature (0: one cyclic)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--hard-negatives",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="embed documents for hard negatives (default: on for SAE features, as the asset; off for rules)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    hard = args.hard_negatives if args.hard_negatives is not None else args.features == "sae"
    corpora = args.corpus if args.features == "sae" else ["sst2"]
    default_out = "label_scores.json" if args.features == "sae" else "label_scores_rule_based.json"
    out = Path(args.out or Path(__file__).resolve().parent / "results" / default_out)

    t0 = time.perf_counter()
    reader = load_default_reader(args.device) if args.features == "sae" else None
    info: dict[str, Any] = {}
    if reader is not None:
        info = {
            "reader_fingerprint": reader.fingerprint,
            "d_sae": reader.d_sae,
            "device": reader.device,
            "seconds_load_reader": round(time.perf_counter() - t0, 2),
        }
    embed = memoized_embeddings()
    results: dict[str, Any] = {}
    summaries: list[pl.DataFrame] = []
    for corpus in corpora:
        results[corpus], parts = run_corpus(corpus, args, hard, reader, embed)
        summaries += parts
    table = pl.concat(summaries, how="diagonal_relaxed")
    table = table.select([c for c in SUMMARY_COLUMNS if c in table.columns])
    shown = table.select(
        pl.col(c).map_elements(lambda v: f"{v:.3g}", return_dtype=pl.String)
        if table.schema[c].is_numeric()
        else c
        for c in table.columns
    )
    with pl.Config(tbl_rows=40, tbl_cols=40, tbl_width_chars=230, fmt_str_lengths=40):
        print("\n== real vs swapped labels (mean over features; Wilcoxon one-sided, real > swapped) ==")
        print(
            shown.transpose(
                include_header=True,
                column_names=[f"{c}/{s}" for c, s in zip(table["corpus"], table["selection"], strict=True)],
            )
        )
    seconds = time.perf_counter() - t0
    print(f"features: {args.features}, swaps {args.swaps}, hard negatives {hard}; {seconds:.1f} s")
    write_results(
        {
            "features_kind": args.features,
            "n_features": args.n_features,
            "hard_negatives": bool(hard),
            "swaps": args.swaps,
            "seed": args.seed,
            "headline_metric": dict(HEADLINE_METRIC),
            **info,
            "summary": table.to_dicts(),
            "corpora": results,
            "seconds": round(seconds, 2),
        },
        out,
    )


if __name__ == "__main__":
    main()
