"""Scoring feature labels on held-out documents: metrics, offline embedding scorer, LLM detection and fuzz.

Every scorer sees only the held-out part of a feature's `EvidenceSplit` (never the documents the label
was written from); thresholds of the offline scorer are fitted on the evidence part. Precision is
precision (TP / predicted positives), not 1 - FPR.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from interp_assets.analysis.reports import HEADLINE_METRIC as HEADLINE_METRIC  # re-exported: scores' reading
from interp_assets.analysis.reports import headline_score
from interp_assets.labels.answers import (
    ask_and_read,
    echoes_prompt,
    failure_status,
    json_status,
    looks_like_refusal,
    worst,
)
from interp_assets.labels.embedding import DEFAULT_EMBEDDING_MODEL, sentence_embeddings
from interp_assets.labels.evidence import Excerpt, split_excerpts, split_features
from interp_assets.labels.labeling import WORD_RE, ChatClient, LabelResponseError, Messages, extract_json
from interp_assets.storage.cache_files import load_cache_file, parquet_frame, write_cache_file
from interp_assets.storage.parquet import parquet_bytes

METHODS = ("embedding", "detection", "fuzz")
FEATURE_SCORES_SCHEMA: dict[str, pl.DataType] = {
    "dataset": pl.String(),
    "feature": pl.Int32(),
    "label": pl.String(),
    "method": pl.String(),
    "n_examples": pl.Int32(),
    "n_positive": pl.Int32(),
    "n_negative": pl.Int32(),
    "precision": pl.Float64(),
    "recall": pl.Float64(),
    "f1": pl.Float64(),
    "balanced_accuracy": pl.Float64(),
    "auc": pl.Float64(),
    "f1_ci_low": pl.Float64(),
    "f1_ci_high": pl.Float64(),
    "length_baseline_auc": pl.Float64(),
    "beats_length_baseline": pl.Boolean(),
    "status": pl.String(),
}
METRIC_COLUMNS = tuple(c for c in tuple(FEATURE_SCORES_SCHEMA)[4:] if c != "status")
SCORER_VERSION = (
    "3"  # bumped when a scorer's metrics change (2: length baseline; 3: its direction from evidence)
)


def length_baseline(heldout: Sequence[Excerpt], evidence: Sequence[Excerpt] = ()) -> float | None:
    """AUC of excerpt length alone for telling the held-out positives from the negatives: what a label
    must beat to carry evidence beyond "positives are longer".

    The direction (longer = positive, or shorter) is fitted on the `evidence` excerpts, as the embedding
    scorer's threshold is, not chosen on the held-out ones (which would inflate the baseline); without
    evidence, or when evidence lengths do not tell, longer counts as positive.
    """
    auc = _length_auc(heldout)
    if auc is None:
        return None
    evidence_auc = _length_auc(evidence)
    return 1.0 - auc if evidence_auc is not None and evidence_auc < 0.5 else auc


def _length_auc(excerpts: Sequence[Excerpt]) -> float | None:
    return auc_score(
        np.array([e.is_positive for e in excerpts], dtype=bool),
        np.array([len(e.text) for e in excerpts], dtype=float),
    )


def with_length_baseline(
    metrics: dict[str, Any], heldout: Sequence[Excerpt], evidence: Sequence[Excerpt] = ()
) -> dict[str, Any]:
    """`metrics` plus `length_baseline_auc` and `beats_length_baseline`: the label's headline metric
    (`headline_score`) above the length-only AUC."""
    baseline = length_baseline(heldout, evidence)
    _, ours = headline_score(metrics)
    beats = None if baseline is None or ours is None else bool(ours > baseline)
    return metrics | {"length_baseline_auc": baseline, "beats_length_baseline": beats}


# --------------------------------------------------------------------------------------------------
# Score cache


def score_key(method: str, payload: Any) -> str:
    """Cache key of one score: a hash of the method, the scorer version and everything the scorer read."""
    text = json.dumps([SCORER_VERSION, method, payload], sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


def _parse_scores(payload: bytes) -> dict[str, str]:
    frame = parquet_frame(payload)
    return dict(zip(frame["key"].to_list(), frame["metrics"].to_list(), strict=True))


class ScoreCache:
    """Metrics of finished scores keyed by `score_key`, in one Parquet file (columns key, metrics JSON).

    The key covers the label, the exact held-out (and, for the embedding scorer, evidence) excerpts, the
    scorer's settings and model, so a hit is the same computation. Writes replace the file atomically.
    """

    def __init__(self, path: str | Path, on_warning: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        entries = load_cache_file(self.path, _parse_scores, "score cache", on_warning)
        self._entries: dict[str, str] = entries or {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached metrics, or None."""
        found = self._entries.get(key)
        return json.loads(found) if found is not None else None

    def put_many(self, entries: Mapping[str, Mapping[str, Any]]) -> None:
        """Store metrics and write the file once."""
        if not entries:
            return
        with self._lock:
            for key, metrics in entries.items():
                self._entries[key] = json.dumps({k: metrics.get(k) for k in (*METRIC_COLUMNS, "status")})
            frame = pl.DataFrame(
                {"key": list(self._entries), "metrics": list(self._entries.values())},
                schema={"key": pl.String, "metrics": pl.String},
            )
            write_cache_file(self.path, parquet_bytes(frame.to_arrow()))


# --------------------------------------------------------------------------------------------------
# Metrics


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def auc_score(y_true: np.ndarray, y_score: np.ndarray) -> float | None:
    """ROC AUC as the Mann-Whitney U statistic (ties count one half); None without both classes."""
    y_true = np.asarray(y_true, dtype=bool)
    n_pos, n_neg = int(y_true.sum()), int((~y_true).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    from scipy.stats import rankdata  # imported on first use: loading the definitions stays fast

    ranks = rankdata(np.asarray(y_score, dtype=np.float64))
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def f1_bootstrap_ci(
    y_true: np.ndarray, y_pred: np.ndarray, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of F1 (examples resampled with replacement, seeded, vectorized)."""
    y_true, y_pred = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    n = y_true.size
    if n == 0 or n_boot < 1:
        return None, None
    outcome = (y_true.astype(np.int8) << 1) | y_pred.astype(np.int8)  # 0 tn, 1 fp, 2 fn, 3 tp
    rng = np.random.default_rng(seed)
    f1 = np.empty(n_boot, dtype=np.float64)
    step = max(1, 4_000_000 // n)
    for start in range(0, n_boot, step):
        sample = outcome[rng.integers(0, n, size=(min(step, n_boot - start), n))]
        tp = (sample == 3).sum(axis=1)
        wrong = (sample == 1).sum(axis=1) + (sample == 2).sum(axis=1)
        den = 2 * tp + wrong
        with np.errstate(invalid="ignore", divide="ignore"):
            f1[start : start + sample.shape[0]] = np.where(den > 0, 2 * tp / den, np.nan)
    if np.isnan(f1).all():
        return None, None
    tail = (1.0 - level) / 2 * 100
    low, high = np.nanpercentile(f1, [tail, 100 - tail])
    return float(low), float(high)


def binary_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    y_score: Sequence[float] | np.ndarray | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """precision, recall, f1, balanced_accuracy, auc, n_examples, n_positive, n_negative, f1_ci_low/high.

    A ratio with a zero denominator is None (e.g. precision when nothing is predicted positive); auc is
    None without `y_score` or without both classes; the F1 interval is a seeded 95% percentile bootstrap.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(
            f"y_true and y_pred must be 1-D and the same length; got {y_true.shape} and {y_pred.shape}."
        )
    if not np.isin(y_true, (0, 1)).all() or not np.isin(y_pred, (0, 1)).all():
        raise ValueError("y_true and y_pred must contain only 0 and 1.")
    t, p = y_true.astype(bool), y_pred.astype(bool)
    tp, fp = int((t & p).sum()), int((~t & p).sum())
    fn, tn = int((t & ~p).sum()), int((~t & ~p).sum())
    recall, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    auc = None
    if y_score is not None:
        score = np.asarray(y_score, dtype=np.float64)
        if score.shape != y_true.shape:
            raise ValueError(f"y_score must have the shape of y_true {y_true.shape}; got {score.shape}.")
        auc = auc_score(t, score)
    low, high = f1_bootstrap_ci(t, p, n_boot=n_boot, seed=seed)
    return {
        "precision": _ratio(tp, tp + fp),
        "recall": recall,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "balanced_accuracy": (recall + specificity) / 2
        if recall is not None and specificity is not None
        else None,
        "auc": auc,
        "n_examples": int(t.size),
        "n_positive": int(t.sum()),
        "n_negative": int((~t).sum()),
        "f1_ci_low": low,
        "f1_ci_high": high,
    }


def youden_threshold(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Threshold maximizing TPR - FPR (predict positive when score >= threshold); ties: the highest."""
    y_true = np.asarray(y_true, dtype=bool)
    score = np.asarray(y_score, dtype=np.float64)
    if score.size == 0:
        raise ValueError("cannot choose a threshold from no examples.")
    values = np.unique(score)
    candidates = np.concatenate(
        [[values[0]], (values[:-1] + values[1:]) / 2, [np.nextafter(values[-1], np.inf)]]
    )
    pred = score[None, :] >= candidates[:, None]
    n_pos, n_neg = max(1, int(y_true.sum())), max(1, int((~y_true).sum()))
    j = (pred & y_true).sum(axis=1) / n_pos - (pred & ~y_true).sum(axis=1) / n_neg
    best = np.flatnonzero(j == j.max())
    return float(candidates[best[-1]])


# --------------------------------------------------------------------------------------------------
# Offline scorer: sentence-embedding similarity to the label


def label_query(label: str, description: str) -> str:
    """The text a label is embedded as: the label alone (descriptions carry statistics and boilerplate
    that blur the embedding; on the SST-2 benchmark label-only separates real from swapped labels better)."""
    return label


def embedding_score(
    label: str,
    description: str,
    heldout: Sequence[Excerpt],
    evidence: Sequence[Excerpt],
    *,
    model: str = DEFAULT_EMBEDDING_MODEL,
    n_boot: int = 1000,
    seed: int = 0,
    embed: Callable[[list[str]], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Score a label by cosine similarity of each held-out excerpt to the label text.

    AUC comes from the similarity; the decision threshold (max TPR - FPR) is fitted on the `evidence`
    excerpts, never on the held-out ones. `embed` maps texts to unit vectors (default: `model`).
    """
    embed = embed or (lambda texts: sentence_embeddings(texts, model=model))
    texts = [label_query(label, description), *(e.text for e in evidence), *(e.text for e in heldout)]
    vectors = embed(texts)
    return _embedding_metrics(
        vectors[0],
        vectors[1 : 1 + len(evidence)],
        vectors[1 + len(evidence) :],
        evidence,
        heldout,
        n_boot=n_boot,
        seed=seed,
    )


def _embedding_metrics(
    query: np.ndarray,
    evidence_vectors: np.ndarray,
    heldout_vectors: np.ndarray,
    evidence: Sequence[Excerpt],
    heldout: Sequence[Excerpt],
    *,
    n_boot: int,
    seed: int,
    reference: np.ndarray | None = None,
) -> dict[str, Any]:
    """Metrics of cosine similarity to `query`. With `reference` (rows = the queries of every label
    scored together), each excerpt's mean similarity to them is subtracted first: an excerpt that is
    close to any short label (e.g. a short one) no longer looks like a match for all of them."""
    if not heldout:
        raise ValueError("embedding_score needs held-out excerpts.")
    if not evidence:
        raise ValueError("embedding_score needs evidence excerpts to fit its threshold.")
    ev_score = evidence_vectors @ query
    ho_score = heldout_vectors @ query
    if reference is not None and reference.shape[0] >= 2:
        ev_score = ev_score - (evidence_vectors @ reference.T).mean(axis=1)
        ho_score = ho_score - (heldout_vectors @ reference.T).mean(axis=1)
    threshold = youden_threshold(np.array([e.is_positive for e in evidence]), ev_score)
    y_true = np.array([e.is_positive for e in heldout], dtype=np.int64)
    metrics = binary_metrics(
        y_true, (ho_score >= threshold).astype(np.int64), ho_score, n_boot=n_boot, seed=seed
    )
    metrics["threshold"] = threshold
    return metrics


# --------------------------------------------------------------------------------------------------
# LLM scorers (delphi-style detection and fuzzing)


DETECTION_SYSTEM_PROMPT = (
    "You check an explanation of a language-model feature. You get the explanation and numbered texts. "
    "For each text, decide whether the feature, as explained, is present anywhere in it. "
    "Answer with a JSON array of 0/1 integers, one per text, in order (1 = present, 0 = absent), and "
    "nothing else."
)
FUZZ_SYSTEM_PROMPT = (
    "You check an explanation of a language-model feature. You get the explanation and numbered texts in "
    "which some tokens are highlighted << like this >>. For each text, decide whether the highlighted "
    "tokens are examples of the feature as explained (1) or not (0). Answer with a JSON array of 0/1 "
    "integers, one per text, in order, and nothing else."
)


def _order(excerpts: Sequence[Excerpt], seed: int, salt: str) -> list[int]:
    """A deterministic shuffle of excerpt positions (mixes positives and negatives in a batch)."""

    def key(i: int) -> bytes:
        return hashlib.blake2b(f"{salt}:{seed}:{excerpts[i].doc_id}:{i}".encode(), digest_size=8).digest()

    return sorted(range(len(excerpts)), key=key)


def _batch_prompts(
    system: str, label: str, description: str, shown: list[str], order: list[int], batch_size: int
) -> list[tuple[Messages, list[int]]]:
    explanation = f"{label}. {description}".strip() if description else label
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        lines = [f"Explanation: {explanation}", "", "Texts:"]
        lines += [f"{n}. {' '.join(shown[i].split())}" for n, i in enumerate(idx, 1)]
        lines += ["", f"Reply with a JSON array of exactly {len(idx)} integers (0 or 1)."]
        out.append(
            ([{"role": "system", "content": system}, {"role": "user", "content": "\n".join(lines)}], idx)
        )
    return out


def fuzz_highlights(excerpts: Sequence[Excerpt], *, seed: int = 0) -> list[Excerpt]:
    """Positives keep their active-token highlights; each negative gets as many random words highlighted
    as the median positive has spans (at least one), chosen deterministically from `seed` and doc_id."""
    counts = [len(e.spans) for e in excerpts if e.is_positive and e.spans]
    k = max(1, int(np.median(counts))) if counts else 1
    out = []
    for e in excerpts:
        if e.is_positive:
            out.append(e)
            continue
        words = [
            (m.start(), m.end()) for m in WORD_RE.finditer(e.text) if any(c.isalnum() for c in m.group())
        ]
        rng = np.random.default_rng([seed, e.doc_id])
        pick = sorted(rng.choice(len(words), size=min(k, len(words)), replace=False)) if words else []
        out.append(Excerpt(e.doc_id, e.text, tuple(words[i] for i in pick), e.activation, e.role))
    return out


def score_prompts(
    method: str,
    label: str,
    description: str,
    heldout: Sequence[Excerpt],
    *,
    batch_size: int = 10,
    seed: int = 0,
) -> list[tuple[Messages, list[int]]]:
    """Prompts for the `detection` or `fuzz` scorer: `(messages, excerpt positions in that prompt)`."""
    if method == "detection":
        shown = [e.text for e in heldout]
        system = DETECTION_SYSTEM_PROMPT
    elif method == "fuzz":
        shown = [e.marked for e in fuzz_highlights(heldout, seed=seed)]
        system = FUZZ_SYSTEM_PROMPT
    else:
        raise ValueError(f"method must be 'detection' or 'fuzz'; got {method!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    return _batch_prompts(system, label, description, shown, _order(heldout, seed, method), batch_size)


def parse_binary_answers(text: str, n: int) -> list[int]:
    """Exactly `n` 0/1 answers from an LLM reply (a JSON array, possibly fenced or inside prose)."""
    value = extract_json(text)
    if isinstance(value, dict):
        value = next((v for v in value.values() if isinstance(v, list)), value)
    if not isinstance(value, list):
        raise LabelResponseError(f"expected a JSON array of {n} 0/1 answers; got {str(text)[:200]!r}")
    answers = []
    for v in value:
        if isinstance(v, bool) or v in (0, 1):
            answers.append(int(v))
        elif isinstance(v, str) and v.strip() in ("0", "1"):
            answers.append(int(v.strip()))
        elif _is_number(v):
            raise LabelResponseError(
                f"answer {v!r} is out of range (not 0 or 1) in {str(text)[:200]!r}", "out_of_range"
            )
        else:
            raise LabelResponseError(f"answer {v!r} is not 0 or 1 in {str(text)[:200]!r}")
    if len(answers) != n:
        raise LabelResponseError(f"expected {n} answers, got {len(answers)} in {str(text)[:200]!r}")
    return answers


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def read_score_answer(text: str, n: int, messages: Messages) -> tuple[list[int], str]:
    """`(answers, status)` from a detection/fuzz reply: status `ok` (bare JSON) or `parsed_from_prose`.
    Raises `LabelResponseError` with status `refused`, `restated_prompt`, `out_of_range` or `invalid`."""
    try:
        answers = parse_binary_answers(text, n)
    except LabelResponseError as exc:
        if exc.status == "invalid" and isinstance(text, str):
            if echoes_prompt(text, messages):
                raise LabelResponseError(
                    f"the reply repeats the prompt: {text[:200]!r}", "restated_prompt"
                ) from None
            if looks_like_refusal(text):
                raise LabelResponseError(f"the model refused: {text[:200]!r}", "refused") from None
        raise
    return answers, json_status(text)


def _ask(llm: ChatClient, prompts: list[tuple[Messages, list[int]]]) -> tuple[list[Any], int]:
    """Every batch's `(answers, status)` read from its reply (or the exception), and how many batches
    were asked again (`answers.ask_and_read`)."""
    return ask_and_read(
        llm,
        [m for m, _ in prompts],
        lambda i, text: read_score_answer(text, len(prompts[i][1]), prompts[i][0]),
    )


def _collect(
    heldout: Sequence[Excerpt],
    prompts: list[tuple[Messages, list[int]]],
    replies: Sequence[tuple[list[int], str] | Exception],
    n_boot: int,
    seed: int,
    errors: list[str],
    statuses: list[str] | None = None,
) -> dict[str, Any] | None:
    """Metrics over the batches answered (`replies`: each batch's `(answers, status)` or exception, as
    `_ask` reads them), with `status`: the worst batch's; each batch's status is appended to `statuses`.
    None when no batch was usable."""
    y_true, y_pred = [], []
    batch_status: list[str] = []
    for (_, idx), reply in zip(prompts, replies, strict=True):
        try:
            if isinstance(reply, Exception):
                raise reply
            answers, status = reply
        except Exception as exc:  # noqa: BLE001 - a failed batch drops its excerpts, others are kept
            batch_status.append(failure_status(exc))
            errors.append(f"{len(idx)} excerpts not scored ({batch_status[-1]}): {exc}")
            continue
        batch_status.append(status)
        y_true += [int(heldout[i].is_positive) for i in idx]
        y_pred += answers
    if statuses is not None:
        statuses += batch_status
    if not y_true:
        return None
    return binary_metrics(y_true, y_pred, None, n_boot=n_boot, seed=seed) | {"status": worst(batch_status)}


def _llm_score(
    method: str,
    label: str,
    description: str,
    heldout: Sequence[Excerpt],
    llm: ChatClient,
    *,
    batch_size: int,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    prompts = score_prompts(method, label, description, heldout, batch_size=batch_size, seed=seed)
    errors: list[str] = []
    metrics = _collect(heldout, prompts, _ask(llm, prompts)[0], n_boot, seed, errors)
    if metrics is None:
        raise LabelResponseError(f"{method} scoring got no usable answer: {'; '.join(errors)}")
    metrics["errors"] = errors
    return metrics


def detection_score(
    label: str,
    description: str,
    heldout: Sequence[Excerpt],
    llm: ChatClient,
    *,
    batch_size: int = 10,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """LLM detection: is each (unmarked) held-out excerpt an example of the label? Metrics + `errors`.

    Excerpts of batches whose answer failed are left out of the metrics and described in `errors`.
    """
    return _llm_score(
        "detection", label, description, heldout, llm, batch_size=batch_size, n_boot=n_boot, seed=seed
    )


def fuzz_score(
    label: str,
    description: str,
    heldout: Sequence[Excerpt],
    llm: ChatClient,
    *,
    batch_size: int = 10,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """LLM fuzzing: are the highlighted tokens examples of the label? Positives are highlighted on their
    active tokens, negatives on random words (`fuzz_highlights`). Metrics + `errors`."""
    return _llm_score(
        "fuzz", label, description, heldout, llm, batch_size=batch_size, n_boot=n_boot, seed=seed
    )


# --------------------------------------------------------------------------------------------------
# Orchestration


def score_features(
    labels: pl.DataFrame,
    token_activations: pl.DataFrame,
    documents: pl.DataFrame,
    *,
    methods: Sequence[str] | None = None,
    llm: ChatClient | None = None,
    embeddings: np.ndarray | None = None,
    n_evidence: int = 20,
    n_holdout: int = 40,
    seed: int = 0,
    context_chars: int = 150,
    embedding_model: str = DEFAULT_EMBEDDING_MODEL,
    embed: Callable[[list[str]], np.ndarray] | None = None,
    batch_size: int = 10,
    n_boot: int = 1000,
    errors: list[str] | None = None,
    cache: ScoreCache | None = None,
    counts: dict[str, int] | None = None,
) -> pl.DataFrame:
    """Score every row of a feature_labels table on its held-out split; returns the feature_scores table.

    The split is rebuilt with the labeling parameters (`n_evidence`, `n_holdout`, `seed`, `embeddings`)
    and must reproduce each row's `evidence_hash`, which proves the scored documents were not the
    evidence. `methods` defaults to `embedding`, plus `detection` and `fuzz` when `llm` is enabled. All
    LLM requests of all features go through one `map_chat` (bounded concurrency, one budget); failed
    batches are left out and described in `errors`; features without held-out positives are skipped.
    `embed` (texts -> unit vectors) replaces `sentence_embeddings(texts, embedding_model)`, e.g. to reuse
    vectors across calls. With `cache`, a score whose inputs (label, excerpts, scorer settings) were scored
    before is read back, not recomputed; `counts` (if given) receives `from_cache` and `computed`, and
    `answers_<status>` per LLM reply (`interp_assets.labels.answers`). A score row's `status` is its worst
    reply's; the metrics leave out the excerpts of unusable replies.
    """
    llm_on = llm is not None and llm.enabled
    methods = (
        list(methods) if methods is not None else ["embedding", *(["detection", "fuzz"] if llm_on else [])]
    )
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown scoring method(s) {unknown}; choose from {list(METHODS)}.")
    if not llm_on and any(m in ("detection", "fuzz") for m in methods):
        raise ValueError("detection and fuzz scoring need an enabled LLM client (set base_url and model).")
    missing = [c for c in ("feature", "label", "description", "evidence_hash") if c not in labels.columns]
    if missing:
        raise ValueError(f"labels frame is missing column(s) {missing}; pass the feature_labels table.")
    errors = errors if errors is not None else []
    rows = labels.select(
        pl.col("dataset") if "dataset" in labels.columns else pl.lit("").alias("dataset"),
        "feature",
        "label",
        "description",
        "evidence_hash",
        *(["evidence_doc_ids"] if "evidence_doc_ids" in labels.columns else []),
    ).to_dicts()
    splits = split_features(
        token_activations,
        documents,
        [r["feature"] for r in rows],
        n_evidence=n_evidence,
        n_holdout=n_holdout,
        seed=seed,
        embeddings=embeddings,
    )
    work: list[tuple[dict[str, Any], list[Excerpt], list[Excerpt]]] = []  # row, held-out, evidence
    for row in rows:
        split = splits[int(row["feature"])]
        if split.evidence_hash != row["evidence_hash"]:
            raise ValueError(
                f"feature_labels row for feature {row['feature']} was labeled from different evidence "
                f"(evidence_hash {row['evidence_hash']}) than this split gives ({split.evidence_hash}): "
                "score with the same documents, token_activations, n_evidence, n_holdout, seed and "
                "embeddings as the labeling run, or re-label."
            )
        shown = set(row.get("evidence_doc_ids") or [])
        if shown & set(split.heldout_doc_ids):
            raise ValueError(
                f"feature_labels row for feature {row['feature']} lists evidence_doc_ids that are in this "
                "split's held-out set; scoring them would grade the label on its own evidence. Re-label."
            )
        ho_pos, ho_neg = split_excerpts(
            split, token_activations, documents, "heldout", context_chars=context_chars
        )
        if not ho_pos:
            errors.append(
                f"feature {row['feature']}: not scored, no held-out document where it fires "
                f"(it fires in {split.n_positive_docs})."
            )
            continue
        ev_pos, ev_neg = split_excerpts(
            split, token_activations, documents, "evidence", context_chars=context_chars
        )
        work.append((row, ho_pos + ho_neg, ev_pos + ev_neg))

    results: dict[tuple[int, str], dict[str, Any]] = {}  # (position in work, method) -> metrics
    fresh: dict[str, dict[str, Any]] = {}  # score_key -> metrics computed now, for the cache
    tally = {"from_cache": 0, "computed": 0}

    def cached(i: int, method: str, payload: Any) -> str | None:
        """The score's key, or None when the cache already answered it (results filled)."""
        key = score_key(method, payload)
        hit = cache.get(key) if cache is not None else None
        if hit is None:
            return key
        results[(i, method)] = hit
        tally["from_cache"] += 1
        return None

    if "embedding" in methods and work:
        queries = [label_query(r["label"], r["description"] or "") for r, *_ in work]
        reference_queries = list(dict.fromkeys(queries))
        todo: dict[int, str] = {}
        for i, ((row, ho, ev), query) in enumerate(zip(work, queries, strict=True)):
            if not ev:
                errors.append(
                    f"feature {row['feature']}: embedding score skipped, no evidence to fit a threshold."
                )
                continue
            payload = {
                "model": embedding_model,  # `embed`, when given, embeds with this model too
                "query": query,
                "reference": sorted(reference_queries),
                "evidence": [(e.text, e.is_positive) for e in ev],
                "heldout": [(e.text, e.is_positive) for e in ho],
                "n_boot": n_boot,
                "seed": seed,
            }
            key = cached(i, "embedding", payload)
            if key is not None:
                todo[i] = key
        if todo:
            texts = list(
                dict.fromkeys([*reference_queries, *(e.text for i in todo for e in work[i][1] + work[i][2])])
            )
            vectors = embed(texts) if embed is not None else sentence_embeddings(texts, model=embedding_model)
            at = {t: j for j, t in enumerate(texts)}
            reference = vectors[[at[q] for q in reference_queries]]
            for i, key in todo.items():
                _, ho, ev = work[i]
                metrics = _embedding_metrics(
                    vectors[at[queries[i]]],
                    vectors[[at[e.text] for e in ev]],
                    vectors[[at[e.text] for e in ho]],
                    ev,
                    ho,
                    n_boot=n_boot,
                    seed=seed,
                    reference=reference,
                )
                results[(i, "embedding")] = fresh[key] = with_length_baseline(metrics, ho, ev)
                tally["computed"] += 1
    llm_methods = [m for m in methods if m in ("detection", "fuzz")]
    if llm_methods and work:
        jobs = []
        for method in llm_methods:
            for i, (row, ho, _) in enumerate(work):
                prompts = score_prompts(
                    method, row["label"], row["description"] or "", ho, batch_size=batch_size, seed=seed
                )
                payload = {
                    "model": getattr(llm, "model", None),
                    "prompts": [m for m, _ in prompts],
                    "truth": [int(e.is_positive) for e in ho],
                    "n_boot": n_boot,
                    "seed": seed,
                }
                key = cached(i, method, payload)
                if key is not None:
                    jobs.append((i, method, prompts, key))
        replies, tally["asked_again"] = (
            _ask(llm, [p for *_, prompts, _ in jobs for p in prompts]) if jobs else ([], 0)
        )
        offset = 0
        answer_statuses: list[str] = []
        for i, method, prompts, key in jobs:
            row, ho, ev = work[i]
            job_errors: list[str] = []
            replies_now = replies[offset : offset + len(prompts)]
            metrics = _collect(ho, prompts, replies_now, n_boot, seed, job_errors, answer_statuses)
            offset += len(prompts)
            errors += [f"feature {row['feature']} ({method}): {e}" for e in job_errors]
            if metrics is not None:
                metrics = with_length_baseline(metrics, ho, ev)
                results[(i, method)] = metrics
                tally["computed"] += 1
                if not job_errors:  # a score with failed batches is not kept: a later run may complete it
                    fresh[key] = metrics
        for status in answer_statuses:  # one per LLM reply: answers_ok, answers_refused, ...
            tally[f"answers_{status}"] = tally.get(f"answers_{status}", 0) + 1
    if cache is not None:
        cache.put_many(fresh)
    if counts is not None:
        counts.update(tally)

    out = [
        {
            "dataset": row["dataset"],
            "feature": row["feature"],
            "label": row["label"],
            "method": method,
            **{k: results[(i, method)][k] for k in METRIC_COLUMNS},
            "status": results[(i, method)].get("status") or "ok",
        }
        for method in methods
        for i, (row, _, _) in enumerate(work)
        if (i, method) in results
    ]
    return pl.DataFrame(out, schema=FEATURE_SCORES_SCHEMA)
