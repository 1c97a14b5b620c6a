"""Feature matching across SAEs: seeds agree, an SAE matches itself, a random SAE does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interp_assets.analysis.matching import match_features, signature_correlations
from interp_assets.engine.sae_training import train_topk_sae

D_IN, N_TRUE, K = 24, 32, 3


@pytest.fixture(scope="module")
def activations() -> torch.Tensor:
    """Inputs built from a sparse code over 32 ground-truth directions (3 active per row)."""
    rng = np.random.default_rng(0)
    dictionary = rng.standard_normal((N_TRUE, D_IN))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    n = 6000
    code = np.zeros((n, N_TRUE))
    for i in range(n):
        code[i, rng.choice(N_TRUE, K, replace=False)] = rng.uniform(0.5, 2.0, K)
    return torch.from_numpy((code @ dictionary).astype(np.float32))


def _sae(acts: torch.Tensor, seed: int, epochs: float = 15.0):
    sae, _ = train_topk_sae(
        acts, d_sae=N_TRUE, k=K, epochs=epochs, batch_size=256, lr=3e-3, seed=seed, metadata={}
    )
    return sae


def _encode(sae, acts: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return sae.encode(acts).float().numpy()


def test_two_seeds_match_one_another_and_a_random_sae_does_not(activations: torch.Tensor) -> None:
    first, second = _sae(activations, 0), _sae(activations, 1)
    a, b = _encode(first, activations), _encode(second, activations)
    matches = match_features(
        a, b, decoder_a=first.W_dec.detach().numpy(), decoder_b=second.W_dec.detach().numpy()
    )
    assert matches.height == N_TRUE
    one_to_one = matches["match_b"].drop_nulls()
    assert one_to_one.n_unique() == one_to_one.len()  # each feature of B used at most once
    corr = np.sort(matches["match_correlation"].fill_null(0).to_numpy())[::-1]
    assert np.median(corr[: N_TRUE // 2]) > 0.8, corr
    # the same directions: decoder cosines of the well-matched pairs are high too
    well = matches.filter(matches["match_correlation"] > 0.8)
    assert well["decoder_cosine"].median() > 0.8

    random = _sae(activations, 2, epochs=0.01)  # barely trained
    noise = np.sort(
        match_features(a, _encode(random, activations))["match_correlation"].fill_null(0).to_numpy()
    )
    assert np.median(noise[::-1][: N_TRUE // 2]) < np.median(corr[: N_TRUE // 2]) - 0.2


def test_an_sae_matches_itself_feature_for_feature(activations: torch.Tensor) -> None:
    a = _encode(_sae(activations, 0, epochs=2.0), activations)
    matches = match_features(a, a)
    alive = np.flatnonzero(a.std(axis=0) > 0)
    mine = matches.filter(matches["feature_a"].is_in(alive.tolist()))
    assert mine["match_b"].to_list() == mine["feature_a"].to_list()
    assert mine["match_correlation"].to_numpy() == pytest.approx(1.0)


def test_correlations_match_numpy_and_dead_features_are_unmatched() -> None:
    rng = np.random.default_rng(1)
    a = np.maximum(rng.standard_normal((50, 4)), 0)
    b = np.maximum(rng.standard_normal((50, 3)), 0)
    b[:, 2] = 0  # never active: no signature
    got = signature_correlations(a, b)
    for i in range(4):
        for j in range(2):
            assert got[i, j] == pytest.approx(np.corrcoef(a[:, i], b[:, j])[0, 1])
    assert np.isnan(got[:, 2]).all()
    with pytest.raises(ValueError, match="same rows"):
        signature_correlations(a, b[:10])


def test_equal_signatures_are_told_apart_by_decoder_cosine() -> None:
    """Features firing on the same single document correlate exactly; the decoders pick the true pairs."""
    rng = np.random.default_rng(2)
    a = np.zeros((5, 6))
    a[0, :4] = rng.uniform(1, 2, 4)  # features 0-3: same document, perfectly correlated signatures
    a[1:, 4] = rng.uniform(1, 2, 4)
    decoder = rng.standard_normal((6, 8))
    perm = np.array([2, 0, 3, 1, 4, 5])  # B's feature j is A's feature perm[j]
    matches = match_features(a, a[:, perm], decoder_a=decoder, decoder_b=decoder[perm])
    expected = np.argsort(perm)[:5].tolist()
    assert matches["match_b"].to_list()[:5] == expected
    assert matches["best_b"].to_list()[:5] == expected
    assert matches["decoder_cosine"].to_list()[:5] == pytest.approx([1.0] * 5)
    assert matches["match_b"][5] is None  # never fires


def test_document_signatures_put_each_documents_max_in_its_row() -> None:
    import polars as pl

    from interp_assets.analysis.matching import document_signatures

    pooled = pl.DataFrame(
        {"doc_id": [7, 7, 3, 9], "feature": [0, 2, 1, 1], "max_activation": [1.5, 2.0, 0.5, 4.0]}
    )
    got = document_signatures(pooled, [3, 7], d_sae=3).toarray()  # doc 9 is not asked for
    assert got.tolist() == [[0.0, 0.5, 0.0], [1.5, 0.0, 2.0]]
    with pytest.raises(ValueError, match="outside the SAE's 2 features"):
        document_signatures(pooled, [7], d_sae=2)


def test_only_firing_features_are_matched_and_too_many_fail_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    from interp_assets.analysis import matching

    a = np.zeros((6, 5))
    a[:, 1] = [0, 1, 2, 0, 3, 1]
    a[:, 3] = 2.0  # fires everywhere at one value: no correlation, unmatched
    matches = match_features(a, a)
    assert matches["match_b"].to_list() == [None, 1, None, None, None]
    monkeypatch.setattr(matching, "MAX_PAIRS", 0)
    with pytest.raises(ValueError, match="matching 1 x 1 firing features"):
        match_features(a, a)
