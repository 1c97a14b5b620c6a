"""Training TopK SAEs with SAELens (`SAETrainer` + `TopKTrainingSAE`) on activations held in memory.

One module serves both SAEs the platform trains: the embedded token-level default
(`scripts/train_default_sae.py`, residual activations of every token) and the document-level SAEs
(`document_sae`, one mean-pooled embedding per document, trained on the user's own data as HypotheSAEs
does). Nothing here reaches the network (no wandb, no hub).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


# Seeding and initialising an SAE use torch's global random generator: one at a time, so that SAEs trained
# on several threads at once (runs sharing a process) start exactly as they would alone.
_INIT_LOCK = threading.Lock()


class TrainingStopped(Exception):
    """Training was stopped from outside (its `stop` event was set) before it finished."""


def shuffled_batches(
    acts: Any, batch_size: int, seed: int, stop: threading.Event | None = None
) -> Iterator[Any]:
    """Endless iterator of `[batch_size, d]` batches: a fresh seeded permutation of `acts` every epoch.
    Raises TrainingStopped at the next batch once `stop` is set."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    n = acts.shape[0]
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            if stop is not None and stop.is_set():
                raise TrainingStopped("SAE training was stopped before it finished.")
            yield acts[perm[start : start + batch_size]]


def _check_training_data(acts: Any, batch_size: int) -> None:
    """Refuse training data that is not `[n, d_in]` with at least one batch of rows."""
    if acts.ndim != 2 or acts.shape[0] < batch_size:
        raise ValueError(
            f"SAE training needs a [n, d_in] array with at least batch_size={batch_size} rows; got shape "
            f"{tuple(acts.shape)}. Give it more data or a smaller batch size."
        )


def train_topk_sae(
    acts: Any,
    *,
    d_sae: int,
    k: int,
    epochs: float,
    batch_size: int,
    lr: float,
    seed: int,
    metadata: dict[str, Any],
    dead_feature_samples: int = 200_000,
    stop: threading.Event | None = None,
) -> tuple[Any, int]:
    """Train a `TopKTrainingSAE` on `acts` (`[n, d_in]` float32) with SAELens's `SAETrainer`.

    Returns `(sae, samples_seen)`. A latent counts as dead after about `dead_feature_samples` inputs
    without firing; the TopK auxiliary loss then revives it. Setting `stop` ends the training within one
    step, raising TrainingStopped.
    """
    import torch
    from sae_lens import LoggingConfig, SAETrainer, TopKTrainingSAE
    from sae_lens.config import SAETrainerConfig  # not re-exported at the top level

    _check_training_data(acts, batch_size)
    d_in = int(acts.shape[1])
    sae_cfg = _topk_training_config(d_in, d_sae, k, metadata)
    with _INIT_LOCK:
        torch.manual_seed(seed)
        sae = TopKTrainingSAE(sae_cfg)

    steps_per_epoch = acts.shape[0] // batch_size
    total_steps = max(1, round(epochs * steps_per_epoch))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total_steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr / 10,  # required: SAETrainer asserts lr_end is set (only its runner config defaults it)
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=min(100, total_steps // 10),
        adam_beta1=0.9,
        adam_beta2=0.999,
        device="cpu",
        dead_feature_window=max(10, dead_feature_samples // batch_size),
        feature_sampling_window=max(10, steps_per_epoch),
        logger=LoggingConfig(log_to_wandb=False),
    )
    batches = shuffled_batches(acts, batch_size, seed, stop)
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches)

    # Set the norm scaling factor from all the data instead of letting fit() draw
    # n_batches_for_norm_estimate (default 1000) batches from the training iterator.
    mean_norm = acts.norm(dim=-1).mean().item()
    scale = math.sqrt(d_in) / mean_norm
    trainer.activation_scaler.scaling_factor = scale
    with torch.no_grad():  # start b_dec at the (scaled) data mean: centres the input of the first steps
        sae.b_dec.copy_(acts.mean(dim=0) * scale)
    trained = trainer.fit()  # folds the scaling factor into the weights and sets normalize_activations="none"
    return trained, trainer.n_training_samples


def _topk_training_config(d_in: int, d_sae: int, k: int, metadata: dict[str, Any]) -> Any:
    """The SAELens `TopKTrainingSAEConfig` both trainers use (float32, on CPU)."""
    from sae_lens import TopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    return TopKTrainingSAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        k=k,
        dtype="float32",
        device="cpu",
        apply_b_dec_to_input=True,
        normalize_activations="expected_average_only_in",
        rescale_acts_by_decoder_norm=True,
        aux_loss_coefficient=1.0,
        decoder_init_norm=0.1,
        metadata=SAEMetadata(**metadata),
    )


def train_topk_saes(
    acts: Any,
    *,
    d_sae: int,
    k: int,
    seeds: list[int],
    epochs: float,
    batch_size: int,
    lr: float,
    metadata: dict[str, Any],
    dead_feature_samples: int = 200_000,
    stop: threading.Event | None = None,
) -> tuple[list[Any], int]:
    """Train one SAELens `TopKTrainingSAE` per seed on `acts` (`[n, d_in]` float32), all members at once.

    Each member is what `train_topk_sae` (SAELens's `SAETrainer`) trains with that seed, step for step, to
    float rounding: SAELens initialises it; every step takes the same batch, the same loss (`topk_step`:
    TopK reconstruction plus the auxiliary loss on dead latents), clips the member's gradient to norm 1
    and takes an Adam step on SAELens's learning-rate schedule; the scaling factor is folded in at the
    end. Small SAEs (document SAEs: a few hundred latents) spend most of an autograd step on
    per-operation overhead, so the members are stacked and `topk_step` writes the gradients out:
    a handful of batched matrix products a step for all of them. Returns `(saes, samples_seen per
    member)`. Setting `stop` ends the training within one step, raising TrainingStopped.
    """
    import torch
    from sae_lens import TopKTrainingSAE
    from sae_lens.training.optim import get_lr_scheduler

    if not seeds:
        raise ValueError("train_topk_saes needs at least one seed (one per SAE to train).")
    _check_training_data(acts, batch_size)
    n, d_in = int(acts.shape[0]), int(acts.shape[1])
    members = []
    for seed in seeds:
        with _INIT_LOCK:
            torch.manual_seed(seed)
            members.append(TopKTrainingSAE(_topk_training_config(d_in, d_sae, k, metadata)))

    scale = math.sqrt(d_in) / acts.norm(dim=-1).mean().item()  # SAELens's expected_average_only_in
    b_dec_start = acts.mean(dim=0) * scale  # b_dec starts at the (scaled) data mean
    scaled = acts * scale
    params = [torch.stack([getattr(m, name).detach() for m in members]) for name in TOPK_PARAMS]
    params[3][:] = b_dec_start
    grads = [torch.zeros_like(p) for p in params]
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad

    steps_per_epoch = n // batch_size
    total_steps = max(1, round(epochs * steps_per_epoch))
    optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=True)
    scheduler = get_lr_scheduler(
        "cosineannealing",
        optimizer=optimizer,
        training_steps=total_steps,
        lr=lr,
        warm_up_steps=min(100, total_steps // 10),
        decay_steps=0,
        lr_end=lr / 10,
        num_cycles=1,
    )
    dead_window = max(10, dead_feature_samples // batch_size)
    since_fired = torch.zeros(len(seeds), d_sae)
    # each member's batches as `train_topk_sae` draws them (its seed's permutation every epoch)
    batches = [shuffled_batches(scaled, batch_size, seed, stop) for seed in seeds]
    for _ in range(total_steps):
        x = torch.stack([next(member_batches) for member_batches in batches])
        fired = topk_step(params, grads, x, k, since_fired > dead_window)
        since_fired += 1
        since_fired.masked_fill_(fired, 0)
        _clip_member_grad_norms(grads, 1.0)
        optimizer.step()
        scheduler.step()

    with torch.no_grad():
        for i, member in enumerate(members):
            for name, value in zip(TOPK_PARAMS, params, strict=True):
                getattr(member, name).copy_(value[i])
            member.fold_activation_norm_scaling_factor(scale)
            member.cfg.metadata.num_dead_features = int((since_fired[i] > dead_window).sum())
    return members, total_steps * batch_size


TOPK_PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def topk_step(params: list[Any], grads: list[Any], x: Any, k: int, dead: Any) -> Any:
    """One training step's loss gradients for stacked TopK SAEs, written into `grads`; returns the latents
    that fired (`[members, d_sae]` bool).

    `params`: `W_enc [m, d_in, d_sae]`, `b_enc [m, d_sae]`, `W_dec [m, d_sae, d_in]`, `b_dec [m, d_in]`;
    `x`: `[m, batch, d_in]`, one batch per member; `dead`: `[m, d_sae]` bool. The loss is SAELens's
    `TopKTrainingSAE.training_forward_pass` (`apply_b_dec_to_input`, `rescale_acts_by_decoder_norm`,
    auxiliary coefficient 1) for each member: the batch's mean squared reconstruction error, plus, while
    some latents are dead, their best `d_in // 2` reconstructing the residual, scaled by the dead share of
    that number. The gradients are that loss's, written out (the tests check them against autograd
    through SAELens): the activations are sparse, so this takes a few batched products where autograd
    takes many small operations.
    """
    import torch

    W_enc, b_enc, W_dec, b_dec = params
    batch = x.shape[1]
    with torch.no_grad():
        norm = W_dec.norm(dim=-1)  # [m, L]
        inv_norm = 1 / norm
        sae_in = x - b_dec[:, None]
        pre = torch.baddbmm(b_enc[:, None], sae_in, W_enc)  # [m, B, L]
        hidden = pre * norm[:, None]
        top_values, top_index = hidden.topk(k, dim=-1, sorted=False)
        acts = torch.zeros_like(hidden).scatter_(-1, top_index, top_values.clamp(min=0))
        scaled_acts = acts * inv_norm[:, None]
        out = torch.baddbmm(b_dec[:, None], scaled_acts, W_dec)
        grad_out = (out - x) * (2 / batch)
        fired = torch.zeros_like(dead).scatter_(1, top_index.flatten(1), (top_values > 0).flatten(1))

        grad_scaled = torch.bmm(grad_out, W_dec.transpose(1, 2))
        grad_W_dec = torch.bmm(scaled_acts.transpose(1, 2), grad_out)
        grad_inv_norm = (grad_scaled * acts).sum(1)
        grad_hidden = torch.zeros_like(hidden)
        n_dead = dead.sum(dim=-1)
        if bool(n_dead.any()):
            _add_auxiliary_gradients(
                x - out, hidden, dead, n_dead, W_dec, inv_norm, grad_hidden, grad_W_dec, grad_inv_norm
            )
        # through the ReLU of the top k (value > 0) into the pre-activations they came from
        grad_top = (
            grad_scaled.gather(-1, top_index) * inv_norm.gather(1, top_index.flatten(1)).view_as(top_index)
        ) * (top_values > 0)
        grad_hidden.scatter_add_(-1, top_index, grad_top)
        grad_pre = grad_hidden * norm[:, None]
        grad_norm = (grad_hidden * pre).sum(1) - grad_inv_norm * inv_norm * inv_norm
        grad_W_dec += (grad_norm * inv_norm)[:, :, None] * W_dec
        grad_b_enc = grad_pre.sum(1)
        grads[0].copy_(torch.bmm(sae_in.transpose(1, 2), grad_pre))
        grads[1].copy_(grad_b_enc)
        grads[2].copy_(grad_W_dec)
        grads[3].copy_(grad_out.sum(1) - torch.bmm(grad_b_enc[:, None], W_enc.transpose(1, 2))[:, 0])
    return fired


def _add_auxiliary_gradients(
    residual: Any,
    hidden: Any,
    dead: Any,
    n_dead: Any,
    W_dec: Any,
    inv_norm: Any,
    grad_hidden: Any,
    grad_W_dec: Any,
    grad_inv_norm: Any,
) -> None:
    """Add the gradients of SAELens's TopK auxiliary loss: each member's top dead latents (at most
    `d_in // 2`, at most its dead count), rescaled by decoder norm like the live ones, reconstruct the
    residual of its live ones; the loss is scaled by `min(dead / (d_in // 2), 1)`. Works on the dead
    latents' columns only (padded to the most any member has), so it costs what the dead count costs."""
    import torch

    members, batch, d_in = residual.shape
    k_cap = d_in // 2
    width = int(n_dead.max())
    # each member's dead latents first (stable: in latent order), padded with live ones marked invalid
    dead_index = torch.argsort(dead.to(torch.int8), dim=1, descending=True, stable=True)[:, :width]
    valid = torch.arange(width) < n_dead[:, None]  # [m, width]
    column = dead_index[:, None].expand(members, batch, width)
    masked = torch.where(valid[:, None], hidden.gather(-1, column), -torch.inf)
    k_member = n_dead.clamp(max=k_cap)
    values, position = masked.topk(int(k_member.max()), dim=-1)  # sorted: ranks below k_member are kept
    keep = (torch.arange(values.shape[-1]) < k_member[:, None, None]).expand_as(values)
    acts = torch.zeros_like(masked).scatter_(-1, position, torch.where(keep, values, 0.0))
    chosen = torch.zeros_like(masked).scatter_(-1, position, keep.to(masked.dtype))
    decoder = W_dec.gather(1, dead_index[:, :, None].expand(members, width, d_in))
    inv = inv_norm.gather(1, dead_index)[:, None]  # [m, 1, width]
    scaled = acts * inv
    weight = (n_dead.to(residual.dtype) / k_cap).clamp(max=1.0)
    grad_recons = (torch.bmm(scaled, decoder) - residual) * (2 / batch * weight[:, None, None])
    grad_scaled = torch.bmm(grad_recons, decoder.transpose(1, 2))  # [m, batch, width]
    rows = dead_index[:, :, None].expand(members, width, d_in)
    grad_W_dec.scatter_add_(1, rows, torch.bmm(scaled.transpose(1, 2), grad_recons))
    grad_inv_norm.scatter_add_(1, dead_index, (grad_scaled * acts).sum(1))
    grad_hidden.scatter_add_(-1, column, grad_scaled * inv * chosen)


def _clip_member_grad_norms(grads: list[Any], max_norm: float) -> None:
    """`torch.nn.utils.clip_grad_norm_` for each member separately (dimension 0 of every gradient)."""
    import torch

    squares = torch.stack([g.pow(2).flatten(start_dim=1).sum(dim=1) for g in grads]).sum(0)
    coef = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.ndim - 1))))


def evaluate_sae(sae: Any, acts: Any, chunk: int = 8192) -> dict[str, float]:
    """Fraction of variance explained, mean L0, dead-feature fraction and max L0 of `sae` on `acts`."""
    import torch

    with torch.inference_mode():
        d_sae = int(sae.cfg.d_sae)
        mean = acts.mean(dim=0)
        sq_err = 0.0
        total_var = 0.0
        l0_sum = 0.0
        l0_max = 0
        fired = torch.zeros(d_sae, dtype=torch.bool)
        for start in range(0, acts.shape[0], chunk):
            x = acts[start : start + chunk]
            feats = sae.encode(x)
            recon = sae.decode(feats)
            sq_err += (recon - x).pow(2).sum().item()
            total_var += (x - mean).pow(2).sum().item()
            active = feats > 0
            per_token = active.sum(dim=-1)
            l0_sum += per_token.sum().item()
            l0_max = max(l0_max, int(per_token.max().item()))
            fired |= active.any(dim=0)
        n = acts.shape[0]
    return {
        "fraction_variance_explained": 1.0 - sq_err / total_var,
        "mse_per_token": sq_err / n,
        "mean_l0": l0_sum / n,
        "max_l0": float(l0_max),
        "dead_feature_fraction": 1.0 - fired.float().mean().item(),
        "n_tokens": float(n),
    }
