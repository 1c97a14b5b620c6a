"""Labels: feature_labels (which features to name, and their names) and feature_scores (held-out scores)."""

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
from dagster import AssetDep, AssetExecutionContext, Config, DataVersion, MetadataValue, Output, asset

from interp_assets.analysis import diffing
from interp_assets.comparisons import load_comparisons
from interp_assets.defs.partitions import datasets_partitions
from interp_assets.defs.shared import (
    INPUTS_KEY,
    MODEL_POOL,
    MODEL_STEP_TAGS,
    OWNERS,
    cached_document_embeddings,
    cached_text_embeddings,
    column_schema,
    data_version,
    encoded_doc_count,
    inputs_key,
    label_cache,
    latest_materialization,
    reuse_stored_output,
    stored_documents,
    token_activations_metadata,
)
from interp_assets.labels import labeling, scoring
from interp_assets.labels.embedding import DEFAULT_EMBEDDING_MODEL
from interp_assets.labels.evidence import HARD_NEGATIVES_MAX_DOCS
from interp_assets.labels.feature_selection import select_features
from interp_assets.storage.parquet import (
    markdown_preview,
    read_table,
    read_token_activations_wide,
    table_exists,
    with_tokens,
)
from resources.llm import LLMResource
from resources.storage import StorageResource

LABELS_CODE_VERSION = "6"  # 3: split by content; 4: LLM answers; 5: phrase/topic/syntax; 6: dense by strength
SCORES_CODE_VERSION = "6"  # 3: split by content; 4: LLM answers; 5: length from evidence; 6: dense


class FeatureLabelsConfig(Config):
    """Which features to label and how much evidence to show the labeler."""

    n_frequent: int = 20
    n_distinctive: int = 30
    n_associated: int = 3  # per metadata criterion, when feature_associations exists
    requested_features: list[int] = []
    published_labels_path: str | None = None
    n_evidence: int = 20
    n_holdout: int = 40
    seed: int = 0
    hard_negatives_max_docs: int = HARD_NEGATIVES_MAX_DOCS


def _document_embeddings(storage: StorageResource, docs: pl.DataFrame, max_docs: int) -> np.ndarray | None:
    """Sentence embeddings of the documents (row i = docs row i), cached by content hash; None if too many."""
    if docs.height > max_docs:
        return None
    return cached_document_embeddings(storage, docs, DEFAULT_EMBEDDING_MODEL)[0]


@asset(
    partitions_def=datasets_partitions,
    io_manager_key="parquet_io_manager",
    group_name="labels",
    kinds={"openai", "parquet"},
    owners=OWNERS,
    metadata=column_schema("feature_labels"),
    code_version=LABELS_CODE_VERSION,
    pool=MODEL_POOL,
    op_tags=MODEL_STEP_TAGS,
    deps=[
        AssetDep("raw_documents"),
        AssetDep("pooled_embeddings"),
        AssetDep("activation_status"),
        AssetDep("feature_associations"),
    ],
    description="Labels for the features that matter in this dataset (frequent, distinctive against its "
    "comparison partners, requested): published labels, else an LLM when configured, else an offline "
    "contrastive log-odds labeler. Cached by (SAE, feature, evidence).",
)
def feature_labels(
    context: AssetExecutionContext,
    config: FeatureLabelsConfig,
    token_activations: pl.LazyFrame,
    tokens: pl.LazyFrame,
    storage: StorageResource,
    llm: LLMResource,
):
    dataset = context.partition_key
    base = storage.parquet_base
    comparisons = [
        c for c in load_comparisons(storage.config_dir / "comparisons.json") if dataset in (c.a, c.b)
    ]
    key = _labels_inputs_key(context, config, storage, llm, dataset, comparisons)
    reused = reuse_stored_output(
        context,
        storage,
        "feature_labels",
        dataset,
        key,
        {"labels_recomputed": 0, "labeling_errors": 0, "llm_calls_made": 0},
    )
    if reused is not None:
        return reused
    pooled = read_table(base, "pooled_embeddings", dataset)
    n_docs = encoded_doc_count(storage, dataset)
    docs = stored_documents(storage, dataset)
    partners = {}
    for comparison in comparisons:
        other = comparison.partner(dataset)
        if table_exists(base, "pooled_embeddings", other):
            pairs = (
                diffing.pairs_from_key(docs, stored_documents(storage, other), comparison.paired_on)
                if comparison.paired_on
                else None
            )
            partners[other] = (
                read_table(base, "pooled_embeddings", other),
                encoded_doc_count(storage, other),
                pairs,
            )
    sae_id = str(token_activations_metadata(context, dataset).get("reader_fingerprint", "unknown"))
    selected = select_features(
        pooled,
        n_docs,
        partners=partners,
        n_frequent=config.n_frequent,
        n_distinctive=config.n_distinctive,
        requested=config.requested_features,
        associated=_top_associated(base, dataset, config.n_associated),
    )
    features = selected["feature"].to_list()
    acts = with_tokens(token_activations.filter(pl.col("feature").is_in(features)), tokens).collect()
    embeddings = _document_embeddings(storage, docs, config.hard_negatives_max_docs)
    published = (
        labeling.load_published_labels(config.published_labels_path) if config.published_labels_path else None
    )
    errors: list[str] = []
    counts: dict[str, int] = {}
    labels = labeling.label_features(
        acts,
        docs,
        features,
        dataset=dataset,
        sae_id=sae_id,
        embeddings=embeddings,
        published=published,
        llm=llm if llm.enabled else None,
        cache=label_cache(storage, context.log.warning),
        selected_because=dict(
            zip(selected["feature"].to_list(), selected["selected_because"].to_list(), strict=True)
        ),
        n_evidence=config.n_evidence,
        n_holdout=config.n_holdout,
        seed=config.seed,
        errors=errors,
        counts=counts,
    )
    for message in errors[:20]:
        context.log.warning(message)
    preview = labels.select("feature", "label", "selected_because", "source").head(20)
    return Output(
        labels,
        data_version=DataVersion(key) if key else None,
        metadata={
            INPUTS_KEY: None if errors else key,  # a run with failures is recomputed next time
            "labeled_features": labels.height,
            "labels_recomputed": counts.get("computed", 0),  # the rest: published or from the label cache
            # held-out documents left out for sharing content with their feature's evidence
            "heldout_dropped": counts.get("heldout_dropped", 0),
            "sources": MetadataValue.json(labels.group_by("source").len().to_dicts()),
            # what happened to each LLM answer (ok, parsed_from_prose, refused, truncated, ...)
            "label_status": MetadataValue.json(dict(Counter(labels["status"].to_list()))),
            "asked_again": counts.get("asked_again", 0),  # unusable LLM answers asked again once
            "labeling_errors": len(errors),
            "llm_calls_made": llm.calls_made if llm.enabled else 0,
            # the comparisons_sensor re-labels when a partner's activations change after this
            "partner_versions": MetadataValue.json(
                {other: data_version(context.instance, "token_activations", other) for other in partners}
            ),
            # feature_scores re-derives the held-out split from exactly these
            "split_parameters": MetadataValue.json(_split_parameters(config)),
            "labels": MetadataValue.md(markdown_preview(preview.to_arrow(), max_rows=preview.height)),
        },
    )


def _llm_settings(llm: LLMResource) -> dict:
    """What of the LLM resource changes labels and scores (never the API key)."""
    return {"enabled": llm.enabled, "model": llm.model, "base_url": llm.base_url}


def _file_digest(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return "unreadable"  # the labeler reports it


def _labels_inputs_key(
    context: AssetExecutionContext,
    config: FeatureLabelsConfig,
    storage: StorageResource,
    llm: LLMResource,
    dataset: str,
    comparisons: list,
) -> str | None:
    """Everything feature_labels reads: this dataset's and its comparison partners' tables, the
    comparisons, config, published labels and the LLM settings."""
    tables = ("raw_documents", "token_activations", "pooled_embeddings")
    upstream = [(t, dataset) for t in tables]
    if table_exists(storage.parquet_base, "feature_associations", dataset):
        upstream.append(("feature_associations", dataset))
    for c in comparisons:
        other = c.partner(dataset)
        if table_exists(storage.parquet_base, "pooled_embeddings", other):
            upstream += [(t, other) for t in tables]
    settings = {
        "config": config.model_dump(),
        "comparisons": [[c.a, c.b, c.paired_on] for c in comparisons],
        "published_labels": _file_digest(config.published_labels_path),
        "llm": _llm_settings(llm),
        "embedding_model": DEFAULT_EMBEDDING_MODEL,
    }
    return inputs_key(context.instance, upstream, settings, LABELS_CODE_VERSION)


def _top_associated(base: str, dataset: str, n: int) -> dict[str, list[int]]:
    """The `n` most significant features of each metadata criterion (empty before feature_associations)."""
    if n <= 0 or not table_exists(base, "feature_associations", dataset):
        return {}
    top = (
        read_table(base, "feature_associations", dataset)
        .filter(pl.col("significant"))
        .sort("q_value")
        .group_by("criterion", maintain_order=True)
        .head(n)
        .collect()
    )
    return {c: part["feature"].to_list() for (c,), part in top.group_by(["criterion"], maintain_order=True)}


SPLIT_PARAMETERS = ("n_evidence", "n_holdout", "seed", "hard_negatives_max_docs")


def _split_parameters(config: FeatureLabelsConfig) -> dict[str, int]:
    return {name: getattr(config, name) for name in SPLIT_PARAMETERS}


@asset(
    partitions_def=datasets_partitions,
    io_manager_key="parquet_io_manager",
    group_name="labels",
    kinds={"pytorch", "parquet"},
    owners=OWNERS,
    metadata=column_schema("feature_scores"),
    code_version=SCORES_CODE_VERSION,
    pool=MODEL_POOL,
    op_tags=MODEL_STEP_TAGS,
    # what it reads beside the labels: the documents and their activations with the token spans
    deps=[AssetDep("raw_documents"), AssetDep("token_activations"), AssetDep("tokens")],
    description="Every label scored on held-out documents never shown to the labeler: precision, recall, F1, "
    "balanced accuracy, AUC and a bootstrap interval, offline (embedding) and with an LLM when configured.",
)
def feature_scores(
    context: AssetExecutionContext,
    feature_labels: pl.LazyFrame,
    storage: StorageResource,
    llm: LLMResource,
):
    dataset = context.partition_key
    key = inputs_key(
        context.instance,
        [(t, dataset) for t in ("raw_documents", "token_activations", "feature_labels")],
        {"llm": _llm_settings(llm), "embedding_model": DEFAULT_EMBEDDING_MODEL},
        SCORES_CODE_VERSION,
    )
    reused = reuse_stored_output(
        context,
        storage,
        "feature_scores",
        dataset,
        key,
        {"scores_recomputed": 0, "texts_embedded_now": 0, "scoring_errors": 0},
    )
    if reused is not None:
        return reused
    record = latest_materialization(context.instance, "feature_labels", dataset)
    stored = record.asset_materialization.metadata.get("split_parameters") if record else None
    split = stored.value if stored is not None else _split_parameters(FeatureLabelsConfig())
    labels = feature_labels.collect()
    docs = stored_documents(storage, dataset)
    features = labels["feature"].to_list()
    acts = read_token_activations_wide(storage.parquet_base, dataset, features).collect()
    embeddings = _document_embeddings(storage, docs, split["hard_negatives_max_docs"])
    errors: list[str] = []
    embedded_now = [0]

    def embed(texts: list[str]) -> np.ndarray:
        vectors, computed = cached_text_embeddings(storage, texts, DEFAULT_EMBEDDING_MODEL)
        embedded_now[0] += computed
        return vectors

    counts: dict[str, int] = {}
    scores = scoring.score_features(
        labels,
        acts,
        docs,
        llm=llm if llm.enabled else None,
        embeddings=embeddings,
        embed=embed,
        n_evidence=split["n_evidence"],
        n_holdout=split["n_holdout"],
        seed=split["seed"],
        errors=errors,
        cache=scoring.ScoreCache(storage.cache_dir / "scores" / f"{dataset}.parquet", context.log.warning),
        counts=counts,
    )
    for message in errors[:20]:
        context.log.warning(message)
    summary = scores.group_by("method").agg(  # headline metrics first (scoring.HEADLINE_METRIC), then F1
        pl.len().alias("labels"),
        pl.col("auc").mean().alias("mean_auc"),
        pl.col("balanced_accuracy").mean().alias("mean_balanced_accuracy"),
        pl.col("length_baseline_auc").mean().alias("mean_length_baseline_auc"),
        pl.col("beats_length_baseline").mean().alias("share_beating_length"),
        pl.col("f1").mean().alias("mean_f1"),
    )
    return Output(
        scores,
        data_version=DataVersion(key) if key else None,
        metadata={
            INPUTS_KEY: None if errors else key,  # a run with failures is recomputed next time
            "scored_labels": scores.height,
            "scores_recomputed": counts.get("computed", 0),  # the rest came from the score cache
            "texts_embedded_now": embedded_now[0],  # the rest came from the embeddings cache
            "scoring_errors": len(errors),
            "score_status": MetadataValue.json(dict(Counter(scores["status"].to_list()))),
            "asked_again": counts.get("asked_again", 0),  # unusable LLM replies asked again once
            "llm_answers": MetadataValue.json(
                {k.removeprefix("answers_"): v for k, v in counts.items() if k.startswith("answers_")}
            ),
            "summary": MetadataValue.md(markdown_preview(summary.to_arrow(), max_rows=summary.height)),
        },
    )
