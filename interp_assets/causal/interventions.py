"""Causal evidence: edit one SAE feature inside the reader's forward pass (through nnsight) and measure
what changes, beside controls.

A diff or an association says a feature goes with something; an intervention says whether the feature
does anything. At the SAE's hook (a residual-stream layer), with `a` the feature's activation and `d` its
decoder direction:

- `ablate` (strength s): h - s * a * d (s = 1 removes its decoder contribution where it fires);
- `clamp` (strength c): h + (c - a) * d where the feature fires (its activation set to c);
- `steer` (strength alpha): h + alpha * d at every real token.

Strength 0 is the placebo: every kind leaves the forward pass unchanged. `intervention_records` measures
an effect for a feature and for frequency-matched random features (features whose firing rate on the same
documents is closest), with bootstrap intervals over documents, in interp-lab's record shape.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from interp_assets.engine.activations import plan_batches
from interp_assets.engine.reader_model import model_lock

INTERVENTIONS = ("ablate", "clamp", "steer")


@dataclass(frozen=True)
class Intervention:
    """One edit of one feature, or of a set of features at once (a tuple): `kind` in INTERVENTIONS,
    `strength` as in the module docstring, applied to each feature of the set."""

    feature: int | tuple[int, ...]
    kind: str = "ablate"
    strength: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in INTERVENTIONS:
            raise ValueError(f"Unknown intervention {self.kind!r}; use one of {list(INTERVENTIONS)}.")
        many = self.feature if isinstance(self.feature, tuple) else None
        if many is not None and (not many or len(set(many)) < len(many)):
            raise ValueError(f"A set of features must be non-empty and without repeats; got {self.feature}.")

    @property
    def features(self) -> tuple[int, ...]:
        """The edited features (one for a single-feature edit)."""
        return self.feature if isinstance(self.feature, tuple) else (int(self.feature),)


def edited_hidden(
    h: Any, sae: Any, intervention: Intervention, real: Any, activations: Any | None = None
) -> Any:
    """The hidden state `h` [batch, tokens, d_in] after `intervention`; `real` [batch, tokens] marks the
    tokens that are not padding (the SAE reads them; padding is never edited). `activations` [batch,
    tokens, k]: the SAE's activations of the intervention's features on `h`, when already known (they are
    then not encoded again)."""
    import torch

    fs = list(intervention.features)
    d_sae = int(sae.cfg.d_sae)
    outside = [f for f in fs if not 0 <= f < d_sae]
    if outside:
        raise ValueError(f"feature {outside[0]} is outside the SAE (d_sae={d_sae}).")
    directions = sae.W_dec[fs].to(h.dtype)  # [k, d_in]
    s = float(intervention.strength)
    if s == 0.0:
        return h
    mask = real.to(h.dtype)
    if intervention.kind == "steer":
        return h + s * mask[..., None] * directions.sum(dim=0)
    if activations is None:
        with torch.no_grad():
            activations = sae.encode(h)[..., fs]
    a = activations.to(h.dtype) * mask[..., None]  # [batch, tokens, k]
    if intervention.kind == "ablate":
        return h - (s * a) @ directions
    fires = (a > 0).to(h.dtype)
    return h + ((s - a) * fires) @ directions


def _envoy(traced: Any, module_name: str) -> Any:
    node = traced
    for part in module_name.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


INPUT_SUFFIX = ":input"  # an edit site `<module>:input` edits the module's input instead of its output


def edit_site(reader: Any) -> str:
    """Where `reader`'s SAE reads, as the edit site the functions here take: its block's dotted name for a
    `hook_resid_post` SAE (the block's output), `<block>:input` for a `hook_resid_pre` SAE (its input)."""
    name = module_name(reader.model, reader.layer_module)
    return name + INPUT_SUFFIX if reader.hook.position == "pre" else name


def _split_site(site: str) -> tuple[str, bool]:
    """(module name, whether the edit is on its input)."""
    return (site.removesuffix(INPUT_SUFFIX), True) if site.endswith(INPUT_SUFFIX) else (site, False)


class _Replay:
    """Context manager: the first `len(outputs)` blocks of `blocks` (a ModuleList) stand in with the
    outputs they gave on the same rows before, so a forward pass that differs only after them skips them.
    Each stand-in answers attribute lookups as its block does (models read e.g. `layer.attention_type`)."""

    def __init__(self, blocks: Any, outputs: list[Any]) -> None:
        self.blocks, self.outputs, self.saved = blocks, outputs, []

    def __enter__(self) -> None:
        self.saved = [self.blocks[i] for i in range(len(self.outputs))]
        for i, output in enumerate(self.outputs):
            self.blocks[i] = _stand_in(self.saved[i], output)

    def __exit__(self, *exc: object) -> None:
        for i, block in enumerate(self.saved):
            self.blocks[i] = block


def _stand_in(block: Any, output: Any) -> Any:
    import torch

    class StandIn(torch.nn.Module):
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return output

        def __getattr__(self, name: str) -> Any:
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(block, name)

    return StandIn()


def _replayable_blocks(model: Any, site: str) -> tuple[Any, int] | None:
    """(the ModuleList of blocks that holds the edit site's module, how many of its first blocks every
    edit at `site` leaves unchanged: through the block for an output edit, before it for an input edit),
    or None when the site is not a block of such a list."""
    import torch

    name, on_input = _split_site(site)
    container, _, index = name.rpartition(".")
    if not index.isdigit():
        return None
    try:
        blocks = model.get_submodule(container) if container else model
    except AttributeError:
        return None
    if not isinstance(blocks, torch.nn.ModuleList):
        return None
    return blocks, int(index) + (0 if on_input else 1)


def module_name(model: Any, module: Any) -> str:
    """The dotted name of `module` inside `model` (how nnsight reaches it)."""
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(model).__name__}.")


def _holding_model_lock(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run `fn(model, ...)` holding `model_lock(model)`: edits add to the model's blocks or swap them, and
    the model may be shared with other readers and with document embeddings (`shared_reader_model`)."""

    @functools.wraps(fn)
    def holding(model: Any, *args: Any, **kwargs: Any) -> Any:
        with model_lock(model):
            return fn(model, *args, **kwargs)

    return holding


@_holding_model_lock
def run_with_intervention(
    model: Any,
    layer_name: str,
    sae: Any,
    intervention: Intervention | None,
    input_ids: Any,
    attention_mask: Any,
    read: Callable[[Any], Any],
    edit_mask: Any | None = None,
    forward_kwargs: dict[str, Any] | None = None,
) -> Any:
    """Run `model` with `intervention` applied at the edit site `layer_name` (`edit_site`: the output of a
    submodule, or with `:input` its input; through nnsight) and return `read(model output)` (e.g. the
    logits). None: the unedited forward pass. `edit_mask` [batch, tokens] limits the edit to the tokens
    the SAE reads (default: every real token); `forward_kwargs` go to the model's forward (e.g.
    output_hidden_states=True)."""
    args = (model, layer_name, sae, intervention, input_ids, attention_mask, read, edit_mask, forward_kwargs)
    return _traced_forward(*args)[0]


def _traced_forward(
    model: Any,
    layer_name: str,
    sae: Any,
    intervention: Intervention | None,
    input_ids: Any,
    attention_mask: Any,
    read: Callable[[Any], Any],
    edit_mask: Any | None = None,
    forward_kwargs: dict[str, Any] | None = None,
    activations: Any | None = None,
) -> tuple[Any, Any]:
    """`run_with_intervention`'s forward pass, also returning the hidden state at the site before the edit.
    `activations`: the SAE's activations of the edited features at the site, when known (`edited_hidden`)."""
    import torch
    from nnsight import NNsight

    traced = NNsight(model)
    real = (attention_mask if edit_mask is None else edit_mask).bool()
    name, on_input = _split_site(layer_name)
    with torch.no_grad():
        with traced.trace(input_ids=input_ids, attention_mask=attention_mask, **(forward_kwargs or {})):
            layer = _envoy(traced, name)
            if on_input:
                hidden = layer.input.save()
                if intervention is not None:
                    layer.input = edited_hidden(layer.input, sae, intervention, real, activations)
            else:
                out = layer.output
                hidden = (out[0] if isinstance(out, tuple) else out).save()
                if intervention is not None:
                    if isinstance(out, tuple):
                        layer.output = (edited_hidden(out[0], sae, intervention, real, activations), *out[1:])
                    else:
                        layer.output = edited_hidden(out, sae, intervention, real, activations)
            result = read(traced.output).save()
    return result, hidden


def _recorded_forward(blocks: Any, n_blocks: int, args: tuple) -> tuple[Any, Any, list[Any]]:
    """`_traced_forward(*args)` that also returns what the first `n_blocks` blocks of `blocks` output."""
    outputs: dict[int, Any] = {}
    handles = [
        blocks[i].register_forward_hook(lambda _m, _a, out, i=i: outputs.__setitem__(i, out))
        for i in range(n_blocks)
    ]
    try:
        result, hidden = _traced_forward(*args)
    finally:
        for handle in handles:
            handle.remove()
    if len(outputs) < n_blocks:  # a block the model skipped: nothing to replay
        return result, hidden, []
    return result, hidden, [outputs[i] for i in range(n_blocks)]


def next_token_logprob(logits: Any, input_ids: Any, attention_mask: Any) -> np.ndarray:
    """Per document: mean log-probability of each observed next token (causal LMs)."""
    import torch

    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    observed = logp.gather(-1, input_ids[:, 1:, None])[..., 0]
    valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).float()
    return ((observed * valid).sum(1) / valid.sum(1).clamp(min=1)).numpy()


def token_logprob(token_id: int) -> Callable[[Any, Any, Any], np.ndarray]:
    """Per document: mean log-probability of one token at every real position (e.g. a planted target)."""

    def score(logits: Any, input_ids: Any, attention_mask: Any) -> np.ndarray:
        import torch

        logp = torch.log_softmax(logits.float(), dim=-1)[..., token_id]
        mask = attention_mask.float()
        return ((logp * mask).sum(1) / mask.sum(1).clamp(min=1)).numpy()

    return score


def matched_controls(rates: np.ndarray, feature: int, n: int, seed: int = 0) -> list[int]:
    """`n` features whose firing rates are closest to `feature`'s (never-firing ones excluded), ties
    broken at random (seeded)."""
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero((rates > 0) & (np.arange(rates.size) != feature))
    jitter = rng.random(candidates.size) * 1e-9
    order = np.argsort(np.abs(rates[candidates] - rates[feature]) + jitter, kind="stable")
    return candidates[order[:n]].tolist()


def bootstrap_interval(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap 95% interval of the mean of `values` (`n_boot` seeded resamples; NaN for no values)."""
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_boot, values.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


@dataclass(frozen=True)
class ShiftScore:
    """A score that compares each document with itself unedited, for what a plain number per document does
    not hold (e.g. a vector of downstream features): `state(read(output), input_ids, attention_mask)` gives
    one row per document `[batch, m]`, and `distance(base, edited)` one number per document from the
    unedited and edited rows (0 when they are equal). Its baseline is 0; its effect is the mean distance."""

    state: Callable[[Any, Any, Any], np.ndarray]
    distance: Callable[[np.ndarray, np.ndarray], np.ndarray]


Score = Callable[[Any, Any, Any], np.ndarray] | ShiftScore


def budget_batches(attention_mask: Any, token_budget: int | None) -> list[tuple[list[int], Any, int]]:
    """The rows of a right-padded batch in forward passes as the engine plans them (length-sorted, at
    most `token_budget` padded tokens each; None: one pass): `(documents, their row index tensor, the width
    that holds their longest)`, so each pass drops the padding it does not need."""
    import torch

    n_docs = int(attention_mask.shape[0])
    if token_budget is None:
        plan = [list(range(n_docs))]
    elif token_budget < 1:
        raise ValueError(f"token_budget must be at least 1 token, got {token_budget}.")
    else:
        plan = plan_batches(attention_mask.sum(dim=1).tolist(), token_budget)
    out = []
    for docs in plan:
        rows = torch.as_tensor(docs)
        out.append((docs, rows, int(attention_mask[rows].sum(dim=1).max())))
    return out


@_holding_model_lock
def intervention_records(
    model: Any,
    layer_name: str,
    sae: Any,
    input_ids: Any,
    attention_mask: Any,
    feature: int,
    *,
    kind: str = "ablate",
    strengths: Sequence[float] = (1.0,),
    score: Score | Mapping[str, Score] = next_token_logprob,
    read: Callable[[Any], Any] = lambda output: output.logits,
    n_controls: int = 20,
    n_boot: int = 1000,
    seed: int = 0,
    edit_mask: Any | None = None,
    forward_kwargs: dict[str, Any] | None = None,
    token_budget: int | None = None,
    replay: bool = True,
) -> pl.DataFrame:
    """Effects of editing `feature` and, as controls, `n_controls` frequency-matched random features and
    a placebo (strength 0), on the given documents (right-padded rows), at the edit site `layer_name`
    (`edit_site`: a block's output, or with `:input` its input).

    With `replay` (when the site is a block of a ModuleList), the edited passes reuse the outputs of the
    blocks before the edit from the unedited pass instead of computing them again: the same numbers, for
    the cost of the blocks after the edit, while those outputs are held (one batch's hidden states per
    block before the edit).

    `edit_mask` [batch, tokens] marks the tokens the SAE reads (edited, and counted for firing); default:
    every real token. `forward_kwargs` go to every forward pass. `token_budget` splits the rows into
    forward passes of at most that many padded tokens (the reader's budget; None: one pass).

    `score(read(output), input_ids, attention_mask)` gives one number per document (default: mean
    log-probability of the observed next tokens); a `ShiftScore` instead compares each document's edited
    state with its unedited one (baseline 0). A mapping of named scores reads them all from the same
    forward passes (`score_name` says which; "score" for a single one). Per (feature, strength, score):
    `baseline_score` and `intervention_score` (means over the documents where the feature fires), `effect`
    (their mean paired difference) with a bootstrap 95% interval, `side_effect_score` (mean |difference|
    on the documents where it never fires), and `control_type` (`target`, `random_matched`, `placebo`).
    """
    import torch

    real = (attention_mask if edit_mask is None else edit_mask).bool()
    n_docs = int(input_ids.shape[0])
    batches = budget_batches(attention_mask, token_budget)
    # Every edited pass shares the blocks before the edit with the unedited one: their outputs are kept
    # from the unedited pass and replayed (`_Replay`), so edited passes compute only the blocks after it.
    replayable = _replayable_blocks(model, layer_name) if replay else None
    recorded: list[list[Any]] = [[] for _ in batches]
    # With replay, every edited pass sees the unedited pass's hidden state at the site: the SAE's
    # activations of the edited features are encoded once per batch (`site_codes`), not once per pass.
    site_hidden: list[Any] = [None for _ in batches]
    site_codes: list[Any] = [None for _ in batches]
    column: dict[int, int] = {}

    scores = dict(score) if isinstance(score, Mapping) else {"score": score}
    d_sae = int(sae.cfg.d_sae)

    def scored(intervention: Intervention | None) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Every score per document (input order; a ShiftScore's state rows); for the unedited pass also
        the features that fire in each document and the number of read tokens each fires on."""
        values: dict[str, np.ndarray] = {}
        fires_in_doc = np.zeros((n_docs, d_sae), dtype=bool)
        firing_tokens = np.zeros(d_sae)
        for b, (docs, rows, width) in enumerate(batches):
            ids, mask, edit = input_ids[rows, :width], attention_mask[rows, :width], real[rows, :width]
            args = (model, layer_name, sae, intervention, ids, mask, read, edit, forward_kwargs)
            if replayable is None:
                out, hidden = _traced_forward(*args)
            elif intervention is None:
                out, hidden, recorded[b] = _recorded_forward(*replayable, args)
                site_hidden[b] = hidden
            else:
                known = None
                if site_codes[b] is not None and intervention.kind != "steer":
                    known = site_codes[b][..., [column[f] for f in intervention.features]]
                with _Replay(replayable[0], recorded[b]):
                    out, hidden = _traced_forward(*args, activations=known)
            for name, fn in scores.items():
                part = np.asarray((fn.state if isinstance(fn, ShiftScore) else fn)(out, ids, mask))
                if name not in values:
                    values[name] = np.zeros((n_docs, *part.shape[1:]), dtype=part.dtype)
                values[name][docs] = part
            if intervention is None:
                with torch.no_grad():
                    fires = (sae.encode(hidden) > 0) & edit[..., None]
                fires_in_doc[docs] = fires.any(dim=1).numpy()
                firing_tokens += fires.sum(dim=(0, 1)).numpy()
        for name in scores:  # no documents: no forward pass
            values.setdefault(name, np.zeros(n_docs))
        return values, fires_in_doc, firing_tokens

    base_state, fires_in_doc, firing_tokens = scored(None)

    def per_document(name: str, state: np.ndarray) -> np.ndarray:
        """A score's value per document: the score itself, or a ShiftScore's distance from unedited."""
        fn = scores[name]
        return fn.distance(base_state[name], state) if isinstance(fn, ShiftScore) else state

    base = {name: per_document(name, base_state[name]) for name in scores}
    rates = firing_tokens / max(float(real.sum()), 1.0)  # share of read tokens where each feature fires
    controls = matched_controls(rates, feature, n_controls, seed)
    plan = [(feature, s, "target") for s in strengths]
    plan += [(c, s, "random_matched") for c in controls for s in strengths]
    plan.append((feature, 0.0, "placebo"))
    if replayable is not None:
        column.update({f: i for i, f in enumerate(dict.fromkeys(f for f, _, _ in plan))})
        with torch.no_grad():
            for b, hidden in enumerate(site_hidden):
                if hidden is not None:
                    site_codes[b] = sae.encode(hidden)[..., list(column)]
        site_hidden.clear()
    rows_out = []
    for f, strength, control in plan:
        edited, _, _ = scored(Intervention(f, kind, strength))
        on = fires_in_doc[:, f] if kind != "steer" else np.ones(n_docs, dtype=bool)
        off = ~fires_in_doc[:, f]
        for name in scores:
            after = per_document(name, edited[name])
            diff = after - base[name]
            low, high = bootstrap_interval(diff[on], n_boot, seed)
            rows_out.append(
                {
                    "feature": int(f),
                    "intervention": kind,
                    "strength": float(strength),
                    "control_type": control,
                    "score_name": name,
                    "documents": int(on.sum()),
                    "baseline_score": float(base[name][on].mean()) if on.any() else None,
                    "intervention_score": float(after[on].mean()) if on.any() else None,
                    "effect": float(diff[on].mean()) if on.any() else None,
                    "effect_ci_low": low if on.any() else None,
                    "effect_ci_high": high if on.any() else None,
                    "side_effect_score": float(np.abs(diff[off]).mean()) if off.any() else None,
                }
            )
    return pl.DataFrame(rows_out)


def document_embedding_shift(
    model: Any, layer_name: str, sae: Any, intervention: Intervention, input_ids: Any, attention_mask: Any
) -> np.ndarray:
    """Per document: 1 - cosine between the document embedding (last hidden state mean-pooled over real
    tokens) with and without `intervention` (encoders such as the embedded MiniLM)."""
    import torch

    def embed(hidden: Any) -> Any:
        mask = attention_mask.float()[..., None]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled.float(), dim=-1)

    def last_hidden(output: Any) -> Any:
        return output.last_hidden_state

    base = embed(run_with_intervention(model, layer_name, sae, None, input_ids, attention_mask, last_hidden))
    edited = embed(
        run_with_intervention(model, layer_name, sae, intervention, input_ids, attention_mask, last_hidden)
    )
    return (1.0 - (base * edited).sum(-1)).clamp(min=0).numpy()
