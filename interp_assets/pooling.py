"""Pool token-level SAE activations into per-document feature statistics."""

from __future__ import annotations

import polars as pl

POOLED_COLUMNS = (
    "dataset",
    "doc_id",
    "feature",
    "max_activation",
    "sum_activation",
    "active_tokens",
    "doc_tokens",
)


def pool_token_activations(
    token_activations: pl.LazyFrame | pl.DataFrame, doc_tokens: pl.DataFrame
) -> pl.DataFrame:
    """Per (doc_id, feature): max, sum and count of active tokens, plus the document's pooled token count.

    `token_activations` holds only pooled tokens (special/template tokens were never stored), so every row
    counts. `doc_tokens` has columns doc_id, pooled_tokens. From these every interp_embed aggregation
    follows: max, mean = sum / doc_tokens, sum, binarize = 1, count = active_tokens.
    """
    lazy = token_activations.lazy()
    pooled = (
        lazy.group_by("dataset", "doc_id", "feature")
        .agg(
            pl.col("activation").cast(pl.Float32).max().alias("max_activation"),
            pl.col("activation").cast(pl.Float64).sum().alias("sum_activation"),
            pl.len().cast(pl.Int32).alias("active_tokens"),
        )
        .join(
            doc_tokens.lazy().select(
                pl.col("doc_id").cast(pl.Int32), pl.col("pooled_tokens").alias("doc_tokens")
            ),
            on="doc_id",
            how="left",
        )
        .with_columns(
            pl.col("dataset").cast(pl.String),
            pl.col("max_activation").cast(pl.Float32),
            pl.col("sum_activation").cast(pl.Float32),
            pl.col("doc_tokens").cast(pl.Int32),
        )
        .sort("doc_id", "feature")
        .select(POOLED_COLUMNS)
    )
    return pooled.collect()
