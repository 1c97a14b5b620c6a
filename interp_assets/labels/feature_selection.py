"""Which features get labels and scores: frequent ones, distinctive ones, and those a user asks for."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import polars as pl

from interp_assets.analysis.diffing import REPORT_FIRING, diff_features, paired_diff_features


def select_features(
    pooled: pl.LazyFrame | pl.DataFrame,
    n_docs: int,
    *,
    partners: Mapping[str, tuple[pl.LazyFrame | pl.DataFrame, int, pl.DataFrame | None]] | None = None,
    n_frequent: int = 20,
    n_distinctive: int = 15,
    requested: Iterable[int] = (),
    associated: Mapping[str, Iterable[int]] | None = None,
    n_features: int | None = None,
    firing: str = REPORT_FIRING,
) -> pl.DataFrame:
    """Features to label for one dataset, with why: columns feature (int32), selected_because (str).

    - `frequent`: the `n_frequent` features active in the most documents;
    - `distinctive:<partner>`: the top `n_distinctive` features significantly more frequent here than in a
      dataset this one is compared with, by the same test its diff report uses (paired when the partner
      comes with `pairs`: columns doc_id_a = this dataset, doc_id_b = the partner);
    - `associated:<criterion>`: top features of a metadata criterion (from feature_associations);
    - `requested`: any feature the user asked for.
    """
    reasons: dict[int, list[str]] = {}
    freq = (
        pooled.lazy()
        .group_by("feature")
        .agg(pl.len().alias("docs"))
        .sort(["docs", "feature"], descending=[True, False])
        .head(n_frequent)
        .collect()
    )
    for f in freq["feature"].to_list():
        reasons.setdefault(int(f), []).append("frequent")
    for name, (other, other_n, pairs) in (partners or {}).items():
        if pairs is not None:
            diff = paired_diff_features(pooled, other, pairs, n_features=n_features)
        else:
            diff = diff_features(pooled, n_docs, other, other_n, n_features=n_features, firing=firing)
        top = diff.filter(pl.col("significant") & (pl.col("direction") == "a")).head(n_distinctive)
        for f in top["feature"].to_list():
            reasons.setdefault(int(f), []).append(f"distinctive:{name}")
    for criterion, features in (associated or {}).items():
        for f in features:
            reasons.setdefault(int(f), []).append(f"associated:{criterion}")
    for f in requested:
        reasons.setdefault(int(f), []).append("requested")
    return pl.DataFrame(
        {"feature": list(reasons), "selected_because": [",".join(v) for v in reasons.values()]},
        schema={"feature": pl.Int32, "selected_because": pl.String},
    ).sort("feature")
