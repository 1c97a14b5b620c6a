"""Matching features across SAEs or models read over the same documents (interp-lab's fingerprints).

Two readers (two SAEs of different widths, seeds or layers, or two models) that read the same documents
give each feature an activation signature: its value on every document (or token). `match_features`
correlates every feature of A with every feature of B over those rows (Pearson), and matches them:

- one-to-one: the assignment that maximizes the summed correlation (Hungarian,
  `scipy.optimize.linear_sum_assignment`), so each feature of B is used at most once;
- many-to-one: each feature of A with the feature of B it correlates with most (several features of a
  wide SAE may map to one of a narrow SAE);
- with both decoders in one residual space (same model and layer), the decoder cosine of each pair.

A feature that never fires in the rows has no signature: it is listed unmatched (correlation null).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
from scipy import sparse


def _nullable(values: np.ndarray, keep: np.ndarray, dtype: Any) -> pl.Series:
    """`values` where `keep`, null elsewhere."""
    return pl.Series(
        [v if k else None for v, k in zip(values.tolist(), keep.tolist(), strict=True)], dtype=dtype
    )


def signature_correlations(a: Any, b: Any) -> np.ndarray:
    """Pearson correlation of every column of `a` with every column of `b` over their rows.

    `a` (n x d_a) and `b` (n x d_b): dense arrays or scipy sparse matrices with the same rows (documents
    or tokens, in the same order). Returns (d_a, d_b); a constant column (e.g. never active) gives NaN.
    """
    a = sparse.csr_matrix(a, dtype=np.float64)
    b = sparse.csr_matrix(b, dtype=np.float64)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"the two signatures need the same rows; got {a.shape[0]} and {b.shape[0]}.")
    n = a.shape[0]
    if n < 2:
        raise ValueError("correlations need at least 2 rows (documents or tokens).")
    mean_a = np.asarray(a.mean(axis=0)).ravel()
    mean_b = np.asarray(b.mean(axis=0)).ravel()
    sq_a = np.asarray(a.multiply(a).mean(axis=0)).ravel()
    sq_b = np.asarray(b.multiply(b).mean(axis=0)).ravel()
    std_a = np.sqrt(np.maximum(sq_a - mean_a**2, 0.0))
    std_b = np.sqrt(np.maximum(sq_b - mean_b**2, 0.0))
    cross = (a.T @ b).toarray() / n
    cov = cross - np.outer(mean_a, mean_b)
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = cov / np.outer(std_a, std_b)
    corr[~np.isfinite(corr)] = np.nan
    return np.clip(corr, -1.0, 1.0)


def match_features(
    a: Any,
    b: Any,
    *,
    decoder_a: np.ndarray | None = None,
    decoder_b: np.ndarray | None = None,
) -> pl.DataFrame:
    """One row per feature of A: its one-to-one match in B and the correlation of their signatures
    (`match_b`, `match_correlation`), its best feature in B (`best_b`, `best_correlation`, many-to-one),
    and with both decoders given (`(d_sae, d_in)` each, one residual space) the pair's `decoder_cosine`.

    Matches with correlation <= 0 or with a feature without signature are left null. With decoders, equal
    correlations (features that fire on the same few documents) are told apart by decoder cosine, so an SAE
    matched with a copy of itself gets the identity.
    """
    from scipy.optimize import linear_sum_assignment

    a = sparse.csr_matrix(a, dtype=np.float64)
    b = sparse.csr_matrix(b, dtype=np.float64)
    d_a, d_b = a.shape[1], b.shape[1]
    cosines = None
    if decoder_a is not None and decoder_b is not None:
        _check_decoders(decoder_a, decoder_b, d_a, d_b)
    # only features whose signature varies can correlate: the others stay unmatched (and out of memory)
    live_a, live_b = _varying_columns(a), _varying_columns(b)
    if live_a.size * live_b.size > MAX_PAIRS:
        raise ValueError(
            f"matching {live_a.size:,} x {live_b.size:,} firing features needs a dense matrix of "
            f"{live_a.size * live_b.size:,} correlations (at most {MAX_PAIRS:,}): match on fewer features "
            "(narrower SAEs, or a dataset where fewer features fire)."
        )
    corr = signature_correlations(a[:, live_a], b[:, live_b])
    score = np.nan_to_num(corr, nan=-1.0)
    if decoder_a is not None and decoder_b is not None:
        cosines = _decoder_cosines(np.asarray(decoder_a)[live_a], np.asarray(decoder_b)[live_b])
        score = score + _TIE_BREAK * cosines
    match, match_corr, match_cos = (
        np.full(d_a, -1, dtype=np.int64),
        np.full(d_a, np.nan),
        np.full(d_a, np.nan),
    )
    best, best_corr = np.full(d_a, -1, dtype=np.int64), np.full(d_a, np.nan)
    if live_a.size and live_b.size:
        rows, cols = linear_sum_assignment(score, maximize=True)
        match[live_a[rows]] = live_b[cols]
        match_corr[live_a[rows]] = corr[rows, cols]
        if cosines is not None:
            match_cos[live_a[rows]] = cosines[rows, cols]
        top = np.argmax(score, axis=1)
        best[live_a] = live_b[top]
        best_corr[live_a] = corr[np.arange(live_a.size), top]
    keep = np.isfinite(match_corr) & (match_corr > 0)
    best_keep = np.isfinite(best_corr) & (best_corr > 0)
    out = pl.DataFrame(
        {
            "feature_a": np.arange(d_a, dtype=np.int32),
            "match_b": _nullable(match, keep, pl.Int32),
            "match_correlation": _nullable(match_corr, keep, pl.Float64),
            "best_b": _nullable(best, best_keep, pl.Int32),
            "best_correlation": _nullable(best_corr, best_keep, pl.Float64),
        }
    )
    if decoder_a is not None and decoder_b is not None:
        out = out.with_columns(_nullable(match_cos, keep, pl.Float64).alias("decoder_cosine"))
    return out


MAX_PAIRS = 100_000_000  # firing features of A x of B matched at once (~0.8 GB per dense float64 matrix)
_TIE_BREAK = 1e-6  # weight of decoder cosine in the assignment: decides only between equal correlations


def _check_decoders(decoder_a: Any, decoder_b: Any, d_a: int, d_b: int) -> None:
    """ValueError unless the decoders are `(d_a, d_in)` and `(d_b, d_in)`: one residual space."""
    shape_a, shape_b = np.shape(decoder_a), np.shape(decoder_b)
    if len(shape_a) != 2 or len(shape_b) != 2 or shape_a[0] != d_a or shape_b != (d_b, shape_a[1]):
        raise ValueError(
            f"decoders must be (d_sae, d_in) of one residual space: got {shape_a} for A ({d_a} "
            f"features) and {shape_b} for B ({d_b} features)."
        )


def _decoder_cosines(decoder_a: np.ndarray, decoder_b: np.ndarray) -> np.ndarray:
    """Cosine of every decoder row of A with every decoder row of B (one residual space)."""
    da, db = np.asarray(decoder_a, dtype=np.float64), np.asarray(decoder_b, dtype=np.float64)
    da = da / np.maximum(np.linalg.norm(da, axis=1, keepdims=True), 1e-12)
    db = db / np.maximum(np.linalg.norm(db, axis=1, keepdims=True), 1e-12)
    return da @ db.T


def _varying_columns(m: sparse.csr_matrix) -> np.ndarray:
    """Indices of the columns of `m` that are not constant over its rows (a feature that fires, and not
    everywhere at one value): the only ones with a correlation."""
    mean = np.asarray(m.mean(axis=0)).ravel()
    square = np.asarray(m.multiply(m).mean(axis=0)).ravel()
    return np.flatnonzero(square - mean**2 > 1e-12 * np.maximum(square, 1e-300))


def document_signatures(pooled: pl.DataFrame, doc_ids: list[int], d_sae: int) -> sparse.csr_matrix:
    """(len(doc_ids), d_sae) sparse matrix of each document's per-feature max activation (row i is
    `doc_ids[i]`; a feature absent from a document is 0), from pooled_embeddings rows (`doc_id`, `feature`,
    `max_activation`). Rows of other documents are ignored; a feature >= `d_sae` raises ValueError."""
    index = pl.DataFrame({"doc_id": doc_ids}, schema={"doc_id": pl.Int32}).with_row_index("row")
    rows = pooled.select(
        pl.col("doc_id").cast(pl.Int32), pl.col("feature").cast(pl.Int64), "max_activation"
    ).join(index, on="doc_id", how="inner")
    if rows.height and (int(rows["feature"].max()) >= d_sae or int(rows["feature"].min()) < 0):
        raise ValueError(
            f"pooled features span {rows['feature'].min()}..{rows['feature'].max()}, outside the SAE's "
            f"{d_sae} features: the table was written by another SAE; materialize it again."
        )
    values = rows["max_activation"].cast(pl.Float64).to_numpy()
    return sparse.csr_matrix(
        (values, (rows["row"].to_numpy(), rows["feature"].to_numpy())), shape=(len(doc_ids), d_sae)
    )
