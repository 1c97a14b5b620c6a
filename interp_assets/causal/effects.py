"""Causal evidence for a comparison's features: does removing a feature change what the reader makes of
the documents where it fires, more than removing a frequency-matched random feature does?

Each score is read from the reader's document embedding (the last hidden state mean-pooled over real
tokens, L2-normalized) after the edit, projected on a direction fixed before any edit, from the unedited
embeddings of a sample of documents:

- `feature_signature`: the mean embedding of documents where the feature fires minus that of documents
  where it does not (what the reader's output says about the feature's content). Ablating a feature that
  carries its content moves its documents against this direction; a feature nothing downstream reads
  moves them no more than a matched random feature does.
- `comparison_direction`: the mean embedding of the feature's side (A or B) minus the other side's (does
  the feature make its documents look like its side?).

For causal language models the change in log-probability of the observed next tokens is measured too.
When the comparison has a document SAE (`DocumentFamily`), the downstream features are measured as well:
the document embedding read at the document family's layer after the edit, encoded by the document SAE,
against the unedited one (`downstream_feature_shift`: `document_feature_shift`, the L1 change of the
document-feature activations, and `document_features_flipped`, how many start or stop firing).
`intervention_records` supplies the controls (frequency-matched random features, a placebo) and the
bootstrap intervals. Works for every reader the platform loads (encoders and causal LMs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from interp_assets.causal.interventions import (
    Intervention,
    ShiftScore,
    budget_batches,
    edit_site,
    intervention_records,
    next_token_logprob,
    run_with_intervention,
)
from interp_assets.engine.activations import document_batch
from interp_assets.engine.documents import document_feature_matrix, pool_hidden_states

FORWARD_KWARGS = {"output_hidden_states": True}
EFFECT_SCHEMA = {
    "target_feature": pl.Int64,
    "feature": pl.Int64,
    "direction": pl.String,
    "score_name": pl.String,
    "intervention": pl.String,
    "strength": pl.Float64,
    "control_type": pl.String,
    "documents": pl.Int64,
    "baseline_score": pl.Float64,
    "intervention_score": pl.Float64,
    "effect": pl.Float64,
    "effect_ci_low": pl.Float64,
    "effect_ci_high": pl.Float64,
    "side_effect_score": pl.Float64,
}


def pooled_embedding(hidden: Any, attention_mask: Any) -> np.ndarray:
    """Mean over real tokens, L2-normalized (the document-embedding recipe): one row per document (float64
    numpy)."""
    return pool_hidden_states(hidden.float(), attention_mask).double().numpy()


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half); NaN when a class is missing."""
    from scipy.stats import rankdata

    pos, neg = labels == 1, labels == 0
    if not pos.any() or not neg.any():
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * neg.sum()))


@dataclass(frozen=True)
class Direction:
    """A unit direction in the document-embedding space between two groups of documents, and how well the
    projection on it separates them on held-out documents (two-fold cross-fit AUC)."""

    vector: np.ndarray
    held_out_auc: float
    n_positive: int
    n_negative: int

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        """Per document: the projection of its embedding on the direction."""
        return embeddings @ self.vector


def mean_difference_direction(positive: np.ndarray, negative: np.ndarray, *, seed: int = 0) -> Direction:
    """The normalized difference of the two groups' mean embeddings (no fitted weights, so no tuning and
    little variance with few documents), with its cross-fitted AUC."""
    if len(positive) < 2 or len(negative) < 2:
        raise ValueError(
            f"A direction needs at least 2 documents on each side; got {len(positive)} and {len(negative)}."
        )
    x = np.vstack([positive, negative])
    y = np.concatenate([np.ones(len(positive)), np.zeros(len(negative))])
    fold = np.random.default_rng(seed).permutation(len(y)) % 2
    cross = np.empty(len(y))
    for k in (0, 1):
        train = fold != k
        d = x[train & (y == 1)].mean(0) - x[train & (y == 0)].mean(0) if _both(y[train]) else 0 * x[0]
        cross[~train] = x[~train] @ d
    diff = positive.mean(0) - negative.mean(0)
    norm = float(np.linalg.norm(diff))
    return Direction(diff / norm if norm > 0 else diff, auc(cross, y), len(positive), len(negative))


def _both(y: np.ndarray) -> bool:
    return bool((y == 1).any() and (y == 0).any())


def document_embeddings(reader: Any, texts: Sequence[str]) -> np.ndarray:
    """Document embeddings of `texts` as the scores read them, from the unedited reader, in forward passes
    planned as the engine plans them (length-sorted, at most the reader's token budget)."""
    if not texts:
        return np.zeros((0, 0))
    layer = edit_site(reader)
    ids, mask, _ = document_batch(reader, texts)
    out = None
    for docs, rows, width in budget_batches(mask, reader.token_budget):
        part_ids, part_mask = ids[rows, :width].to(reader.device), mask[rows, :width].to(reader.device)
        args = (reader.model, layer, reader.sae, None, part_ids, part_mask, read_hidden)
        read = run_with_intervention(*args, forward_kwargs=FORWARD_KWARGS)
        pooled = pooled_embedding(read[LAST_HIDDEN].cpu(), part_mask.cpu())
        if out is None:
            out = np.zeros((len(texts), pooled.shape[1]))
        out[docs] = pooled
    return out


def projection_score(direction: Direction) -> Callable[[Any, Any, Any], np.ndarray]:
    """Per-document score: the edited document embedding projected on `direction`."""

    def score(read: Any, input_ids: Any, attention_mask: Any) -> np.ndarray:
        return direction.project(pooled_embedding(read[LAST_HIDDEN].cpu(), attention_mask.cpu()))

    return score


def _logprob_score(read: Any, input_ids: Any, attention_mask: Any) -> np.ndarray:
    return next_token_logprob(read[LOGITS].cpu(), input_ids.cpu(), attention_mask.cpu())


@dataclass(frozen=True)
class DocumentFamily:
    """The document features downstream of the token SAE: a comparison's document SAE (its ensemble
    members, `saes`) and how its input embeddings were made: the reader's hidden states at `layer` (an
    index into the hidden states, as `engine.documents.document_embeddings` takes it; None: the last;
    counted from the end (negative) when the passes replay the blocks before the edit, whose hidden states
    they then do not record),
    mean-pooled over each document's tokens, L2-normalized with `normalize`. Documents are read as the
    reader tokenizes them (its truncation: a text longer than document_embeddings' 256 tokens is pooled
    over more of itself here, before and after the edit alike)."""

    saes: Sequence[Any]
    layer: int | None = None
    normalize: bool = True

    def features(self, read: Any, input_ids: Any, attention_mask: Any) -> np.ndarray:
        """Per document: its document-feature activations `[batch, n_features]` (0 where one does not
        fire; member i's feature f in column i * d_sae + f), from a forward pass read with `reads`."""
        hidden = read[DOCUMENT_HIDDEN].cpu()
        embeddings = pool_hidden_states(hidden, attention_mask.cpu(), normalize=self.normalize)
        return document_feature_matrix(list(self.saes), embeddings)


# What the scores read from a forward pass run with FORWARD_KWARGS (`reads` names them).
LAST_HIDDEN, LOGITS, DOCUMENT_HIDDEN = "last_hidden", "logits", "document_hidden"


def reads(logits: bool = False, family: DocumentFamily | None = None) -> Callable[[Any], dict[str, Any]]:
    """A read of a forward pass run with FORWARD_KWARGS: the last hidden state, with `logits` the logits
    (causal LMs), and with a document `family` the hidden states it pools (at `family.layer`)."""

    def read(output: Any) -> dict[str, Any]:
        out = {LAST_HIDDEN: output.hidden_states[-1]}
        if logits:
            out[LOGITS] = output.logits
        if family is not None:
            out[DOCUMENT_HIDDEN] = output.hidden_states[-1 if family.layer is None else family.layer]
        return out

    return read


read_hidden = reads()
read_hidden_and_logits = reads(logits=True)


def document_feature_l1(base: np.ndarray, edited: np.ndarray) -> np.ndarray:
    """Per document: the L1 norm of the change of its document-feature activations."""
    return np.abs(edited.astype(np.float64) - base.astype(np.float64)).sum(axis=1)


def document_features_flipped(base: np.ndarray, edited: np.ndarray) -> np.ndarray:
    """Per document: how many document features start or stop firing (activation > 0)."""
    return ((base > 0) != (edited > 0)).sum(axis=1).astype(np.float64)


# The downstream-feature scores: higher means the edit changed the document's document features more.
DOWNSTREAM_SCORES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "document_feature_shift": document_feature_l1,
    "document_features_flipped": document_features_flipped,
}


def downstream_scores(family: DocumentFamily) -> dict[str, ShiftScore]:
    """The downstream-feature scores as `intervention_records` takes them (read with `reads(family=...)`)."""
    return {name: ShiftScore(family.features, distance) for name, distance in DOWNSTREAM_SCORES.items()}


def downstream_feature_shift(
    model: Any,
    layer_name: str,
    sae: Any,
    intervention: Intervention,
    input_ids: Any,
    attention_mask: Any,
    family: DocumentFamily,
    edit_mask: Any | None = None,
) -> dict[str, np.ndarray]:
    """Per document, how `intervention` at the token SAE's layer (`layer_name`) changes the document
    features downstream of it: the document embedding (hidden states at `family.layer`, pooled as the
    document family pools them) with and without the edit, each encoded by the document SAE ensemble.

    Returns {"document_feature_shift": L1 norm of the change of the document-feature activation vector,
    "document_features_flipped": number of document features that start or stop firing}, one value per
    row of `input_ids` (right-padded; `edit_mask` marks the tokens the SAE reads, default every real one).
    Strength 0 gives exactly 0 for both."""
    read = reads(family=family)
    args = (input_ids, attention_mask, read, edit_mask, FORWARD_KWARGS)
    unedited = run_with_intervention(model, layer_name, sae, None, *args)
    after = run_with_intervention(model, layer_name, sae, intervention, *args)
    base = family.features(unedited, input_ids, attention_mask)
    edited = family.features(after, input_ids, attention_mask)
    return {name: distance(base, edited) for name, distance in DOWNSTREAM_SCORES.items()}


def is_causal_lm(model: Any) -> bool:
    """Whether the reader predicts next tokens (has logits over a vocabulary), as GPT-2 or Llama do."""
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_decoder", False)) or type(model).__name__.endswith("ForCausalLM")


@dataclass(frozen=True)
class EffectTarget:
    """One feature to ablate: its side, the texts to edit (where it fires, plus some where it does not,
    for side effects) and the directions its scores project on."""

    feature: int
    direction: str  # "a" or "b": the dataset where the feature is more frequent
    texts: Sequence[str]
    signature: Direction
    comparison: Direction  # toward the feature's side


def feature_effects(
    reader: Any,
    targets: Sequence[EffectTarget],
    *,
    n_controls: int = 10,
    n_boot: int = 1000,
    seed: int = 0,
    direction_name: str = "comparison_direction",
    document_family: DocumentFamily | None = None,
) -> pl.DataFrame:
    """Ablation effects of each target feature beside frequency-matched controls and a placebo, one record
    per (feature, score, control) in interp-lab's shape (`EFFECT_SCHEMA`): scores `feature_signature`,
    `direction_name` (the target's `comparison` direction: a comparison's, or a criterion's), for causal
    LMs `next_token_logprob`, and with a `document_family` the downstream-feature scores
    (`DOWNSTREAM_SCORES`), all from the same forward passes."""
    layer = edit_site(reader)
    causal = is_causal_lm(reader.model)
    read = reads(logits=causal, family=document_family)
    frames = []
    for target in targets:
        if not target.texts:
            continue
        ids, mask, keep = document_batch(reader, target.texts)
        ids, mask, keep = ids.to(reader.device), mask.to(reader.device), keep.to(reader.device)
        scores: dict[str, Any] = {
            "feature_signature": projection_score(target.signature),
            direction_name: projection_score(target.comparison),
        }
        if causal:
            scores["next_token_logprob"] = _logprob_score
        if document_family is not None:
            scores.update(downstream_scores(document_family))
        records = intervention_records(
            reader.model,
            layer,
            reader.sae,
            ids,
            mask,
            int(target.feature),
            kind="ablate",
            score=scores,
            read=read,
            n_controls=n_controls,
            n_boot=n_boot,
            seed=seed,
            edit_mask=keep,
            forward_kwargs=FORWARD_KWARGS,
            token_budget=getattr(reader, "token_budget", None),
        )
        frames.append(
            records.with_columns(
                pl.lit(target.direction).alias("direction"),
                pl.lit(int(target.feature), dtype=pl.Int64).alias("target_feature"),
            )
        )
    if not frames:
        return pl.DataFrame(schema=EFFECT_SCHEMA)
    return pl.concat(frames, how="diagonal_relaxed").select(list(EFFECT_SCHEMA))


def effect_summary(records: pl.DataFrame) -> pl.DataFrame:
    """Per (target feature, score): the target's effect and interval beside its controls.

    A score's effect counts in its own direction: down for the projections and log-probabilities
    (ablating the feature moves its documents against the score's direction), up for the downstream-
    feature shifts (`DOWNSTREAM_SCORES`: the edit changes the document features). `controls_beyond`: share
    of matched random features whose effect goes further that way than the target's; `evidence` is True
    when the target's interval lies beyond 0 that way and no control went further.
    """
    rows = []
    if records.is_empty():
        return pl.DataFrame(schema=SUMMARY_SCHEMA)
    for (target, score_name), part in records.group_by(["target_feature", "score_name"], maintain_order=True):
        tgt = part.filter(pl.col("control_type") == "target")
        if tgt.is_empty() or tgt["effect"][0] is None:
            continue
        controls = part.filter(pl.col("control_type") == "random_matched")["effect"].drop_nulls().to_numpy()
        placebo = part.filter(pl.col("control_type") == "placebo")["effect"]
        effect, low, high = (float(tgt[c][0]) for c in ("effect", "effect_ci_low", "effect_ci_high"))
        up = score_name in DOWNSTREAM_SCORES
        further = controls > effect if up else controls < effect
        beyond = float(np.mean(further)) if controls.size else float("nan")
        interval_clear = low > 0 if up else high < 0
        rows.append(
            {
                "feature": int(target),
                "direction": tgt["direction"][0],
                "score_name": score_name,
                "documents": int(tgt["documents"][0]),
                "effect": effect,
                "effect_ci_low": low,
                "effect_ci_high": high,
                "control_effect_median": float(np.median(controls)) if controls.size else None,
                "controls": int(controls.size),
                "controls_beyond": beyond,
                "placebo_effect": float(placebo[0]) if len(placebo) and placebo[0] is not None else None,
                "side_effect_score": tgt["side_effect_score"][0],
                "evidence": bool(interval_clear and controls.size > 0 and beyond == 0.0),
            }
        )
    return pl.DataFrame(rows, schema=SUMMARY_SCHEMA)


SUMMARY_SCHEMA = {
    "feature": pl.Int64,
    "direction": pl.String,
    "score_name": pl.String,
    "documents": pl.Int64,
    "effect": pl.Float64,
    "effect_ci_low": pl.Float64,
    "effect_ci_high": pl.Float64,
    "control_effect_median": pl.Float64,
    "controls": pl.Int64,
    "controls_beyond": pl.Float64,
    "placebo_effect": pl.Float64,
    "side_effect_score": pl.Float64,
    "evidence": pl.Boolean,
}
