"""Evidence and held-out documents of a feature, and the marked excerpts shown from them.

The labeler only ever sees the *evidence* half of a feature's documents; the scorer only the *held-out*
half. The split is by content, not by document: documents that share content (identical normalized text,
one contained in another, a shared sentence or 8-word shingle; `content_split`) form a group, and a
group lies wholly in one half, chosen by `(group's smallest doc_hash, feature, seed)`. A held-out
document that still shares a (non-boilerplate) sentence, shingle or contained text with the feature's
shown evidence is dropped and counted (`heldout_dropped`; none with the default index, whose groups are
closed under shared keys, some when a caller passes coarser groups). Boilerplate (a phrase in more than
max(20, 1%) of the documents) is not content: it neither groups nor drops. `evidence_hash` (with
`sae_id`, `feature` and the labeler) keys the label cache.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from interp_assets.analysis.reports import ELLIPSIS, highlight_text, merge_spans
from interp_assets.labels.content_split import ContentIndex, content_index, mix64

SPLIT_VERSION = 3  # 2: split by content group, not by document; 3: dense features read by strength
DENSE_FRACTION = 0.5  # a feature firing in more of the documents is "positive" in its top half only
DENSE_NEGATIVE_FRACTION = 0.25  # ... and "negative" in its bottom quarter (absent or weakest)
HARD_NEGATIVES_MAX_DOCS = 20_000  # above this, documents are not embedded for hard negatives
WINDOW_CHARS = 2 * 150 + 20  # an excerpt's size at make_excerpt's default context_chars
CORE_DOC_COLUMNS = frozenset({"dataset", "doc_id", "doc_hash", "text", "source_file", "source_row"})


@dataclass(frozen=True)
class Excerpt:
    """A window of one document; `spans` are the active characters of `text` (merged, window-relative)."""

    doc_id: int
    text: str
    spans: tuple[tuple[int, int], ...]
    activation: float
    role: str  # "positive", "random_negative" or "hard_negative"

    @property
    def is_positive(self) -> bool:
        return self.role == "positive"

    @property
    def marked(self) -> str:
        """The text with the active spans wrapped in `<< >>`."""
        return mark_spans(self.text, self.spans)


@dataclass(frozen=True)
class EvidenceSplit:
    """Which documents a feature's labeler sees (evidence) and which its scorer uses (held-out).

    All fields are doc_ids. Positives are documents where the feature fires; evidence positives are the
    top-activating documents of the evidence pool, held-out positives are drawn across activation
    quantiles of the held-out pool. `background` (evidence-pool non-activating documents, not shown)
    is the offline labeler's reference corpus.
    """

    feature: int
    seed: int
    n_positive_docs: int
    evidence_positive: tuple[int, ...]
    evidence_random_negative: tuple[int, ...]
    evidence_hard_negative: tuple[int, ...]
    heldout_positive: tuple[int, ...]
    heldout_random_negative: tuple[int, ...]
    heldout_hard_negative: tuple[int, ...]
    background: tuple[int, ...]
    evidence_hash: str
    background_hash: str = ""  # content of `background`: with evidence_hash, all the offline labeler reads
    heldout_dropped: int = 0  # held-out pool documents left out for sharing content with the evidence

    @property
    def evidence_doc_ids(self) -> list[int]:
        """Documents shown to the labeler, positives first."""
        return [*self.evidence_positive, *self.evidence_random_negative, *self.evidence_hard_negative]

    @property
    def heldout_doc_ids(self) -> list[int]:
        """Documents the scorer uses, positives first."""
        return [*self.heldout_positive, *self.heldout_random_negative, *self.heldout_hard_negative]


# --------------------------------------------------------------------------------------------------
# Documents and hashing


def text_hash(text: str) -> str:
    """Hex BLAKE2b-128 of a text (the `doc_hash` of raw_documents)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def unit_hash(doc_hash64: np.ndarray, feature: int, seed: int) -> np.ndarray:
    """Deterministic uniform [0, 1) value per document from (doc_hash, feature, seed)."""
    key = mix64(np.array([(int(feature) & 0xFFFFFFFF) << 32 | (int(seed) & 0xFFFFFFFF)], dtype=np.uint64))
    mixed = mix64(doc_hash64.astype(np.uint64) ^ key)
    return (mixed >> np.uint64(11)).astype(np.float64) * 2.0**-53


def prepare_documents(documents: pl.DataFrame) -> pl.DataFrame:
    """Validate raw_documents and add `_row` (position, the embeddings row) and `_h64` (hash prefix)."""
    missing = [c for c in ("doc_id", "text") if c not in documents.columns]
    if missing:
        raise ValueError(
            f"documents frame is missing column(s) {missing}; pass the raw_documents table "
            "(columns doc_id, text, doc_hash, ...)."
        )
    docs = documents.with_row_index("_row").with_columns(
        pl.col("doc_id").cast(pl.Int32), pl.col("text").cast(pl.String).fill_null("")
    )
    if "doc_hash" not in docs.columns:
        docs = docs.with_columns(
            pl.col("text").map_elements(text_hash, return_dtype=pl.String).alias("doc_hash")
        )
    if docs["doc_id"].is_duplicated().any():
        dup = docs.filter(pl.col("doc_id").is_duplicated())["doc_id"][0]
        raise ValueError(
            f"documents frame has doc_id {dup} more than once; doc_id must be unique per dataset."
        )
    hashes = docs["doc_hash"].to_list()
    try:
        h64 = np.array([int(h[:16], 16) for h in hashes], dtype=np.uint64)
    except (TypeError, ValueError):
        bad = next(h for h in hashes if not isinstance(h, str) or not re.fullmatch(r"[0-9a-fA-F]{16,}", h))
        raise ValueError(
            f"documents frame has doc_hash {bad!r}, not a hex digest; doc_hash is the hex BLAKE2b-128 of "
            "the text (drop the column to have it recomputed)."
        ) from None
    return docs.with_columns(pl.Series("_h64", h64, dtype=pl.UInt64))


def _check_activations(token_activations: pl.DataFrame) -> None:
    need = ("doc_id", "feature", "activation", "char_start", "char_end")
    missing = [c for c in need if c not in token_activations.columns]
    if missing:
        raise ValueError(
            f"token_activations frame is missing column(s) {missing}; pass token_activations in the wide "
            f"shape (columns {', '.join(need)}, ...): joined with tokens "
            "(`interp_assets.storage.parquet.with_tokens`, or the DuckDB view token_activations_wide)."
        )


# --------------------------------------------------------------------------------------------------
# Evidence split


def split_evidence(
    token_activations: pl.DataFrame,
    documents: pl.DataFrame,
    feature: int,
    *,
    n_evidence: int = 20,
    n_holdout: int = 40,
    seed: int = 0,
    embeddings: np.ndarray | None = None,
    hard_negative_fraction: float = 0.5,
    n_background: int = 2000,
    n_quantiles: int = 10,
) -> EvidenceSplit:
    """Split `feature`'s documents into evidence (for the labeler) and held-out (for the scorer).

    A document is in the evidence pool when `unit_hash(group_hash, feature, seed) < n_evidence /
    (n_evidence + n_holdout)`, else in the held-out pool, where `group_hash` is the smallest doc_hash of
    its content group (`content_split.content_index`); this holds for positives and negatives alike.
    When the feature's positives span two or more groups that all fall on one side, the group nearest
    the threshold moves across, so that both sides get positives.
    Held-out documents that share a sentence, shingle or contained text with the chosen evidence are
    then left out (`heldout_dropped`).
    Positives and negatives are `positives_and_negatives` (a feature in most documents: its strongest
    half against its weakest quarter).
    Evidence: the `n_evidence` top-activating positives of the evidence pool and `n_evidence` negatives.
    Held-out: `n_holdout` positives spread over `n_quantiles` activation quantiles and `n_holdout`
    negatives. With `embeddings` (row i = document at row i of `documents`, computed once per dataset)
    a `hard_negative_fraction` of each negative set are the non-activating documents of that pool most
    similar to that side's positives; the rest are random. Held-out negatives follow the held-out
    positives' text lengths (`_length_matched`; hard ones are the most similar of 5x as many length-matched
    candidates), so length alone tells them apart little better than chance.
    """
    return split_features(
        token_activations,
        documents,
        [feature],
        n_evidence=n_evidence,
        n_holdout=n_holdout,
        seed=seed,
        embeddings=embeddings,
        hard_negative_fraction=hard_negative_fraction,
        n_background=n_background,
        n_quantiles=n_quantiles,
    )[int(feature)]


def _split(
    docs: pl.DataFrame,
    index: ContentIndex,
    acts: pl.DataFrame,
    feature: int,
    n_evidence: int,
    n_holdout: int,
    seed: int,
    embeddings: np.ndarray | None,
    hard_negative_fraction: float,
    n_background: int,
    n_quantiles: int,
) -> EvidenceSplit:
    if n_evidence < 1 or n_holdout < 1:
        raise ValueError(f"n_evidence and n_holdout must be >= 1; got {n_evidence} and {n_holdout}.")
    if not 0.0 <= hard_negative_fraction <= 1.0:
        raise ValueError(f"hard_negative_fraction must be in [0, 1]; got {hard_negative_fraction}.")
    threshold = n_evidence / (n_evidence + n_holdout)
    per_doc = (
        acts.group_by("doc_id")
        .agg(
            pl.col("activation").max().alias("max_activation"),
            pl.col("activation").sum().alias("activation_sum"),
        )
        .with_columns(pl.col("doc_id").cast(pl.Int32))
    )
    frame = (
        docs.select("doc_id", "doc_hash", "text", "_row", "_h64", "_g64")
        .with_columns(
            pl.Series("u", unit_hash(docs["_h64"].to_numpy(), feature, seed)),
            pl.Series("ug", unit_hash(docs["_g64"].to_numpy(), feature, seed)),
        )
        .with_columns((pl.col("ug") < threshold).alias("evidence_pool"))
        .join(per_doc, on="doc_id", how="left")
    )
    frame = _both_sides(frame)
    pos, neg = positives_and_negatives(frame)

    ev_pos = pos.filter("evidence_pool").sort(["strength", "u"], descending=[True, False]).head(n_evidence)
    use_hard = embeddings is not None
    ev_neg_pool = neg.filter("evidence_pool").sort("u")
    n_hard_ev = round(n_evidence * hard_negative_fraction) if use_hard else 0
    n_hard_ho = round(n_holdout * hard_negative_fraction) if use_hard else 0
    ev_hard = _hard_negatives(ev_neg_pool, ev_pos, embeddings, n_hard_ev)
    ev_rand = ev_neg_pool.join(ev_hard, on="doc_id", how="anti").head(n_evidence - ev_hard.height)

    # held-out: the other groups, less any document that shares content with the shown evidence anyway
    shown_rows = pl.concat([ev_pos["_row"], ev_rand["_row"], ev_hard["_row"]]).to_numpy()
    overlap = pl.Series("overlap", index.shares(shown_rows, boilerplate=False))
    ho_pool = pos.filter(~pl.col("evidence_pool"))
    ho_neg_pool = neg.filter(~pl.col("evidence_pool")).sort("u")
    ho_overlap = [overlap.gather(p["_row"]) for p in (ho_pool, ho_neg_pool)]
    dropped = sum(int(o.sum()) for o in ho_overlap)
    ho_pool, ho_neg_pool = (p.filter(~o) for p, o in zip((ho_pool, ho_neg_pool), ho_overlap, strict=True))
    ho_pos = _quantile_sample(ho_pool, n_holdout, n_quantiles)
    # held-out hard negatives: the most similar of length-matched candidates (length tells nothing)
    ho_hard = _hard_negatives(
        _length_matched(ho_neg_pool, ho_pos, 5 * n_hard_ho), ho_pos, embeddings, n_hard_ho
    )
    ho_rand = _length_matched(
        ho_neg_pool.join(ho_hard, on="doc_id", how="anti"), ho_pos, n_holdout - ho_hard.height
    )
    background = ev_neg_pool.join(pl.concat([ev_hard, ev_rand]), on="doc_id", how="anti").head(n_background)

    shown = {
        "evidence_positive": ev_pos,
        "evidence_random_negative": ev_rand,
        "evidence_hard_negative": ev_hard,
    }
    payload: dict[str, Any] = {"version": SPLIT_VERSION, "feature": int(feature), "seed": int(seed)}
    payload.update({k: v["doc_hash"].to_list() for k, v in shown.items()})
    evidence_hash = hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=16).hexdigest()

    background_hash = hashlib.blake2b(
        json.dumps(background["doc_hash"].to_list()).encode(), digest_size=16
    ).hexdigest()

    def ids(frame: pl.DataFrame) -> tuple[int, ...]:
        return tuple(frame["doc_id"].to_list())

    return EvidenceSplit(
        feature=int(feature),
        seed=int(seed),
        n_positive_docs=pos.height,
        evidence_positive=ids(ev_pos),
        evidence_random_negative=ids(ev_rand),
        evidence_hard_negative=ids(ev_hard),
        heldout_positive=ids(ho_pos),
        heldout_random_negative=ids(ho_rand),
        heldout_hard_negative=ids(ho_hard),
        background=ids(background),
        evidence_hash=evidence_hash,
        background_hash=background_hash,
        heldout_dropped=dropped,
    )


def _both_sides(frame: pl.DataFrame) -> pl.DataFrame:
    """When a feature's positives lie in two or more groups, all on one side, move the group nearest the
    other side's hash range across (whole), so that both sides get positives."""
    groups = (
        frame.filter(pl.col("max_activation").is_not_null())
        .group_by("_g64")
        .agg(pl.col("ug").first(), pl.col("evidence_pool").first())
    )
    if groups.height < 2 or groups["evidence_pool"].n_unique() == 2:
        return frame
    all_evidence = bool(groups["evidence_pool"][0])
    moved = groups.sort("ug", descending=all_evidence)["_g64"][0]
    return frame.with_columns(
        pl.when(pl.col("_g64") == moved)
        .then(not all_evidence)
        .otherwise("evidence_pool")
        .alias("evidence_pool")
    )


def positives_and_negatives(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A feature's positive and negative documents, each with a `strength` column that orders positives.

    `frame`: one row per document, with `text`, `u` (a per-feature hash for tie order), and
    `max_activation` / `activation_sum` over the document's tokens (null where the feature is absent).
    A feature that fires in at most `DENSE_FRACTION` of the documents: where it fires (strength = max
    activation), against documents without it. A denser feature (one on function words fires in nearly
    every document) is read at the scale it works at, by its activation per character of text (a max or
    a sum grows with length alone): positives are the top `DENSE_FRACTION` of the documents by that
    strength, negatives the bottom `DENSE_NEGATIVE_FRACTION`. Otherwise its few documents without it,
    mostly the shortest, would be the only negatives, and length alone would tell them apart.
    """
    usable = frame.filter(pl.col("text").str.strip_chars() != "")
    firing = usable.filter(pl.col("max_activation").is_not_null())
    if firing.height <= DENSE_FRACTION * usable.height:
        negatives = usable.filter(pl.col("max_activation").is_null())
        return frame.filter(pl.col("max_activation").is_not_null()).with_columns(
            pl.col("max_activation").alias("strength")
        ), negatives.with_columns(pl.lit(0.0).alias("strength"))
    n = usable.height
    per_char = pl.col("activation_sum").fill_null(0.0) / pl.col("text").str.len_chars()
    ranked = (
        usable.with_columns(per_char.alias("strength"))
        .sort(["strength", "u"], descending=[True, False])
        .with_row_index("_rank")
    )
    pos = ranked.filter(pl.col("_rank") < int(DENSE_FRACTION * n)).drop("_rank")
    neg = ranked.filter(pl.col("_rank") >= n - int(DENSE_NEGATIVE_FRACTION * n)).drop("_rank")
    return pos, neg


def _quantile_sample(pool: pl.DataFrame, n: int, n_quantiles: int) -> pl.DataFrame:
    """Take `n` documents round-robin from `n_quantiles` strength bins (hash order within a bin)."""
    if pool.height <= n:
        return pool.sort(["strength", "u"], descending=[True, False])
    bins = max(1, min(n_quantiles, n))
    ranked = pool.sort(["strength", "u"]).with_row_index("rank")
    ranked = ranked.with_columns((pl.col("rank") * bins // pool.height).alias("bin"))
    ranked = ranked.with_columns(pl.col("u").rank("ordinal").over("bin").alias("within"))
    picked = ranked.sort(["within", "bin"], descending=[False, True]).head(n)
    return picked.drop("rank", "bin", "within").sort(["strength", "u"], descending=[True, False])


def _length_matched(pool: pl.DataFrame, positives: pl.DataFrame, n: int) -> pl.DataFrame:
    """`n` rows of `pool` whose text lengths follow the `positives`' (their length quantiles): for each
    target length, the unused row of nearest length, the first in pool order on ties. Held-out negatives
    so chosen leave length no cue for telling them from the positives."""
    if n <= 0 or pool.height == 0 or positives.height == 0:
        return pool.head(max(n, 0))
    # lengths as excerpts show them: a text longer than a window is cut to one (make_excerpt's default)
    lengths = np.minimum(pool["text"].str.len_chars().to_numpy(), WINDOW_CHARS).astype(np.float64)
    positive_lengths = np.minimum(positives["text"].str.len_chars().to_numpy(), WINDOW_CHARS)
    targets = np.quantile(positive_lengths, (np.arange(n) + 0.5) / n)
    free = np.ones(lengths.size, dtype=bool)
    picked = []
    for target in targets[: lengths.size]:
        gap = np.where(free, np.abs(lengths - target), np.inf)
        i = int(np.argmin(gap))
        free[i] = False
        picked.append(i)
    return pool[sorted(picked)]


def _hard_negatives(
    pool: pl.DataFrame, positives: pl.DataFrame, embeddings: np.ndarray | None, n: int
) -> pl.DataFrame:
    """The `n` rows of `pool` whose embedding is closest to the mean embedding of `positives`."""
    if embeddings is None or n <= 0 or pool.height == 0 or positives.height == 0:
        return pool.head(0)
    centroid = embeddings[positives["_row"].to_numpy()].astype(np.float64).mean(axis=0)
    norm = np.linalg.norm(centroid)
    if norm == 0:
        return pool.head(0)
    sims = embeddings[pool["_row"].to_numpy()].astype(np.float64) @ (centroid / norm)
    return pool[np.argsort(-sims, kind="stable")[:n]]


class _Memo:
    """What this process computed, by key, up to `size` entries (the oldest dropped first); safe across
    threads, and a value is computed outside the lock (two threads may compute the same one)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: dict[str, Any] = {}
        self.lock = threading.Lock()

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        with self.lock:
            if key in self.items:
                return self.items[key]
        value = compute()
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.pop(next(iter(self.items)))
        return value


_INDEX_CACHE = _Memo(2)
# Splits by everything they read: labeling then scoring the same features (the main job, a notebook)
# splits each feature once. A split holds up to n_background ids: 1,000 of them are at most tens of MB.
_SPLIT_CACHE = _Memo(1_000)


def _content_index(docs: pl.DataFrame) -> ContentIndex:
    """`content_index` of the prepared documents, reused while the same texts (by doc_hash, in order)
    are split again in this process (labeling then scoring, a notebook's per-feature calls)."""
    key = hashlib.blake2b("\n".join(docs["doc_hash"].to_list()).encode(), digest_size=16).hexdigest()
    return _INDEX_CACHE.get(key, lambda: content_index(docs["text"]))


def split_features(
    token_activations: pl.DataFrame,
    documents: pl.DataFrame,
    features: Sequence[int],
    *,
    n_evidence: int = 20,
    n_holdout: int = 40,
    seed: int = 0,
    embeddings: np.ndarray | None = None,
    hard_negative_fraction: float = 0.5,
    n_background: int = 2000,
    n_quantiles: int = 10,
    content: ContentIndex | None = None,
) -> dict[int, EvidenceSplit]:
    """`split_evidence` for many features, preparing documents, grouping them by content and partitioning
    activations once. `content` (`content_index(documents["text"])`) saves recomputing the groups."""
    _check_activations(token_activations)
    docs = prepare_documents(documents)
    index = content if content is not None else _content_index(docs)
    if index.n_docs != docs.height:
        raise ValueError(
            f"content index has {index.n_docs} documents but documents has {docs.height}; build it with "
            "content_index(documents['text'])."
        )
    docs = docs.with_columns(pl.Series("_group", index.group)).with_columns(
        pl.col("_h64").min().over("_group").alias("_g64")
    )
    if embeddings is not None and embeddings.shape[0] != docs.height:
        raise ValueError(
            f"embeddings has {embeddings.shape[0]} rows but documents has {docs.height}; row i of the "
            "embeddings must be the document at row i (compute them from documents['text'])."
        )
    wanted = [int(f) for f in dict.fromkeys(features)]
    acts = token_activations.filter(pl.col("feature").is_in(wanted))
    parts = {int(k[0]): v for k, v in acts.partition_by("feature", as_dict=True).items()}
    empty = token_activations.head(0)
    params = (n_evidence, n_holdout, seed, hard_negative_fraction, n_background, n_quantiles)
    inputs = _inputs_digest(docs, index, embeddings, params)
    out = {}
    for f in wanted:
        part = parts.get(f, empty)
        out[f] = _SPLIT_CACHE.get(
            _split_key(inputs, f, part),
            lambda f=f, part=part: _split(
                docs, index, part, f, n_evidence, n_holdout, seed, embeddings, *params[3:]
            ),
        )
    return out


def _inputs_digest(
    docs: pl.DataFrame, index: ContentIndex, embeddings: np.ndarray | None, params: tuple
) -> bytes:
    """What every feature's split reads besides its own activations: the documents, their content groups
    and keys, the embeddings and the settings."""
    h = hashlib.blake2b(json.dumps(params).encode(), digest_size=16)
    keys = index.keys.tocsr()
    for part in (index.group, index.boilerplate, keys.indptr, keys.indices, np.asarray(keys.shape)):
        h.update(np.ascontiguousarray(part).tobytes() + b"|")
    h.update(docs["doc_id"].to_numpy().tobytes())
    h.update("\n".join(docs["doc_hash"].to_list()).encode())
    h.update("\x00".join(docs["text"].to_list()).encode())
    if embeddings is not None:
        h.update(str(embeddings.shape).encode() + np.ascontiguousarray(embeddings).tobytes())
    return h.digest()


def _split_key(inputs: bytes, feature: int, acts: pl.DataFrame) -> str:
    """The cache key of one feature's split: the shared inputs and the feature's activations (as a set)."""
    rows = acts.select(pl.col("doc_id").cast(pl.Int64), pl.col("activation").cast(pl.Float64)).sort(
        "doc_id", "activation"
    )
    h = hashlib.blake2b(inputs + int(feature).to_bytes(8, "little", signed=True), digest_size=16)
    h.update(rows["doc_id"].to_numpy().tobytes())
    h.update(rows["activation"].to_numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Excerpts


def merge_word_spans(text: str, spans: Iterable[Sequence[int]]) -> list[tuple[int, int]]:
    """Merge spans that overlap, touch, or are separated only by whitespace (`<<sorry for>>`)."""
    merged: list[tuple[int, int]] = []
    for start, end in merge_spans(spans, len(text)):
        if merged and text[merged[-1][1] : start].isspace():
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def mark_spans(text: str, spans: Iterable[Sequence[int]]) -> str:
    """Wrap each span of `text` (merged by `merge_word_spans`) in `<< >>`."""
    return highlight_text(text, merge_word_spans(text, spans))


def _window(text: str, start: int, end: int, lo: int, hi: int) -> tuple[int, int]:
    """Widen nothing, only snap [start, end) inward to word boundaries without cutting into [lo, hi)."""
    if start > 0:
        cut = text.find(" ", start, lo)
        start = cut + 1 if cut >= 0 else start
    if end < len(text):
        cut = text.rfind(" ", hi, end)
        end = cut if cut >= 0 else end
    return start, end


def make_excerpt(
    doc_id: int,
    text: str,
    token_spans: Sequence[tuple[int, int, float]],
    role: str,
    *,
    context_chars: int = 150,
    seed: int = 0,
) -> Excerpt:
    """Cut a window of `text` around its strongest active token (or a pseudo-random window when no span).

    A text no longer than a window (`2 * context_chars + 20` characters) is kept whole, whether the feature
    fires in it or not: positives and negatives of short documents then differ in content, not in length,
    and an excerpt that is a whole document shares its embedding (cached by content hash). A longer text's
    window has that size wherever the activation is (shifted inward at either end of the text).
    `token_spans` are `(char_start, char_end, activation)` of the active tokens in the whole text; the
    excerpt keeps those inside the window, merged. `…` marks where the text was trimmed.
    """
    spans = [(s, e, a) for s, e, a in token_spans if e > s]
    size = 2 * context_chars + 20
    if len(text) <= size:
        start, end = 0, len(text)
    elif spans:
        a_start, a_end, _ = max(spans, key=lambda t: (t[2], -t[0]))
        width = max(size, a_end - a_start + 2 * context_chars)
        # a window that meets an end of the text is shifted, not shrunk: every window of a long text has
        # the same size, positive or negative, so excerpt length tells nothing about firing
        start = max(0, min(a_start - context_chars, len(text) - width))
        end = min(len(text), start + width)
        start, end = _window(text, start, end, a_start, a_end)
    else:
        digest = hashlib.blake2b(f"{doc_id}:{seed}".encode(), digest_size=8).digest()
        start = int.from_bytes(digest, "big") % (len(text) - size + 1)
        start, end = _window(text, start, start + size, start + size // 2, start + size // 2)
    prefix = f"{ELLIPSIS} " if start > 0 else ""
    suffix = f" {ELLIPSIS}" if end < len(text) else ""
    shift = len(prefix) - start
    inside = [(max(s, start) + shift, min(e, end) + shift) for s, e, _ in spans if s < end and e > start]
    body = prefix + text[start:end] + suffix
    activation = max((a for _, _, a in spans), default=0.0)
    return Excerpt(int(doc_id), body, tuple(merge_word_spans(body, inside)), float(activation), role)


def active_token_spans(
    token_activations: pl.DataFrame, feature: int, doc_ids: Sequence[int]
) -> dict[int, list[tuple[int, int, float]]]:
    rows = token_activations.filter(
        (pl.col("feature") == feature) & pl.col("doc_id").is_in(list(doc_ids))
    ).select("doc_id", "char_start", "char_end", "activation")
    spans: dict[int, list[tuple[int, int, float]]] = {}
    for d, s, e, a in rows.iter_rows():
        spans.setdefault(int(d), []).append((int(s), int(e), float(a)))
    return spans


def texts_by_id(documents: pl.DataFrame, doc_ids: Sequence[int]) -> dict[int, str]:
    rows = documents.filter(pl.col("doc_id").is_in(list(doc_ids))).select("doc_id", "text")
    return {int(d): t or "" for d, t in rows.iter_rows()}


def split_excerpts(
    split: EvidenceSplit,
    token_activations: pl.DataFrame,
    documents: pl.DataFrame,
    part: str = "evidence",
    *,
    context_chars: int = 150,
) -> tuple[list[Excerpt], list[Excerpt]]:
    """`(positives, negatives)` excerpts of the `evidence` or `heldout` part of a split."""
    if part == "evidence":
        groups = {
            "positive": split.evidence_positive,
            "random_negative": split.evidence_random_negative,
            "hard_negative": split.evidence_hard_negative,
        }
    elif part == "heldout":
        groups = {
            "positive": split.heldout_positive,
            "random_negative": split.heldout_random_negative,
            "hard_negative": split.heldout_hard_negative,
        }
    else:
        raise ValueError(f"part must be 'evidence' or 'heldout'; got {part!r}.")
    all_ids = [d for ids in groups.values() for d in ids]
    texts = texts_by_id(documents, all_ids)
    spans = active_token_spans(token_activations, split.feature, groups["positive"])
    out: dict[str, list[Excerpt]] = {}
    for role, ids in groups.items():
        out[role] = [
            make_excerpt(
                d,
                texts[d],
                spans.get(d, []) if role == "positive" else [],
                role,
                context_chars=context_chars,
                seed=split.seed,
            )
            for d in ids
            if d in texts
        ]
    return out["positive"], out["random_negative"] + out["hard_negative"]
