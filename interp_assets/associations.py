"""Which SAE features go with a document metadata column (a label, a score, a date), with FDR control.

Pure functions over one dataset's `pooled_embeddings` (README schema) and one metadata column; no
Dagster here. Entry points: `feature_associations` (doc ids + a polars Series aligned to them) and
`associations_for_column` (a raw_documents frame + a column name). Both return an `AssociationResult`:
the per-feature table (`ASSOCIATION_SCHEMA`) plus counts (nulls dropped, features skipped).

A feature's value in a document is its pooled value under `aggregation` (max, mean = sum / doc_tokens,
sum, count = active tokens, binarize = 1) and 0 in every document where it does not fire, documents
with no active feature at all included. Values are compared in float32, the precision pooled_embeddings
stores. All documents where a feature is zero tie at the bottom of its ranking with one shared midrank,
so only the nonzero entries are sorted: one `np.sort` of 64-bit keys (feature, value, document or class)
and O(nonzeros) passes over runs of ties.

Statistics
- Binary column (boolean; a numeric, date or string column with exactly two distinct values): effect =
  AUC = P(value in a positive doc > value in a negative doc) + 1/2 P(tie), i.e. U / (n_pos n_neg) of the
  Mann-Whitney test. p: two-sided normal approximation with the tie correction and the 0.5 continuity
  correction (= scipy.stats.mannwhitneyu(method="asymptotic")). That approximation is badly
  anti-conservative when few active documents are expected in a class (a rare feature, or a rare
  label): U is then driven by the hypergeometric number J of active positives. There (smallest expected
  cell of the active x class table < MIXTURE_MIN_EXPECTED) p is exact over J and normal only within the
  active documents (`_mwu_mixture_pvalue`; fully exact for binarize). CI: DeLong's variance (exact
  under ties, from placement values) with a Wald interval clipped to [0, 1].
- Numeric column (numbers, dates/datetimes as their epoch values, durations): effect = Spearman's rho
  (Pearson on midranks, as scipy.stats.spearmanr) by default. Spearman because activations are heavy
  tailed with a point mass at zero and metadata scales are arbitrary (dates, scores): ranks make the
  test robust to outliers and invariant to monotone rescaling, and they handle the zero ties exactly.
  p: t test with n - 2 df (as scipy); CI: Fisher z with the Bonett-Wright (2000) standard error
  sqrt((1 + rho^2 / 2) / (n - 3)). `method="pearson"` gives Pearson's r instead (point-biserial r with
  aggregation="binarize"), CI by Fisher z with SE 1 / sqrt(n - 3).
- Benjamini-Hochberg q-values over the tested features. Skipping features active in fewer than
  `min_docs` documents is independent filtering (the activity count ignores the column, so it leaves
  the null distribution of the test unchanged), which keeps BH valid over the remaining features.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import polars as pl
from scipy import special, stats

from interp_assets.diffing import (
    AGGREGATIONS,
    FrameLike,
    as_lazy,
    benjamini_hochberg,
    pooled_value_columns,
    pooled_value_expr,
)
from interp_assets.ingest import RESERVED_COLUMNS

Kind = Literal["auto", "binary", "numeric"]
Method = Literal["spearman", "pearson"]
DocIds = Sequence[int] | np.ndarray | pl.Series

ASSOCIATION_SCHEMA: dict[str, pl.DataType] = {
    "dataset": pl.String(),
    "column": pl.String(),
    "feature": pl.Int32(),
    "statistic": pl.String(),
    "aggregation": pl.String(),
    "n_docs": pl.Int64(),
    "n_active": pl.Int64(),
    "effect": pl.Float64(),
    "ci_low": pl.Float64(),
    "ci_high": pl.Float64(),
    "p_value": pl.Float64(),
    "q_value": pl.Float64(),
    "significant": pl.Boolean(),
    "test": pl.String(),
    "positive_class": pl.String(),
    "freq_pos": pl.Float64(),
    "freq_neg": pl.Float64(),
    "mean_pos": pl.Float64(),
    "mean_neg": pl.Float64(),
}
"""Columns of `AssociationResult.table`, one row per tested feature:

dataset, column: what was tested. feature: SAE feature index. statistic: "auc" (binary column),
"spearman" or "pearson" (numeric column). aggregation: the pooled value used. n_docs: documents
analyzed (non-null column value). n_active: of those, documents where the feature fires. effect: AUC
(0.5 = no association, > 0.5 = higher in the positive class) or the correlation. ci_low, ci_high: its
`confidence` interval (null where undefined, e.g. a class with one document). p_value: two-sided.
q_value: Benjamini-Hochberg over the tested features. significant: q_value < alpha. test: how p was
computed ("mann_whitney": normal approximation; "mann_whitney_mixture": exact over the number of
active positives, see MIXTURE_MIN_EXPECTED; "spearman_t" / "pearson_t"). positive_class:
the class AUC > 0.5 points to (null for numeric). freq_pos, freq_neg: fraction of positive / negative
documents where the feature fires; mean_pos, mean_neg: mean feature value over all documents of the
class, zeros included (all four null for numeric). Sorted by q_value, then strength (|AUC - 0.5| or
|rho|) descending, then feature.
"""

_VALUE_BITS = 31  # a positive finite float32 is 31 bits whose unsigned order is the numeric order
_KEY_BITS = 64  # width of the sort keys; features are processed in chunks so that every key fits
_MIXTURE_CHUNK = 4_000_000  # support points of J evaluated at once by the mixture p-value
MIXTURE_MIN_EXPECTED = 20.0
"""Binary columns: below this smallest expected cell of the (active x class) table, p-values come from
the exact-in-J mixture (`test` = "mann_whitney_mixture") instead of the plain normal approximation."""


@dataclass(frozen=True)
class AssociationResult:
    """The per-feature table and what was dropped or skipped on the way (see `metadata`)."""

    table: pl.DataFrame
    dataset: str
    column: str
    kind: str  # "binary" | "numeric"
    statistic: str  # "auc" | "spearman" | "pearson"
    aggregation: str
    positive_class: str | None
    negative_class: str | None
    n_docs_total: int  # documents passed in
    n_null_dropped: int  # documents dropped for a null / NaN / infinite column value
    n_docs: int  # documents analyzed
    n_pos: int | None
    n_neg: int | None
    n_features_active: int  # features active in at least one analyzed document
    n_tested: int
    n_skipped_rare: int  # active in fewer than min_docs analyzed documents
    n_skipped_constant: int  # same value in every analyzed document: no variation to test
    n_significant: int
    pooled_rows_ignored: int  # pooled rows whose doc_id is not among the doc ids passed in
    alpha: float
    min_docs: int

    def metadata(self) -> dict[str, Any]:
        """Everything but the table, as plain values (Dagster materialization metadata)."""
        return {k: v for k, v in self.__dict__.items() if k != "table"}


# --------------------------------------------------------------------------- public API


def feature_associations(
    pooled: FrameLike,
    doc_ids: DocIds,
    values: pl.Series,
    *,
    dataset: str = "",
    column: str | None = None,
    aggregation: str = "max",
    kind: Kind = "auto",
    method: Method = "spearman",
    positive: Any = None,
    min_docs: int = 5,
    alpha: float = 0.05,
    confidence: float = 0.95,
) -> AssociationResult:
    """Per-feature association of pooled SAE activations with a metadata column.

    `pooled`: one dataset's pooled_embeddings (doc_id, feature and the columns `aggregation` reads).
    `doc_ids`: the documents to analyze (pass the encoded ones: a document missing from `pooled` counts
    as all zeros); `values`: the column, one value per doc id. Null, NaN and infinite values are dropped
    and counted. `kind="auto"`: boolean and two-valued columns are binary, other numeric/temporal ones
    numeric; `positive` picks the positive class of a binary column (default True / the larger value /
    the string that sorts last). Features active in fewer than `min_docs` analyzed documents, or
    constant over them, are skipped and counted. Statistics: module docstring; columns: ASSOCIATION_SCHEMA.
    """
    name = column if column is not None else (values.name if isinstance(values, pl.Series) else "")
    name = name or "value"
    _check_params(aggregation, kind, method, min_docs, alpha, confidence)
    if not isinstance(values, pl.Series):
        raise TypeError(f"values for column {name!r} must be a polars Series, got {type(values).__name__}.")
    ids = _doc_id_array(doc_ids)
    if values.len() != ids.size:
        raise ValueError(
            f"Column {name!r} has {values.len()} values but doc_ids has {ids.size}; pass the column "
            "aligned to doc_ids (one value per document, same order)."
        )
    target = _prepare_column(values, name, kind, positive)
    keep = target.keep
    ids_kept = ids[keep]
    n = int(ids_kept.size)
    d, f_raw, v, ignored = _load_entries(pooled, ids, keep, aggregation)

    width = int(f_raw.max()) + 1 if f_raw.size else 0
    k_all = np.bincount(f_raw, minlength=width)
    active = np.flatnonzero(k_all)
    tested = np.flatnonzero(k_all >= min_docs)
    lut = np.full(width, -1, dtype=np.int64)
    lut[tested] = np.arange(tested.size)
    f = lut[f_raw]
    sel = f >= 0
    d, f, v = d[sel], f[sel], v[sel]
    del f_raw, sel
    k = k_all[tested].astype(np.int64)

    z = special.ndtri(0.5 + confidence / 2)
    if target.binary:
        cols, constant = _binary_stats(d, f, v, k, target.y.astype(bool), z)
        statistic = "auc"
    elif method == "spearman":
        cols, constant = _spearman_stats(d, f, v, k, target.y, z)
        statistic = "spearman"
    else:
        cols, constant = _pearson_stats(d, f, v, k, target.y, z)
        statistic = "pearson"

    keep_f = ~constant
    features = tested[keep_f]
    cols = {c: a[keep_f] for c, a in cols.items()}
    q = benjamini_hochberg(cols["p_value"])
    m = features.size
    strength = np.abs(cols["effect"] - 0.5) if target.binary else np.abs(cols["effect"])
    table = pl.DataFrame(
        {
            "dataset": [dataset] * m,
            "column": [name] * m,
            "feature": features.astype(np.int32),
            "statistic": [statistic] * m,
            "aggregation": [aggregation] * m,
            "n_docs": np.full(m, n, dtype=np.int64),
            "n_active": k[keep_f],
            "effect": cols["effect"],
            "ci_low": cols["ci_low"],
            "ci_high": cols["ci_high"],
            "p_value": cols["p_value"],
            "q_value": q,
            "significant": q < alpha,
            "test": cols["test"] if "test" in cols else [f"{statistic}_t"] * m,
            "positive_class": [target.positive] * m,
            "freq_pos": cols.get("freq_pos", np.full(m, np.nan)),
            "freq_neg": cols.get("freq_neg", np.full(m, np.nan)),
            "mean_pos": cols.get("mean_pos", np.full(m, np.nan)),
            "mean_neg": cols.get("mean_neg", np.full(m, np.nan)),
        },
        schema=ASSOCIATION_SCHEMA,
    )
    float_cols = [c for c, t in ASSOCIATION_SCHEMA.items() if t == pl.Float64()]
    table = (
        table.with_columns(pl.col(float_cols).fill_nan(None), _strength=strength)
        .sort(["q_value", "_strength", "feature"], descending=[False, True, False])
        .drop("_strength")
    )
    return AssociationResult(
        table=table,
        dataset=dataset,
        column=name,
        kind="binary" if target.binary else "numeric",
        statistic=statistic,
        aggregation=aggregation,
        positive_class=target.positive,
        negative_class=target.negative,
        n_docs_total=int(ids.size),
        n_null_dropped=int(ids.size - n),
        n_docs=n,
        n_pos=int(target.y.sum()) if target.binary else None,
        n_neg=int(n - target.y.sum()) if target.binary else None,
        n_features_active=int(active.size),
        n_tested=int(m),
        n_skipped_rare=int(active.size - tested.size),
        n_skipped_constant=int(constant.sum()),
        n_significant=int((q < alpha).sum()),
        pooled_rows_ignored=ignored,
        alpha=alpha,
        min_docs=min_docs,
    )


def associations_for_column(
    pooled: FrameLike, documents: FrameLike, column: str, *, dataset: str | None = None, **kwargs: Any
) -> AssociationResult:
    """`feature_associations` for `column` of a raw_documents frame (doc_id + metadata columns).

    `dataset` defaults to the frame's `dataset` column. Keyword arguments go to `feature_associations`.
    """
    lf = as_lazy(documents, "documents", ["doc_id"])
    schema = lf.collect_schema()
    if column not in schema.names():
        usable = [c for c, t in schema.items() if c not in RESERVED_COLUMNS and _maybe_usable(t)]
        raise ValueError(
            f"Column {column!r} is not in the documents; columns that may be usable: {usable} "
            "(boolean, numeric, date/datetime, or two-valued strings)."
        )
    names = ["doc_id", column] + (["dataset"] if dataset is None and "dataset" in schema.names() else [])
    docs = lf.select(names).collect()
    if dataset is None:
        first = docs["dataset"].drop_nulls().head(1) if "dataset" in docs.columns else []
        dataset = str(first[0]) if len(first) else ""
    return feature_associations(
        pooled, docs["doc_id"], docs[column], dataset=dataset, column=column, **kwargs
    )


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class _Target:
    keep: np.ndarray  # bool per input document: value present
    y: np.ndarray  # kept values: 0/1 for binary, float64 for numeric
    binary: bool
    positive: str | None
    negative: str | None


def _check_params(aggregation: str, kind: str, method: str, min_docs: int, alpha: float, conf: float) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"Unknown aggregation {aggregation!r}; use one of {list(AGGREGATIONS)}.")
    if kind not in ("auto", "binary", "numeric"):
        raise ValueError(f"Unknown kind {kind!r}; use 'auto', 'binary' or 'numeric'.")
    if method not in ("spearman", "pearson"):
        raise ValueError(f"Unknown method {method!r}; use 'spearman' or 'pearson'.")
    if isinstance(min_docs, bool) or not isinstance(min_docs, int | np.integer) or min_docs < 1:
        raise ValueError(f"min_docs must be a positive integer, got {min_docs!r}.")
    for label, x in (("alpha", alpha), ("confidence", conf)):
        if not 0.0 < float(x) < 1.0:
            raise ValueError(f"{label} must be between 0 and 1 (exclusive), got {x!r}.")


def _doc_id_array(doc_ids: DocIds) -> np.ndarray:
    s = doc_ids if isinstance(doc_ids, pl.Series) else pl.Series("doc_id", np.asarray(doc_ids))
    if s.null_count():
        raise ValueError(f"doc_ids has {s.null_count()} null value(s); pass the documents' doc_id column.")
    if s.len() and not s.dtype.is_integer():
        raise ValueError(f"doc_ids must be integers (raw_documents.doc_id), got type {s.dtype}.")
    ids = s.cast(pl.Int64).to_numpy()
    if np.unique(ids).size != ids.size:
        raise ValueError("doc_ids repeats documents; pass each document once (one dataset's doc_id).")
    return ids


def _maybe_usable(dtype: pl.DataType) -> bool:
    return (
        dtype == pl.Boolean
        or dtype.is_numeric()
        or dtype.is_temporal()
        or dtype in (pl.String, pl.Categorical)
        or isinstance(dtype, pl.Enum)
    )


def _prepare_column(values: pl.Series, name: str, kind: str, positive: Any) -> _Target:
    """Validate the column's type, drop missing values and decide binary vs numeric."""
    dtype = values.dtype
    total = values.len()
    is_string = dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum)
    if not (dtype == pl.Boolean or dtype.is_numeric() or dtype.is_temporal() or is_string):
        nested = dtype.is_nested() if hasattr(dtype, "is_nested") else False
        hint = (
            f"derive a number or boolean from it first (e.g. pl.col({name!r}).list.len())"
            if nested
            else "cast or derive a boolean/numeric column first"
        )
        raise ValueError(
            f"Column {name!r} has type {dtype}: associations need a boolean, numeric, date/datetime, or "
            f"a string column with exactly two distinct values; {hint}."
        )
    if is_string:
        s = values.cast(pl.String)
        present = s.is_not_null().to_numpy()
        raw = s.drop_nulls()
    elif dtype == pl.Boolean:
        present = values.is_not_null().to_numpy()
        raw = values.drop_nulls()
    else:
        num = _as_float(values)
        present = (num.is_not_null() & num.is_finite().fill_null(False)).to_numpy()
        raw = values.filter(pl.Series(present))
    n = int(present.sum())
    if n == 0:
        raise ValueError(
            f"Column {name!r} has no usable values: all {total} are null"
            + ("" if is_string or dtype == pl.Boolean else ", NaN or infinite")
            + "; nothing to associate."
        )
    distinct = raw.unique().sort()
    m = distinct.len()
    if m < 2:
        raise ValueError(
            f"Column {name!r} has a single distinct value ({distinct[0]!r}) over its {n} non-null "
            "documents; an association needs at least two."
        )
    if is_string and m != 2:
        shown = distinct.head(5).to_list()
        raise ValueError(
            f"Column {name!r} is a string column with {m} distinct values (e.g. {shown}); only a string "
            f"column with exactly two values can be used (as binary). Derive a boolean such as "
            f"pl.col({name!r}) == {shown[0]!r}, or cast it to numbers if it holds numbers as text."
        )
    if kind == "binary" and m != 2:
        raise ValueError(
            f"Column {name!r} has {m} distinct values; kind='binary' needs exactly 2. Use kind='numeric', "
            f"or threshold it (e.g. pl.col({name!r}) > value)."
        )
    if kind == "numeric" and is_string:
        raise ValueError(f"Column {name!r} holds strings; kind='numeric' needs numbers, dates or booleans.")
    binary = kind == "binary" or (kind == "auto" and m == 2)
    if not binary:
        if positive is not None:
            raise ValueError(
                f"positive={positive!r} only applies to a binary column; {name!r} is analyzed as numeric "
                f"({m} distinct values)."
            )
        if n < 3:
            raise ValueError(f"Column {name!r} has {n} non-null values; a correlation needs at least 3.")
        y = _as_float(values.filter(pl.Series(present))).to_numpy()
        return _Target(present, y, False, None, None)
    low, high = distinct[0], distinct[1]
    pos = high
    if positive is not None:
        matches = [x for x in (low, high) if x == positive or str(x) == str(positive)]
        if not matches:
            raise ValueError(
                f"positive={positive!r} is not a value of column {name!r}; its two values are "
                f"{low!r} and {high!r}."
            )
        pos = matches[0]
    neg = low if pos == high else high
    kept = values.filter(pl.Series(present))
    if is_string:
        kept = kept.cast(pl.String)
    y = (kept == pos).to_numpy().astype(np.float64)
    return _Target(present, y, True, _class_name(pos), _class_name(neg))


def _as_float(values: pl.Series) -> pl.Series:
    """Numbers as float64; dates, datetimes, durations and times as their epoch / unit counts."""
    return (values.to_physical() if values.dtype.is_temporal() else values).cast(pl.Float64)


def _class_name(x: Any) -> str:
    return str(x).lower() if isinstance(x, bool) else str(x)


def _load_entries(
    pooled: FrameLike, ids: np.ndarray, keep: np.ndarray, aggregation: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Nonzero (doc row, feature, float32 value) entries of the kept documents; rows of unknown docs."""
    lf = as_lazy(pooled, "pooled", ["doc_id", "feature", *pooled_value_columns(aggregation)])
    df = lf.select(
        pl.col("doc_id").cast(pl.Int64), pl.col("feature").cast(pl.Int64), pooled_value_expr(aggregation)
    ).collect()
    doc = df["doc_id"].to_numpy()
    feat = df["feature"].to_numpy()
    val = df.to_series(2).cast(pl.Float64).fill_null(np.nan).to_numpy()
    del df
    if feat.size and feat.min() < 0:
        raise ValueError(f"pooled has negative feature index {int(feat.min())}; features are 0-based.")
    bad = ~np.isfinite(val) | (val < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"pooled values ({aggregation}) must be finite and >= 0 (SAE activations); {int(bad.sum())} "
            f"row(s) are not, e.g. feature {int(feat[i])} of doc {int(doc[i])} = {float(val[i])!r}. Check "
            "pooled_embeddings (for 'mean': doc_tokens present and > 0)."
        )
    _check_unique_pairs(doc, feat)
    # row index of each pooled row's document among the kept documents (-1: null value or unknown doc)
    row = np.full(ids.size, -1, dtype=np.int64)
    row[keep] = np.arange(int(keep.sum()))
    if doc.size and ids.size and ids.min() >= 0 and max(int(ids.max()), int(doc.max())) < 4 * ids.size + 1024:
        lut = np.full(max(int(ids.max()), int(doc.max())) + 1, -2, dtype=np.int64)
        lut[ids] = row
        where = lut[doc] if doc.min() >= 0 else np.where(doc >= 0, lut[np.maximum(doc, 0)], -2)
    else:
        order = np.argsort(ids)
        pos = np.clip(np.searchsorted(ids[order], doc), 0, max(ids.size - 1, 0))
        found = ids[order][pos] == doc if ids.size else np.zeros(doc.size, dtype=bool)
        where = np.where(found, row[order][pos] if ids.size else -2, -2)
    ignored = int((where == -2).sum())
    val32 = val.astype(np.float32)
    sel = (where >= 0) & (val32 > 0)
    return where[sel], feat[sel], val32[sel], ignored


def _check_unique_pairs(doc: np.ndarray, feat: np.ndarray) -> None:
    """pooled must have one row per (doc_id, feature); cheap when sorted as the asset writes it."""
    if doc.size < 2:
        return
    key = (doc - doc.min()) * (int(feat.max()) + 1) + feat
    if bool(np.all(key[1:] > key[:-1])):
        return
    key.sort()
    dup = np.flatnonzero(key[1:] == key[:-1])
    if dup.size:
        k = int(key[dup[0]])
        w = int(feat.max()) + 1
        raise ValueError(
            f"pooled has {dup.size} repeated (doc_id, feature) row(s), e.g. doc {k // w + int(doc.min())}, "
            f"feature {k % w}: pass one dataset's pooled_embeddings (one row per document and feature)."
        )


# --------------------------------------------------------------------------- sorted runs of ties


@dataclass(frozen=True)
class _Runs:
    """A block of features' entries sorted by (feature, value, low); a run = one (feature, value)."""

    low: np.ndarray  # sorted low bits of each entry (class or document row)
    start: np.ndarray  # first entry of each run
    length: np.ndarray  # entries in each run
    feature: np.ndarray  # (global tested) feature of each run
    rank: np.ndarray  # midrank of the run among its feature's nonzero entries (1-based)
    feature_start: np.ndarray  # first entry of each run's feature


def _sorted_runs(
    f: np.ndarray, v: np.ndarray, k: np.ndarray, low: np.ndarray, low_bits: int
) -> Iterator[_Runs]:
    """Sort the nonzero entries within features by value with one np.sort of 64-bit keys per block.

    Key = feature << (31 + low_bits) | float32 bits << low_bits | low. Features are split into blocks
    (usually one) so that the key fits 64 bits.
    """
    feat_bits = max(1, int(k.size - 1).bit_length())
    room = _KEY_BITS - _VALUE_BITS - low_bits
    if room < 1:
        raise ValueError(f"Too many documents for the sort key ({low_bits} bits); split the dataset.")
    block = 1 << min(room, feat_bits)
    vbits = v.view(np.uint32).astype(np.uint64)
    for first in range(0, max(k.size, 1), block):
        last = min(first + block, k.size)
        if first == 0 and last == k.size:
            fb, vb, lb = f, vbits, low
        else:
            m = (f >= first) & (f < last)
            fb, vb, lb = f[m], vbits[m], low[m]
        key = ((fb - first).astype(np.uint64) << np.uint64(_VALUE_BITS + low_bits)) | (
            vb << np.uint64(low_bits)
        )
        key |= lb.astype(np.uint64)
        del fb, vb, lb
        key.sort()
        n_entries = key.size
        hi = key >> np.uint64(low_bits)
        new = np.empty(n_entries, dtype=bool)
        new[:1] = True
        np.not_equal(hi[1:], hi[:-1], out=new[1:])
        del hi
        start = np.flatnonzero(new)
        del new
        length = np.diff(np.append(start, n_entries))
        feature = (key[start] >> np.uint64(_VALUE_BITS + low_bits)).astype(np.int64) + first
        low_sorted = key & np.uint64((1 << low_bits) - 1)
        del key
        kb = k[first:last]
        fstart = np.concatenate([[0], np.cumsum(kb)[:-1]])[feature - first]
        yield _Runs(
            low=low_sorted.astype(np.int64),
            start=start,
            length=length,
            feature=feature,
            rank=(start - fstart) + (length + 1) / 2.0,
            feature_start=fstart,
        )


def _per_feature(index: np.ndarray, weights: np.ndarray, size: int) -> np.ndarray:
    return np.bincount(index, weights=weights, minlength=size)


def _segment_sums(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sums of `values` over the segments beginning at `starts` (non-empty, increasing)."""
    return np.add.reduceat(values, starts) if starts.size else np.zeros(0)


# --------------------------------------------------------------------------- statistics


def _binary_stats(
    d: np.ndarray, f: np.ndarray, v: np.ndarray, k: np.ndarray, ypos: np.ndarray, z: float
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """AUC, Mann-Whitney p (tie + continuity corrected), DeLong CI, class frequencies and means."""
    T = k.size
    n = ypos.size
    n_pos = float(ypos.sum())
    n_neg = n - n_pos
    cls = ypos[d]
    k_pos = _per_feature(f, cls.astype(np.float64), T)
    k_neg = k - k_pos
    sum_pos = _per_feature(f, np.where(cls, v, 0.0), T)
    sum_all = _per_feature(f, v.astype(np.float64), T)
    r_act_pos = np.zeros(T)  # sum over positive active entries of their midrank among actives
    ties = np.zeros(T)
    n_runs = np.zeros(T)
    d10, q10, d01, q01 = np.zeros(T), np.zeros(T), np.zeros(T), np.zeros(T)
    z_pos, z_neg = n_pos - k_pos, n_neg - k_neg
    for runs in _sorted_runs(f, v, k, cls.astype(np.int64), 1):
        csum = np.concatenate([[0], np.cumsum(runs.low)])
        pr = (csum[runs.start + runs.length] - csum[runs.start]).astype(np.float64)  # positives in run
        nr = runs.length - pr
        pb = (csum[runs.start] - csum[runs.feature_start]).astype(np.float64)  # positives below the run
        nb = (runs.start - runs.feature_start) - pb
        rf = runs.feature
        lf = runs.length.astype(np.float64)
        r_act_pos += _per_feature(rf, pr * runs.rank, T)
        ties += _per_feature(rf, lf**3 - lf, T)
        n_runs += np.bincount(rf, minlength=T)
        # DeLong placements relative to those of the zero documents (which then contribute 0)
        dev10 = (0.5 * z_neg[rf] + nb + 0.5 * nr) / n_neg
        dev01 = -(pb + 0.5 * pr + 0.5 * z_pos[rf]) / n_pos
        d10 += _per_feature(rf, pr * dev10, T)
        q10 += _per_feature(rf, pr * dev10**2, T)
        d01 += _per_feature(rf, nr * dev01, T)
        q01 += _per_feature(rf, nr * dev01**2, T)
    n0 = (n - k).astype(np.float64)
    rank_sum_pos = r_act_pos + k_pos * n0 + z_pos * (n0 + 1) / 2
    u_pos = rank_sum_pos - n_pos * (n_pos + 1) / 2
    auc = u_pos / (n_pos * n_neg)
    sigma = np.sqrt(n_pos * n_neg / 12 * ((n + 1) - (ties + n0**3 - n0) / (n * (n - 1))))
    u = np.maximum(u_pos, n_pos * n_neg - u_pos)
    with np.errstate(divide="ignore", invalid="ignore"):
        zval = (u - n_pos * n_neg / 2 - 0.5) / sigma
        p = np.where(sigma > 0, np.clip(2 * special.ndtr(-zval), 0.0, 1.0), 1.0)
    # few active documents expected in a class: the normal approximation of U fails (U is driven by
    # the hypergeometric count of active positives); mix over that count exactly instead
    k_f = k.astype(np.float64)
    min_expected = np.minimum(k_f, n0) * min(n_pos, n_neg) / n
    mixture = min_expected < MIXTURE_MIN_EXPECTED
    if mixture.any():
        p[mixture] = _mwu_mixture_pvalue(u_pos[mixture], k[mixture], ties[mixture], int(n_pos), int(n_neg))
    test = np.where(mixture, "mann_whitney_mixture", "mann_whitney")
    with np.errstate(divide="ignore", invalid="ignore"):
        var10 = (q10 - d10**2 / n_pos) / (n_pos - 1) if n_pos > 1 else np.full(T, np.nan)
        var01 = (q01 - d01**2 / n_neg) / (n_neg - 1) if n_neg > 1 else np.full(T, np.nan)
    se = np.sqrt(np.maximum(var10 / n_pos + var01 / n_neg, 0.0))
    constant = (k == n) & (n_runs == 1)
    cols = {
        "effect": auc,
        "ci_low": np.clip(auc - z * se, 0.0, 1.0),
        "ci_high": np.clip(auc + z * se, 0.0, 1.0),
        "p_value": p,
        "freq_pos": k_pos / n_pos,
        "freq_neg": k_neg / n_neg,
        "mean_pos": sum_pos / n_pos,
        "mean_neg": (sum_all - sum_pos) / n_neg,
        "test": test,
    }
    return cols, constant


def _mwu_mixture_pvalue(
    u_pos: np.ndarray, k: np.ndarray, active_ties: np.ndarray, n_pos: int, n_neg: int
) -> np.ndarray:
    """Two-sided Mann-Whitney p-value, exact over J = number of active positive documents.

    Under the null J is hypergeometric(n, k, n_pos). Given J = j, U = z_pos z_neg / 2 + j z_neg + U_act
    (zero-zero ties, active positives above zero negatives, U among the k active documents with j
    positives), where U_act is approximated as normal with the tie-corrected Mann-Whitney variance
    (a point mass when j is 0 or k or the active values all tie, e.g. binarize: then the test is exact).
    p = sum_j P(J = j) P(|U - n_pos n_neg / 2| >= |u - n_pos n_neg / 2| given j), continuity corrected.
    """
    n = n_pos + n_neg
    mu = n_pos * n_neg / 2
    kk = k.astype(np.int64)
    lo = np.maximum(0, kk - n_neg)
    hi = np.minimum(kk, n_pos)
    size = hi - lo + 1
    out = np.ones(kk.size)
    dist = np.abs(u_pos - mu)
    eps = 1e-9 * max(mu, 1.0)
    log_total = _log_comb(np.float64(n), np.float64(n_pos))
    start = 0
    while start < kk.size:
        csum = np.cumsum(size[start:])
        stop = start + max(1, int(np.searchsorted(csum, _MIXTURE_CHUNK, side="right")))
        idx = np.arange(start, stop)
        start = stop
        owner = np.repeat(np.arange(idx.size), size[idx])
        offsets = np.cumsum(size[idx]) - size[idx]
        j = (lo[idx][owner] + np.arange(owner.size) - offsets[owner]).astype(np.float64)
        kj = kk[idx][owner].astype(np.float64)
        log_pmf = _log_comb(kj, j) + _log_comb(n - kj, n_pos - j) - log_total
        z_pos = n_pos - j
        z_neg = n_neg - (kj - j)
        mean = 0.5 * z_pos * z_neg + j * z_neg + j * (kj - j) / 2
        with np.errstate(divide="ignore", invalid="ignore"):
            var = np.where(
                kj > 1, j * (kj - j) / 12 * ((kj + 1) - active_ties[idx][owner] / (kj * (kj - 1))), 0.0
            )
        sd = np.sqrt(np.maximum(var, 0.0))
        upper = mu + dist[idx][owner]
        lower = mu - dist[idx][owner]
        with np.errstate(divide="ignore", invalid="ignore"):
            tail_up = np.where(sd > 0, special.ndtr((mean - (upper - 0.5)) / sd), mean >= upper - eps)
            tail_lo = np.where(sd > 0, special.ndtr((lower + 0.5 - mean) / sd), mean <= lower + eps)
        w = np.exp(log_pmf) * (tail_up + tail_lo)
        out[idx] = np.minimum(np.bincount(owner, weights=w, minlength=idx.size), 1.0)
    return out


def _log_comb(n: np.ndarray, k: np.ndarray) -> np.ndarray:
    return special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1)


def _correlation_tests(r: np.ndarray, n: int, se_z: np.ndarray, z: float) -> dict[str, np.ndarray]:
    """t-test p-value (n - 2 df, as scipy) and Fisher-z interval of correlations r."""
    r = np.clip(r, -1.0, 1.0)
    df = n - 2
    with np.errstate(divide="ignore", invalid="ignore"):
        t = r * np.sqrt(df / ((1 - r) * (1 + r)))
        p = np.where(np.abs(r) >= 1, 0.0, 2 * stats.t.sf(np.abs(t), df))
        fz = np.arctanh(r)
    return {
        "effect": r,
        "ci_low": np.tanh(fz - z * se_z),
        "ci_high": np.tanh(fz + z * se_z),
        "p_value": np.clip(p, 0.0, 1.0),
    }


def _spearman_stats(
    d: np.ndarray, f: np.ndarray, v: np.ndarray, k: np.ndarray, y: np.ndarray, z: float
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Spearman rho of each feature's values (zeros included) with y: Pearson r of the midranks."""
    T = k.size
    n = y.size
    mid = (n + 1) / 2
    ryc = stats.rankdata(y) - mid  # centred midranks of y; they sum to 0
    ss_y = float(ryc @ ryc)
    n0 = (n - k).astype(np.float64)
    a = np.zeros(T)  # sum over active entries of (midrank among actives) * ryc
    b = np.zeros(T)  # sum over active entries of ryc
    ss_x = n0 * ((n0 + 1) / 2 - mid) ** 2  # the zeros' share of the rank sum of squares
    n_runs = np.zeros(T)
    low_bits = max(1, int(n - 1).bit_length())
    for runs in _sorted_runs(f, v, k, d, low_bits):
        s_run = _segment_sums(ryc[runs.low], runs.start)
        rf = runs.feature
        a += _per_feature(rf, runs.rank * s_run, T)
        b += _per_feature(rf, s_run, T)
        ss_x += _per_feature(rf, runs.length * (n0[rf] + runs.rank - mid) ** 2, T)
        n_runs += np.bincount(rf, minlength=T)
    # an active entry's rank is n0 + r, the zeros' (n0 + 1) / 2; sum(ryc) = 0 removes the zeros' term
    cov = a + (n0 - 1) / 2 * b
    constant = (k == n) & (n_runs == 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(constant, 0.0, cov / np.sqrt(ss_x * ss_y))
        se_z = np.sqrt((1 + rho**2 / 2) / (n - 3)) if n > 3 else np.full(T, np.nan)
    return _correlation_tests(rho, n, se_z, z), constant


def _pearson_stats(
    d: np.ndarray, f: np.ndarray, v: np.ndarray, k: np.ndarray, y: np.ndarray, z: float
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pearson r of each feature's values (zeros included) with y; no sorting needed."""
    T = k.size
    n = y.size
    yc = y - y.mean()
    ss_y = float(yc @ yc)
    x = v.astype(np.float64)
    mean_x = _per_feature(f, x, T) / n
    ss_x = _per_feature(f, (x - mean_x[f]) ** 2, T) + (n - k) * mean_x**2
    cov = _per_feature(f, x * yc[d], T)
    constant = (k == n) & (ss_x <= n * (1e-7 * mean_x) ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(constant, 0.0, cov / np.sqrt(ss_x * ss_y))
    se_z = np.full(T, 1 / math.sqrt(n - 3) if n > 3 else np.nan)
    return _correlation_tests(r, n, se_z, z), constant
