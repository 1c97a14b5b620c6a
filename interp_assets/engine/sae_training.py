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
# in parallel threads (`train_document_saes`) start exactly as they would alone.
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
    from sae_lens import LoggingConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig  # not re-exported at the top level
    from sae_lens.saes.sae import SAEMetadata

    if acts.ndim != 2 or acts.shape[0] < batch_size:
        raise ValueError(
            f"SAE training needs a [n, d_in] array with at least batch_size={batch_size} rows; got shape "
            f"{tuple(acts.shape)}. Give it more data or a smaller batch size."
        )
    d_in = int(acts.shape[1])
    sae_cfg = TopKTrainingSAEConfig(
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
