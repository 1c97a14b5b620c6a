"""feature_stats against an independent numpy computation, and keep_features."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from interp_assets.analysis.feature_stats import FEATURE_STATS_COLUMNS, feature_stats, keep_features


def _tables() -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """4 documents of 5 tokens; token activations -> pooled rows, as pooled_embeddings does."""
    tokens = pl.DataFrame(
        {
            "doc_id": [0, 0, 1, 2, 3, 0, 0, 1, 2],
            "token_index": [0, 1, 0, 0, 0, 2, 3, 4, 4],
            "feature": [0, 0, 0, 0, 0, 1, 1, 2, 2],
            "activation": [1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 0.5, 1.5, 4.0],
        }
    )
    pooled = (
        tokens.group_by("doc_id", "feature")
        .agg(
            pl.col("activation").max().alias("max_activation"),
            pl.col("activation").sum().alias("sum_activation"),
            pl.len().alias("active_tokens"),
        )
        .with_columns(pl.lit(5).alias("doc_tokens"))
    )
    return pooled, tokens, 4


def _entropy(masses: np.ndarray) -> float:
    p = masses[masses > 0] / masses.sum()
    return float(-(p * np.log(p)).sum())


def test_statistics_match_an_independent_computation() -> None:
    pooled, tokens, n_docs = _tables()
    stats = feature_stats(pooled, n_docs, token_activations=tokens, n_features=5)
    assert stats.columns == list(FEATURE_STATS_COLUMNS)
    assert stats["feature"].to_list() == [0, 1, 2, 3, 4]
    row = {r["feature"]: r for r in stats.iter_rows(named=True)}
    # feature 0: mass 2 in every document -> evenly spread, entropy log(4)
    assert row[0]["documents"] == 4 and row[0]["doc_frequency"] == 1.0
    assert row[0]["doc_entropy_normalized"] == pytest.approx(1.0)
    assert row[0]["active_tokens"] == 5 and row[0]["token_frequency"] == pytest.approx(5 / 20)
    assert row[0]["mean_activation"] == pytest.approx(8 / 5) and row[0]["max_activation"] == 2.0
    spread = _entropy(np.array([1, 1, 2, 2, 2.0]))
    assert row[0]["token_entropy"] == pytest.approx(spread)
    assert row[0]["token_entropy_normalized"] == pytest.approx(spread / math.log(20))
    # feature 1: all of its mass in one document
    assert row[1]["documents"] == 1 and row[1]["doc_entropy"] == pytest.approx(0.0)
    assert row[1]["token_entropy"] == pytest.approx(_entropy(np.array([3.0, 0.5])))
    # feature 2: masses 1.5 and 4 in two documents
    assert row[2]["doc_entropy"] == pytest.approx(_entropy(np.array([1.5, 4.0])))
    # never-active features are listed, as zeros
    for f in (3, 4):
        assert (row[f]["documents"], row[f]["active_tokens"], row[f]["doc_entropy"]) == (0, 0, 0.0)
    # without token activations the token entropy is unknown, the rest identical
    plain = feature_stats(pooled, n_docs, n_features=5)
    assert plain["token_entropy"].null_count() == 5
    assert plain.drop("token_entropy", "token_entropy_normalized").equals(
        stats.drop("token_entropy", "token_entropy_normalized")
    )


def test_keep_features_drops_never_and_always_on_features() -> None:
    pooled, _, n_docs = _tables()
    stats = feature_stats(pooled, n_docs, n_features=5)
    assert keep_features(stats, min_documents=1, max_doc_frequency=0.5) == [1, 2]
    assert keep_features(stats, min_documents=2, max_doc_frequency=1.0) == [0, 2]
    with pytest.raises(ValueError, match="max_doc_frequency"):
        keep_features(stats, max_doc_frequency=0)


def test_bad_input_is_named() -> None:
    pooled, _, _ = _tables()
    with pytest.raises(ValueError, match="n_features"):
        feature_stats(pooled, 4, n_features=2)
    with pytest.raises(ValueError, match="n_docs=3"):
        feature_stats(pooled, 3)
    with pytest.raises(ValueError, match="n_docs >= 1"):
        feature_stats(pooled, 0)
