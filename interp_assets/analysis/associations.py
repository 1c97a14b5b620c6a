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
  correction (= scipy.stats.mannwhitneyu(method="asymptotic")). CI: DeLong's variance (exact under
  ties, from placement values) with a Wald interval clipped to [0, 1].
- Numeric column (numbers, dates/datetimes as their epoch values, durations): effect = Spearman's rho
  (Pearson on midranks, as scipy.stats.spearmanr) by default. Spearman because activations are heavy
  tailed with a point mass at zero and metadata scales are arbitrary (dates, scores): ranks make the
  test robust to outliers and invariant to monotone rescaling, and they handle the zero ties exactly.
  p: t test with n - 2 df (as scipy); CI: Fisher z with the Bonett-Wright (2000) standard error
  sqrt((1 + rho^2 / 2) / (n - 3)). `method="pearson"` gives Pearson's r instead (point-biserial r with
  aggregation="binarize"), CI by Fisher z with SE 1 / sqrt(n - 3); its p assumes well-behaved data.
- Sparse features meet small groups: when few active documents are expected in the positive class
  (binary), or off the modal value of a numeric column whose mode holds >= MODE_MIN_FRACTION of the
  documents (counts, ratings, mostly-zero scores), the statistic is driven by J = the number of active
  documents in that group, hypergeometric under the null, and normal / t approximations understate
  its upper tail many times over at the p-values BH needs (a random 2% label or a Poisson(0.03) count
  column then gave false discoveries in 11-12 of 40 null runs, 23 with Pearson, instead of ~2).
  There (smallest expected cell < MIXTURE_MIN_EXPECTED) p is exact over J and normal only given J
  (`_mixture_pvalue`; exact for binarize); column `test` says which p-value a row has.
- Benjamini-Hochberg q-values over the tested features. Skipping features active in fewer than
  `min_docs` documents is independent filtering (the activity count ignores the column, so it leaves
  the null distribution of the test unchanged), which keeps BH valid over the remaining features.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import polars as pl

from interp_assets.analysis.diffing import (
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
computed ("mann_whitney" normal approximation, "spearman_t" / "pearson_t" t test, or "<that>_mixture":
exact over the number of active documents in the small group, see MIXTURE_MIN_EXPECTED). positive_class:
the class AUC > 0.5 points to (null for numeric). freq_pos, freq_neg: fraction of positive / negative
documents where the feature fires; mean_pos, mean_neg: mean feature value over all documents of the
class, zeros included (all four null for numeric). Sorted by q_value, then strength (|AUC - 0.5| or
|rho|) descending, then feature.
"""

_VALUE_BITS = 31  # a positive finite float32 is 31 bits whose unsigned order is the numeric order
_LITTLE_ENDIAN = sys.byteorder == "little"
_KEY_BITS = 64  # width of the sort keys; features are processed in chunks so that every key fits
_MIXTURE_CHUNK = 4_000_000  # support points of J evaluated at once by the mixture p-value
MODE_MIN_FRACTION = 0.1
"""Numeric columns whose most common value holds at least this fraction of the documents (counts,
ratings, zero-inflated scores) get the mixture p-values too, with R = documents off that value."""
MIXTURE_MIN_EXPECTED = 100.0
"""Below this smallest expected cell of the (active x in-group) table, p-values come from the
exact-in-J mixture (`test` = "..._mixture") instead of the plain normal / t approximation, which
understates the hypergeometric tail of J by 3-10x at p ~ 1e-6 with 20-40 expected and still 1.3x with
80 (p-values that small decide BH over thousands of features)."""


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
    from scipy import special

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
    lut = np.full(width, -1, dtype=np.int32)
    lut[tested] = np.arange(tested.size, dtype=np.int32)
    f = lut[f_raw]
    del f_raw
    if tested.size < active.size:
        sel = f >= 0
        d, f, v = d[sel], f[sel], v[sel]
        del sel
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
            "test": cols["test"],
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
    if column == "doc_id":
        raise ValueError("Column 'doc_id' is the document key, not metadata; pick a metadata column.")
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
        pl.col("doc_id"),
        pl.col("feature").cast(pl.Int32),
        pooled_value_expr(aggregation).cast(pl.Float32).alias("value"),
    ).collect()
    if not df.schema["doc_id"].is_integer():
        raise ValueError(f"pooled.doc_id must be integers, got type {df.schema['doc_id']}.")
    nulls = {c: df[c].null_count() for c in ("doc_id", "feature")}
    if any(nulls.values()):
        raise ValueError(f"pooled has null doc_id / feature values ({nulls}); pass pooled_embeddings.")
    doc = df["doc_id"].to_numpy()
    feat = df["feature"].to_numpy()
    val = df["value"].to_numpy()  # NaN where null (e.g. mean with a missing doc_tokens)
    del df
    if feat.size and feat.min() < 0:
        raise ValueError(f"pooled has negative feature index {int(feat.min())}; features are 0-based.")
    lowest = float(val.min()) if val.size else 1.0
    if val.size and not (lowest >= 0 and float(val.max()) < np.inf):
        bad = ~np.isfinite(val) | (val < 0)
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"pooled values ({aggregation}) must be finite and >= 0 (SAE activations); {int(bad.sum())} "
            f"row(s) are not, e.g. feature {int(feat[i])} of doc {int(doc[i])} = {float(val[i])!r}. Check "
            "pooled_embeddings (for 'mean': doc_tokens present and > 0)."
        )
    _check_unique_pairs(doc, feat)
    # row index of each pooled row's document among the kept documents (-1: null value, -2: unknown doc)
    all_kept = bool(keep.all())
    if (
        all_kept
        and (not doc.size or (int(doc.min()) >= 0 and int(doc.max()) < ids.size))
        and np.array_equal(ids, np.arange(ids.size))
    ):
        where, ignored = doc, 0  # doc ids are 0..n-1 in order (raw_documents): no lookup
    else:
        row = np.full(ids.size, -1, dtype=np.int64)
        row[keep] = np.arange(int(keep.sum()))
        top = max(int(ids.max()), int(doc.max()) if doc.size else 0)
        if doc.size and ids.min() >= 0 and doc.min() >= 0 and top < 4 * ids.size + 1024:
            lut = np.full(top + 1, -2, dtype=np.int64)
            lut[ids] = row
            where = lut[doc]
        else:
            order = np.argsort(ids)
            pos = np.clip(np.searchsorted(ids[order], doc), 0, ids.size - 1)
            where = np.where(ids[order][pos] == doc, row[order][pos], -2)
        ignored = int((where == -2).sum())
    if all_kept and ignored == 0 and lowest > 0:
        return where, feat, val, 0
    sel = (where >= 0) & (val > 0)
    return where[sel], feat[sel], val[sel], ignored


def _check_unique_pairs(doc: np.ndarray, feat: np.ndarray) -> None:
    """pooled must have one row per (doc_id, feature); cheap when sorted as the asset writes it."""
    if doc.size < 2:
        return
    d0, d1 = doc[:-1], doc[1:]
    if bool(((d1 > d0) | ((d1 == d0) & (feat[1:] > feat[:-1]))).all()):
        return
    w = int(feat.max()) + 1
    key = (doc.astype(np.int64) - int(doc.min())) * w + feat
    key.sort()
    dup = np.flatnonzero(key[1:] == key[:-1])
    if dup.size:
        k = int(key[dup[0]])
        raise ValueError(
            f"pooled has {dup.size} repeated (doc_id, feature) row(s), e.g. doc {k // w + int(doc.min())}, "
            f"feature {k % w}: pass one dataset's pooled_embeddings (one row per document and feature)."
        )


# --------------------------------------------------------------------------- sorting within features


@dataclass(frozen=True)
class _Block:
    """Entries of a block of features sorted by (feature, value, low); block-local positions."""

    first: int  # first (tested) feature of the block
    starts: np.ndarray  # first entry of each feature
    low: np.ndarray  # low bits of each sorted entry: class (binary) or document row (numeric)
    below: np.ndarray  # entries of the same feature sorted before this one (0-based position)
    tie_start: np.ndarray  # first entry of each run of >= 2 equal values of a feature
    tie_len: np.ndarray  # entries in that run
    tie_feature: np.ndarray  # block-local feature of that run
    single_value: np.ndarray  # per feature: all its active values are equal
    values: np.ndarray | None  # float32 value of each sorted entry (when asked for)

    def feature_sums(self, values: np.ndarray, dtype: type = np.float64) -> np.ndarray:
        """Per-feature sums of per-entry `values` (every feature of a block has >= 1 entry)."""
        if not self.starts.size:
            return np.zeros(0, dtype=dtype)
        return np.add.reduceat(values, self.starts, dtype=dtype)

    def tie_entries(self) -> tuple[np.ndarray, np.ndarray]:
        """(run of each entry that lies in a tie run, its position)."""
        owner = np.repeat(np.arange(self.tie_start.size), self.tie_len)
        offsets = np.cumsum(self.tie_len) - self.tie_len
        return owner, self.tie_start[owner] + np.arange(owner.size) - offsets[owner]


def _sorted_blocks(
    f: np.ndarray, v: np.ndarray, k: np.ndarray, low: np.ndarray, low_bits: int, with_values: bool = False
) -> Iterator[_Block]:
    """Sort the nonzero entries within features by value: one np.sort of 64-bit keys per block.

    Key = feature << (31 + low_bits) | float32 bits << low_bits | low. Features are split into blocks
    (usually one) so that the key fits 64 bits.
    """
    feat_bits = max(1, int(k.size - 1).bit_length())
    room = _KEY_BITS - _VALUE_BITS - low_bits
    if room < 1:
        raise ValueError(f"Too many documents for the sort key ({low_bits} bits); split the dataset.")
    block = 1 << min(room, feat_bits)
    for first in range(0, max(k.size, 1), block):
        last = min(first + block, k.size)
        if first == 0 and last == k.size:
            fb, vb, lb = f, v, low
        else:
            m = (f >= first) & (f < last)
            fb, vb, lb = f[m], v[m], low[m]
        key = (fb - first if first else fb).astype(np.uint64)  # in-place steps below: no temporaries
        key <<= np.uint64(_VALUE_BITS)
        key |= vb.view(np.uint32)
        key <<= np.uint64(low_bits)
        key |= lb.view(f"u{lb.dtype.itemsize}") if lb.dtype.kind == "i" else lb  # lb >= 0
        del fb, vb, lb
        key.sort()
        counts = k[first:last]
        starts = (np.cumsum(counts) - counts).astype(np.int64)
        ends = starts + counts - 1
        shift = np.uint64(low_bits)
        single_value = (key[starts] >> shift) == (key[ends] >> shift)
        ties_next = (key[1:] ^ key[:-1]) < np.uint64(1 << low_bits)  # entry i + 1 ties entry i
        if low_bits == 1 and _LITTLE_ENDIAN:  # cheap strided views of the key's low 32-bit word
            low_sorted = key.view(np.uint8)[::8] & np.uint8(1)
            values = (key.view(np.uint32)[::2] >> np.uint32(1)).view(np.float32) if with_values else None
        else:
            low_sorted = (key & np.uint64((1 << low_bits) - 1)).view(np.int64)
            values = None
            if with_values:
                values = ((key >> shift) & np.uint64(0x7FFFFFFF)).astype(np.uint32).view(np.float32)
        n_entries = key.size
        del key
        if ties_next.any():
            edge = np.diff(np.concatenate([[0], ties_next.view(np.int8), [0]]))
            tie_start = np.flatnonzero(edge == 1)
            tie_len = np.flatnonzero(edge == -1) - tie_start + 1
            del edge
        else:
            tie_start = tie_len = np.zeros(0, dtype=np.int64)
        del ties_next
        below = np.arange(n_entries, dtype=np.int64)
        below -= np.repeat(starts, counts)
        yield _Block(
            first=first,
            starts=starts,
            low=low_sorted,
            below=below,
            tie_start=tie_start,
            tie_len=tie_len,
            tie_feature=np.searchsorted(starts, tie_start, side="right") - 1,
            single_value=single_value,
            values=values,
        )


def _per_feature(index: np.ndarray, weights: np.ndarray, size: int) -> np.ndarray:
    return np.bincount(index, weights=weights, minlength=size)


def _midranks(blk: _Block) -> np.ndarray:
    """1-based midrank of each sorted entry among its feature's nonzero entries."""
    rank = blk.below + 1.0
    if blk.tie_start.size:
        owner, idx = blk.tie_entries()
        rank[idx] = (blk.below[blk.tie_start] + (blk.tie_len + 1) / 2.0)[owner]
    return rank


def _tie_sums(blk: _Block, size: int) -> np.ndarray:
    """Per block feature: sum of t^3 - t over its runs of tied nonzero values."""
    t = blk.tie_len.astype(np.float64)
    return _per_feature(blk.tie_feature, t**3 - t, size)


# --------------------------------------------------------------------------- statistics


def _binary_stats(
    d: np.ndarray, f: np.ndarray, v: np.ndarray, k: np.ndarray, ypos: np.ndarray, z: float
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """AUC, Mann-Whitney p (normal or mixture), DeLong CI, class frequencies and means."""
    from scipy import special

    T = k.size
    n = ypos.size
    n_pos = float(ypos.sum())
    n_neg = n - n_pos
    cls_all = ypos[d]
    sum_pos, sum_all = np.zeros(T), np.zeros(T)  # sums of the values over positive / all entries
    k_pos = np.zeros(T)
    u_act = np.zeros(T)  # Mann-Whitney U of the positive among the active entries
    sp2 = np.zeros(T)  # sum over positive active entries of P^2 (P: negatives below, ties half)
    sq2 = np.zeros(T)  # sum over negative active entries of Q^2 (Q: positives below, ties half)
    ties = np.zeros(T)
    single_value = np.zeros(T, dtype=bool)
    for blk in _sorted_blocks(f, v, k, cls_all, 1, with_values=True):
        sl = slice(blk.first, blk.first + blk.starts.size)
        cls = blk.low
        assert blk.values is not None
        sum_all[sl] = blk.feature_sums(blk.values)
        sum_pos[sl] = blk.feature_sums(np.where(cls, blk.values, np.float32(0)))
        c_excl = np.cumsum(cls, dtype=np.int64)
        c_excl -= cls  # positives sorted before each entry (block-wide)
        pb = c_excl - np.repeat(c_excl[blk.starts], k[sl])  # ... within its feature
        # twice the other-class entries below each entry (twice: ties count half, all stays integer)
        w = np.where(cls, blk.below - pb, pb)
        w <<= 1
        if blk.tie_start.size:  # entries of a tie run: other class strictly below + half of the run
            owner, idx = blk.tie_entries()
            s, ln = blk.tie_start, blk.tie_len
            last = s + ln - 1
            pos_in = c_excl[last] + cls[last] - c_excl[s]
            pb_s = pb[s]
            nb_s = blk.below[s] - pb_s
            w[idx] = np.where(cls[idx], (2 * nb_s + ln - pos_in)[owner], (2 * pb_s + pos_in)[owner])
        del c_excl, pb
        wp = w * cls
        k_pos[sl] = blk.feature_sums(cls, np.int64)
        u_act[sl] = blk.feature_sums(wp, np.int64) / 2
        p2 = blk.feature_sums(wp * w, np.int64)
        sp2[sl] = p2 / 4
        sq2[sl] = (blk.feature_sums(w * w, np.int64) - p2) / 4
        ties[sl] = _tie_sums(blk, sl.stop - sl.start)
        single_value[sl] = blk.single_value
    k_f = k.astype(np.float64)
    k_neg = k_f - k_pos
    z_pos, z_neg = n_pos - k_pos, n_neg - k_neg
    n0 = n - k_f
    u_pos = 0.5 * z_pos * z_neg + k_pos * z_neg + u_act
    auc = u_pos / (n_pos * n_neg)
    sigma = np.sqrt(n_pos * n_neg / 12 * ((n + 1) - (ties + n0**3 - n0) / (n * (n - 1))))
    u = np.maximum(u_pos, n_pos * n_neg - u_pos)
    with np.errstate(divide="ignore", invalid="ignore"):
        zval = (u - n_pos * n_neg / 2 - 0.5) / sigma
        p = np.where(sigma > 0, np.clip(2 * special.ndtr(-zval), 0.0, 1.0), 1.0)
    mixture = _needs_mixture(k, n, int(n_pos))
    if mixture.any():
        # X = sum over active positives of (overall rank - zeros' rank) = midrank among actives + (n0-1)/2;
        # those scores average n/2 with centred sum of squares (k^3 - k - ties) / 12; beta = 1
        m = mixture
        p[m] = _mixture_pvalue(
            x_obs=u_act[m] + k_pos[m] * (k_pos[m] + 1) / 2 + k_pos[m] * (n0[m] - 1) / 2,
            k=k[m],
            abar=np.full(int(m.sum()), n / 2),
            s_alpha=(k_f[m] ** 3 - k_f[m] - ties[m]) / 12,
            n=n,
            r=int(n_pos),
            bbar=1.0,
            s_beta=0.0,
            continuity=0.5,
        )
    # DeLong: placements V10 (positives) and V01 (negatives) relative to those of the zero documents,
    # active positive: (z_neg / 2 + P) / n_neg, active negative: -(Q + z_pos / 2) / n_pos, zeros: 0
    sum_q = k_pos * k_neg - u_act
    d10 = (0.5 * z_neg * k_pos + u_act) / n_neg
    q10 = (0.25 * z_neg**2 * k_pos + z_neg * u_act + sp2) / n_neg**2
    d01 = -(sum_q + 0.5 * z_pos * k_neg) / n_pos
    q01 = (sq2 + z_pos * sum_q + 0.25 * z_pos**2 * k_neg) / n_pos**2
    with np.errstate(divide="ignore", invalid="ignore"):
        var10 = (q10 - d10**2 / n_pos) / (n_pos - 1) if n_pos > 1 else np.full(T, np.nan)
        var01 = (q01 - d01**2 / n_neg) / (n_neg - 1) if n_neg > 1 else np.full(T, np.nan)
    se = np.sqrt(np.maximum(var10 / n_pos + var01 / n_neg, 0.0))
    constant = (k == n) & single_value
    cols = {
        "effect": auc,
        "ci_low": np.clip(auc - z * se, 0.0, 1.0),
        "ci_high": np.clip(auc + z * se, 0.0, 1.0),
        "p_value": p,
        "freq_pos": k_pos / n_pos,
        "freq_neg": k_neg / n_neg,
        "mean_pos": sum_pos / n_pos,
        "mean_neg": (sum_all - sum_pos) / n_neg,
        "test": np.where(mixture, "mann_whitney_mixture", "mann_whitney"),
    }
    return cols, constant


def _needs_mixture(k: np.ndarray, n: int, r: int) -> np.ndarray:
    """Features whose (active x in-R) table has an expected cell below MIXTURE_MIN_EXPECTED."""
    return np.minimum(k, n - k) * (min(r, n - r) / n) < MIXTURE_MIN_EXPECTED


def _mixture_pvalue(
    *,
    x_obs: np.ndarray,
    k: np.ndarray,
    abar: np.ndarray,
    s_alpha: np.ndarray,
    n: int,
    r: int,
    bbar: float,
    s_beta: float,
    continuity: float,
) -> np.ndarray:
    """Two-sided permutation p-value of X = sum of alpha * beta over the active documents in group R.

    The n documents split into R (r documents: the positive class, or the non-modal values of a
    numeric column; beta = their score relative to the others, mean bbar, centred sum of squares
    s_beta) and the rest; a feature's k active documents have alpha = their score relative to its
    zeros (mean abar, centred sum of squares s_alpha). The statistic is C + X with C fixed under
    permutation, and X depends on J = active documents in R, hypergeometric(n, k, r) under the null.
    Given J = j, X sums j products of a random j-sample of the alphas and one of the betas; exact
    conditional mean j abar bbar and variance
        bbar^2 j s_a/k (k-j)/(k-1) + abar^2 j s_b/r (r-j)/(r-1) + j s_a s_b/(k r) (1 + (j-1)/((k-1)(r-1))),
    taken as normal (a point mass where it is 0, e.g. binarize: then the test is exact).
    p = sum_j P(J = j) P(|X - E X| >= |x_obs - E X| given j) with `continuity` correction, over the j
    within 12 sd + 30 of E[J], plus a bound on P(J outside) (far below any p-value of interest; it only
    keeps p above 0 for extreme features).
    """
    from scipy import special

    kk = k.astype(np.int64)
    out = np.ones(kk.size)
    if kk.size == 0:
        return out
    expected = kk * (r / n)
    sd_j = np.sqrt(expected * ((n - r) / n) * (n - kk) / max(n - 1, 1))
    lo = np.maximum(np.maximum(0, kk - (n - r)), np.floor(expected - 12 * sd_j - 30).astype(np.int64))
    hi = np.minimum(np.minimum(kk, r), np.ceil(expected + 12 * sd_j + 30).astype(np.int64))
    size = hi - lo + 1
    centre = kk * (r / n) * abar * bbar  # E X
    dist = np.abs(x_obs - centre)
    eps = 1e-9 * np.maximum(np.abs(centre) + dist, 1.0)
    log_fact = special.gammaln(np.arange(n + 1, dtype=np.float64) + 1)  # log(i!), a lookup table
    log_total = log_fact[n] - log_fact[r] - log_fact[n - r]

    def log_hypergeom(kv: np.ndarray, jv: np.ndarray) -> np.ndarray:
        """log P(J = j) = log C(k, j) + log C(n - k, r - j) - log C(n, r)."""
        return (
            log_fact[kv] - log_fact[jv] - log_fact[kv - jv]
            + log_fact[n - kv] - log_fact[r - jv] - log_fact[n - kv - r + jv] - log_total
        )  # fmt: skip

    # J outside the window: add its whole probability (a conservative bound, far below 1e-20),
    # bounded geometrically since the pmf ratio keeps falling away from the mode
    outside = np.zeros(kk.size)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        up = hi < np.minimum(kk, r)
        j1 = np.where(up, hi + 1, np.maximum(0, kk - (n - r)))  # (a valid j where unused)
        ratio = (kk - j1) * (r - j1) / ((j1 + 1.0) * (n - kk - r + j1 + 1.0))
        outside += np.where(up, np.exp(log_hypergeom(kk, j1)) / np.maximum(1 - ratio, 1e-300), 0.0)
        down = lo > np.maximum(0, kk - (n - r))
        j0 = np.where(down, lo - 1, np.minimum(kk, r))
        ratio = j0 * (n - kk - r + j0) / ((kk - j0 + 1.0) * (r - j0 + 1.0))
        outside += np.where(down, np.exp(log_hypergeom(kk, j0)) / np.maximum(1 - ratio, 1e-300), 0.0)
    start = 0
    while start < kk.size:
        csum = np.cumsum(size[start:])
        stop = start + max(1, int(np.searchsorted(csum, _MIXTURE_CHUNK, side="right")))
        idx = np.arange(start, stop)
        start = stop
        owner = np.repeat(np.arange(idx.size), size[idx])
        offsets = np.cumsum(size[idx]) - size[idx]
        j = (lo[idx][owner] + np.arange(owner.size) - offsets[owner]).astype(np.float64)
        ki = kk[idx][owner]
        ji = j.astype(np.int64)
        kj = ki.astype(np.float64)
        a, sa = abar[idx][owner], s_alpha[idx][owner]
        log_pmf = log_hypergeom(ki, ji)
        mean = j * a * bbar
        with np.errstate(divide="ignore", invalid="ignore"):
            fa = np.where(kj > 1, (kj - j) / (kj - 1), 0.0)
            fb = (r - j) / (r - 1) if r > 1 else np.zeros_like(j)
            both = np.where(kj > 1, (j - 1) / ((kj - 1) * (r - 1)), 0.0) if r > 1 else np.zeros_like(j)
            var = (
                bbar**2 * j * sa / kj * fa
                + a**2 * j * (s_beta / r) * fb
                + j * sa * s_beta / (kj * r) * (1 + both)
            )
        sd = np.sqrt(np.maximum(np.nan_to_num(var), 0.0))
        upper = (centre + dist)[idx][owner]
        lower = (centre - dist)[idx][owner]
        e = eps[idx][owner]
        with np.errstate(divide="ignore", invalid="ignore"):
            tail_up = np.where(sd > 0, special.ndtr((mean - (upper - continuity)) / sd), mean >= upper - e)
            tail_lo = np.where(sd > 0, special.ndtr((lower + continuity - mean) / sd), mean <= lower + e)
        w = np.exp(log_pmf) * (tail_up + tail_lo)
        out[idx] = np.minimum(np.bincount(owner, weights=w, minlength=idx.size) + outside[idx], 1.0)
    return out


def _mode_split(b: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, float] | None:
    """R = documents off the column's mode, when the mode holds >= MODE_MIN_FRACTION of them.

    Returns (in_R, mean of beta over R, centred sum of squares of beta over R), beta = b - b(mode).
    """
    values, counts = np.unique(y, return_counts=True)
    top = int(np.argmax(counts))
    if counts[top] < max(2.0, MODE_MIN_FRACTION * y.size):
        return None
    in_r = y != values[top]
    beta = b[in_r] - b[~in_r][0]
    return in_r, float(beta.mean()), float(((beta - beta.mean()) ** 2).sum())


def _correlation_tests(r: np.ndarray, n: int, se_z: np.ndarray, z: float) -> dict[str, np.ndarray]:
    """t-test p-value (n - 2 df, as scipy) and Fisher-z interval of correlations r."""
    from scipy import stats

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
    from scipy import stats

    T = k.size
    n = y.size
    ryc = stats.rankdata(y) - (n + 1) / 2  # centred midranks of y; they sum to 0
    ss_y = float(ryc @ ryc)
    split = _mode_split(ryc, y)
    beta = np.where(split[0], ryc - ryc[~split[0]][0], 0.0) if split else None
    k_f = k.astype(np.float64)
    n0 = n - k_f
    ra, rb = np.zeros(T), np.zeros(T)  # sums over active entries of midrank * ryc and of ryc
    xa, xb = np.zeros(T), np.zeros(T)  # the same with beta (mixture statistic)
    ties = np.zeros(T)
    single_value = np.zeros(T, dtype=bool)
    low_bits = max(1, int(n - 1).bit_length())
    for blk in _sorted_blocks(f, v, k, d, low_bits):
        sl = slice(blk.first, blk.first + blk.starts.size)
        rank = _midranks(blk)
        ry = ryc[blk.low]
        ra[sl] = blk.feature_sums(rank * ry)
        rb[sl] = blk.feature_sums(ry)
        if beta is not None:
            be = beta[blk.low]
            xa[sl] = blk.feature_sums(rank * be)
            xb[sl] = blk.feature_sums(be)
        ties[sl] = _tie_sums(blk, sl.stop - sl.start)
        single_value[sl] = blk.single_value
    # overall ranks: zeros (n0 + 1) / 2, an active entry n0 + midrank; sum(ryc) = 0 drops the zeros
    cov = ra + (n0 - 1) / 2 * rb
    ss_x = (k_f**3 - k_f - ties) / 12 + k_f * n0 * n / 4
    constant = (k == n) & single_value
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(constant, 0.0, cov / np.sqrt(ss_x * ss_y))
        se_z = np.sqrt((1 + rho**2 / 2) / (n - 3)) if n > 3 else np.full(T, np.nan)
    cols = _correlation_tests(rho, n, se_z, z)
    mixture = _needs_mixture(k, n, int(split[0].sum())) if split else np.zeros(T, dtype=bool)
    if mixture.any():
        m = mixture
        cols["p_value"][m] = _mixture_pvalue(
            x_obs=xa[m] + (n0[m] - 1) / 2 * xb[m],  # alpha = midrank + (n0 - 1) / 2
            k=k[m],
            abar=np.full(int(m.sum()), n / 2),
            s_alpha=(k_f[m] ** 3 - k_f[m] - ties[m]) / 12,
            n=n,
            r=int(split[0].sum()),
            bbar=split[1],
            s_beta=split[2],
            continuity=0.0,
        )
    cols["test"] = np.where(mixture, "spearman_mixture", "spearman_t")
    return cols, constant


def _pearson_stats(
    d: np.ndarray, f: np.ndarray, v: np.ndarray, k: np.ndarray, y: np.ndarray, z: float
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pearson r of each feature's values (zeros included) with y; no sorting needed."""
    T = k.size
    n = y.size
    yc = y - y.mean()
    ss_y = float(yc @ yc)
    x = v.astype(np.float64)
    sum_x = _per_feature(f, x, T)
    mean_x = sum_x / n
    ss_x = _per_feature(f, (x - mean_x[f]) ** 2, T) + (n - k) * mean_x**2
    cov = _per_feature(f, x * yc[d], T)
    constant = (k == n) & (ss_x <= n * (1e-7 * mean_x) ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(constant, 0.0, cov / np.sqrt(ss_x * ss_y))
    se_z = np.full(T, 1 / math.sqrt(n - 3) if n > 3 else np.nan)
    cols = _correlation_tests(r, n, se_z, z)
    split = _mode_split(yc, y)
    mixture = _needs_mixture(k, n, int(split[0].sum())) if split else np.zeros(T, dtype=bool)
    if mixture.any():
        in_r, bbar, s_beta = split
        beta = np.where(in_r, yc - yc[~in_r][0], 0.0)
        mean_active = sum_x / k
        s_alpha = _per_feature(f, (x - mean_active[f]) ** 2, T)
        x_obs = _per_feature(f, x * beta[d], T)
        cols["p_value"][mixture] = _mixture_pvalue(
            x_obs=x_obs[mixture],
            k=k[mixture],
            abar=mean_active[mixture],
            s_alpha=s_alpha[mixture],
            n=n,
            r=int(in_r.sum()),
            bbar=bbar,
            s_beta=s_beta,
            continuity=0.0,
        )
    cols["test"] = np.where(mixture, "pearson_mixture", "pearson_t")
    return cols, constant


# --------------------------------------------------------------------------- criteria: every metadata column

CRITERIA_SCHEMA: dict[str, pl.DataType] = {
    **{k: t for k, t in ASSOCIATION_SCHEMA.items() if k in ("dataset", "column")},
    "criterion": pl.String(),
    "level": pl.String(),
    **{k: t for k, t in ASSOCIATION_SCHEMA.items() if k not in ("dataset", "column")},
}
"""Columns of the `feature_associations` table: ASSOCIATION_SCHEMA plus `criterion` (`csat`,
`topic=billing`) and `level` (the text value tested against the rest; null for other columns)."""

MIN_LEVEL_DOCS = 5


def metadata_criteria(
    documents: pl.DataFrame, columns: Sequence[str] | None = None, *, max_levels: int = 20
) -> tuple[pl.DataFrame, dict[str, str]]:
    """Turn metadata columns into criteria: (doc_id + one column per criterion, skipped column -> reason).

    Boolean, numeric and date columns are criteria as they are (`feature_associations` decides binary or
    numeric); a text column with 3..`max_levels` distinct values gives one boolean criterion per level
    (`topic=refund`: that level against the rest; levels held by fewer than MIN_LEVEL_DOCS documents are
    skipped), a two-valued one stays a single binary criterion. `columns` None means every column but the
    document bookkeeping (RESERVED_COLUMNS); a named column that cannot be used is a ValueError, an
    automatically picked one is only reported as skipped.
    """
    explicit = columns is not None
    names = list(columns) if explicit else [c for c in documents.columns if c not in RESERVED_COLUMNS]
    missing = [c for c in names if c not in documents.columns]
    if missing:
        usable = [c for c in documents.columns if c not in RESERVED_COLUMNS]
        raise ValueError(f"Metadata column(s) {missing} are not in the documents; available: {usable}.")
    out = [documents.select(pl.col("doc_id").cast(pl.Int64))]
    skipped: dict[str, str] = {}
    for name in names:
        col = documents[name]
        dtype = col.dtype
        if dtype == pl.Boolean or dtype.is_numeric() or dtype.is_temporal():
            if col.drop_nulls().n_unique() < 2:
                skipped[name] = "fewer than 2 distinct values"
            else:
                out.append(col.to_frame())
            continue
        if not (dtype == pl.String or isinstance(dtype, pl.Categorical | pl.Enum)):
            skipped[name] = f"type {dtype} (criteria need boolean, numeric, date or few-valued text)"
            continue
        values = col.cast(pl.String)
        counts = values.drop_nulls().value_counts(sort=True)
        if not 2 <= counts.height <= max_levels:
            skipped[name] = f"{counts.height} distinct values (criteria need 2..{max_levels})"
            continue
        if counts.height == 2:
            out.append(values.to_frame())
            continue
        levels = counts.filter(pl.col("count") >= MIN_LEVEL_DOCS)[name].to_list()
        if not levels:
            skipped[name] = f"no value is held by at least {MIN_LEVEL_DOCS} documents"
            continue
        for level in levels:
            flag = pl.when(values.is_null()).then(None).otherwise(values == level)
            out.append(documents.select(flag.alias(f"{name}={level}")))
    if explicit and skipped:
        name, reason = next(iter(skipped.items()))
        raise ValueError(f"Metadata column {name!r} cannot be a criterion: {reason}.")
    return pl.concat(out, how="horizontal"), skipped


def criteria_associations(
    pooled: FrameLike,
    criteria: pl.DataFrame,
    *,
    dataset: str = "",
    aggregation: str = "max",
    alpha: float = 0.05,
) -> tuple[pl.DataFrame, dict[str, str]]:
    """`feature_associations` for every criterion column of `criteria` (from `metadata_criteria`).

    One row per (criterion, tested feature) in CRITERIA_SCHEMA; the false discovery rate is controlled
    within each criterion (each is its own question). Pass criteria for the encoded documents only. A
    criterion that cannot be tested (one value left after dropping nulls, say) is returned in the
    second value with its reason.
    """
    frames, failed = [], {}
    doc_ids = criteria["doc_id"]
    for criterion in criteria.columns[1:]:
        column, _, level = criterion.partition("=")
        try:
            result = feature_associations(
                pooled,
                doc_ids,
                criteria[criterion],
                dataset=dataset,
                column=column,
                aggregation=aggregation,
                alpha=alpha,
                positive=True if level else None,
            )
        except ValueError as exc:
            failed[criterion] = str(exc)
            continue
        frames.append(
            result.table.with_columns(
                criterion=pl.lit(criterion), level=pl.lit(level or None, pl.String)
            ).select(list(CRITERIA_SCHEMA))
        )
    if not frames:
        return pl.DataFrame(schema=CRITERIA_SCHEMA), failed
    return pl.concat(frames), failed
