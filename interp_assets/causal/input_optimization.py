"""Inputs that drive a feature (the inverse-embeddings method): continuous ascent on input embeddings
projected to real tokens, then a discrete token-swap search.

1. Gradient ascent on a sequence of input embeddings (initialized from random tokens) to raise the
   feature's SAE pre-activation at the hook, its strongest token counting; each position is then projected
   to the token whose embedding is most similar (cosine).
2. Greedy coordinate search on tokens: at each position, the `candidates` tokens whose one-hot gradient
   promises most (all tokens for a small vocabulary) are tried, and a swap is kept when it raises the
   feature's real (encoded) activation.

Returns the best prompts with their activations, to compare with the best dataset examples.
"""

from __future__ import annotations

from typing import Any

import polars as pl


def _hidden(model: Any, layer: int, position: str, **inputs: Any) -> Any:
    states = model(**inputs, output_hidden_states=True).hidden_states
    return states[layer + 1] if position == "post" else states[layer]


def _pre_activation(sae: Any, hidden: Any, feature: int) -> Any:
    """The feature's pre-activation (before TopK or ReLU): differentiable everywhere."""
    return (hidden - sae.b_dec) @ sae.W_enc[:, feature] + sae.b_enc[feature]


def feature_activation(
    model: Any, sae: Any, layer: int, position: str, feature: int, token_ids: Any
) -> float:
    """The feature's strongest activation (SAE encode) over the tokens of one prompt."""
    import torch

    with torch.no_grad():
        hidden = _hidden(model, layer, position, input_ids=token_ids[None])
        return float(sae.encode(hidden)[0, :, feature].max())


def optimize_inputs(
    model: Any,
    sae: Any,
    layer: int,
    position: str,
    feature: int,
    *,
    length: int = 8,
    restarts: int = 4,
    steps: int = 60,
    lr: float = 0.1,
    swap_rounds: int = 3,
    candidates: int = 32,
    seed: int = 0,
) -> pl.DataFrame:
    """Prompts of `length` tokens that drive `feature`: one per restart, best first, with `token_ids` and
    `activation` (the feature's strongest encoded activation over the prompt's tokens)."""
    import torch

    if not 0 <= feature < int(sae.cfg.d_sae):
        raise ValueError(f"feature {feature} is outside the SAE (d_sae={int(sae.cfg.d_sae)}).")
    if length < 1 or restarts < 1:
        raise ValueError("length and restarts must be at least 1.")
    embedding = model.get_input_embeddings().weight.detach()
    vocab = embedding.shape[0]
    unit = torch.nn.functional.normalize(embedding, dim=-1)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(restarts):
        start = torch.randint(0, vocab, (length,), generator=generator)
        x = embedding[start].clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            pre = _pre_activation(sae, _hidden(model, layer, position, inputs_embeds=x[None]), feature)
            (-torch.logsumexp(pre[0] * 4.0, dim=0) / 4.0).backward()  # a smooth max over positions
            optimizer.step()
        ids = (torch.nn.functional.normalize(x.detach(), dim=-1) @ unit.T).argmax(-1)
        best = feature_activation(model, sae, layer, position, feature, ids)
        for _ in range(swap_rounds):
            improved = False
            for pos in range(length):
                one_hot = torch.nn.functional.one_hot(ids, vocab).float().requires_grad_(True)
                pre = _pre_activation(
                    sae, _hidden(model, layer, position, inputs_embeds=(one_hot @ embedding)[None]), feature
                )
                pre[0].max().backward()
                tried = torch.topk(one_hot.grad[pos], min(candidates, vocab)).indices
                for token in tried.tolist():
                    if token == int(ids[pos]):
                        continue
                    trial = ids.clone()
                    trial[pos] = token
                    value = feature_activation(model, sae, layer, position, feature, trial)
                    if value > best:
                        ids, best, improved = trial, value, True
            if not improved:
                break
        rows.append({"token_ids": ids.tolist(), "activation": best})
    return pl.DataFrame(rows).sort("activation", descending=True)
