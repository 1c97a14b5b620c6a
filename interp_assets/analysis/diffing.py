"""Which SAE features differ between two datasets, and how sure we are.

Pure statistics over `pooled_embeddings` frames (README schema); no Dagster here.

Unpaired diff (`diff_features`): a document *has* a feature when its `max_activation` exceeds
`threshold`. Per feature we compare the document frequencies of A and B with

- the difference `freq_a - freq_b` and its 95% Newcombe hybrid score interval (Newcombe 1998, method 10:
  Wilson intervals of both proportions combined by square-and-add);
- `log2_ratio` = log2 of the ratio of the two frequencies with the Haldane-Anscombe correction (0.5 added
  to every cell of the 2x2 table) and its Wald interval on the log scale;
- a two-sided p-value: Fisher's exact test when any expected cell of the 2x2 table is below 5, else the
  two-proportion z test (equal to Pearson's chi-square without continuity correction);
- Benjamini-Hochberg q-values over *all* features of the SAE (`n_features`): features that fire in
  neither dataset are counted as tests with p = 1.

Paired diff (`paired_diff_features`): A and B share a key (the same prompts answered by two models);
exact McNemar test on the discordant pairs and Newcombe's interval for paired proportions (1998b,
method 10).

Everything is vectorized over features (numpy on per-feature counts from one polars group-by), so a
16k-wide SAE over 100k documents per side is a few hundred milliseconds of work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

Z95 = 1.959963984540054  # two-sided 95% normal quantile
FISHER_MIN_EXPECTED = 5.0
_FISHER_REL_TOL = 1e-7  # as R's fisher.test: tables within this relative pmf of the observed count as ties
_FISHER_CHUNK = 4_000_000  # support points evaluated per vectorized Fisher chunk

FrameLike = pl.DataFrame | pl.LazyFrame | pa.Table

DIFF_SCHEMA: dict[str, pl.DataType] = {
    "feature": pl.Int32(),
    "docs_a": pl.Int64(),
    "docs_b": pl.Int64(),
    "freq_a": pl.Float64(),
    "freq_b": pl.Float64(),
    "freq_diff": pl.Float64(),
    "freq_diff_ci_low": pl.Float64(),
    "freq_diff_ci_high": pl.Float64(),
    "log2_ratio": pl.Float64(),
    "log2_ratio_ci_low": pl.Float64(),
    "log2_ratio_ci_high": pl.Float64(),
    "p_value": pl.Float64(),
    "q_value": pl.Float64(),
    "significant": pl.Boolean(),
    "direction": pl.String(),
    "mean_activation_a": pl.Float64(),
    "mean_activation_b": pl.Float64(),
    "test": pl.String(),
}
"""Columns of `diff_features` (paired mode adds `n_pairs`, `docs_both`, `docs_a_only`, `docs_b_only`;
adaptive firing adds `threshold`, `n_thresholds`, `tested`)."""

EXTRA_COLUMNS: dict[str, pl.DataType] = {
    "threshold": pl.Float64(),
    "n_thresholds": pl.Int64(),
    "tested": pl.Boolean(),
}

AGGREGATIONS = ("max", "mean", "sum", "binarize", "count")


# --------------------------------------------------------------------------- input helpers


def as_lazy(frame: FrameLike, what: str, columns: Sequence[str] = ()) -> pl.LazyFrame:
    """`frame` (polars or Arrow) as a LazyFrame after checking it has `columns` (errors name `what`)."""
    if isinstance(frame, pa.Table):
        frame = pl.from_arrow(frame)
    if isinstance(frame, pl.DataFrame):
        lf = frame.lazy()
    elif isinstance(frame, pl.LazyFrame):
        lf = frame
    else:
        raise TypeError(
            f"{what}: expected a polars DataFrame/LazyFrame or a pyarrow Table, got {type(frame)!r}."
        )
    have = lf.collect_schema().names()
    missing = [c for c in columns if c not in have]
    if missing:
        raise ValueError(
            f"{what} is missing column(s) {missing}; it has {have}. "
            "Pass the pooled_embeddings / raw_documents table in the README schema."
        )
    return lf


def pooled_value_expr(aggregation: str) -> pl.Expr:
    """Expression of one pooled row's value under `aggregation` (README: mean = sum / doc_tokens)."""
    if aggregation == "max":
        return pl.col("max_activation").cast(pl.Float64)
    if aggregation == "sum":
        return pl.col("sum_activation").cast(pl.Float64)
    if aggregation == "mean":
        return pl.col("sum_activation").cast(pl.Float64) / pl.col("doc_tokens").cast(pl.Float64)
    if aggregation == "count":
        return pl.col("active_tokens").cast(pl.Float64)
    if aggregation == "binarize":
        return pl.lit(1.0, dtype=pl.Float64)
    raise ValueError(f"Unknown aggregation {aggregation!r}; use one of {list(AGGREGATIONS)}.")


def pooled_value_columns(aggregation: str) -> list[str]:
    """pooled_embeddings columns that `pooled_value_expr(aggregation)` reads."""
    return {
        "max": ["max_activation"],
        "sum": ["sum_activation"],
        "mean": ["sum_activation", "doc_tokens"],
        "count": ["active_tokens"],
        "binarize": [],
    }[aggregation]


def _check_features(features: np.ndarray, n_features: int | None, what: str) -> int:
    """Validate feature indices; return the number of features BH counts."""
    if features.size and features.min() < 0:
        raise ValueError(f"{what} has negative feature index {int(features.min())}; features are 0-based.")
    top = int(features.max()) + 1 if features.size else 0
    if n_features is None:
        return features.size
    if n_features < top:
        raise ValueError(
            f"n_features={n_features} but {what} contains feature {top - 1}; pass the SAE width (d_sae)."
        )
    return int(n_features)


def check_docs_per_feature(feature: np.ndarray, docs: np.ndarray, n_docs: int, what: str) -> None:
    """Refuse a feature counted in more documents (`docs`, one count per entry of `feature`) than exist."""
    if docs.size and docs.max() > n_docs:
        i = int(np.argmax(docs))
        raise ValueError(
            f"{what}: feature {int(feature[i])} is active in {int(docs[i])} pooled rows but n_docs={n_docs}; "
            "pass the number of rows of raw_documents, and check pooled_embeddings has one row per "
            "(doc_id, feature)."
        )


# --------------------------------------------------------------------------- statistics (vectorized)


def wilson_interval(successes: np.ndarray, n: np.ndarray, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval (no continuity correction) of successes / n, elementwise."""
    x = np.asarray(successes, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    p = x / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * np.sqrt(np.maximum(p * (1 - p) / n + z2 / (4 * n * n), 0.0)) / denom
    return np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)


def newcombe_interval(
    x_a: np.ndarray, n_a: np.ndarray, x_b: np.ndarray, n_b: np.ndarray, z: float = Z95
) -> tuple[np.ndarray, np.ndarray]:
    """Newcombe hybrid score interval (method 10) of x_a/n_a - x_b/n_b for independent samples."""
    p1 = np.asarray(x_a, dtype=np.float64) / n_a
    p2 = np.asarray(x_b, dtype=np.float64) / n_b
    l1, u1 = wilson_interval(x_a, n_a, z)
    l2, u2 = wilson_interval(x_b, n_b, z)
    d = p1 - p2
    low = d - np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return np.maximum(low, -1.0), np.minimum(high, 1.0)


def newcombe_paired_interval(
    both: np.ndarray, a_only: np.ndarray, b_only: np.ndarray, n: np.ndarray | int, z: float = Z95
) -> tuple[np.ndarray, np.ndarray]:
    """Newcombe's interval (1998b, method 10) for the difference of two paired proportions.

    With cells a = both, b = a_only, c = b_only, d = neither: difference (b - c) / n, Wilson intervals of
    the two marginals, combined with the correlation phi (numerator ad - bc reduced by n/2 when
    positive, zero when that crosses zero; phi = 0 when a margin is empty).
    """
    a = np.asarray(both, dtype=np.float64)
    b = np.asarray(a_only, dtype=np.float64)
    c = np.asarray(b_only, dtype=np.float64)
    n = np.broadcast_to(np.asarray(n, dtype=np.float64), a.shape)
    d = n - a - b - c
    p1 = (a + b) / n
    p2 = (a + c) / n
    l1, u1 = wilson_interval(a + b, n, z)
    l2, u2 = wilson_interval(a + c, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    num = a * d - b * c
    num = np.where(num > n / 2, num - n / 2, np.where(num < 0, num, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        phi = np.where(margins > 0, num / np.sqrt(margins), 0.0)
    diff = p1 - p2
    dl = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    du = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    low = diff - np.sqrt(np.maximum(dl, 0.0))
    high = diff + np.sqrt(np.maximum(du, 0.0))
    return np.maximum(low, -1.0), np.minimum(high, 1.0)


def log2_ratio_interval(
    x_a: np.ndarray, n_a: np.ndarray, x_b: np.ndarray, n_b: np.ndarray, z: float = Z95
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """log2 of (x_a/n_a) / (x_b/n_b) with 0.5 added to every 2x2 cell (Haldane), and its Wald interval."""
    a = np.asarray(x_a, dtype=np.float64) + 0.5
    b = np.asarray(x_b, dtype=np.float64) + 0.5
    na = np.asarray(n_a, dtype=np.float64) + 1.0
    nb = np.asarray(n_b, dtype=np.float64) + 1.0
    ln_rr = np.log(a / na) - np.log(b / nb)
    se = np.sqrt(np.maximum(1 / a - 1 / na + 1 / b - 1 / nb, 0.0))
    return ln_rr / math.log(2), (ln_rr - z * se) / math.log(2), (ln_rr + z * se) / math.log(2)


def two_proportion_z_pvalue(x_a: np.ndarray, n_a: np.ndarray, x_b: np.ndarray, n_b: np.ndarray) -> np.ndarray:
    """Two-sided pooled two-proportion z test (= Pearson chi-square on the 2x2 table, no Yates)."""
    from scipy import special

    x_a = np.asarray(x_a, dtype=np.float64)
    x_b = np.asarray(x_b, dtype=np.float64)
    n_a = np.asarray(n_a, dtype=np.float64)
    n_b = np.asarray(n_b, dtype=np.float64)
    pooled = (x_a + x_b) / (n_a + n_b)
    se = np.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    with np.errstate(divide="ignore", invalid="ignore"):
        zval = np.where(se > 0, (x_a / n_a - x_b / n_b) / se, 0.0)
    return np.minimum(2.0 * special.ndtr(-np.abs(zval)), 1.0)


def _log_comb(n: np.ndarray, k: np.ndarray) -> np.ndarray:
    from scipy import special

    gammaln = special.gammaln
    return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)


def fisher_exact_pvalue(x_a: np.ndarray, n_a: np.ndarray, x_b: np.ndarray, n_b: np.ndarray) -> np.ndarray:
    """Two-sided Fisher exact p-value of each 2x2 table [[x_a, n_a-x_a], [x_b, n_b-x_b]], vectorized.

    Sums the hypergeometric probabilities of all tables with the observed margins that are no more
    likely than the observed one (relative tolerance 1e-7). Work is proportional to the support size.
    """
    xa = np.asarray(x_a, dtype=np.int64).ravel()
    xb = np.asarray(x_b, dtype=np.int64).ravel()
    na = np.broadcast_to(np.asarray(n_a, dtype=np.int64), xa.shape).ravel()
    nb = np.broadcast_to(np.asarray(n_b, dtype=np.int64), xa.shape).ravel()
    out = np.ones(xa.shape, dtype=np.float64)
    total = xa + xb  # successes, the hypergeometric "draws" into row A
    lo = np.maximum(0, total - nb)
    hi = np.minimum(total, na)
    size = hi - lo + 1
    todo = np.flatnonzero(size > 1)
    start = 0
    while start < todo.size:
        # chunk so that the ragged support arrays stay bounded
        csum = np.cumsum(size[todo[start:]])
        stop = start + max(1, int(np.searchsorted(csum, _FISHER_CHUNK, side="right")))
        idx = todo[start:stop]
        start = stop
        sz = size[idx]
        owner = np.repeat(np.arange(idx.size), sz)
        offsets = np.cumsum(sz) - sz
        x = lo[idx][owner] + (np.arange(owner.size) - offsets[owner])
        n_a_, n_b_, t_ = na[idx], nb[idx], total[idx]
        lp = _log_comb(n_a_[owner], x) + _log_comb(n_b_[owner], t_[owner] - x)
        lp_obs = _log_comb(n_a_, xa[idx]) + _log_comb(n_b_, t_ - xa[idx])
        keep = lp <= lp_obs[owner] + math.log1p(_FISHER_REL_TOL)
        # normalize by the largest term per table to avoid under/overflow, then divide by the total mass
        lmax = np.full(idx.size, -np.inf)
        np.maximum.at(lmax, owner, lp)
        w = np.exp(lp - lmax[owner])
        mass = np.bincount(owner, weights=w, minlength=idx.size)
        tail = np.bincount(owner, weights=np.where(keep, w, 0.0), minlength=idx.size)
        out[idx] = np.minimum(tail / mass, 1.0)
    return out.reshape(np.shape(x_a))


def min_expected_cell(x_a: np.ndarray, n_a: np.ndarray, x_b: np.ndarray, n_b: np.ndarray) -> np.ndarray:
    """Smallest expected count of the 2x2 table under independence, elementwise."""
    x_a = np.asarray(x_a, dtype=np.float64)
    x_b = np.asarray(x_b, dtype=np.float64)
    n_a = np.asarray(n_a, dtype=np.float64)
    n_b = np.asarray(n_b, dtype=np.float64)
    n = n_a + n_b
    succ = x_a + x_b
    return np.minimum(n_a, n_b) * np.minimum(succ, n - succ) / n


def two_by_two_pvalue(
    x_a: np.ndarray, n_a: np.ndarray, x_b: np.ndarray, n_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided p-values: Fisher exact where an expected cell < 5, else the z test; and the test used."""
    x_a = np.asarray(x_a, dtype=np.int64)
    x_b = np.asarray(x_b, dtype=np.int64)
    n_a = np.broadcast_to(np.asarray(n_a, dtype=np.int64), x_a.shape)
    n_b = np.broadcast_to(np.asarray(n_b, dtype=np.int64), x_a.shape)
    use_fisher = min_expected_cell(x_a, n_a, x_b, n_b) < FISHER_MIN_EXPECTED
    p = two_proportion_z_pvalue(x_a, n_a, x_b, n_b)
    if use_fisher.any():
        p[use_fisher] = fisher_exact_pvalue(
            x_a[use_fisher], n_a[use_fisher], x_b[use_fisher], n_b[use_fisher]
        )
    return p, np.where(use_fisher, "fisher_exact", "z_test")


def mcnemar_exact_pvalue(a_only: np.ndarray, b_only: np.ndarray) -> np.ndarray:
    """Exact two-sided McNemar p-value: binomial(b + c, 1/2) test of the discordant pairs."""
    from scipy import stats

    b = np.asarray(a_only, dtype=np.int64)
    c = np.asarray(b_only, dtype=np.int64)
    m = b + c
    p = np.minimum(1.0, 2.0 * stats.binom.cdf(np.minimum(b, c), m, 0.5))
    return np.where(m > 0, p, 1.0)


def benjamini_hochberg(p_values: np.ndarray, n_tests: int | None = None) -> np.ndarray:
    """Benjamini-Hochberg q-values; `n_tests` >= len(p) counts untested hypotheses as p = 1."""
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size if n_tests is None else int(n_tests)
    if m < p.size:
        raise ValueError(f"n_tests={m} is smaller than the number of p-values ({p.size}).")
    if p.size == 0:
        return p.copy()
    if np.isnan(p).any():
        raise ValueError("p-values contain NaN.")
    order = np.argsort(p, kind="stable")
    ranked = p[order] * m / np.arange(1, p.size + 1)
    q_sorted = np.minimum.accumulate(ranked[::-1])[::-1]
    q = np.empty_like(p)
    q[order] = np.minimum(q_sorted, 1.0)
    return q


# --------------------------------------------------------------------------- adaptive firing thresholds

FIRING_RULES = ("fixed", "adaptive")
REPORT_FIRING = "adaptive"  # what diff_reports and the distinctive-feature selection use by default
ADAPTIVE_QUANTILES = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01)
"""Top fractions of the pooled A+B documents at which `adaptive` thresholds cut a feature's values."""
WITHIN_FEATURE = ("exact", "bonferroni")
"""How `adaptive` firing adjusts a feature's smallest candidate p-value for its several thresholds."""


def attainable_min_pvalue(total: np.ndarray, n_a: int, n_b: int) -> np.ndarray:
    """Smallest two-sided p-value any split of `total` firing documents between A and B could give.

    It depends only on the margins, so it can select which tests to count without looking at the
    labels (independent filtering): a test that cannot reach significance is not counted by BH.
    """
    t = np.asarray(total, dtype=np.int64)
    lo = np.maximum(0, t - n_b)  # as few in A as possible
    hi = np.minimum(t, n_a)
    p_lo, _ = two_by_two_pvalue(lo, n_a, t - lo, n_b)
    p_hi, _ = two_by_two_pvalue(hi, n_a, t - hi, n_b)
    return np.minimum(p_lo, p_hi)


_MIN_P_REL_TOL = 1e-9  # candidate p-values within this relative distance of the observed one count as ties
_MIN_P_TRUNCATE = 1e-12  # states below this fraction of p_obs are dropped (and counted as rejected)


def nested_min_pvalue(sizes: Sequence[int], n_a: int, n_b: int, p_obs: float) -> float:
    """Exact null probability that the smallest candidate p-value of one feature is at most `p_obs`.

    `sizes` are the document counts of a feature's candidate firing sets, which are nested (each
    threshold keeps the documents above it, so a higher threshold keeps a subset). Under the null the
    n_b B-labels are a uniformly random subset of the n_a + n_b documents, so the B count of the largest
    set is hypergeometric, and the B count of each next (smaller) set, given the previous one, is
    hypergeometric within it. A dynamic program over that chain sums the probability of every path on
    which some candidate's `two_by_two_pvalue` is at most `p_obs`: the exact min-p adjustment (Westfall
    and Young's minP, computed instead of sampled). It is never above Bonferroni's `len(sizes) * p_obs`
    and is much below it when the candidates overlap, as nested sets do.

    Numerically conservative: probability dropped by truncating negligible states (below 1e-12 of `p_obs`)
    or the far tails of a step (beyond 12 standard deviations) is counted as rejected.
    """
    n = int(n_a) + int(n_b)
    steps = sorted({int(s) for s in sizes if 0 < int(s) <= n}, reverse=True)
    if not steps:
        return 1.0
    cut = p_obs * (1 + _MIN_P_REL_TOL)
    floor = _MIN_P_TRUNCATE * max(p_obs, 1e-300)
    rejected = dropped = 0.0
    prev = steps[0]
    x = np.arange(max(0, prev - n_a), min(prev, n_b) + 1)  # B documents in the largest set
    mass = np.exp(_log_comb(n_b, x) + _log_comb(n_a, prev - x) - _log_comb(n, prev))
    for i, size in enumerate(steps):
        if i:
            # y = B documents among the `size` kept of the previous set's `prev`, which held x of them
            frac = x / prev
            sd = np.sqrt(size * frac * (1 - frac) * max(prev - size, 0) / max(prev - 1, 1))
            mean = size * frac
            lo = max(0, int(np.floor((mean - 12 * sd).min())) - 2, size - (prev - int(x.min())))
            hi = min(size, int(np.ceil((mean + 12 * sd).max())) + 2, int(x.max()))
            y = np.arange(lo, hi + 1)
            xx, yy = np.meshgrid(x, y, indexing="ij")
            ok = (yy <= xx) & (size - yy <= prev - xx)
            lp = (
                _log_comb(xx, np.where(ok, yy, 0))
                + _log_comb(prev - xx, np.where(ok, size - yy, 0))
                - _log_comb(prev, size)
            )
            step = np.where(ok, np.exp(lp), 0.0)
            dropped += float(mass @ np.clip(1.0 - step.sum(axis=1), 0.0, None))
            mass, x, prev = mass @ step, y, size
        p, _ = two_by_two_pvalue(size - x, n_a, x, n_b)
        hit = p <= cut
        rejected += float(mass[hit].sum())
        keep = ~hit & (mass > floor)
        dropped += float(mass[~hit & ~keep].sum())
        x, mass = x[keep], mass[keep]
        if not x.size:
            break
    return min(1.0, rejected + dropped)


def adaptive_threshold_counts(
    feature: np.ndarray, value: np.ndarray, in_b: np.ndarray, n_docs: int, quantiles: Sequence[float]
) -> dict[str, np.ndarray]:
    """Candidate firing thresholds of every feature, chosen on the pooled A+B values alone.

    For each feature: "fires at all" (value > 0) and, for each q in `quantiles` with ceil(q * n_docs)
    below the feature's number of firing documents, "value >= the ceil(q * n_docs)-th largest pooled
    value" (ties included). Returns per candidate: feature, threshold, docs_a, docs_b, act_sum_a,
    act_sum_b. Under the null (A and B exchangeable) the split of each candidate's documents between
    A and B is hypergeometric whatever the pooled values are, so the tests stay exact. A document fires
    at a candidate when its value is at least the candidate's `threshold`.
    """
    order = np.lexsort((-value, feature))
    f, v, b = feature[order], value[order], in_b[order].astype(np.int64)
    n = f.size
    starts = np.flatnonzero(np.r_[True, f[1:] != f[:-1]]) if n else np.zeros(0, dtype=np.int64)
    counts = np.diff(np.r_[starts, n])
    # last index of each run of equal (feature, value): ties fire together
    run_start = np.r_[True, (f[1:] != f[:-1]) | (v[1:] != v[:-1])] if n else np.zeros(0, dtype=bool)
    run_id = np.cumsum(run_start) - 1
    run_last = np.r_[np.flatnonzero(run_start)[1:] - 1, n - 1] if n else np.zeros(0, dtype=np.int64)
    cum_b = np.r_[0, np.cumsum(b)]
    cum_v = np.r_[0.0, np.cumsum(v)]
    cum_vb = np.r_[0.0, np.cumsum(v * b)]

    grp, end, thr = [np.arange(starts.size)], [starts + counts - 1], [v[starts + counts - 1]]
    for q in quantiles:
        m = math.ceil(q * n_docs)
        ok = np.flatnonzero(counts > m)
        if not ok.size or m < 1:
            continue
        idx = starts[ok] + m - 1
        grp.append(ok)
        end.append(run_last[run_id[idx]])
        thr.append(v[idx])
    g = np.concatenate(grp)
    e = np.concatenate(end)
    s = starts[g]
    total = e - s + 1
    docs_b = cum_b[e + 1] - cum_b[s]
    act_b = cum_vb[e + 1] - cum_vb[s]
    act_all = cum_v[e + 1] - cum_v[s]
    return {
        "feature": f[s] if n else np.zeros(0, dtype=np.int64),
        "threshold": np.concatenate(thr),
        "docs_a": total - docs_b,
        "docs_b": docs_b,
        "act_sum_a": act_all - act_b,
        "act_sum_b": act_b,
    }


# --------------------------------------------------------------------------- unpaired diff


def _feature_counts(pooled: FrameLike, threshold: float, what: str) -> pl.DataFrame:
    lf = as_lazy(pooled, what, ["feature", "max_activation"])
    return (
        lf.select("feature", "max_activation")
        .filter(pl.col("max_activation") > threshold)
        .group_by("feature")
        .agg(
            docs=pl.len().cast(pl.Int64),
            act_sum=pl.col("max_activation").cast(pl.Float64).sum(),
        )
        .collect()
    )


def _check_n_docs(n_docs: int, what: str) -> int:
    if isinstance(n_docs, bool) or not isinstance(n_docs, int | np.integer) or n_docs <= 0:
        raise ValueError(
            f"{what}: n_docs must be a positive integer (rows of raw_documents), got {n_docs!r}."
        )
    return int(n_docs)


def _finish(
    feature: np.ndarray,
    docs_a: np.ndarray,
    docs_b: np.ndarray,
    freq_a: np.ndarray,
    freq_b: np.ndarray,
    ci: tuple[np.ndarray, np.ndarray],
    log2: tuple[np.ndarray, np.ndarray, np.ndarray],
    p: np.ndarray,
    test: np.ndarray,
    mean_a: np.ndarray,
    mean_b: np.ndarray,
    n_tests: int,
    alpha: float,
    extra: dict[str, np.ndarray] | None = None,
    q: np.ndarray | None = None,
) -> pl.DataFrame:
    if q is None:
        q = benjamini_hochberg(p, n_tests)
    diff = freq_a - freq_b
    direction = np.where(diff > 0, "a", np.where(diff < 0, "b", None))
    cols: dict[str, object] = {
        "feature": feature.astype(np.int32),
        "docs_a": docs_a.astype(np.int64),
        "docs_b": docs_b.astype(np.int64),
        "freq_a": freq_a,
        "freq_b": freq_b,
        "freq_diff": diff,
        "freq_diff_ci_low": ci[0],
        "freq_diff_ci_high": ci[1],
        "log2_ratio": log2[0],
        "log2_ratio_ci_low": log2[1],
        "log2_ratio_ci_high": log2[2],
        "p_value": p,
        "q_value": q,
        "significant": q < alpha,
        "direction": pl.Series("direction", direction.tolist(), dtype=pl.String),
        "mean_activation_a": pl.Series(mean_a).fill_nan(None),
        "mean_activation_b": pl.Series(mean_b).fill_nan(None),
        "test": pl.Series("test", test.tolist() if test.size else [], dtype=pl.String),
    }
    if extra:
        cols.update(extra)
    schema = dict(DIFF_SCHEMA) | {k: EXTRA_COLUMNS.get(k, pl.Int64()) for k in (extra or {})}
    out = pl.DataFrame(cols, schema=schema)
    return out.sort(
        [pl.col("q_value"), pl.col("freq_diff").abs(), pl.col("feature")],
        descending=[False, True, False],
    )


def diff_features(
    pooled_a: FrameLike,
    n_docs_a: int,
    pooled_b: FrameLike,
    n_docs_b: int,
    *,
    threshold: float = 0.0,
    alpha: float = 0.05,
    n_features: int | None = None,
    firing: str = "fixed",
    quantiles: Sequence[float] = ADAPTIVE_QUANTILES,
    within_feature: str = "exact",
) -> pl.DataFrame:
    """Per-feature document-frequency comparison of dataset A against dataset B.

    `firing="fixed"`: a document has a feature when its max activation exceeds `threshold`. `"adaptive"`:
    each feature is tested at several firing thresholds chosen on the pooled A+B values alone (see
    `adaptive_diff_features`, which also explains `within_feature`), which finds a small subpopulation
    that a feature singles out even when the feature fires somewhere in most documents.

    `pooled_a` / `pooled_b` are pooled_embeddings frames; `n_docs_*` the number of documents of each
    dataset (documents without any active feature count as not having it). `n_features` is the SAE
    width: BH then counts every feature of the SAE (those active in neither have p = 1); without it
    only features active in either dataset are counted. Returns one row per feature active in either,
    columns `DIFF_SCHEMA`, sorted by q_value then |freq_diff| (descending).
    """
    if firing not in FIRING_RULES:
        raise ValueError(f"firing={firing!r}: use one of {list(FIRING_RULES)}.")
    if firing == "adaptive":
        return adaptive_diff_features(
            pooled_a,
            n_docs_a,
            pooled_b,
            n_docs_b,
            threshold=threshold,
            alpha=alpha,
            n_features=n_features,
            quantiles=quantiles,
            within_feature=within_feature,
        )
    n_a = _check_n_docs(n_docs_a, "dataset A")
    n_b = _check_n_docs(n_docs_b, "dataset B")
    ca = _feature_counts(pooled_a, threshold, "pooled_a")
    cb = _feature_counts(pooled_b, threshold, "pooled_b")
    joined = ca.join(cb, on="feature", how="full", coalesce=True, suffix="_b").sort("feature")
    feature = joined["feature"].to_numpy()
    n_tests = _check_features(feature, n_features, "pooled_a/pooled_b")
    docs_a = joined["docs"].fill_null(0).to_numpy()
    docs_b = joined["docs_b"].fill_null(0).to_numpy()
    for docs, n, side in ((docs_a, n_a, "A"), (docs_b, n_b, "B")):
        check_docs_per_feature(feature, docs, n, f"Dataset {side}")
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_a = joined["act_sum"].fill_null(0.0).to_numpy() / docs_a
        mean_b = joined["act_sum_b"].fill_null(0.0).to_numpy() / docs_b
    freq_a = docs_a / n_a
    freq_b = docs_b / n_b
    p, test = two_by_two_pvalue(docs_a, n_a, docs_b, n_b)
    return _finish(
        feature,
        docs_a,
        docs_b,
        freq_a,
        freq_b,
        newcombe_interval(docs_a, n_a, docs_b, n_b),
        log2_ratio_interval(docs_a, n_a, docs_b, n_b),
        p,
        test,
        mean_a,
        mean_b,
        n_tests,
        alpha,
    )


def adaptive_diff_features(
    pooled_a: FrameLike,
    n_docs_a: int,
    pooled_b: FrameLike,
    n_docs_b: int,
    *,
    threshold: float = 0.0,
    alpha: float = 0.05,
    n_features: int | None = None,
    quantiles: Sequence[float] = ADAPTIVE_QUANTILES,
    within_feature: str = "exact",
) -> pl.DataFrame:
    """`diff_features` with label-blind, per-feature firing thresholds and independent filtering.

    1. Candidates (`adaptive_threshold_counts`): each feature fires "at all" (max activation above
       `threshold`) or "in the top q of the pooled A+B documents" for each q in `quantiles`. Thresholds
       depend on the pooled values only, never on which dataset a document is in.
    2. Each candidate gets the unpaired two-sided test of `two_by_two_pvalue`; a feature's p-value is the
       null probability that its smallest candidate p-value is as small as observed: computed exactly
       over the nested candidates (`nested_min_pvalue`, `within_feature="exact"`), or bounded by the
       smallest times the number of candidates (`"bonferroni"`). The row reports that best candidate
       (`threshold`, docs, frequencies and intervals at that threshold).
    3. Independent filtering: a feature whose smallest attainable p-value (from the margins alone,
       adjusted the same way) exceeds `alpha` can never be significant and is not counted as a test
       (`tested` = False, q = 1). BH runs over the tested features.

    Under the null (A and B exchangeable) every step is conditional on the pooled values, so the tests stay
    valid; the split-halves null checks it (tests, benchmarks/planted.py).
    """
    n_a = _check_n_docs(n_docs_a, "dataset A")
    n_b = _check_n_docs(n_docs_b, "dataset B")
    if not all(0 < q < 1 for q in quantiles):
        raise ValueError(f"quantiles must lie strictly between 0 and 1; got {list(quantiles)}.")
    if within_feature not in WITHIN_FEATURE:
        raise ValueError(f"within_feature={within_feature!r}: use one of {list(WITHIN_FEATURE)}.")
    frames = []
    for pooled, what in ((pooled_a, "pooled_a"), (pooled_b, "pooled_b")):
        frames.append(
            as_lazy(pooled, what, ["feature", "max_activation"])
            .select(pl.col("feature").cast(pl.Int64), pl.col("max_activation").cast(pl.Float64))
            .filter(pl.col("max_activation") > threshold)
            .collect()
        )
    for frame, n, side in ((frames[0], n_a, "A"), (frames[1], n_b, "B")):
        counts = frame.group_by("feature").len()
        check_docs_per_feature(counts["feature"].to_numpy(), counts["len"].to_numpy(), n, f"Dataset {side}")
    feature = np.concatenate([frames[0]["feature"].to_numpy(), frames[1]["feature"].to_numpy()])
    value = np.concatenate([frames[0]["max_activation"].to_numpy(), frames[1]["max_activation"].to_numpy()])
    in_b = np.concatenate([np.zeros(frames[0].height, dtype=bool), np.ones(frames[1].height, dtype=bool)])
    _check_features(np.unique(feature), n_features, "pooled_a/pooled_b")
    cand = adaptive_threshold_counts(feature, value, in_b, n_a + n_b, quantiles)
    p, test = two_by_two_pvalue(cand["docs_a"], n_a, cand["docs_b"], n_b)
    p_floor = attainable_min_pvalue(cand["docs_a"] + cand["docs_b"], n_a, n_b)
    # per feature: the best candidate (earliest on ties: "fires at all" comes first), counts, floors
    position = np.arange(p.size)
    order = np.lexsort((position, p, cand["feature"]))
    f_sorted = cand["feature"][order]
    first = np.flatnonzero(np.r_[True, f_sorted[1:] != f_sorted[:-1]]) if p.size else np.zeros(0, int)
    best = order[first]
    n_cand = np.diff(np.r_[first, p.size])
    floor = np.minimum.reduceat(p_floor[order], first) if p.size else np.zeros(0)
    p_feature = np.minimum(1.0, p[best] * n_cand)
    tested = np.minimum(1.0, floor * n_cand) <= alpha
    if within_feature == "exact":
        sizes = (cand["docs_a"] + cand["docs_b"])[order]
        for i in np.flatnonzero((n_cand > 1) & ((p[best] <= alpha) | (~tested & (floor <= alpha)))):
            own = sizes[first[i] : first[i] + n_cand[i]]
            if not tested[i]:  # the attainable minimum decides whether the feature counts as a test
                tested[i] = nested_min_pvalue(own, n_a, n_b, floor[i]) <= alpha
            if p[best[i]] <= alpha:
                p_feature[i] = min(p_feature[i], nested_min_pvalue(own, n_a, n_b, p[best[i]]))
    q = np.ones(best.size)
    if tested.any():
        q[tested] = benjamini_hochberg(p_feature[tested])
    docs_a, docs_b = cand["docs_a"][best], cand["docs_b"][best]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_a = cand["act_sum_a"][best] / docs_a
        mean_b = cand["act_sum_b"][best] / docs_b
    return _finish(
        cand["feature"][best],
        docs_a,
        docs_b,
        docs_a / n_a,
        docs_b / n_b,
        newcombe_interval(docs_a, n_a, docs_b, n_b),
        log2_ratio_interval(docs_a, n_a, docs_b, n_b),
        p_feature,
        test[best],
        mean_a,
        mean_b,
        int(tested.sum()),
        alpha,
        extra={"threshold": cand["threshold"][best], "n_thresholds": n_cand, "tested": tested},
        q=q,
    )


def split_halves_null(pooled: FrameLike, n_docs: int, seed: int, **kwargs: object) -> pl.DataFrame:
    """`diff_features` between two random halves of ONE dataset: a null check (nothing may be significant)."""
    n = _check_n_docs(n_docs, "split_halves_null")
    if n < 2:
        raise ValueError("split_halves_null needs at least 2 documents.")
    lf = as_lazy(pooled, "pooled", ["doc_id", "feature", "max_activation"])
    perm = np.random.default_rng(seed).permutation(n)
    half = pl.DataFrame({"doc_id": np.sort(perm[: n // 2]).astype(np.int32)}).lazy()
    lf = lf.with_columns(pl.col("doc_id").cast(pl.Int32))
    a = lf.join(half, on="doc_id", how="semi")
    b = lf.join(half, on="doc_id", how="anti")
    return diff_features(a, n // 2, b, n - n // 2, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- paired diff


def pairs_from_key(documents_a: FrameLike, documents_b: FrameLike, key_column: str) -> pl.DataFrame:
    """Pair the documents of A and B that share `key_column`; columns doc_id_a, doc_id_b, key.

    The key must exist in both and be unique within each (rows with a null key are left unpaired).
    """
    frames = []
    for frame, side in ((documents_a, "A"), (documents_b, "B")):
        lf = as_lazy(frame, f"documents of dataset {side}", ["doc_id"])
        names = lf.collect_schema().names()
        label = side
        if "dataset" in names:
            first = lf.select(pl.col("dataset").first()).collect().item()
            label = f"{side} ({first})" if first is not None else side
        if key_column not in names:
            raise ValueError(
                f"Dataset {label}: key column {key_column!r} not found; available columns: {names}."
            )
        df = lf.select("doc_id", key_column).collect()
        df = df.filter(pl.col(key_column).is_not_null())
        dups = df.group_by(key_column).len().filter(pl.col("len") > 1).sort(key_column)
        if dups.height:
            shown = dups[key_column].head(10).to_list()
            more = f" (and {dups.height - 10} more)" if dups.height > 10 else ""
            raise ValueError(
                f"Dataset {label}: key column {key_column!r} is not unique; "
                f"duplicated values: {shown}{more}. "
                "Pairing needs exactly one document per key on each side: deduplicate or pick another key."
            )
        frames.append((df.select("doc_id", key_column), label))
    (da, la), (db, lb) = frames
    ta, tb = da.schema[key_column], db.schema[key_column]
    if ta != tb:
        if ta.is_integer() and tb.is_integer():
            da = da.with_columns(pl.col(key_column).cast(pl.Int64))
            db = db.with_columns(pl.col(key_column).cast(pl.Int64))
        else:
            da = da.with_columns(pl.col(key_column).cast(pl.String))
            db = db.with_columns(pl.col(key_column).cast(pl.String))
    pairs = da.rename({"doc_id": "doc_id_a"}).join(
        db.rename({"doc_id": "doc_id_b"}), on=key_column, how="inner"
    )
    if pairs.height == 0:
        raise ValueError(
            f"No key of {key_column!r} occurs in both dataset {la} and dataset {lb}: nothing to pair."
        )
    return pairs.select(
        pl.col("doc_id_a").cast(pl.Int32), pl.col("doc_id_b").cast(pl.Int32), pl.col(key_column).alias("key")
    ).sort("doc_id_a")


def paired_diff_features(
    pooled_a: FrameLike,
    pooled_b: FrameLike,
    pairs: pl.DataFrame,
    *,
    threshold: float = 0.0,
    alpha: float = 0.05,
    n_features: int | None = None,
) -> pl.DataFrame:
    """Paired diff: document `doc_id_a` of A against `doc_id_b` of B for each row of `pairs`.

    Exact McNemar test per feature with BH q-values over `n_features`; freq_diff interval by Newcombe's
    paired method 10; log2_ratio of the marginal frequencies (0.5 added to every cell) with the
    matched-pairs variance (b + c) / ((a + b)(a + c)). Columns `DIFF_SCHEMA` plus n_pairs, docs_both,
    docs_a_only, docs_b_only; mean activations are over paired documents where the feature fires.
    """
    from scipy import sparse

    pairs_lf = as_lazy(pairs, "pairs", ["doc_id_a", "doc_id_b"])
    pr = (
        pairs_lf.select(pl.col("doc_id_a").cast(pl.Int32), pl.col("doc_id_b").cast(pl.Int32))
        .collect()
        .with_row_index("pair")
    )
    n = pr.height
    if n == 0:
        raise ValueError("pairs is empty: nothing to compare (see pairs_from_key).")
    if pr.null_count().sum_horizontal().item():
        raise ValueError("pairs contains null doc_id_a/doc_id_b; drop unmatched rows first.")

    for col in ("doc_id_a", "doc_id_b"):
        if pr[col].min() < 0:
            raise ValueError(f"pairs.{col} has negative values; doc_id is 0-based.")
        dup = pr.filter(pl.col(col).is_duplicated())[col].unique().sort().head(5).to_list()
        if dup:
            raise ValueError(
                f"pairs.{col} repeats document(s) {dup}: each document may be in at most one pair "
                "(paired tests need independent pairs); deduplicate the pairs."
            )

    def side(pooled: FrameLike, col: str, what: str) -> tuple[np.ndarray, np.ndarray, Any]:
        """Per-feature doc counts and activation sums over paired docs, and the pair x feature pattern."""
        df = (
            as_lazy(pooled, what, ["doc_id", "feature", "max_activation"])
            .select(pl.col("doc_id").cast(pl.Int32), pl.col("feature").cast(pl.Int32), "max_activation")
            .filter(pl.col("max_activation") > threshold)
            .collect()
        )
        doc = df["doc_id"].to_numpy()
        ids = pr[col].to_numpy().astype(np.int64)
        lut = np.full(max(int(doc.max()) if doc.size else 0, int(ids.max())) + 1, -1, dtype=np.int32)
        lut[ids] = np.arange(n, dtype=np.int32)
        pair = lut[doc]
        keep = pair >= 0
        feat = df["feature"].to_numpy()[keep]
        act = df["max_activation"].to_numpy()[keep]
        del df, doc
        if feat.size and feat.min() < 0:
            raise ValueError(f"{what} has negative feature index {int(feat.min())}; features are 0-based.")
        width = int(feat.max()) + 1 if feat.size else 1
        pattern = sparse.csr_matrix(
            (np.ones(feat.size, dtype=np.int8), (pair[keep], feat)), shape=(n, max(width, 1))
        )
        return np.bincount(feat, minlength=width), np.bincount(feat, weights=act, minlength=width), pattern

    cnt_a, sum_a, pat_a = side(pooled_a, "doc_id_a", "pooled_a")
    cnt_b, sum_b, pat_b = side(pooled_b, "doc_id_b", "pooled_b")
    width = max(cnt_a.size, cnt_b.size)
    pat_a.resize((n, width))
    pat_b.resize((n, width))
    both = pat_a.multiply(pat_b).tocsr()
    both.eliminate_zeros()
    n11_all = np.bincount(both.indices, minlength=width)
    cnt_a = np.pad(cnt_a, (0, width - cnt_a.size))
    cnt_b = np.pad(cnt_b, (0, width - cnt_b.size))
    sum_a = np.pad(sum_a, (0, width - sum_a.size))
    sum_b = np.pad(sum_b, (0, width - sum_b.size))
    feature = np.flatnonzero((cnt_a > 0) | (cnt_b > 0))
    n_tests = _check_features(feature, n_features, "pooled_a/pooled_b")
    docs_a, docs_b, n11 = cnt_a[feature], cnt_b[feature], n11_all[feature]
    if docs_a.size and max(docs_a.max(), docs_b.max()) > n:
        raise ValueError(
            "A paired document has a feature more than once: pooled_embeddings must have one row per "
            "(doc_id, feature)."
        )
    n10 = docs_a - n11
    n01 = docs_b - n11
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_a = sum_a[feature] / docs_a
        mean_b = sum_b[feature] / docs_b
    # log ratio of marginal proportions for matched pairs, 0.5 added to each of the four cells
    ca, cb_, cc = n11 + 0.5, n10 + 0.5, n01 + 0.5
    ln_rr = np.log((ca + cb_) / (ca + cc))
    se = np.sqrt((cb_ + cc) / ((ca + cb_) * (ca + cc)))
    ln2 = math.log(2)
    log2 = (ln_rr / ln2, (ln_rr - Z95 * se) / ln2, (ln_rr + Z95 * se) / ln2)
    p = mcnemar_exact_pvalue(n10, n01)
    return _finish(
        feature,
        docs_a,
        docs_b,
        docs_a / n,
        docs_b / n,
        newcombe_paired_interval(n11, n10, n01, n),
        log2,
        p,
        np.full(feature.size, "mcnemar_exact"),
        mean_a,
        mean_b,
        n_tests,
        alpha,
        extra={
            "n_pairs": np.full(feature.size, n, dtype=np.int64),
            "docs_both": n11,
            "docs_a_only": n10,
            "docs_b_only": n01,
        },
    )
