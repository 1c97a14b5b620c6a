"""Tests of interp_assets.analysis.associations: hand values, scipy on dense data, planted signal, null,
inputs."""

from __future__ import annotations

import datetime as dt
import itertools

import numpy as np
import polars as pl
import pytest
from scipy import special, stats

from interp_assets.analysis import associations as assoc
from interp_assets.analysis.associations import (
    ASSOCIATION_SCHEMA,
    associations_for_column,
    feature_associations,
)

Z95 = 1.959963984540054

# --------------------------------------------------------------------------- helpers


def pooled_from_dense(x: np.ndarray, doc_ids: np.ndarray | None = None) -> pl.DataFrame:
    """pooled_embeddings frame (README schema) from a dense docs x features matrix of max activations.

    sum_activation = 2 * max, active_tokens = 1 + (feature % 3), doc_tokens = 10 + doc row.
    """
    d, f = np.nonzero(x)
    ids = np.arange(x.shape[0]) if doc_ids is None else np.asarray(doc_ids)
    return pl.DataFrame(
        {
            "dataset": ["d"] * d.size,
            "doc_id": ids[d].astype(np.int32),
            "feature": f.astype(np.int32),
            "max_activation": x[d, f].astype(np.float32),
            "sum_activation": (2 * x[d, f]).astype(np.float32),
            "active_tokens": (1 + f % 3).astype(np.int32),
            "doc_tokens": (10 + d).astype(np.int32),
        }
    )


def dense_values(x: np.ndarray, aggregation: str) -> np.ndarray:
    """What the module sees for each aggregation of `pooled_from_dense(x)`, in float32 as it compares."""
    n, w = x.shape
    active = x > 0
    if aggregation == "max":
        v = x
    elif aggregation == "sum":
        v = (2 * x).astype(np.float32)
    elif aggregation == "mean":
        v = (2 * x).astype(np.float32).astype(np.float64) / (10 + np.arange(n))[:, None]
    elif aggregation == "count":
        v = np.broadcast_to(1 + np.arange(w) % 3, (n, w))
    else:
        v = np.ones((n, w))
    return np.where(active, v, 0.0).astype(np.float32).astype(np.float64)


def random_dense(rng: np.random.Generator, n: int, w: int, density: float = 0.3) -> np.ndarray:
    """Sparse-ish activations rounded to 0.5 (many ties), with some all-zero documents."""
    x = np.where(rng.random((n, w)) < density, np.round(rng.gamma(2.0, 1.0, (n, w)) * 2) / 2, 0.0)
    x[rng.random(n) < 0.1] = 0.0  # documents with no active feature at all
    return x.astype(np.float32)


def delong_dense(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """AUC and DeLong standard error from all n_pos x n_neg pairs (reference for tiny inputs)."""
    pos, neg = x[y], x[~y]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    var = v10.var(ddof=1) / pos.size + v01.var(ddof=1) / neg.size
    return float(psi.mean()), float(np.sqrt(var))


def synthetic_pooled(n_docs: int, width: int, seed: int, mean_active: float = 30.0) -> pl.DataFrame:
    """Zipf feature frequencies and heterogeneous documents (correlated features), gamma activations."""
    rng = np.random.default_rng(seed)
    w = 1.0 / (np.arange(width) + 5.0) ** 1.2
    intensity = rng.lognormal(0.0, 0.6, n_docs)
    p = 1.0 - np.exp(-np.outer(intensity, w) * mean_active / (w.sum() * intensity.mean()))
    doc, feat = np.nonzero(rng.random((n_docs, width)) < p)
    return pl.DataFrame(
        {
            "doc_id": doc.astype(np.int32),
            "feature": feat.astype(np.int32),
            "max_activation": (rng.gamma(2.0, 1.0, doc.size) + 0.01).astype(np.float32),
        }
    )


def row(result: assoc.AssociationResult, feature: int) -> dict:
    return result.table.filter(pl.col("feature") == feature).row(0, named=True)


# --------------------------------------------------------------------------- hand-computed values


def test_auc_hand_example_with_ties_and_an_all_zero_document(monkeypatch: pytest.MonkeyPatch) -> None:
    # labels T T T F F F; feature 0 = 3, 2, 0, 1, 0, 0 (doc 2 and doc 5 have no pooled row at all)
    pool = pl.DataFrame(
        {
            "doc_id": pl.Series([0, 1, 3, 4], dtype=pl.Int32),
            "feature": pl.Series([0, 0, 0, 1], dtype=pl.Int32),
            "max_activation": pl.Series([3.0, 2.0, 1.0, 5.0], dtype=pl.Float32),
        }
    )
    y = pl.Series("toxic", [True, True, True, False, False, False])
    res = feature_associations(pool, np.arange(6), y, dataset="ds", min_docs=1)
    r = row(res, 0)
    # pairs: 3 and 2 beat all three negatives (6), 0 loses to 1 and ties two zeros (1) -> U = 7 of 9
    assert r["effect"] == pytest.approx(7 / 9, abs=1e-12)
    # Mixture p (few active docs expected per class): J = active positives ~ hypergeom(6, 3, 3), pmf
    # 1/20, 9/20, 9/20, 1/20. Given j: U = 3j + U_act, U_act ~ N(., j(3-j)/3). |U - 4.5| >= 2.5 means
    # U >= 7 or U <= 2: j=0 always (U=0), j=3 always (U=9), j=1 and 2 each Phi(-0.5/sqrt(2/3)) + Phi(-3.5/..)
    tail = special.ndtr(-0.5 / np.sqrt(2 / 3)) + special.ndtr(-3.5 / np.sqrt(2 / 3))
    assert r["test"] == "mann_whitney_mixture"
    assert r["p_value"] == pytest.approx(2 / 20 + 18 / 20 * tail, rel=1e-12)
    assert r["p_value"] == pytest.approx(0.34314, abs=1e-5)
    # plain normal approximation: ranks 0,0,0 -> 2; 1 -> 4; 2 -> 5; 3 -> 6. Tie term 3^3 - 3 = 24.
    # sigma = sqrt(9/12 * (7 - 24/30)) = sqrt(4.65); z = (7 - 4.5 - 0.5) / sigma
    monkeypatch.setattr(assoc, "MIXTURE_MIN_EXPECTED", 0.0)
    normal = row(feature_associations(pool, np.arange(6), y, min_docs=1), 0)
    assert normal["test"] == "mann_whitney"
    assert normal["p_value"] == pytest.approx(2 * special.ndtr(-2 / np.sqrt(4.65)), rel=1e-12)
    assert normal["p_value"] == pytest.approx(0.35368, abs=1e-5)
    # DeLong: V10 = 1, 1, 1/3 (sample var 12/81); V01 = 2/3, 5/6, 5/6 (sample var 1/108)
    se = np.sqrt(12 / 81 / 3 + 1 / 108 / 3)
    assert r["ci_low"] == pytest.approx(7 / 9 - Z95 * se, abs=1e-9)
    assert r["ci_high"] == 1.0  # 7/9 + 0.449 clipped
    assert (r["freq_pos"], r["freq_neg"]) == (pytest.approx(2 / 3), pytest.approx(1 / 3))
    assert (r["mean_pos"], r["mean_neg"]) == (pytest.approx(5 / 3), pytest.approx(1 / 3))
    assert r["n_docs"] == 6 and r["n_active"] == 3 and r["positive_class"] == "true"
    assert r["dataset"] == "ds" and r["column"] == "toxic" and r["statistic"] == "auc"
    # feature 1 fires only in negative doc 4: positives lose 3 pairs and tie 6 -> U = 3 of 9
    assert row(res, 1)["effect"] == pytest.approx(1 / 3, abs=1e-12)
    assert res.table.schema == pl.Schema(ASSOCIATION_SCHEMA)


def test_spearman_hand_example() -> None:
    # x = 0, 0, 1, 2 (doc 0 and 1 inactive), y = 1, 3, 2, 4: ranks x 1.5 1.5 3 4, y 1 3 2 4
    pool = pl.DataFrame({"doc_id": [2, 3], "feature": [7, 7], "max_activation": [1.0, 2.0]})
    res = feature_associations(pool, [0, 1, 2, 3], pl.Series("score", [1.0, 3.0, 2.0, 4.0]), min_docs=1)
    r = row(res, 7)
    # centred ranks x: -1, -1, 0.5, 1.5 (ss 4.5); y: -1.5, 0.5, -0.5, 1.5 (ss 5); cov = 1.5-0.5-0.25+2.25
    rho = 3.0 / np.sqrt(4.5 * 5.0)
    assert r["effect"] == pytest.approx(rho, abs=1e-12)
    assert r["statistic"] == "spearman" and r["positive_class"] is None and r["freq_pos"] is None
    t = rho * np.sqrt(2 / (1 - rho**2))
    assert r["p_value"] == pytest.approx(2 * stats.t.sf(t, 2), rel=1e-12)
    se = np.sqrt((1 + rho**2 / 2) / 1)  # Bonett-Wright with n - 3 = 1
    assert r["ci_low"] == pytest.approx(np.tanh(np.arctanh(rho) - Z95 * se), abs=1e-12)
    assert r["ci_high"] == pytest.approx(np.tanh(np.arctanh(rho) + Z95 * se), abs=1e-12)


# --------------------------------------------------------------------------- against scipy on dense data


@pytest.mark.parametrize("aggregation", ["max", "mean", "sum", "count", "binarize"])
def test_binary_matches_scipy_and_delong_on_dense_data(
    aggregation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(assoc, "MIXTURE_MIN_EXPECTED", 0.0)  # plain normal approximation everywhere
    rng = np.random.default_rng(11)
    n, w = 160, 12
    x = random_dense(rng, n, w)
    y = rng.random(n) < 0.35
    x[:, 4] *= 1 + y  # a real effect
    res = feature_associations(pooled_from_dense(x), np.arange(n), pl.Series("y", y), aggregation=aggregation)
    dense = dense_values(x, aggregation)
    assert res.n_tested + res.n_skipped_rare + res.n_skipped_constant == res.n_features_active
    for r in res.table.iter_rows(named=True):
        xf = dense[:, r["feature"]]
        ref = stats.mannwhitneyu(xf[y], xf[~y], method="asymptotic", use_continuity=True)
        assert r["effect"] == pytest.approx(ref.statistic / (y.sum() * (~y).sum()), abs=1e-12)
        assert r["p_value"] == pytest.approx(ref.pvalue, rel=1e-10, abs=1e-300)
        auc, se = delong_dense(xf, y)
        assert r["effect"] == pytest.approx(auc, abs=1e-12)
        assert r["ci_low"] == pytest.approx(max(0.0, auc - Z95 * se), abs=1e-10)
        assert r["ci_high"] == pytest.approx(min(1.0, auc + Z95 * se), abs=1e-10)
        assert r["freq_pos"] == pytest.approx((xf[y] > 0).mean())
        assert r["freq_neg"] == pytest.approx((xf[~y] > 0).mean())
        assert r["mean_pos"] == pytest.approx(xf[y].mean(), rel=1e-6)
        assert r["mean_neg"] == pytest.approx(xf[~y].mean(), rel=1e-6)
        assert r["n_active"] == int((xf > 0).sum())
        assert r["test"] == "mann_whitney"


def _exact_mwu_pvalue(x: np.ndarray, n_pos: int) -> tuple[np.ndarray, float]:
    """All C(n, n_pos) values of U (positives = every subset) and the null mean."""
    ranks = stats.rankdata(x)
    subsets = np.array(list(itertools.combinations(range(x.size), n_pos)))
    return ranks[subsets].sum(axis=1) - n_pos * (n_pos + 1) / 2, n_pos * (x.size - n_pos) / 2


@pytest.mark.parametrize("seed", range(6))
def test_mixture_pvalue_close_to_exact_permutation_where_normal_is_not(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, n_pos = 16, int(rng.integers(3, 7))
    x = np.where(rng.random(n) < 0.3, rng.gamma(2.0, 1.0, n), 0.0).astype(np.float32)
    x[:2] = [1.0, 0.5]  # at least two active documents
    y = np.zeros(n, dtype=bool)
    y[rng.choice(n, n_pos, replace=False)] = True
    res = feature_associations(pooled_from_dense(x[:, None]), np.arange(n), pl.Series("y", y), min_docs=1)
    r = res.table.row(0, named=True)
    assert r["test"] == "mann_whitney_mixture"
    us, mu = _exact_mwu_pvalue(x.astype(np.float64), n_pos)
    u = r["effect"] * n_pos * (n - n_pos)
    exact = float(np.mean(np.abs(us - mu) >= abs(u - mu) - 1e-9))
    assert r["p_value"] == pytest.approx(exact, abs=0.04)


def test_mixture_pvalue_of_an_extreme_feature_stays_positive() -> None:
    # J far beyond its window (12 sd + 30): p is bounded by the probability outside, not 0
    n, n_pos, k = 20000, 2000, 80
    x = np.zeros((n, 1), dtype=np.float32)
    x[:k, 0] = 1.0
    y = np.zeros(n, dtype=bool)
    y[:n_pos] = True  # all 80 active documents are positive (E J = 8, window up to J = 70)
    r = feature_associations(pooled_from_dense(x), np.arange(n), pl.Series("y", y), aggregation="binarize")
    p = r.table["p_value"][0]
    exact = stats.hypergeom.sf(k - 1, n, k, n_pos)
    assert 0 < exact <= p < 1e-50


def test_mixture_is_the_exact_hypergeometric_test_for_binarize() -> None:
    # all active values tie: U is linear in J, so p = P(|J - E J| >= |j - E J|) under hypergeom(n, k, n_pos)
    n, n_pos, k = 4000, 74, 63
    x = np.zeros((n, 1), dtype=np.float32)
    x[:k, 0] = 1.0
    for j in (0, 1, 3, 6, 10):
        y = np.zeros(n, dtype=bool)
        y[:j] = True
        y[k : k + n_pos - j] = True
        r = feature_associations(
            pooled_from_dense(x), np.arange(n), pl.Series("y", y), aggregation="binarize"
        ).table.row(0, named=True)
        support = np.arange(0, k + 1)
        pmf = stats.hypergeom.pmf(support, n, k, n_pos)
        e = k * n_pos / n
        exact = pmf[np.abs(support - e) >= abs(j - e) - 1e-9].sum()
        assert r["test"] == "mann_whitney_mixture"
        assert r["p_value"] == pytest.approx(min(exact, 1.0), rel=1e-9)


@pytest.mark.parametrize("method", ["spearman", "pearson"])
def test_numeric_mixture_close_to_exact_permutation(method: str) -> None:
    # a column mostly at one value (10 of 14 documents at 0): the mixture p-value applies. Exact null:
    # all 12,012 distinct arrangements of the column over the documents.
    n = 14
    rest = [1.0, 2.0, 2.0, 3.0]
    null_y = []
    for where in itertools.combinations(range(n), 4):
        for values in sorted(set(itertools.permutations(rest))):
            yy = np.zeros(n)
            yy[list(where)] = values
            null_y.append(yy)
    null_y = np.array(null_y)
    rng = np.random.default_rng(31)
    errors = []
    for _ in range(10):
        x = np.where(rng.random(n) < 0.35, rng.gamma(2.0, 1.0, n), 0.0).astype(np.float32)
        x[:2] = [1.0, 0.5]
        y = null_y[rng.integers(len(null_y))]
        r = feature_associations(
            pooled_from_dense(x[:, None]), np.arange(n), pl.Series("y", y), min_docs=1, method=method
        ).table.row(0, named=True)
        assert r["test"] == f"{method}_mixture"
        if method == "spearman":  # Pearson on midranks; y's ranks permute with y
            xs, ys = stats.rankdata(x), stats.rankdata(null_y, axis=1)
        else:
            xs, ys = x.astype(np.float64), null_y
        xc = (xs - xs.mean()) / np.linalg.norm(xs - xs.mean())
        yc = ys - ys.mean(axis=1, keepdims=True)
        null = (yc @ xc) / np.linalg.norm(yc, axis=1)
        obs = stats.spearmanr(x, y).statistic if method == "spearman" else stats.pearsonr(xs, y).statistic
        exact = float(np.mean(np.abs(null) >= abs(obs) - 1e-12))
        errors.append(r["p_value"] - exact)
    assert np.max(np.abs(errors)) < 0.1 and np.mean(np.abs(errors)) < 0.04


def test_numeric_mixture_is_exact_for_a_binary_column_and_binarize() -> None:
    n, n_pos, k = 4000, 74, 63
    x = np.zeros((n, 1), dtype=np.float32)
    x[:k, 0] = 1.0
    support = np.arange(0, k + 1)
    pmf = stats.hypergeom.pmf(support, n, k, n_pos)
    e = k * n_pos / n
    for j in (0, 3, 9):
        y = np.zeros(n)
        y[:j] = 1.0
        y[k : k + n_pos - j] = 1.0
        for method in ("spearman", "pearson"):
            r = feature_associations(
                pooled_from_dense(x),
                np.arange(n),
                pl.Series("y", y),
                kind="numeric",
                method=method,
                aggregation="binarize",
            ).table.row(0, named=True)
            assert r["test"] == f"{method}_mixture"
            assert r["p_value"] == pytest.approx(
                pmf[np.abs(support - e) >= abs(j - e) - 1e-9].sum(), rel=1e-9
            )


@pytest.mark.parametrize("aggregation", ["max", "mean", "count", "binarize"])
def test_spearman_and_pearson_match_scipy_on_dense_data(aggregation: str) -> None:
    rng = np.random.default_rng(12)
    n, w = 150, 10
    x = random_dense(rng, n, w)
    y = rng.normal(size=n).round(1)  # ties in the column too
    x[:, 2] = np.where(x[:, 2] > 0, x[:, 2] + np.exp(y), 0).astype(np.float32)
    dense = dense_values(x, aggregation)
    sp = feature_associations(pooled_from_dense(x), np.arange(n), pl.Series("s", y), aggregation=aggregation)
    pe = feature_associations(
        pooled_from_dense(x), np.arange(n), pl.Series("s", y), aggregation=aggregation, method="pearson"
    )
    assert sp.n_tested == pe.n_tested > 0
    for r in sp.table.iter_rows(named=True):
        ref = stats.spearmanr(dense[:, r["feature"]], y)
        assert r["effect"] == pytest.approx(ref.statistic, abs=1e-12)
        assert r["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    for r in pe.table.iter_rows(named=True):
        ref = stats.pearsonr(dense[:, r["feature"]], y)
        assert r["effect"] == pytest.approx(ref.statistic, abs=1e-10)
        assert r["p_value"] == pytest.approx(ref.pvalue, rel=1e-7)
        ci = ref.confidence_interval(0.95)
        assert (r["ci_low"], r["ci_high"]) == (
            pytest.approx(ci.low, abs=1e-9),
            pytest.approx(ci.high, abs=1e-9),
        )
        assert r["statistic"] == "pearson"


def test_point_biserial_is_pearson_on_binarize() -> None:
    rng = np.random.default_rng(13)
    x = random_dense(rng, 120, 5)
    y = rng.normal(size=120)
    res = feature_associations(
        pooled_from_dense(x), np.arange(120), pl.Series("y", y), aggregation="binarize", method="pearson"
    )
    for r in res.table.iter_rows(named=True):
        ref = stats.pointbiserialr(x[:, r["feature"]] > 0, y)
        assert r["effect"] == pytest.approx(ref.statistic, abs=1e-10)
        assert r["p_value"] == pytest.approx(ref.pvalue, rel=1e-7)


def test_feature_blocks_give_the_same_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    # force the sort keys to split the features into blocks of 8 (what happens for huge n x width)
    rng = np.random.default_rng(14)
    n, w = 300, 40
    x = random_dense(rng, n, w)
    pool = pooled_from_dense(x)
    lab = pl.Series("lab", rng.random(n) < 0.5)
    num = pl.Series("num", rng.normal(size=n))
    whole_b = feature_associations(pool, np.arange(n), lab).table
    whole_n = feature_associations(pool, np.arange(n), num).table
    monkeypatch.setattr(assoc, "_KEY_BITS", 31 + 1 + 3)
    assert feature_associations(pool, np.arange(n), lab).table.equals(whole_b)
    monkeypatch.setattr(assoc, "_KEY_BITS", 31 + 9 + 3)  # 300 docs -> 9 bits of document row
    assert feature_associations(pool, np.arange(n), num).table.equals(whole_n)


def test_row_order_and_doc_id_layout_do_not_matter() -> None:
    rng = np.random.default_rng(15)
    n = 200
    x = random_dense(rng, n, 15)
    ids = rng.permutation(n) + 5  # unordered doc ids
    pool = pooled_from_dense(x, ids)
    y = rng.normal(size=n)
    base = feature_associations(pooled_from_dense(x), np.arange(n), pl.Series("y", y)).table
    shuffled = pool.sample(fraction=1.0, shuffle=True, seed=1)
    out = feature_associations(shuffled, pl.Series(ids), pl.Series("y", y)).table
    assert out.equals(base)
    far = pooled_from_dense(x, ids * 100_000)  # ids too sparse for a lookup table: searchsorted path
    assert feature_associations(far, ids * 100_000, pl.Series("y", y)).table.equals(base)


# --------------------------------------------------------------------------- planted signal and null


def test_planted_binary_signal_is_found_and_nothing_else() -> None:
    n, width = 3000, 300
    pool = synthetic_pooled(n, width, seed=3)
    rng = np.random.default_rng(1003)  # not the seed of the pooled table (its stream drives intensity)
    toxic = rng.random(n) < 0.2
    planted = pl.DataFrame(  # feature 299 fires in 60% of toxic docs and 5% of the others
        {
            "doc_id": np.flatnonzero(rng.random(n) < np.where(toxic, 0.6, 0.05)).astype(np.int32),
        }
    ).with_columns(feature=pl.lit(299, pl.Int32), max_activation=pl.lit(2.5, pl.Float32))
    pool = pl.concat([pool.filter(pl.col("feature") != 299), planted.select(pool.columns)])
    res = feature_associations(pool, np.arange(n), pl.Series("toxic", toxic), dataset="demo")
    top = res.table.row(0, named=True)
    assert top["feature"] == 299 and top["significant"] and top["q_value"] < 1e-50
    assert top["effect"] > 0.75 and top["ci_low"] > 0.7 and top["freq_pos"] > 0.5 > 0.1 > top["freq_neg"]
    assert res.n_significant <= 3  # 5% FDR: at most a stray false discovery besides the planted one
    flipped = feature_associations(pool, np.arange(n), pl.Series("toxic", toxic), positive=False)
    assert row(flipped, 299)["effect"] == pytest.approx(1 - top["effect"], abs=1e-12)
    assert flipped.positive_class == "false" and flipped.negative_class == "true"


def test_planted_numeric_signal_is_found() -> None:
    n, width = 3000, 300
    pool = synthetic_pooled(n, width, seed=4)
    rng = np.random.default_rng(1004)
    score = rng.normal(size=n)
    docs = np.flatnonzero(rng.random(n) < special.expit(1.5 * score - 1))
    planted = pl.DataFrame(
        {
            "doc_id": docs.astype(np.int32),
            "feature": np.full(docs.size, 7, np.int32),
            "max_activation": (np.exp(0.5 * score[docs]) + rng.random(docs.size)).astype(np.float32),
        }
    )
    pool = pl.concat([pool.filter(pl.col("feature") != 7), planted])
    res = feature_associations(pool, np.arange(n), pl.Series("score", score))
    top = res.table.row(0, named=True)
    assert top["feature"] == 7 and top["significant"] and top["q_value"] < 1e-30
    assert top["ci_low"] > 0.25 and top["effect"] > 0.3
    assert res.n_significant <= 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_null_random_columns_have_no_significant_feature(seed: int) -> None:
    n, width = 4000, 400
    pool = synthetic_pooled(n, width, seed=100 + seed)
    rng = np.random.default_rng(seed)
    for values in (
        pl.Series("flag", rng.random(n) < 0.3),
        pl.Series("score", rng.normal(size=n)),
        pl.Series("rare", rng.random(n) < 0.02),
    ):
        res = feature_associations(pool, np.arange(n), values)
        assert res.n_tested > 300
        assert res.n_significant == 0, res.table.head(3)
        # p-values are roughly uniform under the null
        assert 0.35 < res.table["p_value"].median() < 0.65


@pytest.mark.parametrize(
    ("kind", "method"),
    [("half", "spearman"), ("rare", "spearman"), ("counts", "spearman"), ("counts", "pearson")],
)
def test_null_false_discovery_rate_over_many_seeds(kind: str, method: str) -> None:
    # Under the complete null, P(any discovery) <= alpha for BH: about 2 of 40 runs, allow some slack.
    # A rare label or a mostly-zero count column is where plain normal / t approximations of rare
    # features fail (11-23 of 40 runs had false discoveries without the mixture p-values).
    n = 4000
    pool = synthetic_pooled(n, 400, seed=101)
    rng = np.random.default_rng(99)
    draw = {
        "half": lambda: pl.Series("y", rng.random(n) < 0.5),
        "rare": lambda: pl.Series("y", rng.random(n) < 0.02),
        "counts": lambda: pl.Series("y", rng.poisson(0.03, n)),
    }[kind]
    results = [feature_associations(pool, np.arange(n), draw(), method=method) for _ in range(40)]
    assert sum(r.n_significant > 0 for r in results) <= 5
    p = np.concatenate([r.table["p_value"].to_numpy() for r in results])
    assert (p < 0.001).mean() < 0.002  # no excess of small p-values
    if kind != "half":
        assert results[0].table["test"].str.ends_with("_mixture").mean() > 0.9


# --------------------------------------------------------------------------- column types


def test_dates_and_datetimes_are_numeric() -> None:
    rng = np.random.default_rng(21)
    n = 120
    x = random_dense(rng, n, 6)
    days = rng.integers(18000, 20000, n)
    pool = pooled_from_dense(x)
    dates = pl.Series("when", days, dtype=pl.Int32).cast(pl.Date)
    by_date = feature_associations(pool, np.arange(n), dates).table
    by_number = feature_associations(pool, np.arange(n), pl.Series("when", days.astype(float))).table
    assert by_date.equals(by_number)
    stamps = dates.cast(pl.Datetime("us", "UTC")) + pl.Series(rng.integers(0, 10**9, n)).cast(
        pl.Duration("us")
    )
    res = feature_associations(pool, np.arange(n), stamps)
    ref = stats.spearmanr(x[:, 0], stamps.dt.epoch("us").to_numpy())
    assert row(res, 0)["effect"] == pytest.approx(ref.statistic, abs=1e-12)
    # two distinct dates: binary, positive = the later one
    two = pl.Series("when", [dt.date(2024, 1, 1), dt.date(2024, 6, 1)] * (n // 2))
    b = feature_associations(pool, np.arange(n), two)
    assert b.kind == "binary" and b.positive_class == "2024-06-01" and b.negative_class == "2024-01-01"


def test_two_valued_strings_and_numbers_are_binary() -> None:
    rng = np.random.default_rng(22)
    n = 200
    x = random_dense(rng, n, 8)
    pool = pooled_from_dense(x)
    flag = rng.random(n) < 0.4
    as_bool = feature_associations(pool, np.arange(n), pl.Series("c", flag)).table
    words = pl.Series("c", np.where(flag, "toxic", "clean"))
    res = feature_associations(pool, np.arange(n), words)
    assert res.kind == "binary" and res.positive_class == "toxic" and res.negative_class == "clean"
    assert res.table.drop("positive_class").equals(as_bool.drop("positive_class"))
    cat = feature_associations(pool, np.arange(n), words.cast(pl.Categorical), positive="toxic").table
    assert cat.equals(res.table)
    other = feature_associations(pool, np.arange(n), words, positive="clean")
    assert other.positive_class == "clean"
    assert row(other, 0)["effect"] == pytest.approx(1 - row(res, 0)["effect"], abs=1e-12)
    ints = feature_associations(pool, np.arange(n), pl.Series("c", flag.astype(np.int64)))
    assert ints.kind == "binary" and ints.positive_class == "1"
    assert ints.table.drop("positive_class").equals(as_bool.drop("positive_class"))
    as_numeric = feature_associations(pool, np.arange(n), pl.Series("c", flag), kind="numeric")
    assert as_numeric.statistic == "spearman"
    assert row(as_numeric, 0)["effect"] == pytest.approx(stats.spearmanr(x[:, 0], flag).statistic)


def test_nulls_are_dropped_and_counted() -> None:
    rng = np.random.default_rng(23)
    n = 150
    x = random_dense(rng, n, 6)
    pool = pooled_from_dense(x)
    y = rng.normal(size=n)
    missing = rng.random(n) < 0.2
    keep = ~missing
    with_nulls = pl.Series("y", np.where(missing, np.nan, y))  # NaN counts as missing
    with_nulls = with_nulls.scatter(np.flatnonzero(missing)[:3], None)  # and so do nulls
    res = feature_associations(pool, np.arange(n), with_nulls)
    assert res.n_null_dropped == int(missing.sum()) and res.n_docs == int(keep.sum())
    subset = feature_associations(pooled_from_dense(x[keep]), np.arange(keep.sum()), pl.Series("y", y[keep]))
    assert res.table.equals(subset.table)
    assert res.pooled_rows_ignored == 0
    for values in (
        pl.Series("b", [None if m else bool(v > 0) for m, v in zip(missing, y, strict=True)]),
        pl.Series("s", [None if m else ("a" if v > 0 else "b") for m, v in zip(missing, y, strict=True)]),
        pl.Series("y", np.where(missing, np.inf, y)),
    ):
        r = feature_associations(pool, np.arange(n), values)
        assert r.n_null_dropped == int(missing.sum()) and r.table["n_docs"].unique().to_list() == [keep.sum()]


def test_skips_rare_and_constant_features_and_counts_them() -> None:
    n = 50
    x = np.zeros((n, 4), dtype=np.float32)
    x[:3, 0] = 1.0  # active in 3 docs < min_docs = 5
    x[:, 1] = 2.0  # active everywhere with one value: constant
    x[:, 2] = np.arange(1, n + 1)  # active everywhere, varying: tested
    x[::2, 3] = 1.0
    y = pl.Series("y", np.arange(n) % 3 == 0)
    res = feature_associations(pooled_from_dense(x), np.arange(n), y)
    assert (res.n_features_active, res.n_tested, res.n_skipped_rare, res.n_skipped_constant) == (4, 2, 1, 1)
    assert sorted(res.table["feature"].to_list()) == [2, 3]
    num = feature_associations(pooled_from_dense(x), np.arange(n), pl.Series("y", np.arange(n) * 1.0))
    assert sorted(num.table["feature"].to_list()) == [2, 3] and num.n_skipped_constant == 1
    assert row(num, 2)["effect"] == pytest.approx(1.0)
    assert feature_associations(pooled_from_dense(x), np.arange(n), y, min_docs=1).n_tested == 3
    # a pooled frame with no rows: nothing tested, but a well-formed empty table
    empty = feature_associations(pooled_from_dense(np.zeros((n, 2))), np.arange(n), y)
    assert empty.table.height == 0 and empty.table.schema == pl.Schema(ASSOCIATION_SCHEMA)


def test_sorted_by_q_then_strength() -> None:
    res = feature_associations(
        synthetic_pooled(800, 60, seed=5),
        np.arange(800),
        pl.Series("y", np.random.default_rng(5).normal(size=800)),
    )
    t = res.table
    q = t["q_value"].to_numpy()
    assert np.all(np.diff(q) >= 0)
    for qv in np.unique(q):
        s = np.abs(t.filter(pl.col("q_value") == qv)["effect"].to_numpy())
        assert np.all(np.diff(s) <= 1e-15)


def test_associations_for_column_reads_raw_documents() -> None:
    rng = np.random.default_rng(24)
    n = 100
    x = random_dense(rng, n, 5)
    docs = pl.DataFrame(
        {
            "dataset": ["reviews"] * n,
            "doc_id": np.arange(n, dtype=np.int32),
            "text": ["t"] * n,
            "label": np.where(rng.random(n) < 0.5, "pos", "neg"),
            "tags": [["a"]] * n,
        }
    )
    res = associations_for_column(pooled_from_dense(x).lazy(), docs.lazy(), "label", aggregation="sum")
    assert res.dataset == "reviews" and res.column == "label" and res.positive_class == "pos"
    assert set(res.table["dataset"].to_list()) == {"reviews"}
    assert res.metadata()["n_docs"] == n and "table" not in res.metadata()
    with pytest.raises(ValueError, match=r"'nope' is not in the documents.*\['label'\]"):
        associations_for_column(pooled_from_dense(x), docs, "nope")
    with pytest.raises(ValueError, match="'doc_id' is the document key"):
        associations_for_column(pooled_from_dense(x), docs, "doc_id")


def test_unknown_pooled_documents_are_ignored_and_counted() -> None:
    x = random_dense(np.random.default_rng(25), 40, 3)
    pool = pooled_from_dense(x)
    ids = np.arange(30)  # documents 30..39 are not analyzed
    res = feature_associations(pool, ids, pl.Series("y", np.arange(30) % 2 == 0))
    assert res.pooled_rows_ignored == pool.filter(pl.col("doc_id") >= 30).height > 0
    assert res.n_docs == 30


# --------------------------------------------------------------------------- bad inputs


def _pool() -> pl.DataFrame:
    return pooled_from_dense(random_dense(np.random.default_rng(0), 20, 3))


@pytest.mark.parametrize(
    ("values", "kwargs", "message"),
    [
        (pl.Series("tags", [["a"]] * 20), {}, r"Column 'tags' has type List\(String\).*list\.len\(\)"),
        (pl.Series("meta", [{"a": 1}] * 20), {}, r"Column 'meta' has type Struct.*derive"),
        (pl.Series("blob", [b"x"] * 20), {}, r"Column 'blob' has type Binary.*boolean, numeric, date"),
        (pl.Series("topic", ["a", "b", "c", "d"] * 5), {}, r"'topic' is a string column with 4 distinct"),
        (pl.Series("empty", [None] * 20, dtype=pl.Float64), {}, r"'empty' has no usable values: all 20"),
        (pl.Series("same", [3] * 20), {}, r"'same' has a single distinct value \(3\)"),
        (pl.Series("s", [1.0, 2.0, 3.0, 4.0] * 5), {"kind": "binary"}, r"4 distinct values; kind='binary'"),
        (pl.Series("s", ["a", "b"] * 10), {"kind": "numeric"}, r"'s' holds strings; kind='numeric'"),
        (pl.Series("s", ["a", "b"] * 10), {"positive": "c"}, r"positive='c' is not a value.*'a' and 'b'"),
        (pl.Series("s", [1.0, 2.0, 3.0, 4.0] * 5), {"positive": 2}, r"positive=2 only applies to a binary"),
        (pl.Series("s", [1.0, 2.0] * 5), {}, r"'s' has 10 values but doc_ids has 20"),
        (pl.Series("s", [True, False] * 10), {"aggregation": "median"}, r"Unknown aggregation 'median'"),
        (pl.Series("s", [True, False] * 10), {"min_docs": 0}, r"min_docs must be a positive integer"),
        (pl.Series("s", [True, False] * 10), {"alpha": 1.5}, r"alpha must be between 0 and 1"),
        (pl.Series("s", [True, False] * 10), {"method": "kendall"}, r"Unknown method 'kendall'"),
        (pl.Series("s", [True, False] * 10), {"kind": "ordinal"}, r"Unknown kind 'ordinal'"),
    ],
)
def test_bad_columns_and_parameters(values: pl.Series, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        feature_associations(_pool(), np.arange(20), values, **kwargs)


def test_bad_numeric_column_with_too_few_values() -> None:
    with pytest.raises(ValueError, match=r"'s' has 2 non-null values; a correlation needs at least 3"):
        feature_associations(_pool(), np.arange(20), pl.Series("s", [1.0, 2.0] + [None] * 18), kind="numeric")
    # (3 distinct values over 3 documents is fine)
    ok = feature_associations(
        _pool(), np.arange(20), pl.Series("s", [1.0, 2.0, 3.0] + [None] * 17), min_docs=1
    )
    assert ok.n_docs == 3


def test_bad_doc_ids_and_pooled_frames() -> None:
    y = pl.Series("y", [True, False] * 10)
    with pytest.raises(ValueError, match="doc_ids repeats documents"):
        feature_associations(_pool(), [0] * 20, y)
    with pytest.raises(ValueError, match="doc_ids has 1 null"):
        feature_associations(_pool(), pl.Series([None] + list(range(19))), y)
    with pytest.raises(ValueError, match="doc_ids must be integers"):
        feature_associations(_pool(), np.arange(20) * 1.5, y)
    with pytest.raises(TypeError, match="must be a polars Series"):
        feature_associations(_pool(), np.arange(20), [True, False] * 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"pooled is missing column\(s\) \['doc_tokens'\]"):
        feature_associations(_pool().drop("doc_tokens"), np.arange(20), y, aggregation="mean")
    bad = pl.DataFrame({"doc_id": [0, 2], "feature": [0, 1], "max_activation": [1.0, -1.0]})
    with pytest.raises(ValueError, match=r"must be finite and >= 0.*feature 1 of doc 2 = -1.0"):
        feature_associations(bad, np.arange(20), y)
    nan_mean = bad.with_columns(sum_activation=pl.lit(1.0), doc_tokens=pl.lit(None, pl.Int32))
    with pytest.raises(ValueError, match=r"pooled values \(mean\).*doc_tokens present"):
        feature_associations(nan_mean, np.arange(20), y, aggregation="mean")
    with pytest.raises(ValueError, match=r"repeated \(doc_id, feature\) row\(s\).*one dataset's"):
        feature_associations(pl.concat([_pool(), _pool().head(2)]), np.arange(20), y)
    with pytest.raises(ValueError, match="negative feature index -3"):
        feature_associations(_pool().with_columns(feature=pl.lit(-3, pl.Int32)), np.arange(20), y)


# --------------------------------------------------------------------------- criteria (the asset's input)


def test_metadata_criteria_cover_booleans_numbers_dates_and_text_levels():
    n = 30
    docs = pl.DataFrame(
        {
            "doc_id": list(range(n)),
            "text": ["x"] * n,
            "flag": [i % 2 == 0 for i in range(n)],
            "score": [float(i) for i in range(n)],
            "day": [dt.date(2024, 1, 1) + dt.timedelta(days=i) for i in range(n)],
            "pair": ["yes" if i < 20 else "no" for i in range(n)],
            "topic": ["a"] * 12 + ["b"] * 15 + ["c"] * 3,
            "ticket": [f"T{i}" for i in range(n)],
            "same": [1] * n,
        }
    )
    criteria, skipped = assoc.metadata_criteria(docs, max_levels=5)
    assert criteria.columns == ["doc_id", "flag", "score", "day", "pair", "topic=b", "topic=a"]
    assert criteria["topic=a"].sum() == 12  # level "c" has fewer than MIN_LEVEL_DOCS documents
    assert "30 distinct values" in skipped["ticket"] and "fewer than 2" in skipped["same"]
    with pytest.raises(ValueError, match="'ticket' cannot be a criterion: 30 distinct values"):
        assoc.metadata_criteria(docs, ["ticket"], max_levels=5)
    with pytest.raises(ValueError, match=r"\['nope'\] are not in the documents"):
        assoc.metadata_criteria(docs, ["nope"])


def test_criteria_associations_find_a_planted_level_and_report_untestable_ones():
    rng = np.random.default_rng(0)
    n = 300
    topic = rng.choice(["refund", "billing", "other"], n)
    rows = []
    for d in range(n):
        if topic[d] == "refund" and rng.random() < 0.9:
            rows.append((d, 7, 2.0, 2.0, 1, 10))
        for f in rng.choice(np.arange(20, 60), 3, replace=False):
            rows.append((d, int(f), 1.0, 1.0, 1, 10))
    pooled = pl.DataFrame(
        rows,
        schema=["doc_id", "feature", "max_activation", "sum_activation", "active_tokens", "doc_tokens"],
        orient="row",
    )
    day = [dt.date(2024, 1, 1) + dt.timedelta(days=int(i)) for i in range(n)]
    docs = pl.DataFrame({"doc_id": list(range(n)), "topic": topic.tolist(), "day": day})
    criteria, _ = assoc.metadata_criteria(docs)
    # a criterion with a single non-null value left cannot be tested: reported, not raised
    criteria = criteria.with_columns(pl.Series("constant", [1.0] + [None] * (n - 1)))
    table, failed = assoc.criteria_associations(pooled, criteria, dataset="d")
    assert list(table.columns) == list(assoc.CRITERIA_SCHEMA)
    top = table.filter(pl.col("criterion") == "topic=refund").row(0, named=True)
    assert top["feature"] == 7 and top["significant"] and top["statistic"] == "auc" and top["effect"] > 0.9
    assert top["level"] == "refund" and top["column"] == "topic" and top["positive_class"] == "true"
    billing = table.filter(pl.col("criterion") == "topic=billing")
    assert billing.row(0, named=True)["feature"] == 7 and billing.row(0, named=True)["effect"] < 0.5
    # 120 null (criterion, feature) tests at 5% FDR: an occasional false discovery is allowed, not a pattern
    assert table.filter(pl.col("feature") != 7)["significant"].sum() <= 1
    assert set(table.filter(pl.col("criterion") == "day")["statistic"].to_list()) == {"spearman"}
    assert "constant" in failed
