"""The stacked TopK trainer against SAELens: the same gradients as autograd through SAELens's own training
loss, and the same SAE as SAELens's `SAETrainer` given the same seed and batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interp_assets.engine.sae_training import (
    TOPK_PARAMS,
    _topk_training_config,
    topk_step,
    train_topk_sae,
    train_topk_saes,
)

D_IN, D_SAE, K, BATCH = 24, 32, 3, 16


def _sae_lens_member(seed: int) -> torch.nn.Module:
    """A SAELens TopKTrainingSAE whose weights are not at their tidy start: decoder rows of unequal norm,
    a nonzero encoder bias and decoder bias, so every term of the gradient matters."""
    from sae_lens import TopKTrainingSAE

    torch.manual_seed(seed)
    sae = TopKTrainingSAE(_topk_training_config(D_IN, D_SAE, K, {"hook_name": "h", "model_name": "m"}))
    sae.cfg.normalize_activations = "none"  # the trainer scales the batch itself
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1) * 3 + 0.2)
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
        sae.b_enc.copy_(0.05 * torch.randn(D_SAE))
        sae.b_dec.copy_(0.1 * torch.randn(D_IN))
    return sae


@pytest.mark.parametrize("dead_counts", [(0, 0, 0), (5, 0, 31), (32, 12, 1)])
def test_step_gradients_are_autograd_through_sae_lens_training_loss(dead_counts: tuple[int, ...]) -> None:
    """Members with no, some and all latents dead (the auxiliary loss then picks at most d_in // 2 = 12 of
    them): each member's gradient is what autograd gives for SAELens's `training_forward_pass` loss."""
    from sae_lens.saes.sae import TrainStepInput

    generator = torch.Generator().manual_seed(1)
    members = [_sae_lens_member(seed) for seed in range(3)]
    x = torch.randn(3, BATCH, D_IN, generator=generator)
    dead = torch.zeros(3, D_SAE, dtype=torch.bool)
    for i, count in enumerate(dead_counts):
        dead[i, torch.randperm(D_SAE, generator=generator)[:count]] = True

    params = [torch.stack([getattr(m, name).detach() for m in members]) for name in TOPK_PARAMS]
    grads = [torch.zeros_like(p) for p in params]
    fired = topk_step(params, grads, x, K, dead)

    for i, member in enumerate(members):
        step = TrainStepInput(
            sae_in=x[i], dead_neuron_mask=dead[i], coefficients={}, n_training_steps=0, is_logging_step=False
        )
        output = member.training_forward_pass(step)
        output.loss.backward()
        if dead_counts[i]:
            assert float(output.losses["auxiliary_reconstruction_loss"]) > 0
        for name, grad in zip(TOPK_PARAMS, grads, strict=True):
            expected = getattr(member, name).grad
            torch.testing.assert_close(grad[i], expected, rtol=1e-4, atol=1e-6, msg=f"{name} of member {i}")
        assert torch.equal(fired[i], (output.feature_acts > 0).any(dim=0))


def _clustered(n: int = 300, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, D_IN))
    x = centres[rng.integers(0, 8, size=n)] + 0.4 * rng.normal(size=(n, D_IN))
    return torch.from_numpy((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))


def test_a_stacked_member_is_the_sae_that_sae_lens_trainer_trains() -> None:
    """Same seed, same batches, 90 steps (past the warm-up, with latents dying and the auxiliary loss on):
    the stacked trainer's member and SAELens's SAETrainer end with the same weights, to float rounding."""
    x = _clustered()
    settings = dict(
        d_sae=D_SAE,
        k=K,
        epochs=5.0,
        batch_size=BATCH,
        lr=1e-3,
        metadata={"hook_name": "h", "model_name": "m"},
        dead_feature_samples=160,
    )
    reference, reference_seen = train_topk_sae(x, seed=4, **settings)
    stacked, seen = train_topk_saes(x, seeds=[9, 4], **settings)
    assert seen == reference_seen == 5 * (300 // BATCH) * BATCH
    assert stacked[1].cfg.metadata.num_dead_features == reference.cfg.metadata.num_dead_features
    for name in TOPK_PARAMS:
        mine, theirs = getattr(stacked[1], name).detach(), getattr(reference, name).detach()
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5 * float(theirs.abs().max()))
    assert stacked[1].cfg.normalize_activations == reference.cfg.normalize_activations == "none"
    assert not torch.allclose(stacked[0].W_enc, stacked[1].W_enc)  # the other seed is another SAE


def test_training_needs_a_seed_and_a_batch_of_rows() -> None:
    x = _clustered(40)
    settings = dict(d_sae=D_SAE, k=K, epochs=1.0, lr=1e-3, metadata={"hook_name": "h", "model_name": "m"})
    with pytest.raises(ValueError, match="at least one seed"):
        train_topk_saes(x, seeds=[], batch_size=BATCH, **settings)
    with pytest.raises(ValueError, match="at least batch_size=64 rows"):
        train_topk_saes(x, seeds=[0], batch_size=64, **settings)
