"""Feature labels: offline (contrastive weighted log-odds), LLM and published labelers, and the label cache.

Labelers see only a feature's evidence documents (`interp_assets.labels.evidence`); the cache is keyed by
`(sae_id, feature, labeler, evidence_hash)`.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import polars as pl

from interp_assets.labels.answers import (
    AnswerError,
    ask_and_read,
    failure_status,
    json_status,
    looks_like_refusal,
    restates_prompt,
)
from interp_assets.labels.evidence import (
    CORE_DOC_COLUMNS,
    EvidenceSplit,
    Excerpt,
    active_token_spans,
    split_excerpts,
    split_features,
    texts_by_id,
)
from interp_assets.storage.cache_files import load_cache_file, parquet_frame, write_cache_file
from interp_assets.storage.parquet import parquet_bytes

Messages = list[dict[str, Any]]

OFFLINE_SOURCE = "offline:log-odds"
OFFLINE_VERSION = "3"  # bumped when offline_label's output changes for the same inputs
PROMPT_VERSION = "label-prompt-v2"  # 2: excerpt windows of one size, length-matched held-out negatives

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
    "status": pl.String(),
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
    status: str = "ok"  # of the LLM answer it came from (`interp_assets.labels.answers`)


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


def _most_common(counts: Counter[str], k: int) -> list[str]:
    """The `k` most counted terms, ties in alphabetical order: `Counter.most_common` breaks ties by
    insertion order, which follows the iteration order of the sets counted, so it differed between
    processes (Python's string hashing is salted per process) and a worker labeled differently."""
    return [t for t, _ in sorted(counts.items(), key=lambda tc: (-tc[1], tc[0]))[:k]]


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


# English function words: a label made only of these describes syntax, not a topic, and says so
FUNCTION_WORDS = frozenset(
    """a an the this that these those i me my mine we us our you your he him his she her it its they them
    their what which who whom whose and or but nor so yet if then than because as while although though
    of in on at by for with about against between into through during before after above below to from up
    down out off over under again further once here there when where why how all any both each few more
    most other some such no not only own same too very can will just should would could may might must
    shall do does did doing done be is am are was were been being have has had having s t n't 's 're 've
    'll 'd also even""".split()
)
SYNTAX_LABEL = "syntax: function words"
POSITION_LABEL = "position: first token"


def _is_function_term(term: str) -> bool:
    """A function word, a phrase of function words, or punctuation."""
    parts = term.split()
    return all(p in FUNCTION_WORDS or not _is_word(p) for p in parts)


def _is_word(term: str) -> bool:
    return any(ch.isalnum() for ch in term)


def _is_topic_word(term: str) -> bool:
    """A content word that can name a theme: not a function word, not a number, at least 3 letters."""
    return len(term) >= 3 and term.isalpha() and term not in FUNCTION_WORDS


def is_stopword_label(label: str) -> bool:
    """True for a label that is only function words and punctuation ("i, the, and"): it names no meaning.

    Explicit `syntax: ...` and `position: ...` labels say what they are and are not stopword labels.
    """
    text = label.strip().lower()
    if text.startswith(("syntax:", "position:")):
        return False
    words = WORD_RE.findall(text)
    return bool(words) and all(_is_function_term(w) for w in words)


def _active_indices(words: list[tuple[int, int, str]], spans: Sequence[tuple[int, int, float]]) -> set[int]:
    """Indices of the words that overlap an active token span (word pieces merge into their word)."""
    starts = [w[0] for w in words]
    active: set[int] = set()
    for s, e, _ in spans:
        i = max(0, int(np.searchsorted(starts, s, side="right")) - 1)
        while i < len(words) and words[i][0] < e:
            if words[i][1] > s:
                active.add(i)
            i += 1
    return active


def _ngrams(words: list[tuple[int, int, str]], sizes: Sequence[int] = (2, 3)) -> set[str]:
    """Every n-gram of whole words (no punctuation inside) of the given sizes."""
    out: set[str] = set()
    for n in sizes:
        for i in range(len(words) - n + 1):
            grams = [w for _, _, w in words[i : i + n]]
            if all(_is_word(g) for g in grams):
                out.add(" ".join(grams))
    return out


def _phrases_around(words: list[tuple[int, int, str]], active: set[int]) -> set[str]:
    """The 2- and 3-word n-grams (of whole words) that contain an active word."""
    out: set[str] = set()
    for i in active:
        for n in (2, 3):
            for start in range(max(0, i - n + 1), min(i, len(words) - n) + 1):
                grams = [w for _, _, w in words[start : start + n]]
                if all(_is_word(g) for g in grams):
                    out.add(" ".join(grams))
    return out


@lru_cache(maxsize=65_536)
def _document_terms(text: str) -> tuple[frozenset[str], frozenset[str]]:
    """A document's distinct words (and punctuation) and its 2-3-word n-grams (cached: background
    documents recur across features)."""
    words = _words(text)
    return frozenset(w for _, _, w in words), frozenset(_ngrams(words))


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
    max_terms: int = 3,
    prior_strength: float = 100.0,
    min_z: float = 1.0,
    phrase_min_z: float = 3.0,
    phrase_min_share: float = 0.25,
    topic_min_z: float = 3.0,
    topic_min_share: float = 0.3,
    position_share: float = 0.8,
) -> Label:
    """Deterministic contrastive label from the evidence split only.

    Every term is ranked by weighted log-odds with an informative Dirichlet prior, the evidence positives
    against the non-activating evidence documents (hard negatives and background), counted once per
    document. The label has up to two parts, joined by "; ":
    - what it fires on: the top firing words with z >= `min_z` (word pieces merged into whole words), a
      quoted phrase (2-3 words around an active word, z >= `phrase_min_z`, in >= `phrase_min_share` of the
      positives) when it adds a content word (a feature on "for" in "sorry for"); function words alone
      are not listed as a meaning but named `syntax: function words (the, of)`; a feature that fires on
      the first word of >= `position_share` of its texts, whatever the word, is `position: first token`;
    - `topic: ...`: content words of the whole documents (z >= `topic_min_z`, in >= `topic_min_share` of
      the positives) when the documents share a theme.
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
    texts = texts_by_id(documents, positives + background)
    spans = active_token_spans(token_activations, split.feature, positives)

    fg_active: Counter[str] = Counter()
    fg_phrases: Counter[str] = Counter()
    fg_doc: Counter[str] = Counter()
    active_by_doc: dict[int, set[str]] = {}
    first_only = 0
    for d in positives:
        words = _words(texts.get(d, ""))
        active = _active_indices(words, spans.get(d, []))
        first_only += bool(active) and active == {0}
        active_by_doc[d] = {words[i][2] for i in active}
        fg_active.update(active_by_doc[d])
        fg_phrases.update(_phrases_around(words, active))
        fg_doc.update(_document_terms(texts.get(d, ""))[0])
    bg_words: Counter[str] = Counter()
    bg_grams: Counter[str] = Counter()
    for d in background:
        unigrams, grams = _document_terms(texts.get(d, ""))
        bg_words.update(unigrams)
        bg_grams.update(grams)

    n_pos = len(positives)
    meta = _metadata_phrase(documents, positives, background)
    common = _most_common(fg_active, max_terms)
    varied_first = len(fg_active) >= 3 and fg_active[common[0]] <= 0.5 * n_pos
    if first_only >= position_share * n_pos and varied_first:
        sentence = (
            f"Fires on the first word of the text in {first_only} of {n_pos} top examples, whatever the "
            f"word ({_quoted(common)} most often): a position feature"
        )
        return Label(POSITION_LABEL, sentence + (f", {meta}" if meta else "") + ".", OFFLINE_SOURCE)

    active_ranked = _ranked_terms(fg_active, bg_words, prior_strength, 1 if n_pos < 10 else 2)
    top = _top_terms(active_ranked, max_terms, min_z)
    content = [t for t in top if not _is_function_term(t)]
    min_docs = max(2, math.ceil(min(phrase_min_share, topic_min_share) * n_pos))
    doc_z = dict(_ranked_terms(fg_doc, bg_words, prior_strength, min_docs))
    phrase_ranked = _ranked_terms(
        fg_phrases, bg_grams, prior_strength, max(2, math.ceil(phrase_min_share * n_pos))
    )
    phrase = next(  # named when it adds a distinctive content word to the firing words
        (
            t
            for t, z in phrase_ranked
            if z >= phrase_min_z
            and any(
                not _is_function_term(w) and w not in content and doc_z.get(w, 0.0) >= phrase_min_z
                for w in t.split()
            )
        ),
        "",
    )
    fires: list[str] = [f'"{phrase}"'] if phrase else []
    fires += [t for t in content if t not in phrase.split()][: max_terms - len(fires)]
    named = {w for item in fires for w in item.strip('"').split()}
    topic = [
        t
        for t, z in sorted(doc_z.items(), key=lambda tz: (-tz[1], tz[0]))
        if z >= topic_min_z and _is_topic_word(t) and t not in named and fg_doc[t] >= topic_min_share * n_pos
    ][:max_terms]

    parts: list[str] = []
    if fires:
        parts.append(", ".join(fires))
        covered = sum(1 for d in positives if active_by_doc[d] & (set(content) | set(phrase.split())))
        sentence = f"Fires on {_quoted([t.strip(chr(34)) for t in fires])}; {covered} of {n_pos} top examples"
    else:
        syntax = top or _most_common(fg_active, max_terms)
        if syntax and all(_is_function_term(t) for t in syntax):
            parts.append(f"{SYNTAX_LABEL} ({', '.join(syntax)})")
            covered = sum(1 for d in positives if active_by_doc[d] & set(syntax))
            sentence = (
                f"Fires on function words ({_quoted(syntax)}), a grammatical rather than topical feature; "
                f"{covered} of {n_pos} top examples"
            )
        else:
            varied = [t for t in syntax if not _is_function_term(t)]
            sentence = (
                f"Fires on varied words ({_quoted(varied)} most often) with no term that stands out "
                "against non-activating text"
                if varied
                else "Fires on no distinctive words"
            )
    if topic:
        parts.append("topic: " + ", ".join(topic))
        share = sum(1 for d in positives if set(topic) & _document_terms(texts.get(d, ""))[0])
        sentence += f"; the texts share a theme ({_quoted(topic)}; {share} of {n_pos} name one)"
    label = "; ".join(parts) or "(no distinctive words)"
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


class LabelResponseError(AnswerError):
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


def read_label_answer(text: str, messages: Messages) -> tuple[str, str, str]:
    """`(label, description, status)` from an LLM answer to `messages`; status `ok` (bare JSON) or
    `parsed_from_prose`. Raises `LabelResponseError` with status `refused`, `restated_prompt` or
    `invalid`."""
    try:
        label, description = parse_label_response(text)
    except LabelResponseError:
        if isinstance(text, str) and looks_like_refusal(text):
            raise LabelResponseError(f"the model refused: {_snippet(text)}", "refused") from None
        raise
    if looks_like_refusal(label):
        raise LabelResponseError(f"the model refused in its label: {_snippet(text)}", "refused")
    if restates_prompt(label, messages):
        raise LabelResponseError(
            f"the label {label!r} restates the prompt instead of naming a concept", "restated_prompt"
        )
    return label, description, json_status(text)


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

    COLUMNS = ("sae_id", "feature", "evidence_hash", "labeler", "label", "description", "source", "status")

    def __init__(self, path: str | os.PathLike[str], on_warning: Callable[[str], None] | None = None):
        self.path = Path(path)
        self._json = self.path.suffix.lower() == ".json"
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, int, str, str], Label] = (
            load_cache_file(self.path, self._parse, "label cache", on_warning) or {}
        )

    def _parse(self, payload: bytes) -> dict[tuple[str, int, str, str], Label]:
        if self._json:
            rows = json.loads(payload.decode("utf-8"))
        else:
            rows = parquet_frame(payload).to_dicts()
        entries = {}
        for r in rows:
            key = (str(r["sae_id"]), int(r["feature"]), str(r["evidence_hash"]), str(r["labeler"]))
            entries[key] = Label(
                str(r["label"]), str(r["description"]), str(r["source"]), str(r.get("status") or "ok")
            )
        return entries

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
                "status": v.status,
            }
            for k, v in sorted(self._entries.items())
        ]
        if self._json:
            payload = json.dumps(rows, indent=1, ensure_ascii=False).encode("utf-8")
        else:
            schema = {c: pl.String() for c in self.COLUMNS} | {"feature": pl.Int32()}
            payload = parquet_bytes(pl.DataFrame(rows, schema=schema).to_arrow())
        write_cache_file(self.path, payload)


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
    counts: dict[str, int] | None = None,
) -> pl.DataFrame:
    """Label `features`: published labels first, then the cache, then the LLM (if enabled), else offline.

    Returns the feature_labels table. A feature whose LLM request fails (bad answer, HTTP error, budget
    spent) gets its offline label instead (source says so; `status` says what happened, see
    `interp_assets.labels.answers`) and a message appended to `errors`; the other features' answers are
    kept and cached. Offline labels are cached too, keyed by everything they
    read (evidence and background documents). `counts` (if given) receives `published`, `from_cache`
    and `computed` (labels written now: LLM answers and offline labels), and `heldout_dropped` (held-out
    documents left out for sharing content with the evidence, all features).
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
    status: dict[int, str] = {}  # of the LLM answer, for features the LLM was asked (or cached) for
    pending: dict[int, Messages] = {}
    tally = {"published": 0, "from_cache": 0, "computed": 0}
    tally["heldout_dropped"] = sum(s.heldout_dropped for s in splits.values())
    for f, split in splits.items():
        if f in published_by_feature:
            labels[f] = published_by_feature[f]
            tally["published"] += 1
        elif use_llm and split.evidence_positive:
            cached = cache.get(sae_id, f, split.evidence_hash, labeler) if cache is not None else None
            if cached is not None:
                labels[f] = cached
                status[f] = cached.status
                tally["from_cache"] += 1
            else:
                pos, neg = split_excerpts(
                    split, token_activations, documents, "evidence", context_chars=context_chars
                )
                pending[f] = build_label_prompt(pos, neg)
    if pending:
        asked = list(pending)
        answers, tally["asked_again"] = ask_and_read(
            llm, list(pending.values()), lambda i, text: read_label_answer(text, pending[asked[i]])
        )
        fresh = []
        for f, answer in zip(asked, answers, strict=True):
            try:
                if isinstance(answer, Exception):
                    raise answer
                label, description, status[f] = answer
            except Exception as exc:  # noqa: BLE001 - recorded per feature, others kept
                status[f] = failure_status(exc)
                if errors is not None:
                    errors.append(
                        f"feature {f}: LLM label failed ({status[f]}), offline label used instead: {exc}"
                    )
                continue
            labels[f] = Label(label, description, f"llm:{llm.model}", status[f])
            fresh.append((sae_id, f, splits[f].evidence_hash, labeler, labels[f]))
            tally["computed"] += 1
        if cache is not None and fresh:
            cache.put_many(fresh)
    offline_fresh = []
    for f, split in splits.items():
        if f in labels:
            continue
        offline_id = f"{OFFLINE_SOURCE}#{OFFLINE_VERSION}:{split.background_hash}"
        cached = cache.get(sae_id, f, split.evidence_hash, offline_id) if cache is not None else None
        if cached is not None:
            labels[f] = cached
            tally["from_cache"] += 1
        else:
            labels[f] = offline_label(token_activations, documents, split)
            offline_fresh.append((sae_id, f, split.evidence_hash, offline_id, labels[f]))
            tally["computed"] += 1
    if cache is not None and offline_fresh:
        cache.put_many(offline_fresh)
    if counts is not None:
        counts.update(tally)
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
            "status": [status.get(f, "ok") for f in splits],
        },
        schema=FEATURE_LABELS_SCHEMA,
    )
