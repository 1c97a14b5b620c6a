"""The lexical profile the document SAE reads beside each embedding (interp_assets.engine.documents)."""

from __future__ import annotations

import numpy as np
import pytest

from interp_assets.engine.documents import (
    LexicalProjection,
    document_representation,
    fit_lexical_projection,
    lexical_profiles,
    load_lexical_projection,
    save_lexical_projection,
)


def _corpus(seed: int = 0) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """200 documents over 300 token features: each fires ~12 common features; 20 documents (the "topic")
    also fire 3 of 5 rare features that no other document has."""
    rng = np.random.default_rng(seed)
    n = 200
    topic = np.zeros(n, dtype=bool)
    topic[rng.choice(n, 20, replace=False)] = True
    rows, feats = [], []
    for d in range(n):
        common = rng.choice(np.arange(5, 300), size=12, replace=False)
        extra = rng.choice(5, size=3, replace=False) if topic[d] else np.zeros(0, dtype=int)
        for f in np.r_[common, extra]:
            rows.append(d)
            feats.append(int(f))
    return np.array(rows), np.array(feats), n, topic


def test_profiles_are_unit_length_and_deterministic() -> None:
    rows, feats, n, _ = _corpus()
    first = fit_lexical_projection(rows, feats, n, dims=16, seed=3)
    again = fit_lexical_projection(rows, feats, n, dims=16, seed=3)
    assert first.components.shape == (16, 300)
    np.testing.assert_allclose(np.abs(first.components), np.abs(again.components), atol=1e-6)
    profiles = lexical_profiles(rows, feats, n, first)
    assert profiles.shape == (n, 16)
    np.testing.assert_allclose(np.linalg.norm(profiles, axis=1), 1.0, atol=1e-5)


def test_rare_shared_features_bring_a_topic_together() -> None:
    rows, feats, n, topic = _corpus()
    profiles = lexical_profiles(rows, feats, n, fit_lexical_projection(rows, feats, n, dims=8))
    sim = profiles @ profiles.T
    within = sim[np.ix_(topic, topic)][~np.eye(topic.sum(), dtype=bool)].mean()
    across = sim[np.ix_(topic, ~topic)].mean()
    assert within > across + 0.3, (within, across)


def test_idf_weights_rare_features_above_common_ones() -> None:
    rows = np.array([0, 1, 2, 3, 0])
    feats = np.array([7, 7, 7, 7, 2])  # feature 7 in every document, feature 2 in one
    projection = fit_lexical_projection(rows, feats, 4, dims=2)
    assert projection.idf[2] > projection.idf[7]
    # a feature repeated on one row counts once; a feature beyond the fitted ones is ignored
    twice = lexical_profiles(np.array([0, 0, 0]), np.array([2, 2, 99]), 1, projection)
    once = lexical_profiles(np.array([0]), np.array([2]), 1, projection)
    np.testing.assert_allclose(twice, once, atol=1e-6)
    # a document with no known feature is all zeros, not NaN
    assert not lexical_profiles(np.array([0]), np.array([99]), 2, projection).any()


def test_representation_gives_both_parts_equal_weight() -> None:
    emb = np.eye(3, 4, dtype=np.float32)
    prof = np.eye(3, 2, dtype=np.float32)
    prof[2] = 0
    x = document_representation(emb, prof)
    assert x.shape == (3, 6)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(x[0, :4] @ x[0, :4], 0.5, atol=1e-6)
    np.testing.assert_allclose(x[2, :4], emb[2], atol=1e-6)  # no profile: the embedding alone
    np.testing.assert_array_equal(document_representation(emb, None), emb / 1.0)
    with pytest.raises(ValueError, match="lexical profiles"):
        document_representation(emb, prof[:2])


def test_projection_round_trips_beside_the_sae(tmp_path) -> None:
    rows, feats, n, _ = _corpus()
    projection = fit_lexical_projection(rows, feats, n, dims=4)
    assert load_lexical_projection(str(tmp_path)) is None
    save_lexical_projection(projection, str(tmp_path))
    loaded = load_lexical_projection(str(tmp_path))
    assert isinstance(loaded, LexicalProjection)
    np.testing.assert_array_equal(loaded.components, projection.components)
    np.testing.assert_array_equal(loaded.idf, projection.idf)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="dims >= 1"):
        fit_lexical_projection(np.array([0]), np.array([1]), 1, dims=0)
    with pytest.raises(ValueError, match="doc_rows within"):
        fit_lexical_projection(np.array([5]), np.array([1]), 2, dims=2)
