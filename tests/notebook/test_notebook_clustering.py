"""The notebook's clustering: Dataset.cluster_documents and Dataset.feature_clusters on a dataset's pooled
features, with feature selection by list, label query and metadata criterion, following the view."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from interp_assets.analysis.clustering import adjusted_rand_index
from interp_assets.notebook import FEATURE_LABELS_SCHEMA, Dataset

TOPICS = ("rivers", "films", "plants")
PER_TOPIC, OWN = 30, 6  # documents per topic, features of each topic (ids 10 + 6 t .. 15 + 6 t)


def own_features(topic: int) -> list[int]:
    return list(range(10 + OWN * topic, 10 + OWN * (topic + 1)))


@pytest.fixture(scope="module")
def ds() -> Dataset:
    """90 documents in 3 topics, stored in a shuffled order; each topic has 6 features firing in 70% of its
    documents only, features 0-9 fire in 40% of all documents; features 10-11 (rivers) and 16 (films) are
    labeled."""
    rng = np.random.default_rng(0)
    n = PER_TOPIC * len(TOPICS)
    topic = np.repeat(np.arange(len(TOPICS)), PER_TOPIC)
    rows = []
    for d in range(n):
        fire = [f for f in own_features(int(topic[d])) if rng.random() < 0.7] or own_features(int(topic[d]))[
            :1
        ]
        fire += [f for f in range(10) if rng.random() < 0.4]
        for f in fire:
            act = float(rng.exponential(1.0) + 0.1)
            rows.append((d, f, act, act * 2, 2, 20))
    pooled = pl.DataFrame(
        rows,
        schema={
            "doc_id": pl.Int32,
            "feature": pl.Int32,
            "max_activation": pl.Float32,
            "sum_activation": pl.Float32,
            "active_tokens": pl.Int32,
            "doc_tokens": pl.Int32,
        },
        orient="row",
    )
    order = rng.permutation(n)
    docs = pl.DataFrame(
        {
            "doc_id": order.astype(np.int32),
            "text": [f"document {d} about {TOPICS[topic[d]]}" for d in order],
            "topic": [TOPICS[topic[d]] for d in order],
        }
    )
    labels = pl.DataFrame(
        {
            "dataset": ["topics"] * 3,
            "feature": [10, 11, 16],
            "label": ["river, rivers", "lake", "film, movie"],
            "description": ["rivers and their banks", "lakes; a river's source", "films"],
        }
    )
    labels = labels.with_columns(
        pl.lit(None, dtype=t).alias(c) for c, t in FEATURE_LABELS_SCHEMA.items() if c not in labels.columns
    ).select(list(FEATURE_LABELS_SCHEMA))
    return Dataset.from_frames(
        "topics", docs, pooled.sample(fraction=1.0, shuffle=True, seed=2), feature_labels=labels, d_sae=40
    )


def test_cluster_documents_recovers_the_topics_in_view_order(ds: Dataset) -> None:
    result = ds.cluster_documents(3)
    by_doc = dict(result.documents.select("doc_id", "cluster").iter_rows())
    topic = dict(ds.documents.select("doc_id", "topic").iter_rows())
    ids = sorted(by_doc)
    assert adjusted_rand_index([by_doc[d] for d in ids], [topic[d] for d in ids]) == 1.0
    rivers = by_doc[ds.documents.filter(pl.col("topic") == "rivers")["doc_id"][0]]
    name = result.clusters.filter(pl.col("cluster") == rivers)["name"].item()
    assert set(name.split(" / ")) == {"river, rivers", "lake"}
    top = result.features.filter(pl.col("cluster") == rivers).head(OWN)
    assert sorted(top["feature"].to_list()) == own_features(0)
    # rows follow the view, so a cluster's documents are a filter away
    view = ds[::-1]
    reversed_result = view.cluster_documents(3)
    assert reversed_result.documents["doc_id"].to_list() == view.doc_ids.tolist()
    members = view.filter(reversed_result.documents["cluster"] == reversed_result.documents["cluster"][0])
    assert members.metadata["topic"].n_unique() == 1 and len(members) == PER_TOPIC
    # a view clusters only its own documents
    two = ds.filter(pl.col("topic") != "plants").cluster_documents(2)
    assert two.documents.height == 2 * PER_TOPIC and two.clusters["size"].to_list() == [PER_TOPIC] * 2


def test_label_query_and_criterion_pick_the_features(ds: Dataset) -> None:
    by_query = ds.cluster_documents(2, query="river")  # labels 10 and 11, description of 11
    assert by_query.features_used == [10, 11]
    clustered = by_query.documents.filter(pl.col("cluster").is_not_null())["doc_id"].to_list()
    assert set(ds.documents.filter(pl.col("doc_id").is_in(clustered))["topic"]) == {"rivers"}
    by_criterion = ds.cluster_documents(2, criterion="topic=films", n_criterion_features=OWN)
    assert by_criterion.features_used == own_features(1)
    both = ds.cluster_documents(2, [20], query="river")
    assert both.features_used == [10, 11, 20]  # the union of the selections


def test_feature_clusters_group_each_topics_features(ds: Dataset) -> None:
    table = ds.feature_clusters(coactivation="correlation", min_similarity=0.3)
    groups = table.filter(pl.col("size") > 1).group_by("cluster").agg(pl.col("feature").sort())
    assert sorted(groups["feature"].to_list()) == [own_features(t) for t in range(3)]
    assert table.filter(pl.col("feature") == 12)["name"].item() in (
        "river, rivers / lake",
        "lake / river, rivers",
    )
    # a decoder (a torch tensor is fine) adds the grouping by direction: features 0 and 1 point the same way
    decoder = torch.randn(40, 256, generator=torch.Generator().manual_seed(0))
    decoder[1] = 3 * decoder[0]
    both = ds.feature_clusters(decoder=decoder, min_similarity=0.5)
    by_decoder = both.filter(pl.col("by") == "decoder")
    pair = by_decoder.filter(pl.col("feature").is_in([0, 1]))["cluster"]
    assert pair.n_unique() == 1 and by_decoder.filter(pl.col("size") > 1).height == 2


def test_clustering_errors_name_the_problem(ds: Dataset) -> None:
    with pytest.raises(ValueError, match="not a feature|outside"):
        ds.cluster_documents(3, [99])
    with pytest.raises(ValueError, match=r"No feature label contains 'volcano'"):
        ds.cluster_documents(3, query="volcano")
    with pytest.raises(ValueError, match=r"n_clusters=200 is out of range"):
        ds.cluster_documents(200)
    bare = Dataset.from_frames("bare", ds.documents, ds._store.pooled.collect(), d_sae=40)
    with pytest.raises(ValueError, match="materialize feature_labels"):
        bare.cluster_documents(2, query="river")
