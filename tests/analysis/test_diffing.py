"""Tests of interp_assets.analysis.diffing on real computation with hand-checked / published values."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy import stats

from interp_assets.analysis.diffing import (
    DIFF_SCHEMA,
    benjamini_hochberg,
    diff_features,
    fisher_exact_pvalue,
    log2_ratio_interval,
    mcnemar_exact_pvalue,
    nested_min_pvalue,
    newcombe_interval,
    newcombe_paired_interval,
    paired_diff_features,
    pairs_from_key,
    split_halves_null,
    two_by_two_pvalue,
    two_proportion_z_pvalue,
    wilson_interval,
)

# --------------------------------------------------------------------------- helpers


def pooled(rows: list[tuple[int, int, float]], dataset: str = "d") -> pl.DataFrame:
    """pooled_embeddings frame (README schema) from (doc_id, feature, max_activation) triples."""
    doc, feat, act = zip(*rows, strict=True) if rows else ((), (), ())
    n = len(doc)
    return pl.DataFrame(
        {
            "dataset": [dataset] * n,
            "doc_id": pl.Series(doc, dtype=pl.Int32),
            "feature": pl.Series(feat, dtype=pl.Int32),
            "max_activation": pl.Series(act, dtype=pl.Float32),
            "sum_activation": pl.Series([2 * a for a in act], dtype=pl.Float32),
            "active_tokens": pl.Series([2] * n, dtype=pl.Int32),
            "doc_tokens": pl.Series([10] * n, dtype=pl.Int32),
        }
    )


def synthetic_pooled(n_docs: int, width: int, seed: int, mean_active: float = 40.0) -> pl.DataFrame:
    """Realistic-ish pooled table: Zipf feature frequencies, document intensity (long docs fire more)."""
    rng = np.random.default_rng(seed)
    w = 1.0 / (np.arange(width) + 5.0) ** 1.4
    w = w[rng.permutation(width)]
    intensity = rng.lognormal(0.0, 0.6, n_docs)  # heterogeneous documents -> correlated features
    scale = mean_active / (w.sum() * intensity.mean())
    p = 1.0 - np.exp(-np.outer(intensity, w) * scale)
    doc, feat = np.nonzero(rng.random((n_docs, width)) < p)
    act = rng.gamma(2.0, 1.0, doc.size).astype(np.float32) + 0.01
    return pl.DataFrame(
        {
            "doc_id": doc.astype(np.int32),
            "feature": feat.astype(np.int32),
            "max_activation": act,
        }
    )


# --------------------------------------------------------------------------- interval formulas


def test_wilson_interval_hand_values() -> None:
    # 7/34: p = 0.205882, z^2 = 3.841459; centre = (p + z^2/68)/(1 + z^2/34) = 0.261740 / 1.112984 = 0.235169;
    # half = z*sqrt(p(1-p)/34 + z^2/4624)/1.112984 = 1.959964*0.075167/1.112984 = 0.132369
    lo, hi = wilson_interval(np.array([7, 0]), np.array([34, 10]))
    assert lo[0] == pytest.approx(0.103495, abs=1e-6)
    assert hi[0] == pytest.approx(0.367984, abs=1e-6)
    # 0/10: lower 0, upper z^2/(n + z^2) = 3.841459/13.841459 = 0.277533
    assert lo[1] == 0.0
    assert hi[1] == pytest.approx(0.277533, abs=1e-6)


@pytest.mark.parametrize(
    ("xa", "na", "xb", "nb", "low", "high"),
    [
        # Newcombe (1998) Statistics in Medicine 17:873, Table II, method 10
        (56, 70, 48, 80, 0.0524, 0.3339),
        (9, 10, 3, 10, 0.1705, 0.8090),
        (6, 7, 2, 7, 0.0582, 0.8062),
        (5, 56, 0, 29, -0.0381, 0.1926),
        (0, 10, 0, 20, -0.1611, 0.2775),
        (10, 10, 0, 10, 0.6075, 1.0000),
    ],
)
def test_newcombe_hybrid_score_matches_published(
    xa: int, na: int, xb: int, nb: int, low: float, high: float
) -> None:
    lo, hi = newcombe_interval(np.array([xa]), np.array([na]), np.array([xb]), np.array([nb]))
    assert lo[0] == pytest.approx(low, abs=5e-5)
    assert hi[0] == pytest.approx(high, abs=5e-5)


def test_newcombe_paired_matches_published() -> None:
    # Cavo et al. (2012) in Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables", ch. 8:
    # [[59, 6], [16, 80]] -> estimate -0.0621, 95% CI -0.1186 to -0.0046
    lo, hi = newcombe_paired_interval(np.array([59]), np.array([6]), np.array([16]), 161)
    assert lo[0] == pytest.approx(-0.1186, abs=5e-5)
    assert hi[0] == pytest.approx(-0.0046, abs=5e-5)


def test_log2_ratio_haldane_hand_values() -> None:
    # 9/10 vs 3/10, 0.5 added to each cell: (9.5/11)/(3.5/11) = 2.714286, log2 = 1.440573;
    # se(ln) = sqrt(1/9.5 - 1/11 + 1/3.5 - 1/11) = 0.457339; ln CI = 0.998529 +- 0.896369
    est, lo, hi = log2_ratio_interval(9, 10, 3, 10)
    assert est == pytest.approx(1.440573, abs=1e-6)
    assert lo == pytest.approx(0.147386, abs=1e-6)
    assert hi == pytest.approx(2.733759, abs=1e-6)
    # zero counts stay finite thanks to the correction: (0.5/11)/(0.5/11) = 1 -> 0
    est0, lo0, hi0 = log2_ratio_interval(0, 10, 0, 10)
    assert est0 == pytest.approx(0.0) and lo0 < 0 < hi0


# --------------------------------------------------------------------------- p-values


def test_fisher_matches_scipy_on_many_tables() -> None:
    rng = np.random.default_rng(1)
    na = rng.integers(1, 200, 800)
    nb = rng.integers(1, 200, 800)
    xa = np.minimum(rng.integers(0, 8, 800), na)
    xb = np.minimum(rng.integers(0, 12, 800), nb)
    xa[:100] = rng.integers(0, na[:100] + 1)  # also large, non-sparse tables
    got = fisher_exact_pvalue(xa, na, xb, nb)
    ref = [
        stats.fisher_exact([[a, n1 - a], [b, n2 - b]]).pvalue
        for a, n1, b, n2 in zip(xa, na, xb, nb, strict=True)
    ]
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-14)


def test_fisher_lady_tasting_tea() -> None:
    # [[3, 1], [1, 3]]: tables as or less likely: x=3 (16/70), x=1 (16/70), x=4 (1/70), x=0 (1/70) -> 34/70
    assert fisher_exact_pvalue(np.array([3]), np.array([4]), np.array([1]), np.array([4]))[
        0
    ] == pytest.approx(34 / 70, rel=1e-12)


def test_z_test_matches_chi_square_without_yates() -> None:
    xa, na = np.array([300, 51, 4000]), np.array([1000, 400, 10000])
    xb, nb = np.array([250, 80, 4100]), np.array([1000, 1000, 10000])
    got = two_proportion_z_pvalue(xa, na, xb, nb)
    for i in range(3):
        table = [[xa[i], na[i] - xa[i]], [xb[i], nb[i] - xb[i]]]
        assert got[i] == pytest.approx(stats.chi2_contingency(table, correction=False).pvalue, rel=1e-10)


def test_test_choice_by_expected_cells() -> None:
    # 9/10 vs 3/10: margins 12 / 8 -> min expected 10*8/20 = 4 < 5 -> Fisher
    # 60/100 vs 40/100: min expected 100*100/200 = 50 -> z test
    p, test = two_by_two_pvalue(
        np.array([9, 60]), np.array([10, 100]), np.array([3, 40]), np.array([10, 100])
    )
    assert test.tolist() == ["fisher_exact", "z_test"]
    assert p[0] == pytest.approx(stats.fisher_exact([[9, 1], [3, 7]]).pvalue, rel=1e-10)
    assert p[1] == pytest.approx(
        stats.chi2_contingency([[60, 40], [40, 60]], correction=False).pvalue, rel=1e-10
    )


def test_mcnemar_exact_hand_values() -> None:
    # 9 vs 2 discordant: 2 * P(X <= 2 | 11, 1/2) = 2 * (1 + 11 + 55) / 2048 = 134/2048
    # Cavo: 6 vs 16 -> 0.0525 (Fagerland et al.); no discordant pairs -> 1
    p = mcnemar_exact_pvalue(np.array([9, 6, 0, 5]), np.array([2, 16, 0, 5]))
    assert p[0] == pytest.approx(134 / 2048, rel=1e-12)
    assert p[1] == pytest.approx(0.0525, abs=5e-5)
    assert p[2] == 1.0 and p[3] == 1.0


def test_benjamini_hochberg_hand_example() -> None:
    p = np.array([0.01, 0.04, 0.03, 0.005])
    # sorted 0.005, 0.01, 0.03, 0.04 -> p*4/rank = 0.02, 0.02, 0.04, 0.04
    np.testing.assert_allclose(benjamini_hochberg(p), [0.02, 0.04, 0.04, 0.02])
    # counting 6 more untested hypotheses (p = 1): p*10/rank = 0.05, 0.05, 0.1, 0.1
    np.testing.assert_allclose(benjamini_hochberg(p, 10), [0.05, 0.1, 0.1, 0.05])
    # monotone step-up: 0.02*3/2 = 0.03 is beaten by the later 0.021*3/3
    np.testing.assert_allclose(benjamini_hochberg(np.array([0.001, 0.02, 0.021])), [0.003, 0.021, 0.021])
    with pytest.raises(ValueError, match="smaller than the number"):
        benjamini_hochberg(p, 3)


# --------------------------------------------------------------------------- diff_features


def test_diff_features_small_hand_example() -> None:
    # A: 10 docs, feature 7 in docs 0..8 (9/10), feature 2 in doc 0 with activation 0.05 (below threshold 0.1)
    # B: 10 docs, feature 7 in docs 0..2 (3/10), feature 4 in docs 0..1
    a = pooled([(d, 7, 1.0 + d) for d in range(9)] + [(0, 2, 0.05)], "A")
    b = pooled([(d, 7, 2.0) for d in range(3)] + [(0, 4, 1.0), (1, 4, 3.0)], "B")
    out = diff_features(a, 10, b, 10, threshold=0.1, n_features=100)
    assert out.schema == pl.Schema(DIFF_SCHEMA)
    assert out["feature"].to_list() == [7, 4]  # feature 2 never exceeds the threshold
    f7 = out.row(0, named=True)
    assert (f7["docs_a"], f7["docs_b"]) == (9, 3)
    assert f7["freq_diff"] == pytest.approx(0.6)
    assert (f7["freq_diff_ci_low"], f7["freq_diff_ci_high"]) == pytest.approx((0.1705, 0.8090), abs=5e-5)
    assert f7["log2_ratio"] == pytest.approx(1.440573, abs=1e-6)
    assert f7["test"] == "fisher_exact"
    p7 = stats.fisher_exact([[9, 1], [3, 7]]).pvalue  # 0.019762
    assert f7["p_value"] == pytest.approx(p7, rel=1e-10)
    # BH over the 100 features of the SAE: rank 1 -> p * 100 / 1
    assert f7["q_value"] == pytest.approx(min(1.0, p7 * 100))
    assert f7["direction"] == "a" and f7["significant"] is False
    assert f7["mean_activation_a"] == pytest.approx(np.mean([1.0 + d for d in range(9)]))
    assert f7["mean_activation_b"] == pytest.approx(2.0)
    f4 = out.row(1, named=True)
    assert (f4["docs_a"], f4["docs_b"], f4["direction"]) == (0, 2, "b")
    assert f4["mean_activation_a"] is None and f4["mean_activation_b"] == pytest.approx(2.0)


def test_diff_features_detects_planted_difference_and_sorts() -> None:
    rng = np.random.default_rng(3)
    rows_a, rows_b = [], []
    for d in range(2000):
        for f, (pa, pb) in {0: (0.30, 0.20), 1: (0.10, 0.10), 2: (0.02, 0.06), 3: (0.5, 0.5)}.items():
            if rng.random() < pa:
                rows_a.append((d, f, 1.0))
            if rng.random() < pb:
                rows_b.append((d, f, 1.0))
    out = diff_features(pooled(rows_a).lazy(), 2000, pooled(rows_b).lazy(), 2000, n_features=16384)
    sig = out.filter("significant")
    assert sorted(sig["feature"].to_list()) == [0, 2]
    assert dict(zip(sig["feature"], sig["direction"], strict=True)) == {0: "a", 2: "b"}
    assert out["q_value"].is_sorted()
    for r in sig.iter_rows(named=True):
        assert r["freq_diff_ci_low"] <= r["freq_diff"] <= r["freq_diff_ci_high"]
        assert r["log2_ratio_ci_low"] <= r["log2_ratio"] <= r["log2_ratio_ci_high"]
        assert np.sign(r["freq_diff_ci_low"]) == np.sign(r["freq_diff_ci_high"])  # CI excludes 0


def test_diff_features_user_errors() -> None:
    a = pooled([(0, 1, 1.0), (1, 1, 1.0), (2, 1, 1.0)])
    with pytest.raises(ValueError, match="n_docs=2"):
        diff_features(a, 2, a, 5)
    with pytest.raises(ValueError, match="missing column"):
        diff_features(a.drop("max_activation"), 5, a, 5)
    with pytest.raises(ValueError, match="n_features=1"):
        diff_features(a, 5, a, 5, n_features=1)
    with pytest.raises(ValueError, match="positive integer"):
        diff_features(a, 0, a, 5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_null_split_halves_has_no_significant_feature(seed: int) -> None:
    data = synthetic_pooled(3000, 4096, seed=100 + seed)
    out = split_halves_null(data, 3000, seed=seed, n_features=4096)
    assert out.height > 500  # many features tested, including many rare ones (Fisher) and common ones (z)
    assert {"fisher_exact", "z_test"} <= set(out["test"].unique())
    assert out["significant"].sum() == 0
    # and the p-values look uniform-ish: not too many small ones among the well-powered tests
    common = out.filter(pl.col("test") == "z_test")
    assert (common["p_value"] < 0.05).mean() < 0.1


def test_null_split_halves_false_discovery_rate_over_many_seeds() -> None:
    data = synthetic_pooled(2000, 512, seed=7)
    hits = [split_halves_null(data, 2000, seed=s, n_features=512)["significant"].sum() for s in range(20)]
    # BH at 5% under the complete null: P(any discovery) <= 5% per split
    assert sum(h > 0 for h in hits) <= 2


# --------------------------------------------------------------------------- paired


def test_paired_diff_mcnemar_hand_example() -> None:
    # 20 pairs. feature 5: both in pairs 0-1, A only in pairs 2-10 (9), B only in 11-12 (2), neither 13-19
    # A's doc ids are the pair numbers; B's doc ids are pair + 100 (shuffled order of pairs)
    pairs = pl.DataFrame({"doc_id_a": list(range(20)), "doc_id_b": [100 + i for i in range(20)]})[::-1]
    a = pooled([(i, 5, 1.0) for i in range(0, 11)] + [(i, 9, 2.0) for i in range(20)])
    b = pooled(
        [(100 + i, 5, 3.0) for i in (0, 1, 11, 12)] + [(100 + i, 9, 2.0) for i in range(20)] + [(999, 5, 1.0)]
    )
    out = paired_diff_features(a, b, pairs, n_features=10)
    r = out.filter(pl.col("feature") == 5).row(0, named=True)
    assert (r["n_pairs"], r["docs_both"], r["docs_a_only"], r["docs_b_only"]) == (20, 2, 9, 2)
    assert (r["docs_a"], r["docs_b"]) == (11, 4)  # doc 999 of B is in no pair: ignored
    assert r["freq_diff"] == pytest.approx(0.35)
    assert r["p_value"] == pytest.approx(134 / 2048, rel=1e-12)
    assert r["q_value"] == pytest.approx(min(1.0, 134 / 2048 * 10))
    assert r["test"] == "mcnemar_exact" and r["direction"] == "a"
    assert r["mean_activation_b"] == pytest.approx(3.0)
    lo, hi = newcombe_paired_interval(np.array([2]), np.array([9]), np.array([2]), 20)
    assert (r["freq_diff_ci_low"], r["freq_diff_ci_high"]) == pytest.approx((lo[0], hi[0]))
    # log ratio of marginals, 0.5 per cell: (2.5 + 9.5) / (2.5 + 2.5) = 2.4 -> log2 = 1.263034
    assert r["log2_ratio"] == pytest.approx(1.263034, abs=1e-6)
    with pytest.raises(ValueError, match=r"pairs.doc_id_b repeats document\(s\) \[100\]"):
        paired_diff_features(a, b, pl.DataFrame({"doc_id_a": [0, 1], "doc_id_b": [100, 100]}))
    f9 = out.filter(pl.col("feature") == 9).row(0, named=True)
    assert (f9["docs_both"], f9["p_value"], f9["direction"]) == (20, 1.0, None)


def test_pairs_from_key_and_errors() -> None:
    docs_a = pl.DataFrame({"dataset": "gpt", "doc_id": [0, 1, 2, 3], "ticket": [10, 11, 12, None]})
    docs_b = pl.DataFrame({"dataset": "claude", "doc_id": [0, 1, 2], "ticket": [12, 10, 99]})
    pairs = pairs_from_key(docs_a, docs_b, "ticket")
    assert pairs.rows() == [(0, 1, 10), (2, 0, 12)]
    with pytest.raises(ValueError, match=r"Dataset B \(claude\): key column 'ticket_id' not found"):
        pairs_from_key(docs_a.with_columns(ticket_id=pl.col("ticket")), docs_b, "ticket_id")
    dup = pl.DataFrame({"dataset": "claude", "doc_id": [0, 1, 2, 3], "ticket": [12, 10, 12, 10]})
    with pytest.raises(ValueError, match=r"Dataset B \(claude\).*not unique.*\[10, 12\]"):
        pairs_from_key(docs_a, dup, "ticket")
    with pytest.raises(ValueError, match="No key"):
        pairs_from_key(docs_a, docs_b.with_columns(ticket=pl.col("ticket") + 500), "ticket")


# --------------------------------------------------------------------------- metadata associations


def _dense(pool: pl.DataFrame, n_docs: int, feature: int) -> np.ndarray:
    x = np.zeros(n_docs)
    sub = pool.filter(pl.col("feature") == feature)
    x[sub["doc_id"].to_numpy()] = sub["max_activation"].to_numpy()
    return x


# --------------------------------------------------------------------------- unequal sizes


def test_test_choice_uses_the_smaller_sample_with_unequal_sizes() -> None:
    """Fisher where the smallest expected cell of the 2x2 table is below 5, computed here from the margins."""
    rng = np.random.default_rng(3)
    n_a = rng.integers(15, 300, 300)
    n_b = rng.integers(150, 900, 300)
    x_a = rng.binomial(n_a, 0.2)
    x_b = rng.binomial(n_b, rng.choice([0.01, 0.1], 300))
    p, test = two_by_two_pvalue(x_a, n_a, x_b, n_b)
    for i in range(300):
        table = np.array([[x_a[i], n_a[i] - x_a[i]], [x_b[i], n_b[i] - x_b[i]]], dtype=float)
        expected = np.outer(table.sum(1), table.sum(0)) / table.sum()
        want_fisher = expected.min() < 5
        assert test[i] == ("fisher_exact" if want_fisher else "z_test"), (i, table, expected.min())
        ref = (
            stats.fisher_exact(table.astype(int)).pvalue
            if want_fisher
            else stats.chi2_contingency(table, correction=False).pvalue
        )
        assert p[i] == pytest.approx(ref, rel=1e-9, abs=1e-300)
    assert {"fisher_exact", "z_test"} <= set(test.tolist())  # both branches exercised


def test_log2_ratio_interval_covers_the_true_ratio_with_unequal_sizes() -> None:
    """Coverage by simulation (independent of the formula): about 95%, not 68% (a halved standard error)."""
    rng = np.random.default_rng(11)
    n_a, n_b, p_a, p_b = 150, 600, 0.3, 0.15
    x_a = rng.binomial(n_a, p_a, 4000)
    x_b = rng.binomial(n_b, p_b, 4000)
    _, lo, hi = log2_ratio_interval(x_a, n_a, x_b, n_b)
    truth = np.log2(p_a / p_b)
    coverage = np.mean((lo <= truth) & (truth <= hi))
    assert 0.93 <= coverage <= 0.97, coverage


def test_paired_log2_ratio_interval_covers_the_true_ratio() -> None:
    """Matched pairs, correlated within a pair: 1,500 features are 1,500 independent replicates."""
    rng = np.random.default_rng(5)
    n_pairs, reps = 400, 1500
    # cell probabilities: both 0.2, A only 0.15, B only 0.05, neither 0.6 -> p_A = 0.35, p_B = 0.25
    cells = rng.choice(4, size=(n_pairs, reps), p=[0.2, 0.15, 0.05, 0.6])
    in_a = (cells == 0) | (cells == 1)
    in_b = (cells == 0) | (cells == 2)
    pa_doc, pa_feat = np.nonzero(in_a)
    pb_doc, pb_feat = np.nonzero(in_b)
    a = pl.DataFrame({"doc_id": pa_doc.astype(np.int32), "feature": pa_feat.astype(np.int32)}).with_columns(
        max_activation=pl.lit(1.0, dtype=pl.Float32)
    )
    b = pl.DataFrame({"doc_id": pb_doc.astype(np.int32), "feature": pb_feat.astype(np.int32)}).with_columns(
        max_activation=pl.lit(1.0, dtype=pl.Float32)
    )
    pairs = pl.DataFrame({"doc_id_a": np.arange(n_pairs), "doc_id_b": np.arange(n_pairs)})
    out = paired_diff_features(a, b, pairs)
    assert out.height == reps
    truth = np.log2(0.35 / 0.25)
    covered = (out["log2_ratio_ci_low"].to_numpy() <= truth) & (truth <= out["log2_ratio_ci_high"].to_numpy())
    assert 0.93 <= covered.mean() <= 0.975, covered.mean()


# --------------------------------------------------------------------------- adaptive firing thresholds


def _pooled_with_subpopulation(
    n_a: int, n_b: int, planted_b: int, seed: int, width: int = 30
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Every feature fires in ~60% of documents of both; feature 3 is much stronger in `planted_b` B docs."""
    rng = np.random.default_rng(seed)
    frames = []
    for n, planted in ((n_a, 0), (n_b, planted_b)):
        fires = rng.random((n, width)) < 0.6
        act = rng.gamma(2.0, 1.0, (n, width))
        fires[:planted, 3] = True
        act[:planted, 3] += 6.0
        doc, feat = np.nonzero(fires)
        frames.append(
            pl.DataFrame(
                {
                    "doc_id": doc.astype(np.int32),
                    "feature": feat.astype(np.int32),
                    "max_activation": act[doc, feat].astype(np.float32),
                }
            )
        )
    return frames[0], frames[1]


def test_adaptive_thresholds_equal_a_brute_force_computation() -> None:
    import math

    a, b = _pooled_with_subpopulation(300, 500, 25, seed=1, width=12)
    out = diff_features(a, 300, b, 500, firing="adaptive")
    bonferroni_out = diff_features(a, 300, b, 500, firing="adaptive", within_feature="bonferroni")
    quantiles = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01)
    for f in range(12):
        va = a.filter(pl.col("feature") == f)["max_activation"].to_numpy()
        vb = b.filter(pl.col("feature") == f)["max_activation"].to_numpy()
        pooled_values = np.sort(np.r_[va, vb])[::-1]
        cuts = [pooled_values.min()] + [
            pooled_values[math.ceil(q * 800) - 1]
            for q in quantiles
            if pooled_values.size > math.ceil(q * 800)
        ]
        p = []
        for t in cuts:
            table = np.array(
                [[(va >= t).sum(), 300 - (va >= t).sum()], [(vb >= t).sum(), 500 - (vb >= t).sum()]]
            )
            expected = np.outer(table.sum(1), table.sum(0)) / table.sum()
            p.append(
                stats.fisher_exact(table).pvalue
                if expected.min() < 5
                else stats.chi2_contingency(table, correction=False).pvalue
            )
        row = out.filter(pl.col("feature") == f).row(0, named=True)
        assert row["n_thresholds"] == len(cuts)
        sizes = [int((va >= t).sum() + (vb >= t).sum()) for t in cuts]
        bonferroni = min(1.0, min(p) * len(cuts))
        exact = nested_min_pvalue(sizes, 300, 500, min(p)) if len(cuts) > 1 and min(p) <= 0.05 else bonferroni
        assert row["p_value"] == pytest.approx(min(exact, bonferroni), rel=1e-6)
        assert min(p) <= row["p_value"] <= bonferroni * (1 + 1e-9)
        by_bonferroni = bonferroni_out.filter(pl.col("feature") == f).row(0, named=True)
        assert by_bonferroni["p_value"] == pytest.approx(bonferroni, rel=1e-9)
        chosen = [i for i, cut in enumerate(cuts) if cut == pytest.approx(row["threshold"])]
        assert chosen and p[chosen[0]] == pytest.approx(min(p), rel=1e-9)  # the best candidate is reported
        assert (
            row["docs_a"] == (va >= row["threshold"]).sum()
            and row["docs_b"] == (vb >= row["threshold"]).sum()
        )


def test_adaptive_thresholds_find_a_subpopulation_that_fixed_firing_misses() -> None:
    a, b = _pooled_with_subpopulation(1000, 1000, 60, seed=2)
    fixed = diff_features(a, 1000, b, 1000)
    adaptive = diff_features(a, 1000, b, 1000, firing="adaptive")
    assert not fixed.filter(pl.col("feature") == 3)["significant"].item()
    row = adaptive.filter(pl.col("feature") == 3).row(0, named=True)
    assert row["significant"] and row["direction"] == "b" and row["threshold"] > 2.0
    assert row["docs_b"] >= 50 and row["docs_a"] <= 20
    assert adaptive["significant"].sum() == 1  # nothing else: the other features are identical in A and B


def test_adaptive_independent_filtering_drops_untestable_features() -> None:
    # feature 1 fires in 3 documents: no split of 3 documents can reach p < 0.05 -> not counted by BH
    a = pooled([(i, 0, 1.0 + i % 7) for i in range(80)] + [(0, 1, 1.0)])
    b = pooled([(i, 0, 1.0 + i % 5) for i in range(90)] + [(0, 1, 2.0), (1, 1, 2.0)])
    out = diff_features(a, 100, b, 120, firing="adaptive", n_features=50)
    rare = out.filter(pl.col("feature") == 1).row(0, named=True)
    assert rare["tested"] is False and rare["q_value"] == 1.0 and not rare["significant"]
    assert out.filter(pl.col("feature") == 0)["tested"].item() is True
    with pytest.raises(ValueError, match="firing='sometimes'"):
        diff_features(a, 100, b, 120, firing="sometimes")


@pytest.mark.parametrize("sizes", [(1000, 1000), (700, 1300)])
def test_adaptive_null_split_halves_stays_clean(sizes: tuple[int, int]) -> None:
    """Random splits of one dataset (equal and unequal sizes): at most 1 of 20 with a significant feature."""
    n = sum(sizes)
    data = synthetic_pooled(n, 512, seed=21)
    hits = 0
    for seed in range(20):
        perm = np.random.default_rng(seed).permutation(n)
        in_a = np.zeros(n, dtype=bool)
        in_a[perm[: sizes[0]]] = True
        lut_a = pl.DataFrame({"doc_id": np.flatnonzero(in_a).astype(np.int32)})
        a = data.join(lut_a, on="doc_id", how="semi")
        b = data.join(lut_a, on="doc_id", how="anti")
        out = diff_features(a, sizes[0], b, sizes[1], firing="adaptive", n_features=512)
        hits += int(out["significant"].sum() > 0)
    assert hits <= 1, hits


def _min_p_by_enumeration(sizes: list[int], n_a: int, n_b: int, p_obs: float) -> float:
    """P(min candidate p <= p_obs) over every equally likely placement of the B documents (brute force).

    Documents are ranked by value; candidate j keeps the top sizes[j] ranks, so a placement of the B
    documents is a subset of ranks."""
    from itertools import combinations

    ranks = np.array(list(combinations(range(n_a + n_b), n_b)))
    best = np.ones(len(ranks))
    for t in sizes:
        in_b = (ranks < t).sum(axis=1)
        best = np.minimum(best, two_by_two_pvalue(t - in_b, n_a, in_b, n_b)[0])
    return float((best <= p_obs * (1 + 1e-9)).mean())


@pytest.mark.parametrize(
    ("sizes", "n_a", "n_b"),
    [([10, 6, 3], 8, 6), ([12, 9, 7, 4, 2], 9, 7), ([5], 7, 7), ([13, 13, 8, 4], 10, 5)],
)
def test_nested_min_pvalue_equals_enumeration_of_every_placement(
    sizes: list[int], n_a: int, n_b: int
) -> None:
    n = n_a + n_b
    attained = set()
    for t in sizes:
        x = np.arange(max(0, t - n_a), min(t, n_b) + 1)
        attained.update(two_by_two_pvalue(t - x, n_a, x, n_b)[0].tolist())
    attained = sorted(attained)
    for p_obs in attained[:: max(1, len(attained) // 6)]:
        exact = nested_min_pvalue(sizes, n_a, n_b, p_obs)
        assert exact == pytest.approx(_min_p_by_enumeration(sizes, n_a, n_b, p_obs), abs=1e-12), (p_obs, n)
        assert exact <= min(1.0, len(set(sizes)) * p_obs) * (1 + 1e-9)


def test_nested_min_pvalue_matches_simulation_at_realistic_sizes() -> None:
    """2,000 documents, the adaptive quantiles' nesting: exact within the Monte Carlo interval, below
    Bonferroni, and a single candidate is the test's own p-value (Fisher: exact by construction)."""
    rng = np.random.default_rng(5)
    n_a, n_b, sizes, p_obs = 1000, 1000, [1400, 1000, 400, 200, 100, 40, 20], 0.002
    runs = 20_000
    b_before = np.zeros((runs, len(sizes)), dtype=np.int64)
    for r in range(runs):
        ranks = rng.choice(n_a + n_b, n_b, replace=False)
        b_before[r] = [(ranks < t).sum() for t in sizes]
    t = np.asarray(sizes)
    p = two_by_two_pvalue(t - b_before, n_a, b_before, n_b)[0]
    simulated = (p.min(axis=1) <= p_obs * (1 + 1e-9)).mean()
    exact = nested_min_pvalue(sizes, n_a, n_b, p_obs)
    assert abs(exact - simulated) < 4 * np.sqrt(simulated * (1 - simulated) / runs) + 1e-4, (exact, simulated)
    assert exact < len(sizes) * p_obs
    fisher = two_by_two_pvalue(np.array([6]), 1000, np.array([0]), 1000)
    assert fisher[1][0] == "fisher_exact"
    assert nested_min_pvalue([6], 1000, 1000, fisher[0][0]) == pytest.approx(fisher[0][0], rel=1e-7)


def test_exact_within_feature_adjustment_is_never_above_bonferroni() -> None:
    """(The null stays clean with it: test_adaptive_null_split_halves_stays_clean runs the default, exact.)"""
    a, b = _pooled_with_subpopulation(1000, 1000, 60, seed=2)
    exact = diff_features(a, 1000, b, 1000, firing="adaptive")
    bonferroni = diff_features(a, 1000, b, 1000, firing="adaptive", within_feature="bonferroni")
    joined = exact.join(bonferroni, on="feature", suffix="_bonferroni")
    assert (joined["p_value"] <= joined["p_value_bonferroni"] * (1 + 1e-9)).all()
    assert (joined["p_value"] >= 0).all()
    with pytest.raises(ValueError, match="within_feature='sidak'"):
        diff_features(a, 1000, b, 1000, firing="adaptive", within_feature="sidak")


@pytest.mark.parametrize("firing", ["fixed", "adaptive"])
def test_more_pooled_rows_than_documents_is_refused(firing: str) -> None:
    # feature 3 listed for 4 documents of a dataset said to hold 3: pooled rows or n_docs are wrong
    pooled_a = pl.DataFrame({"doc_id": [0, 1, 2, 2], "feature": [3, 3, 3, 3], "max_activation": [1.0] * 4})
    pooled_b = pl.DataFrame({"doc_id": [0], "feature": [3], "max_activation": [1.0]})
    with pytest.raises(ValueError, match=r"Dataset A: feature 3 is active in 4 pooled rows but n_docs=3"):
        diff_features(pooled_a, 3, pooled_b, 3, n_features=5, firing=firing)
