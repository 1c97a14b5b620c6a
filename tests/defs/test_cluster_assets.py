"""document_clusters and feature_clusters through dagster.materialize, on stored tables of a dataset with
three planted topics (written in the README schemas): launchpad config picks the features, the family,
and the similarity; a bad config fails with the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from dagster import AssetMaterialization, DagsterInstance, materialize

from interp_assets.analysis.associations import criteria_associations, metadata_criteria
from interp_assets.analysis.clustering import adjusted_rand_index, feature_clusters
from interp_assets.defs.cluster_assets import document_clusters
from interp_assets.defs.cluster_assets import feature_clusters as feature_clusters_asset
from interp_assets.labels.labeling import FEATURE_LABELS_SCHEMA
from interp_assets.storage.parquet import read_table, write_table
from resources.local import local_resources

ROOT = Path(__file__).resolve().parents[2]
TOPICS = ("rivers", "films", "plants")
PER_TOPIC, OWN = 30, 6
DATASET, COMPARISON = "topics", "topics__vs__other"


def own(topic: int) -> list[int]:
    return list(range(10 + OWN * topic, 10 + OWN * (topic + 1)))


@pytest.fixture
def stored(tmp_path: Path) -> tuple[Path, DagsterInstance, dict]:
    """A dataset of 91 documents (the last one rejected by the model step) in 3 topics, with its
    pooled_embeddings, feature_labels and feature_associations, and document features of a comparison."""
    rng = np.random.default_rng(0)
    n = PER_TOPIC * len(TOPICS)
    topic = np.repeat(np.arange(len(TOPICS)), PER_TOPIC)
    rows = []
    for d in range(n):
        fire = [f for f in own(int(topic[d])) if rng.random() < 0.7] or own(int(topic[d]))[:1]
        fire += [f for f in range(10) if rng.random() < 0.4]
        rows += [(DATASET, d, f, float(rng.exponential(1.0) + 0.1), 1.0, 1, 20) for f in fire]
    pooled = pl.DataFrame(
        rows,
        schema={
            "dataset": pl.String,
            "doc_id": pl.Int32,
            "feature": pl.Int32,
            "max_activation": pl.Float32,
            "sum_activation": pl.Float32,
            "active_tokens": pl.Int32,
            "doc_tokens": pl.Int32,
        },
        orient="row",
    )
    ids = np.arange(n + 1, dtype=np.int32)
    topics = [TOPICS[t] for t in topic] + ["rivers"]
    docs = pl.DataFrame(
        {
            "dataset": DATASET,
            "doc_id": ids,
            "doc_hash": [f"h{d}" for d in ids],
            "text": [f"document {d} about {t}" for d, t in zip(ids, topics, strict=True)],
            "source_file": "drop.parquet",
            "source_row": (ids + 1).astype(np.int64),
            "topic": topics,
        }
    )
    status = docs.select(
        "dataset",
        "doc_id",
        "doc_hash",
        pl.lit(20, dtype=pl.Int32).alias("n_tokens"),
        pl.lit(20, dtype=pl.Int32).alias("pooled_tokens"),
        pl.lit(False).alias("truncated"),
        pl.when(pl.col("doc_id") < n).then(pl.lit("encoded")).otherwise(pl.lit("rejected")).alias("status"),
        pl.lit(None, dtype=pl.String).alias("reason"),
    )
    labels = pl.DataFrame(
        {"dataset": DATASET, "feature": [10, 11, 16], "label": ["river, rivers", "lake", "film, movie"]}
    )
    labels = labels.with_columns(
        pl.lit(None, dtype=t).alias(c) for c, t in FEATURE_LABELS_SCHEMA.items() if c not in labels.columns
    ).select(list(FEATURE_LABELS_SCHEMA))
    criteria, _ = metadata_criteria(docs.filter(pl.col("doc_id") < n), ["topic"])
    associations, _ = criteria_associations(pooled, criteria, dataset=DATASET)
    # document features of a comparison: feature 3 t + j (j < 2) fires in topic t's documents
    doc_features = pl.DataFrame(
        [(COMPARISON, DATASET, d, 3 * int(topic[d]) + j, 1.0 + j) for d in range(n) for j in range(2)],
        schema={
            "comparison": pl.String,
            "dataset": pl.String,
            "doc_id": pl.Int32,
            "feature": pl.Int32,
            "activation": pl.Float32,
        },
        orient="row",
    )
    base = str(tmp_path / "parquet")
    for table, partition, frame in (
        ("raw_documents", DATASET, docs),
        ("activation_status", DATASET, status),
        ("pooled_embeddings", DATASET, pooled.to_arrow().replace_schema_metadata({b"d_sae": b"40"})),
        ("feature_labels", DATASET, labels),
        ("feature_associations", DATASET, associations),
        ("document_features", COMPARISON, doc_features),
        (
            "document_sae",
            COMPARISON,
            pl.DataFrame({"comparison": [COMPARISON], "d_sae": [16], "members": [1], "n_features": [16]}),
        ),
    ):
        write_table(base, table, partition, frame)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("datasets", [DATASET])
    return tmp_path, instance, local_resources(tmp_path)


def _run(stored, asset, config: dict):
    data_dir, instance, resources = stored
    result = materialize(
        [asset],
        partition_key=DATASET,
        instance=instance,
        resources=resources,
        run_config={"ops": {asset.op.name: {"config": config}}},
    )
    assert result.success
    metadata = result.asset_materializations_for_node(asset.op.name)[0].metadata
    return read_table(str(data_dir / "parquet"), asset.op.name, DATASET).collect(), metadata


def _topic_of(data_dir: Path) -> dict[int, str]:
    docs = read_table(str(data_dir / "parquet"), "raw_documents", DATASET).select("doc_id", "topic").collect()
    return dict(docs.iter_rows())


def test_document_clusters_of_every_token_feature_recover_the_topics(stored) -> None:
    data_dir = stored[0]
    table, metadata = _run(stored, document_clusters, {"n_clusters": 3})
    assert table.columns == ["dataset", "family", "doc_id", "cluster", "similarity", "cluster_name"]
    assert table.height == PER_TOPIC * 3  # the rejected document is not clustered
    topic = _topic_of(data_dir)
    assert adjusted_rand_index(table["cluster"].to_list(), [topic[d] for d in table["doc_id"]]) == 1.0
    rivers = table.filter(pl.col("doc_id") == 0).row(0, named=True)
    assert set(rivers["cluster_name"].split(" / ")) == {"river, rivers", "lake"}
    assert metadata["documents_clustered"].value == PER_TOPIC * 3 and metadata["features_used"].value == 28
    assert "river, rivers" in metadata["clusters"].value
    side = read_table(str(data_dir / "parquet"), "document_cluster_features", DATASET).collect()
    first = side.filter((pl.col("cluster") == rivers["cluster"]) & (pl.col("rank") < OWN))
    assert sorted(first["feature"].to_list()) == own(0) and (first["rate_out"] == 0).all()
    assert set(side["size"].unique()) == {PER_TOPIC}


def test_label_query_criterion_and_document_family_from_the_launchpad(stored) -> None:
    data_dir = stored[0]
    topic = _topic_of(data_dir)
    table, metadata = _run(stored, document_clusters, {"n_clusters": 2, "label_query": "river"})
    assert metadata["features_used"].value == 1  # feature 10, "river, rivers"
    clustered = table.filter(pl.col("cluster").is_not_null())["doc_id"].to_list()
    assert {topic[d] for d in clustered} == {"rivers"}
    table, metadata = _run(
        stored, document_clusters, {"n_clusters": 2, "criterion": "topic=films", "n_criterion_features": OWN}
    )
    assert metadata["features_used"].value == OWN
    assert {topic[d] for d in table.filter(pl.col("cluster").is_not_null())["doc_id"]} == {"films"}
    table, metadata = _run(
        stored, document_clusters, {"n_clusters": 3, "family": "document", "comparison": COMPARISON}
    )
    assert (table["family"] == "document").all() and table.height == PER_TOPIC * 3
    assert adjusted_rand_index(table["cluster"].to_list(), [topic[d] for d in table["doc_id"]]) == 1.0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"n_clusters": 3, "label_query": "volcano"}, "No feature label contains 'volcano'"),
        ({"n_clusters": 500}, "n_clusters=500 is out of range"),
        ({"n_clusters": 3, "features": [5000]}, r"unknown feature\(s\) \[5000\]"),
        ({"n_clusters": 3, "criterion": "topic=volcanoes"}, "No criterion 'topic=volcanoes'"),
        ({"n_clusters": 3, "family": "document"}, "family 'document' needs `comparison`"),
    ],
)
def test_a_bad_config_fails_with_the_reason(stored, config: dict, message: str) -> None:
    with pytest.raises(Exception, match=message):
        _run(stored, document_clusters, config)


def test_feature_clusters_by_coactivation_and_by_the_readers_decoder(stored) -> None:
    table, metadata = _run(
        stored, feature_clusters_asset, {"coactivation": "correlation", "min_similarity": 0.3}
    )
    groups = table.filter(pl.col("size") > 1).group_by("cluster").agg(pl.col("feature").sort())
    assert sorted(groups["feature"].to_list()) == [own(t) for t in range(3)]
    assert metadata["groups_of_two_or_more"].value == {"coactivation": 3}
    # by decoder: the embedded default SAE's decoder (the sae_reader resource), as the pure function groups it
    table, _ = _run(stored, feature_clusters_asset, {"by": ["decoder"], "min_similarity": 0.3})
    from safetensors.numpy import load_file

    decoder = load_file(str(ROOT / "resources" / "default_sae" / "sae_weights.safetensors"))["W_dec"]
    expected = feature_clusters(decoder=decoder, features=table["feature"].to_list(), min_similarity=0.3)
    columns = ["by", "cluster", "size", "feature", "centrality"]
    assert table.height == 28 and table.select(columns).equals(expected.select(columns))
    # a dataset read by another reader: its features are not this decoder's
    data_dir, instance, _ = stored
    instance.report_runless_asset_event(
        AssetMaterialization("token_activations", partition=DATASET, metadata={"reader_fingerprint": "other"})
    )
    with pytest.raises(Exception, match="is not the reader that made this dataset's features"):
        _run(stored, feature_clusters_asset, {"by": ["decoder"]})


def test_stored_cluster_tables_have_their_documented_columns_and_types(stored) -> None:
    from interp_assets.storage.schemas import schema_mismatches, stored_schemas

    _run(stored, document_clusters, {"n_clusters": 3})
    _run(stored, feature_clusters_asset, {"coactivation": "correlation", "min_similarity": 0.3})
    schemas = stored_schemas(str(stored[0] / "parquet"))
    tables = {"feature_clusters", "document_clusters", "document_cluster_features"}
    assert tables <= {t for t, _ in schemas}
    problems = [p for (t, _), schema in schemas.items() if t in tables for p in schema_mismatches(t, schema)]
    assert not problems, problems
