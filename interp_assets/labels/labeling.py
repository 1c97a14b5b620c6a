"""Feature labeling: evidence/held-out splits, marked excerpts, offline/LLM/published labels, a cache.

The labeler only ever sees the *evidence* half of a feature's documents; the scorer only the *held-out*
half. Which half a document is in depends only on `(doc_hash, feature, seed)`, so the split is stable
when a dataset grows, and `evidence_hash` (with `sae_id`, `feature` and the labeler) keys the cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import polars as pl

from interp_assets.analysis.reports import ELLIPSIS, highlight_text, merge_spans

Messages = list[dict[str, Any]]

OFFLINE_SOURCE = "offline:log-odds"
PROMPT_VERSION = "label-prompt-v1"
SPLIT_VERSION = 1
CORE_DOC_COLUMNS = frozenset({"dataset", "doc_id", "doc_hash", "text", "source_file", "source_row"})

FEATURE_LABELS_SCHEMA: dict[str, pl.DataType] = {
    "dataset": pl.String(),
    "feature": pl.Int32(),
    "label": pl.String(),
    "description": pl.String(),
    "source": pl.String(),
    "selected_because": pl.String(),
    "evidence_doc_ids": pl.List(pl.Int32()),
    "evidence_hash": pl.String(),
    "sae_id": pl.String(),
}
PUBLISHED_SCHEMA: dict[str, pl.DataType] = {
    "feature": pl.Int32(),
    "label": pl.String(),
    "description": pl.String(),
    "source": pl.String(),
}


class ChatClient(Protocol):
    """What labeling and scoring need from an LLM client (`resources.llm.LLMResource` is one)."""

    model: str | None

    @property
    def enabled(self) -> bool: ...

    def map_chat(self, requests: Sequence[Messages]) -> list[str | Exception]: ...


@dataclass(frozen=True)
class Label:
    """A feature's name, one-sentence description, and who wrote it."""

    label: str
    description: str
    source: str


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


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def unit_hash(doc_hash64: np.ndarray, feature: int, seed: int) -> np.ndarray:
    """Deterministic uniform [0, 1) value per document from (doc_hash, feature, seed)."""
    key = _mix64(np.array([(int(feature) & 0xFFFFFFFF) << 32 | (int(seed) & 0xFFFFFFFF)], dtype=np.uint64))
    mixed = _mix64(doc_hash64.astype(np.uint64) ^ key)
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
            f"token_activations frame is missing column(s) {missing}; pass the token_activations table "
            f"(columns {', '.join(need)}, ...)."
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

    A document is in the evidence pool when `unit_hash(doc_hash, feature, seed) < n_evidence /
    (n_evidence + n_holdout)`, else in the held-out pool; this holds for positives and negatives alike.
    Evidence: the `n_evidence` top-activating positives of the evidence pool and `n_evidence` negatives.
    Held-out: `n_holdout` positives spread over `n_quantiles` activation quantiles and `n_holdout`
    negatives. With `embeddings` (row i = document at row i of `documents`, computed once per dataset)
    a `hard_negative_fraction` of each negative set are the non-activating documents of that pool most
    similar to that side's positives; the rest are random.
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
        .agg(pl.col("activation").max().alias("max_activation"))
        .with_columns(pl.col("doc_id").cast(pl.Int32))
    )
    frame = (
        docs.select("doc_id", "doc_hash", "text", "_row", "_h64")
        .with_columns(pl.Series("u", unit_hash(docs["_h64"].to_numpy(), feature, seed)))
        .join(per_doc, on="doc_id", how="left")
        .with_columns((pl.col("u") < threshold).alias("evidence_pool"))
    )
    pos = frame.filter(pl.col("max_activation").is_not_null())
    neg = frame.filter(pl.col("max_activation").is_null() & (pl.col("text").str.strip_chars() != ""))

    ev_pos = (
        pos.filter("evidence_pool").sort(["max_activation", "u"], descending=[True, False]).head(n_evidence)
    )
    ho_pool = pos.filter(~pl.col("evidence_pool"))
    ho_pos = _quantile_sample(ho_pool, n_holdout, n_quantiles)

    use_hard = embeddings is not None
    ev_neg_pool = neg.filter("evidence_pool").sort("u")
    ho_neg_pool = neg.filter(~pl.col("evidence_pool")).sort("u")
    n_hard_ev = round(n_evidence * hard_negative_fraction) if use_hard else 0
    n_hard_ho = round(n_holdout * hard_negative_fraction) if use_hard else 0
    ev_hard = _hard_negatives(ev_neg_pool, ev_pos, embeddings, n_hard_ev)
    ho_hard = _hard_negatives(ho_neg_pool, ho_pos, embeddings, n_hard_ho)
    ev_rand = ev_neg_pool.join(ev_hard, on="doc_id", how="anti").head(n_evidence - ev_hard.height)
    ho_rand = ho_neg_pool.join(ho_hard, on="doc_id", how="anti").head(n_holdout - ho_hard.height)
    background = ev_neg_pool.join(pl.concat([ev_hard, ev_rand]), on="doc_id", how="anti").head(n_background)

    shown = {
        "evidence_positive": ev_pos,
        "evidence_random_negative": ev_rand,
        "evidence_hard_negative": ev_hard,
    }
    payload: dict[str, Any] = {"version": SPLIT_VERSION, "feature": int(feature), "seed": int(seed)}
    payload.update({k: v["doc_hash"].to_list() for k, v in shown.items()})
    evidence_hash = hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=16).hexdigest()

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
    )


def _quantile_sample(pool: pl.DataFrame, n: int, n_quantiles: int) -> pl.DataFrame:
    """Take `n` documents round-robin from `n_quantiles` activation bins (hash order within a bin)."""
    if pool.height <= n:
        return pool.sort(["max_activation", "u"], descending=[True, False])
    bins = max(1, min(n_quantiles, n))
    ranked = pool.sort(["max_activation", "u"]).with_row_index("rank")
    ranked = ranked.with_columns((pl.col("rank") * bins // pool.height).alias("bin"))
    ranked = ranked.with_columns(pl.col("u").rank("ordinal").over("bin").alias("within"))
    picked = ranked.sort(["within", "bin"], descending=[False, True]).head(n)
    return picked.drop("rank", "bin", "within").sort(["max_activation", "u"], descending=[True, False])


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
) -> dict[int, EvidenceSplit]:
    """`split_evidence` for many features, preparing documents and partitioning activations once."""
    _check_activations(token_activations)
    docs = prepare_documents(documents)
    if embeddings is not None and embeddings.shape[0] != docs.height:
        raise ValueError(
            f"embeddings has {embeddings.shape[0]} rows but documents has {docs.height}; row i of the "
            "embeddings must be the document at row i (compute them from documents['text'])."
        )
    wanted = [int(f) for f in dict.fromkeys(features)]
    acts = token_activations.filter(pl.col("feature").is_in(wanted))
    parts = {int(k[0]): v for k, v in acts.partition_by("feature", as_dict=True).items()}
    empty = token_activations.head(0)
    return {
        f: _split(
            docs,
            parts.get(f, empty),
            f,
            n_evidence,
            n_holdout,
            seed,
            embeddings,
            hard_negative_fraction,
            n_background,
            n_quantiles,
        )
        for f in wanted
    }


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

    `token_spans` are `(char_start, char_end, activation)` of the active tokens in the whole text; the
    excerpt keeps those inside the window, merged. `…` marks where the text was trimmed.
    """
    spans = [(s, e, a) for s, e, a in token_spans if e > s]
    if spans:
        a_start, a_end, _ = max(spans, key=lambda t: (t[2], -t[0]))
        start, end = max(0, a_start - context_chars), min(len(text), a_end + context_chars)
        start, end = _window(text, start, end, a_start, a_end)
    else:
        size = 2 * context_chars + 20
        if len(text) <= size:
            start, end = 0, len(text)
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


def _token_spans(
    token_activations: pl.DataFrame, feature: int, doc_ids: Sequence[int]
) -> dict[int, list[tuple[int, int, float]]]:
    rows = token_activations.filter(
        (pl.col("feature") == feature) & pl.col("doc_id").is_in(list(doc_ids))
    ).select("doc_id", "char_start", "char_end", "activation")
    spans: dict[int, list[tuple[int, int, float]]] = {}
    for d, s, e, a in rows.iter_rows():
        spans.setdefault(int(d), []).append((int(s), int(e), float(a)))
    return spans


def _texts(documents: pl.DataFrame, doc_ids: Sequence[int]) -> dict[int, str]:
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
    texts = _texts(documents, all_ids)
    spans = _token_spans(token_activations, split.feature, groups["positive"])
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


# --------------------------------------------------------------------------------------------------
# Offline labeler: weighted log-odds with an informative Dirichlet prior


WORD_RE = re.compile(r"\w+|[^\w\s]")


def log_odds_z(y_fg: np.ndarray, y_bg: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """z-scored log-odds ratio of each term, foreground vs background, with Dirichlet prior `alpha`.

    Monroe, Colaresi & Quinn (2008), eq. 16-22: delta_w = log((y_fg+a)/(n_fg+a0-y_fg-a))
    - log((y_bg+a)/(n_bg+a0-y_bg-a)), var ~= 1/(y_fg+a) + 1/(y_bg+a), z = delta / sqrt(var).
    """
    y_fg, y_bg, alpha = (np.asarray(x, dtype=np.float64) for x in (y_fg, y_bg, alpha))
    n_fg, n_bg, a0 = y_fg.sum(), y_bg.sum(), alpha.sum()
    delta = np.log((y_fg + alpha) / (n_fg + a0 - y_fg - alpha)) - np.log(
        (y_bg + alpha) / (n_bg + a0 - y_bg - alpha)
    )
    return delta / np.sqrt(1.0 / (y_fg + alpha) + 1.0 / (y_bg + alpha))


def _ranked_terms(
    fg: Counter[str], bg: Counter[str], prior_strength: float, min_count: int
) -> list[tuple[str, float]]:
    vocab = sorted(set(fg) | set(bg))
    if not fg or not vocab:
        return []
    y_fg = np.array([fg.get(w, 0) for w in vocab], dtype=np.float64)
    y_bg = np.array([bg.get(w, 0) for w in vocab], dtype=np.float64)
    pooled = y_fg + y_bg
    alpha = prior_strength * pooled / pooled.sum()
    z = log_odds_z(y_fg, y_bg, alpha)
    ranked = [(vocab[i], float(z[i])) for i in np.argsort(-z, kind="stable") if y_fg[i] >= min_count]
    return ranked


def _words(text: str) -> list[tuple[int, int, str]]:
    return [(m.start(), m.end(), m.group().lower()) for m in WORD_RE.finditer(text)]


def _is_word(term: str) -> bool:
    return any(ch.isalnum() for ch in term)


def _context_terms(words: list[tuple[int, int, str]], window: set[int], active: set[int]) -> set[str]:
    terms = {words[j][2] for j in window if _is_word(words[j][2])}
    terms |= {
        f"{words[j][2]} {words[j + 1][2]}"
        for j in window
        if j + 1 in window and j + 1 not in active and _is_word(words[j][2]) and _is_word(words[j + 1][2])
    }
    return terms


def _all_terms(words: list[tuple[int, int, str]]) -> tuple[set[str], set[str]]:
    unigrams = {w for _, _, w in words}
    grams = {w for w in unigrams if _is_word(w)}
    grams |= {
        f"{a[2]} {b[2]}" for a, b in zip(words, words[1:], strict=False) if _is_word(a[2]) and _is_word(b[2])
    }
    return unigrams, grams


def _metadata_phrase(documents: pl.DataFrame, positives: Sequence[int], background: Sequence[int]) -> str:
    """'mostly in documents with <col> = <value> (...)' for a metadata value over-represented in positives."""
    n_pos = len(positives)
    if n_pos < 5 or not background:
        return ""
    best: tuple[float, str] | None = None
    pos_ids, bg_ids = list(positives), list(background)
    subset = documents.filter(pl.col("doc_id").is_in(pos_ids + bg_ids))
    for col, dtype in subset.schema.items():
        if col in CORE_DOC_COLUMNS or col.startswith("_"):
            continue
        if not (
            dtype.is_integer()
            or dtype in (pl.String, pl.Boolean, pl.Categorical)
            or isinstance(dtype, pl.Enum)
        ):
            continue
        values = subset.select("doc_id", col)
        if values[col].n_unique() > 20 or values[col].n_unique() < 2:
            continue
        pos_vals = values.filter(pl.col("doc_id").is_in(pos_ids))[col].drop_nulls().to_list()
        bg_vals = values.filter(pl.col("doc_id").is_in(bg_ids))[col].to_list()
        for value, count in Counter(pos_vals).items():
            share, bg_share = count / n_pos, bg_vals.count(value) / len(bg_vals)
            if share >= 0.6 and share >= 1.5 * bg_share:
                phrase = (
                    f"mostly in documents with {col} = {value} ({count} of {n_pos} examples, "
                    f"vs {bg_share:.0%} of other documents)"
                )
                if best is None or share - bg_share > best[0]:
                    best = (share - bg_share, phrase)
    return best[1] if best else ""


def offline_label(
    token_activations: pl.DataFrame,
    documents: pl.DataFrame,
    split: EvidenceSplit,
    *,
    context_words: int = 2,
    max_terms: int = 3,
    prior_strength: float = 100.0,
    min_z: float = 1.0,
    context_min_z: float = 3.0,
    context_min_share: float = 0.25,
) -> Label:
    """Deterministic contrastive label from the evidence split only.

    Ranks (a) the words the feature fires on (word pieces merged into whole words by character
    offsets) and (b) unigrams/bigrams within `context_words` words of them, each against the same
    terms in non-activating evidence-pool documents, by weighted log-odds with an informative Dirichlet
    prior; the label is the top 1-`max_terms` firing words with z >= `min_z` (context terms if none
    stands out). Context terms are named when z >= `context_min_z` and they occur near the activation
    in >= `context_min_share` of the evidence documents.
    """
    positives = list(split.evidence_positive)
    if not positives:
        return Label(
            "(inactive)",
            f"Feature {split.feature} does not fire on any document of this dataset.",
            OFFLINE_SOURCE,
        )
    background = (
        list(split.background) + list(split.evidence_random_negative) + list(split.evidence_hard_negative)
    )
    texts = _texts(documents, positives + background)
    spans = _token_spans(token_activations, split.feature, positives)

    fg_active: Counter[str] = Counter()
    fg_context: Counter[str] = Counter()
    active_by_doc: dict[int, set[str]] = {}
    for d in positives:
        words = _words(texts.get(d, ""))
        starts = [w[0] for w in words]
        active: set[int] = set()
        for s, e, _ in spans.get(d, []):
            i = max(0, np.searchsorted(starts, s, side="right") - 1)
            while i < len(words) and words[i][0] < e:
                if words[i][1] > s:
                    active.add(i)
                i += 1
        window = {
            j
            for i in active
            for j in range(i - context_words, i + context_words + 1)
            if 0 <= j < len(words) and j not in active
        }
        active_by_doc[d] = {words[i][2] for i in active}
        fg_active.update(active_by_doc[d])
        fg_context.update(_context_terms(words, window, active))
    bg_unigrams: Counter[str] = Counter()
    bg_grams: Counter[str] = Counter()
    for d in background:
        unigrams, grams = _all_terms(_words(texts.get(d, "")))
        bg_unigrams.update(unigrams)
        bg_grams.update(grams)

    n_pos = len(positives)
    active_ranked = _ranked_terms(fg_active, bg_unigrams, prior_strength, 1 if n_pos < 10 else 2)
    context_ranked = _ranked_terms(
        fg_context, bg_grams, prior_strength, max(2, math.ceil(context_min_share * n_pos))
    )
    top = _top_terms(active_ranked, max_terms, min_z)
    near = [t for t in _top_terms(context_ranked, 2, context_min_z) if t not in top]
    meta = _metadata_phrase(documents, positives, background)

    if top:
        label = ", ".join(top)
        covered = sum(1 for d in positives if active_by_doc.get(d, set()) & set(top))
        sentence = f"Fires on {_quoted(top)}"
        if near:
            sentence += f" (and nearby {_quoted(near)})"
        sentence += f"; {covered} of {len(positives)} top examples"
    elif near:
        label = "near " + ", ".join(near)
        sentence = f"Fires on varied words next to {_quoted(near)}"
    else:
        words = [w for w, _ in active_ranked[:max_terms]]
        label = ", ".join(words) if words else "(no distinctive words)"
        sentence = (
            (
                f"Fires on varied words ({_quoted(words)} most often) with no term that stands out "
                "against non-activating text"
            )
            if words
            else "Fires on no distinctive words"
        )
    if meta:
        sentence += f", {meta}"
    return Label(label, sentence + ".", OFFLINE_SOURCE)


def _top_terms(ranked: list[tuple[str, float]], k: int, min_z: float) -> list[str]:
    return [t for t, z in ranked[:k] if z >= min_z]


def _quoted(terms: Sequence[str]) -> str:
    return ", ".join(f'"{t}"' for t in terms)


# --------------------------------------------------------------------------------------------------
# LLM labeler


LABEL_SYSTEM_PROMPT = (
    "You name features of a sparse autoencoder trained on a language model's hidden states. A feature "
    "activates on some tokens of some texts. You are shown texts where the feature fires, with the tokens "
    "it fires on marked << like this >>, strongest first, and texts where it does not fire (some were "
    "chosen because they look similar). Find the concept that the marked tokens (and their immediate "
    "context) share and that the non-firing texts lack. Be specific; prefer the concept to the exact "
    "words if several words express it.\n"
    'Answer with one JSON object and nothing else: {"label": "<2-6 words>", "description": "<one sentence '
    'saying what the feature fires on>"}'
)


def build_label_prompt(
    positive_excerpts: Sequence[Excerpt],
    negative_excerpts: Sequence[Excerpt],
    *,
    max_chars: int = 400,
) -> Messages:
    """Chat messages asking an LLM for `{"label", "description"}` from marked and contrastive excerpts."""
    if not positive_excerpts:
        raise ValueError("build_label_prompt needs at least one excerpt where the feature fires.")

    def clip(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= max_chars else text[: max_chars - 1] + "…"

    lines = ["Texts where the feature fires (marked tokens are where it fires):"]
    lines += [f"{i}. {clip(e.marked)}" for i, e in enumerate(positive_excerpts, 1)]
    if negative_excerpts:
        lines += ["", "Texts where the feature does NOT fire anywhere:"]
        lines += [f"{i}. {clip(e.text)}" for i, e in enumerate(negative_excerpts, 1)]
    lines += ["", 'Reply with the JSON object {"label": ..., "description": ...} only.']
    return [{"role": "system", "content": LABEL_SYSTEM_PROMPT}, {"role": "user", "content": "\n".join(lines)}]


class LabelResponseError(ValueError):
    """An LLM answer that does not contain the JSON the prompt asked for."""


_FENCE_RE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


def extract_json(text: str) -> Any:
    """The first JSON object or array in `text`: the whole text, a ``` fenced block, or embedded in prose."""
    if not isinstance(text, str):
        raise LabelResponseError(f"expected the answer text, got {type(text).__name__}.")
    candidates = [text.strip(), *(m.strip() for m in _FENCE_RE.findall(text))]
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except ValueError:
            pass
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[\[{]", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(value, dict | list):
            return value
    raise LabelResponseError(f"no JSON object or array found in the answer: {_snippet(text)}")


def _snippet(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= limit else text[:limit] + "…")


def parse_label_response(text: str) -> tuple[str, str]:
    """`(label, description)` from an LLM answer; tolerates code fences and prose around the JSON.

    Raises `LabelResponseError` (with a snippet of the answer) when there is no JSON object with a
    non-empty `label`.
    """
    value = extract_json(text)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, dict):
        raise LabelResponseError(f"the answer's JSON is not an object with a 'label': {_snippet(text)}")
    lowered = {str(k).lower(): v for k, v in value.items()}
    label = next((lowered[k] for k in ("label", "name", "title") if isinstance(lowered.get(k), str)), "")
    description = next(
        (lowered[k] for k in ("description", "explanation") if isinstance(lowered.get(k), str)), ""
    )
    label, description = " ".join(label.split()), " ".join(description.split())
    if not label:
        raise LabelResponseError(f"the answer's JSON has no non-empty 'label': {_snippet(text)}")
    if len(label) > 120:
        raise LabelResponseError(
            f"the answer's label is {len(label)} characters, not a short name: {_snippet(text)}"
        )
    return label, description


# --------------------------------------------------------------------------------------------------
# Published labels


def load_published_labels(path: str | os.PathLike[str]) -> pl.DataFrame:
    """Read published labels: Neuronpedia-style JSON (a list of objects with `index`/`feature` and
    `description`/`explanation`/`label`), JSONL, or CSV/Parquet with `feature` and `label` columns.

    Returns `feature, label, description, source` with source `published:<file name>`; the first label
    of a feature wins.
    """
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise FileNotFoundError(f"published labels file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(
                f"{name}: not valid JSON ({exc}); export a JSON list of label objects."
            ) from None
        if isinstance(data, dict):
            key = next(
                (k for k in ("explanations", "features", "labels", "data") if isinstance(data.get(k), list)),
                None,
            )
            if key is None:
                raise ValueError(
                    f"{name}: expected a JSON list of objects (or an object with an 'explanations' list); "
                    f"got an object with keys {sorted(data)[:10]}."
                )
            data = data[key]
        if not isinstance(data, list):
            raise ValueError(f"{name}: expected a JSON list of objects, got {type(data).__name__}.")
        records = [(f"item {i}", r) for i, r in enumerate(data)]
    elif suffix in (".jsonl", ".ndjson"):
        records = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"line {n}", json.loads(line)))
            except ValueError as exc:
                raise ValueError(f"{name}: line {n} is not valid JSON ({exc}).") from None
    elif suffix in (".csv", ".parquet"):
        frame = pl.read_csv(path, infer_schema_length=0) if suffix == ".csv" else pl.read_parquet(path)
        first = 2 if suffix == ".csv" else 1  # CSV: data starts on line 2
        records = [
            (f"row {i + first}" if suffix == ".parquet" else f"line {i + first}", r)
            for i, r in enumerate(frame.iter_rows(named=True))
        ]
        if not frame.is_empty() or frame.columns:
            have = {c.lower() for c in frame.columns}
            if not have & {"feature", "index"} or not have & {"label", "description", "explanation"}:
                raise ValueError(
                    f"{name}: needs columns 'feature' and 'label' (optional 'description'); "
                    f"found {frame.columns}."
                )
    else:
        raise ValueError(
            f"{name}: unsupported published-labels format {suffix!r}; use .json, .jsonl, .csv or .parquet."
        )
    rows: dict[int, tuple[str, str]] = {}
    for where, record in records:
        feature, label, description = _published_record(name, where, record)
        rows.setdefault(feature, (label, description))
    return pl.DataFrame(
        {
            "feature": list(rows),
            "label": [v[0] for v in rows.values()],
            "description": [v[1] for v in rows.values()],
            "source": [f"published:{name}"] * len(rows),
        },
        schema=PUBLISHED_SCHEMA,
    )


def _published_record(name: str, where: str, record: Any) -> tuple[int, str, str]:
    if not isinstance(record, dict):
        raise ValueError(
            f"{name}: {where} is a {type(record).__name__}, not an object with 'index' and 'description'."
        )
    lowered = {str(k).lower(): v for k, v in record.items()}
    raw = next((lowered[k] for k in ("feature", "index") if lowered.get(k) not in (None, "")), None)
    if raw is None:
        raise ValueError(
            f"{name}: {where} has no 'feature' or 'index' field; every label needs the index of its feature."
        )
    try:
        feature = int(str(raw).strip())
    except ValueError:
        raise ValueError(f"{name}: {where} has feature index {raw!r}, not an integer.") from None
    texts = {
        k: " ".join(str(lowered[k]).split())
        for k in ("label", "description", "explanation")
        if lowered.get(k) not in (None, "")
    }
    description = texts.get("description") or texts.get("explanation") or ""
    label = texts.get("label") or description
    if not label:
        raise ValueError(
            f"{name}: {where} (feature {feature}) has no 'label', 'description' or 'explanation' text."
        )
    return feature, label, description or label


# --------------------------------------------------------------------------------------------------
# Cache


class LabelCache:
    """Labels keyed by `(sae_id, feature, evidence_hash, labeler)` in one Parquet (or `.json`) file.

    Writes go to a temporary file in the same folder, then replace the cache file atomically.
    """

    COLUMNS = ("sae_id", "feature", "evidence_hash", "labeler", "label", "description", "source")

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._json = self.path.suffix.lower() == ".json"
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, int, str, str], Label] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            if self._json:
                rows = json.loads(self.path.read_text(encoding="utf-8"))
            else:
                rows = pl.read_parquet(self.path).to_dicts()
            for r in rows:
                key = (str(r["sae_id"]), int(r["feature"]), str(r["evidence_hash"]), str(r["labeler"]))
                self._entries[key] = Label(str(r["label"]), str(r["description"]), str(r["source"]))
        except Exception as exc:  # noqa: BLE001 - any unreadable cache gets the same advice
            raise ValueError(
                f"label cache {str(self.path)!r} is unreadable ({type(exc).__name__}: {exc}); delete it to "
                "start an empty cache (labels will be requested again)."
            ) from None

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, sae_id: str, feature: int, evidence_hash: str, labeler: str) -> Label | None:
        """The cached label, or None."""
        return self._entries.get((sae_id, int(feature), evidence_hash, labeler))

    def put(self, sae_id: str, feature: int, evidence_hash: str, labeler: str, label: Label) -> None:
        """Store one label and write the file."""
        self.put_many([(sae_id, feature, evidence_hash, labeler, label)])

    def put_many(self, entries: Iterable[tuple[str, int, str, str, Label]]) -> None:
        """Store labels and write the file once."""
        with self._lock:
            for sae_id, feature, evidence_hash, labeler, label in entries:
                self._entries[(sae_id, int(feature), evidence_hash, labeler)] = label
            self._write()

    def _write(self) -> None:
        rows = [
            {
                "sae_id": k[0],
                "feature": k[1],
                "evidence_hash": k[2],
                "labeler": k[3],
                "label": v.label,
                "description": v.description,
                "source": v.source,
            }
            for k, v in sorted(self._entries.items())
        ]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                if self._json:
                    fh.write(json.dumps(rows, indent=1, ensure_ascii=False).encode("utf-8"))
                else:
                    schema = {c: pl.String() for c in self.COLUMNS} | {"feature": pl.Int32()}
                    pl.DataFrame(rows, schema=schema).write_parquet(fh)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# --------------------------------------------------------------------------------------------------
# Orchestration


def llm_labeler_id(model: str | None) -> str:
    """Cache key of the LLM labeler: model and prompt version (a new prompt is a new labeler)."""
    return f"llm:{model}#{PROMPT_VERSION}"


def label_features(
    token_activations: pl.DataFrame,
    documents: pl.DataFrame,
    features: Sequence[int],
    *,
    dataset: str,
    sae_id: str,
    embeddings: np.ndarray | None = None,
    published: pl.DataFrame | None = None,
    llm: ChatClient | None = None,
    cache: LabelCache | None = None,
    selected_because: Mapping[int, str] | None = None,
    n_evidence: int = 20,
    n_holdout: int = 40,
    seed: int = 0,
    context_chars: int = 150,
    errors: list[str] | None = None,
) -> pl.DataFrame:
    """Label `features`: published labels first, then the cache, then the LLM (if enabled), else offline.

    Returns the feature_labels table. A feature whose LLM request fails (bad answer, HTTP error, budget
    spent) gets its offline label instead (source says so) and a message appended to `errors`; the
    other features' answers are kept and cached.
    """
    splits = split_features(
        token_activations,
        documents,
        features,
        n_evidence=n_evidence,
        n_holdout=n_holdout,
        seed=seed,
        embeddings=embeddings,
    )
    published_by_feature: dict[int, Label] = {}
    if published is not None:
        for f, lab, desc, src in published.select("feature", "label", "description", "source").iter_rows():
            published_by_feature.setdefault(int(f), Label(lab, desc or lab, src))
    use_llm = llm is not None and llm.enabled
    labeler = llm_labeler_id(llm.model) if use_llm else OFFLINE_SOURCE
    labels: dict[int, Label] = {}
    pending: dict[int, Messages] = {}
    for f, split in splits.items():
        if f in published_by_feature:
            labels[f] = published_by_feature[f]
        elif use_llm and split.evidence_positive:
            cached = cache.get(sae_id, f, split.evidence_hash, labeler) if cache is not None else None
            if cached is not None:
                labels[f] = cached
            else:
                pos, neg = split_excerpts(
                    split, token_activations, documents, "evidence", context_chars=context_chars
                )
                pending[f] = build_label_prompt(pos, neg)
    if pending:
        answers = llm.map_chat(list(pending.values()))
        fresh = []
        for f, answer in zip(pending, answers, strict=True):
            try:
                if isinstance(answer, Exception):
                    raise answer
                label, description = parse_label_response(answer)
            except Exception as exc:  # noqa: BLE001 - recorded per feature, others kept
                if errors is not None:
                    errors.append(f"feature {f}: LLM label failed, offline label used instead: {exc}")
                continue
            labels[f] = Label(label, description, f"llm:{llm.model}")
            fresh.append((sae_id, f, splits[f].evidence_hash, labeler, labels[f]))
        if cache is not None and fresh:
            cache.put_many(fresh)
    for f, split in splits.items():
        if f not in labels:
            labels[f] = offline_label(token_activations, documents, split)
    reasons = selected_because or {}
    return pl.DataFrame(
        {
            "dataset": [dataset] * len(splits),
            "feature": list(splits),
            "label": [labels[f].label for f in splits],
            "description": [labels[f].description for f in splits],
            "source": [labels[f].source for f in splits],
            "selected_because": [reasons.get(f, "requested") for f in splits],
            "evidence_doc_ids": [s.evidence_doc_ids for s in splits.values()],
            "evidence_hash": [s.evidence_hash for s in splits.values()],
            "sae_id": [sae_id] * len(splits),
        },
        schema=FEATURE_LABELS_SCHEMA,
    )
