"""Clustering features and documents: planted structure is recovered, rates are the hand counts, the same
input gives the same clusters, and bad input fails with a message that says what to do."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from interp_assets.analysis.clustering import (
    adjusted_rand_index,
    criterion_features,
    document_clusters,
    feature_clusters,
    features_matching,
    spherical_kmeans,
)

N_TOPICS, DOCS_PER_TOPIC, TOPIC_FEATURES, BACKGROUND = 5, 40, 8, 30


def planted_pooled(seed: int = 0) -> tuple[pl.DataFrame, np.ndarray]:
    """pooled_embeddings rows of 200 documents in 5 topics: each topic has 8 features of its own (each fires
    in 60% of the topic's documents, never elsewhere), 30 background features fire in 40% of every document,
    and feature 99 fires everywhere. Returns (pooled, topic of each doc_id)."""
    rng = np.random.default_rng(seed)
    rows = []
    topics = np.repeat(np.arange(N_TOPICS), DOCS_PER_TOPIC)
    for doc, topic in enumerate(topics):
        own = 100 + topic * TOPIC_FEATURES + np.arange(TOPIC_FEATURES)
        fire = own[rng.random(TOPIC_FEATURES) < 0.6]
        if fire.size == 0:
            fire = own[:1]
        background = np.flatnonzero(rng.random(BACKGROUND) < 0.4)
        for f in [*fire.tolist(), *background.tolist(), 99]:
            rows.append((doc, f, float(rng.exponential(1.0) + 0.05)))
    pooled = pl.DataFrame(
        rows, schema={"doc_id": pl.Int32, "feature": pl.Int32, "max_activation": pl.Float32}, orient="row"
    )
    return pooled, topics


def topic_features(topic: int) -> set[int]:
    return set(range(100 + topic * TOPIC_FEATURES, 100 + (topic + 1) * TOPIC_FEATURES))


# --------------------------------------------------------------------------- documents


def test_planted_topics_are_recovered_with_their_own_features_as_distinguishing() -> None:
    pooled, topics = planted_pooled()
    result = document_clusters(pooled, N_TOPICS, n_features=200)
    got = result.documents.sort("doc_id")["cluster"].to_numpy()
    assert adjusted_rand_index(got, topics) == pytest.approx(1.0)
    assert result.clusters["size"].to_list() == [DOCS_PER_TOPIC] * N_TOPICS
    for c in range(N_TOPICS):
        topic = int(np.bincount(topics[got == c]).argmax())
        top = result.features.filter(pl.col("cluster") == c).head(TOPIC_FEATURES)
        # the top 8 are exactly the topic's own features: fire inside, never outside
        assert set(top["feature"].to_list()) == topic_features(topic)
        assert (top["rate_out"] == 0).all()
        docs = np.flatnonzero(got == c)
        for f, rate_in in top.select("feature", "rate_in").iter_rows():
            fired = pooled.filter((pl.col("feature") == f) & pl.col("doc_id").is_in(docs.tolist())).height
            assert rate_in == pytest.approx(fired / docs.size)
        # the always-on feature never distinguishes a cluster
        assert 99 not in result.features.filter(pl.col("cluster") == c)["feature"].to_list()
    similarity = result.documents["similarity"].to_numpy()
    assert np.all((similarity > 0) & (similarity <= 1 + 1e-9))


def test_rates_and_ratio_follow_the_hand_counts() -> None:
    # documents 0-2 share feature 1, 3-5 share feature 2; feature 3 fires in documents 0 and 3
    rows = [(0, 1), (1, 1), (2, 1), (3, 2), (4, 2), (5, 2), (0, 3), (3, 3), (1, 4)]
    pooled = pl.DataFrame(
        {"doc_id": [d for d, _ in rows], "feature": [f for _, f in rows], "max_activation": [1.0] * len(rows)}
    )
    result = document_clusters(pooled, 2, idf=False)
    clusters = dict(result.documents.select("doc_id", "cluster").iter_rows())
    assert clusters[0] == clusters[1] == clusters[2] != clusters[3] == clusters[4] == clusters[5]
    first = result.features.filter(pl.col("cluster") == clusters[0])
    # feature 1: 3 of 3 inside, 0 of 3 outside; feature 4: 1 of 3 inside; feature 3 ties (1/3 both): left out
    assert first["feature"].to_list() == [1, 4]
    row = first.row(0, named=True)
    assert (row["docs_in"], row["rate_in"], row["rate_out"], row["rate_diff"]) == (3, 1.0, 0.0, 1.0)
    assert row["log2_ratio"] == pytest.approx(np.log2(3.5 / 4) - np.log2(0.5 / 4))
    assert first.row(1, named=True)["rate_in"] == pytest.approx(1 / 3)


def test_a_selection_clusters_only_documents_where_it_fires() -> None:
    pooled, topics = planted_pooled()
    chosen = sorted(topic_features(0) | topic_features(1))
    result = document_clusters(pooled, 2, features=chosen)
    docs = result.documents.sort("doc_id")
    assert docs.height == len(topics)  # every document of pooled is listed
    clustered = docs.filter(pl.col("cluster").is_not_null())
    assert set(topics[clustered["doc_id"].to_numpy()]) == {0, 1}
    assert clustered.height == 2 * DOCS_PER_TOPIC
    assert adjusted_rand_index(clustered["cluster"].to_numpy(), topics[clustered["doc_id"].to_numpy()]) == 1.0
    assert set(result.features["feature"].to_list()) <= set(chosen)
    assert result.features_used == chosen and result.features_silent == []
    # doc_ids adds documents that have no row at all: listed, unclustered
    more = document_clusters(pooled, 2, features=chosen, doc_ids=np.arange(len(topics) + 5))
    assert more.documents.height == len(topics) + 5
    assert more.documents.filter(pl.col("doc_id") >= len(topics))["cluster"].null_count() == 5


def test_same_input_same_clusters_whatever_the_row_order() -> None:
    pooled, _ = planted_pooled(seed=3)
    first = document_clusters(pooled, N_TOPICS, seed=7)
    again = document_clusters(pooled.sample(fraction=1.0, shuffle=True, seed=1), N_TOPICS, seed=7)
    assert first.documents.equals(again.documents.sort("doc_id"))
    assert first.features.equals(again.features)


def test_labels_name_the_clusters() -> None:
    pooled, topics = planted_pooled()
    labels = pl.DataFrame(
        {"feature": [100, 101, 108], "label": ["rivers, lakes", "mountains", "guitars"]}, schema_overrides={}
    )
    result = document_clusters(pooled, N_TOPICS, labels=labels)
    got = result.documents.sort("doc_id")["cluster"].to_numpy()
    topic0 = int(got[topics == 0][0])
    name = result.clusters.filter(pl.col("cluster") == topic0)["name"].item()
    assert set(name.split(" / ")) == {"rivers, lakes", "mountains"}
    named = result.features.filter(pl.col("feature") == 108)["label"].to_list()
    assert named == ["guitars"]


def test_spherical_kmeans_recovers_directions_and_keeps_the_best_restart() -> None:
    rng = np.random.default_rng(0)
    centers = np.linalg.qr(rng.standard_normal((16, 4)))[0].T  # 4 orthonormal directions in 16 dims
    truth = np.repeat(np.arange(4), 50)
    x = centers[truth] * rng.uniform(0.5, 3.0, (200, 1)) + 0.15 * rng.standard_normal((200, 16))
    labels, found, score = spherical_kmeans(x, 4, seed=0)
    assert adjusted_rand_index(labels, truth) == 1.0
    assert np.allclose(np.linalg.norm(found, axis=1), 1.0)
    assert np.sort(np.abs(found @ centers.T).max(axis=1)).min() > 0.95
    singles = [spherical_kmeans(x, 4, seed=s, n_init=1)[2] for s in range(5)]
    assert score >= max(singles) - 1e-9 or score == pytest.approx(max(singles))


def test_adjusted_rand_index_known_values() -> None:
    assert adjusted_rand_index([0, 0, 1, 1], [1, 1, 0, 0]) == 1.0
    assert adjusted_rand_index(["a", "a", "b", "b"], [0, 0, 1, 2]) == pytest.approx(4 / 7)
    assert adjusted_rand_index([0, 0, 0, 0], [0, 1, 2, 3]) == 0.0
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.integers(0, 6, 300), rng.integers(0, 4, 300)
        b[:150] = a[:150] % 4
        assert adjusted_rand_index(a, b) == pytest.approx(metrics.adjusted_rand_score(a, b))


# --------------------------------------------------------------------------- features


def test_duplicated_decoder_directions_are_grouped_in_pairs() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((30, 64))
    decoder = np.vstack([base, 2.0 * base + 0.05 * rng.standard_normal((30, 64))])  # 30 + i copies i
    table = feature_clusters(decoder=decoder, min_similarity=0.9)
    assert table["by"].unique().to_list() == ["decoder"]
    groups = table.group_by("cluster").agg(pl.col("feature").sort())["feature"].to_list()
    assert sorted(groups) == [[i, i + 30] for i in range(30)]
    assert (table["size"] == 2).all() and (table["centrality"] > 0.99).all()
    assert table["documents"].null_count() == table.height  # no pooled: no document counts
    # cut into a fixed number of groups instead
    assert feature_clusters(decoder=decoder, n_clusters=5)["cluster"].n_unique() == 5


def test_features_that_fire_together_are_grouped_and_named_by_their_labels() -> None:
    pooled, topics = planted_pooled()
    labels = pl.DataFrame({"feature": [100, 101, 116], "label": ["rivers", "lakes", "stadiums"]})
    expected = sorted(topic_features(t) for t in range(N_TOPICS))
    # phi correlation over the documents: the topics' features group, the independent background
    # features stay alone, and so does the always-on feature 99 (no variance) when it is included
    table = feature_clusters(
        pooled, labels=labels, coactivation="correlation", n_docs=len(topics), min_similarity=0.3
    )
    grouped = table.filter(pl.col("size") > 1)
    assert sorted(set(g) for g in grouped.group_by("cluster").agg("feature")["feature"].to_list()) == expected
    alone = table.filter(pl.col("size") == 1)
    assert alone.height > 20 and set(alone["feature"].to_list()) <= set(range(BACKGROUND))
    assert alone["centrality"].null_count() == alone.height
    # by default features firing in over half of the documents are left out, as keep_features does
    assert 99 not in table["feature"].to_list()
    every = feature_clusters(pooled, coactivation="correlation", max_doc_frequency=1.0, min_similarity=0.3)
    assert every.filter(pl.col("feature") == 99)["size"].item() == 1
    river = table.filter(pl.col("feature") == 100).row(0, named=True)
    assert set(river["name"].split(" / ")) == {"rivers", "lakes"} and river["label"] == "rivers"
    assert river["documents"] == pooled.filter(pl.col("feature") == 100).height
    assert table.filter(pl.col("feature") == 116)["name"].item() == "stadiums"
    # Jaccard of the documents they fire in finds the same topic groups among the topic features
    jaccard = feature_clusters(pooled, features=range(100, 140), min_similarity=0.3)
    assert sorted(set(g) for g in jaccard.group_by("cluster").agg("feature")["feature"].to_list()) == expected


def test_both_similarities_side_by_side() -> None:
    pooled, _ = planted_pooled()
    rng = np.random.default_rng(1)
    decoder = rng.standard_normal((200, 512))
    table = feature_clusters(pooled, decoder=decoder, min_similarity=0.3)
    assert set(table["by"].unique()) == {"decoder", "coactivation"}
    per = table.group_by("by").agg(pl.col("feature").sort())
    assert per["feature"].to_list()[0] == per["feature"].to_list()[1]  # the same features, two groupings
    # random decoder rows: nothing groups by direction
    assert (table.filter(pl.col("by") == "decoder")["size"] == 1).all()


# --------------------------------------------------------------------------- selection helpers


def test_features_matching_searches_labels_and_descriptions() -> None:
    labels = pl.DataFrame(
        {
            "feature": [3, 5, 9, 9],
            "label": ["Refund, refunded", "apology", None, "billing"],
            "description": ["money back", "says sorry about a REFUND delay", None, None],
        }
    )
    assert features_matching(labels, "refund") == [3, 5]
    assert features_matching(labels, "refund", descriptions=False) == [3]
    with pytest.raises(ValueError, match=r"No feature label contains 'weather'.*apology"):
        features_matching(labels, "weather")
    with pytest.raises(ValueError, match="materialize feature_labels"):
        features_matching(None, "refund")


def test_criterion_features_rank_by_q_then_effect_size() -> None:
    table = pl.DataFrame(
        {
            "criterion": ["topic=a"] * 4 + ["csat"],
            "feature": [1, 2, 3, 4, 5],
            "statistic": ["auc"] * 4 + ["spearman"],
            "effect": [0.6, 0.1, 0.9, 0.8, 0.5],
            "q_value": [0.01, 0.01, 0.01, 0.2, 0.001],
            "significant": [True, True, True, False, True],
        }
    )
    assert criterion_features(table, "topic=a") == [2, 3, 1]  # |0.1 - 0.5| > |0.9 - 0.5| > |0.6 - 0.5|
    assert criterion_features(table, "topic=a", n=1) == [2]
    assert criterion_features(table, "topic=a", significant_only=False) == [2, 3, 1, 4]
    with pytest.raises(ValueError, match=r"No criterion 'topic=b'.*'csat', 'topic=a'"):
        criterion_features(table, "topic=b")


# --------------------------------------------------------------------------- errors


def test_bad_input_says_what_and_what_to_do() -> None:
    pooled, _ = planted_pooled()
    with pytest.raises(ValueError, match=r"unknown feature\(s\) \[512\].*0\.\.199"):
        document_clusters(pooled, 3, features=[100, 512], n_features=200)
    with pytest.raises(ValueError, match="selection is empty"):
        document_clusters(pooled, 3, features=[])
    with pytest.raises(ValueError, match=r"n_clusters=1 is out of range.*2\.\.200"):
        document_clusters(pooled, 1)
    with pytest.raises(ValueError, match=r"n_clusters=500 is out of range"):
        document_clusters(pooled, 500)
    with pytest.raises(ValueError, match="none of the 2 chosen features fires"):
        document_clusters(pooled, 2, features=[150, 151])
    with pytest.raises(ValueError, match=r"only 1 distinct profiles.*at most 1"):
        document_clusters(pooled, 2, features=[99], aggregation="binarize")  # fires everywhere: all alike
    with pytest.raises(ValueError, match="repeated"):
        document_clusters(pl.concat([pooled, pooled]), 3)
    with pytest.raises(ValueError, match="missing column"):
        document_clusters(pooled.drop("max_activation"), 3)
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] are all zeros"):
        spherical_kmeans(np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]), 2)
    with pytest.raises(ValueError, match="pass `decoder`"):
        feature_clusters()
    with pytest.raises(ValueError, match="pass `decoder`"):
        feature_clusters(pooled, by=["decoder"])
    with pytest.raises(ValueError, match="over max_features=10"):
        feature_clusters(pooled, max_features=10)
    with pytest.raises(ValueError, match=r"no feature fires in at least min_documents=1000"):
        feature_clusters(pooled, min_documents=1000)
