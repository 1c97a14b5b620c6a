"""Per-feature statistics of one dataset, to drop always-on and never-on features before an analysis.

`feature_stats` reads pooled_embeddings (one row per document and active feature) and, optionally, the
token activations, and gives each feature of the SAE (never-active ones included, as zeros):

- documents / doc_frequency: documents where it fires at all (share of the dataset's documents);
- active_tokens / token_frequency: tokens where it fires (share of all pooled tokens);
- mean_activation (per active token) and max_activation;
- doc_entropy: entropy (nats) of the feature's activation mass over documents, and
  doc_entropy_normalized = doc_entropy / log(n_docs): 1 when the mass is spread evenly over every
  document (an always-on feature), near 0 when it sits in one document;
- token_entropy / token_entropy_normalized: the same over tokens (with token activations).

All statistics ignore which dataset of a comparison a document belongs to, so filtering on them before a
diff keeps the diff's tests valid (label-blind filtering).
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from interp_assets.analysis.diffing import FrameLike, as_lazy, check_docs_per_feature

FEATURE_STATS_COLUMNS = (
    "feature",
    "documents",
    "doc_frequency",
    "active_tokens",
    "token_frequency",
    "mean_activation",
    "max_activation",
    "doc_entropy",
    "doc_entropy_normalized",
    "token_entropy",
    "token_entropy_normalized",
)


def _entropy(values: str) -> list[pl.Expr]:
    """Aggregations giving, per group, the mass S and sum of m*log(m) of positive values `values`."""
    m = pl.col(values).cast(pl.Float64)
    return [
        m.sum().alias(f"{values}_mass"),
        pl.when(m > 0).then(m * m.log()).otherwise(0.0).sum().alias(f"{values}_mlogm"),
    ]


def _entropy_from(mass: pl.Expr, mlogm: pl.Expr) -> pl.Expr:
    """H = log S - sum(m log m) / S for the distribution m / S (0 for no mass)."""
    return pl.when(mass > 0).then(mass.log() - mlogm / mass).otherwise(0.0)


def feature_stats(
    pooled: FrameLike,
    n_docs: int,
    *,
    total_tokens: int | None = None,
    token_activations: FrameLike | None = None,
    n_features: int | None = None,
) -> pl.DataFrame:
    """Statistics of every feature over one set of documents (see the module docstring for columns).

    `pooled`: pooled_embeddings rows (feature, max_activation, sum_activation, active_tokens) of the
    documents; `n_docs`: how many documents there are (those without an active feature included);
    `total_tokens`: pooled tokens of those documents (default: from `doc_tokens` of `pooled`, which
    counts only documents with an active feature); `token_activations` (feature, activation): for the
    entropy over tokens (null without it); `n_features`: the SAE width (default: highest feature + 1).
    """
    if n_docs < 1:
        raise ValueError(f"feature_stats needs n_docs >= 1; got {n_docs}.")
    columns = ["feature", "max_activation", "sum_activation", "active_tokens"]
    lf = as_lazy(pooled, "pooled", columns + ([] if total_tokens is not None else ["doc_id", "doc_tokens"]))
    if total_tokens is None:
        per_doc = lf.select("doc_id", "doc_tokens").unique("doc_id")
        total_tokens = int(per_doc.select(pl.col("doc_tokens").sum()).collect().item() or 0)
    per_feature = (
        lf.group_by("feature")
        .agg(
            pl.len().alias("documents"),
            pl.col("active_tokens").cast(pl.Int64).sum().alias("active_tokens"),
            pl.col("max_activation").cast(pl.Float64).max().alias("max_activation"),
            *_entropy("sum_activation"),
        )
        .collect()
    )
    width = n_features if n_features is not None else int(per_feature["feature"].max() or -1) + 1
    seen = per_feature["feature"]
    if per_feature.height and (int(seen.min()) < 0 or int(seen.max()) >= width):
        raise ValueError(
            f"pooled has features outside 0..{width - 1} (n_features={width}): pass the SAE's width."
        )
    check_docs_per_feature(seen.to_numpy(), per_feature["documents"].to_numpy(), n_docs, "pooled")
    table = (
        pl.DataFrame({"feature": np.arange(width, dtype=np.int32)})
        .join(per_feature.with_columns(pl.col("feature").cast(pl.Int32)), on="feature", how="left")
        .fill_null(0)
    )
    mass, mlogm = pl.col("sum_activation_mass"), pl.col("sum_activation_mlogm")
    table = table.with_columns(
        (pl.col("documents") / n_docs).alias("doc_frequency"),
        (pl.col("active_tokens") / max(total_tokens, 1)).alias("token_frequency"),
        pl.when(pl.col("active_tokens") > 0)
        .then(mass / pl.col("active_tokens"))
        .otherwise(0.0)
        .alias("mean_activation"),
        _entropy_from(mass, mlogm).alias("doc_entropy"),
    ).with_columns(
        (pl.col("doc_entropy") / math.log(n_docs) if n_docs > 1 else pl.lit(0.0)).alias(
            "doc_entropy_normalized"
        )
    )
    if token_activations is not None:
        tokens = (
            as_lazy(token_activations, "token_activations", ["feature", "activation"])
            .group_by("feature")
            .agg(*_entropy("activation"))
            .with_columns(pl.col("feature").cast(pl.Int32))
            .collect()
        )
        table = (
            table.join(tokens, on="feature", how="left")
            .with_columns(
                _entropy_from(pl.col("activation_mass"), pl.col("activation_mlogm"))
                .fill_null(0.0)
                .alias("token_entropy")
            )
            .with_columns(
                (pl.col("token_entropy") / math.log(total_tokens) if total_tokens > 1 else pl.lit(0.0)).alias(
                    "token_entropy_normalized"
                )
            )
        )
    else:
        table = table.with_columns(
            pl.lit(None, dtype=pl.Float64).alias("token_entropy"),
            pl.lit(None, dtype=pl.Float64).alias("token_entropy_normalized"),
        )
    return table.select(
        pl.col("feature"),
        pl.col("documents").cast(pl.Int64),
        pl.col("doc_frequency").cast(pl.Float64),
        pl.col("active_tokens").cast(pl.Int64),
        pl.col("token_frequency").cast(pl.Float64),
        pl.col("mean_activation").cast(pl.Float64),
        pl.col("max_activation").cast(pl.Float64),
        pl.col("doc_entropy").cast(pl.Float64),
        pl.col("doc_entropy_normalized").cast(pl.Float64),
        pl.col("token_entropy").cast(pl.Float64),
        pl.col("token_entropy_normalized").cast(pl.Float64),
    )


def keep_features(
    stats: pl.DataFrame, *, min_documents: int = 5, max_doc_frequency: float = 0.5
) -> list[int]:
    """Features worth analysing: active in at least `min_documents` documents and in at most
    `max_doc_frequency` of them (drops never-on and always-on features). Label-blind."""
    if not 0 < max_doc_frequency <= 1:
        raise ValueError(f"max_doc_frequency must be in (0, 1]; got {max_doc_frequency}.")
    keep = stats.filter(
        (pl.col("documents") >= min_documents) & (pl.col("doc_frequency") <= max_doc_frequency)
    )
    return keep["feature"].to_list()
