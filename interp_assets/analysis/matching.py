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

    corr = signature_correlations(a, b)
    d_a, d_b = corr.shape
    score = np.nan_to_num(corr, nan=-1.0)
    cosines = None
    if decoder_a is not None and decoder_b is not None:
        cosines = _decoder_cosines(decoder_a, decoder_b, d_a, d_b)
        score = score + _TIE_BREAK * cosines
    rows, cols = linear_sum_assignment(score, maximize=True)
    match = np.full(d_a, -1, dtype=np.int64)
    match[rows] = cols
    match_corr = np.full(d_a, np.nan)
    valid = match >= 0
    match_corr[valid] = corr[np.flatnonzero(valid), match[valid]]
    keep = np.isfinite(match_corr) & (match_corr > 0)
    best = np.argmax(score, axis=1) if d_b else np.zeros(d_a, dtype=np.int64)
    best_corr = corr[np.arange(d_a), best] if d_b else np.full(d_a, np.nan)
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
    if cosines is not None:
        cosine = np.where(keep, cosines[np.arange(d_a), np.where(keep, match, 0)], np.nan)
        out = out.with_columns(pl.Series("decoder_cosine", cosine).fill_nan(None))
    return out


_TIE_BREAK = 1e-6  # weight of decoder cosine in the assignment: decides only between equal correlations


def _decoder_cosines(decoder_a: np.ndarray, decoder_b: np.ndarray, d_a: int, d_b: int) -> np.ndarray:
    """(d_a, d_b) cosine of every decoder row of A with every decoder row of B (one residual space)."""
    da, db = np.asarray(decoder_a, dtype=np.float64), np.asarray(decoder_b, dtype=np.float64)
    if da.ndim != 2 or db.ndim != 2 or da.shape[0] != d_a or db.shape != (d_b, da.shape[1]):
        raise ValueError(
            f"decoders must be (d_sae, d_in) of one residual space: got {da.shape} for A ({d_a} "
            f"features) and {db.shape} for B ({d_b} features)."
        )
    da = da / np.maximum(np.linalg.norm(da, axis=1, keepdims=True), 1e-12)
    db = db / np.maximum(np.linalg.norm(db, axis=1, keepdims=True), 1e-12)
    return da @ db.T


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
