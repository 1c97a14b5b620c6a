"""Pool token-level SAE activations into per-document feature statistics."""

from __future__ import annotations

import polars as pl
import pyarrow as pa

POOLING_VERSION = "1"  # pooled_embeddings' code version; part of every pooled segment's name

POOLED_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()),
        ("doc_id", pa.int32()),
        ("feature", pa.int32()),
        ("max_activation", pa.float32()),
        ("sum_activation", pa.float32()),
        ("active_tokens", pa.int32()),
        ("doc_tokens", pa.int32()),
    ]
)
POOLED_COLUMNS = tuple(POOLED_SCHEMA.names)


def pooled_segment_name(token_activations_segment: str) -> str:
    """Name of the pooled_embeddings segment pooled from one token_activations segment.

    Pooling is per document and a token_activations segment name fixes its documents, rows and token
    counts, so this name (plus the pooling version) fixes the pooled rows.
    """
    return f"{token_activations_segment}-p{POOLING_VERSION}"


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


def pooled_summary(pooled: pl.LazyFrame) -> dict[str, int | float]:
    """Rows, documents with features, mean features per document, distinct features, and inconsistent rows
    (max above sum, more active tokens than tokens, or unknown doc_tokens) of a pooled_embeddings frame."""
    row = (
        pooled.select(
            pl.len().alias("rows"),
            pl.col("doc_id").n_unique().alias("documents_with_features"),
            pl.col("feature").n_unique().alias("distinct_features"),
            (
                (pl.col("max_activation") > pl.col("sum_activation") * 1.0001)
                | (pl.col("active_tokens") > pl.col("doc_tokens"))
                | pl.col("doc_tokens").is_null()
            )
            .sum()
            .alias("inconsistent_rows"),
        )
        .collect()
        .row(0, named=True)
    )
    docs = int(row["documents_with_features"])
    return {
        "rows": int(row["rows"]),
        "documents_with_features": docs,
        "mean_features_per_document": row["rows"] / docs if docs else 0.0,
        "distinct_features": int(row["distinct_features"]),
        "inconsistent_rows": int(row["inconsistent_rows"] or 0),
    }
