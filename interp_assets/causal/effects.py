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
    budget_batches,
    intervention_records,
    module_name,
    next_token_logprob,
    run_with_intervention,
)
from interp_assets.engine.activations import document_batch

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
    """Mean over real tokens, L2-normalized: one row per document (float64 numpy)."""
    import torch

    mask = attention_mask.float()[..., None]
    pooled = (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=-1).double().numpy()


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
    layer = module_name(reader.model, reader.layer_module)
    ids, mask, _ = document_batch(reader, texts)
    out = None
    for docs, rows, width in budget_batches(mask, reader.token_budget):
        part_ids, part_mask = ids[rows, :width].to(reader.device), mask[rows, :width].to(reader.device)
        args = (reader.model, layer, reader.sae, None, part_ids, part_mask, read_hidden)
        (hidden,) = run_with_intervention(*args, forward_kwargs=FORWARD_KWARGS)
        pooled = pooled_embedding(hidden.cpu(), part_mask.cpu())
        if out is None:
            out = np.zeros((len(texts), pooled.shape[1]))
        out[docs] = pooled
    return out


def projection_score(direction: Direction) -> Callable[[Any, Any, Any], np.ndarray]:
    """Per-document score: the edited document embedding projected on `direction`."""

    def score(read: Any, input_ids: Any, attention_mask: Any) -> np.ndarray:
        return direction.project(pooled_embedding(read[0].cpu(), attention_mask.cpu()))

    return score


def _logprob_score(read: Any, input_ids: Any, attention_mask: Any) -> np.ndarray:
    return next_token_logprob(read[1].cpu(), input_ids.cpu(), attention_mask.cpu())


def read_hidden(output: Any) -> tuple[Any]:
    """What the projection scores read from a forward pass run with FORWARD_KWARGS: the last hidden state."""
    return (output.hidden_states[-1],)


def read_hidden_and_logits(output: Any) -> tuple[Any, Any]:
    """The last hidden state and the logits (causal LMs)."""
    return (output.hidden_states[-1], output.logits)


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
) -> pl.DataFrame:
    """Ablation effects of each target feature beside frequency-matched controls and a placebo, one record
    per (feature, score, control) in interp-lab's shape (`EFFECT_SCHEMA`): scores `feature_signature`,
    `direction_name` (the target's `comparison` direction: a comparison's, or a criterion's) and, for
    causal LMs, `next_token_logprob`."""
    layer = module_name(reader.model, reader.layer_module)
    causal = is_causal_lm(reader.model)
    frames = []
    for target in targets:
        if not target.texts:
            continue
        ids, mask, keep = document_batch(reader, target.texts)
        ids, mask, keep = ids.to(reader.device), mask.to(reader.device), keep.to(reader.device)
        scores = {
            "feature_signature": projection_score(target.signature),
            direction_name: projection_score(target.comparison),
        }
        if causal:
            scores["next_token_logprob"] = _logprob_score
        records = intervention_records(
            reader.model,
            layer,
            reader.sae,
            ids,
            mask,
            int(target.feature),
            kind="ablate",
            score=scores,
            read=read_hidden_and_logits if causal else read_hidden,
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

    `controls_below`: share of matched random features whose effect is smaller (more negative) than the
    target's; `evidence` is True when the target's interval lies below 0 and no control moved the score
    down as much (ablating the feature moves its documents against the score's direction).
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
        effect, high = float(tgt["effect"][0]), float(tgt["effect_ci_high"][0])
        below = float(np.mean(controls < effect)) if controls.size else float("nan")
        rows.append(
            {
                "feature": int(target),
                "direction": tgt["direction"][0],
                "score_name": score_name,
                "documents": int(tgt["documents"][0]),
                "effect": effect,
                "effect_ci_low": float(tgt["effect_ci_low"][0]),
                "effect_ci_high": high,
                "control_effect_median": float(np.median(controls)) if controls.size else None,
                "controls": int(controls.size),
                "controls_below": below,
                "placebo_effect": float(placebo[0]) if len(placebo) and placebo[0] is not None else None,
                "side_effect_score": tgt["side_effect_score"][0],
                "evidence": bool(high < 0 and controls.size > 0 and below == 0.0),
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
    "controls_below": pl.Float64,
    "placebo_effect": pl.Float64,
    "side_effect_score": pl.Float64,
    "evidence": pl.Boolean,
}
