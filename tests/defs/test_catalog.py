"""What a data engineer sees in the catalog: every asset grouped by domain, with kinds, owners and a
description; automation on by default."""

from dagster import DefaultSensorStatus

import definitions

GROUPS = {
    "raw_documents": "ingest",
    "document_rejects": "ingest",
    "token_activations": "features",
    "tokens": "features",
    "activation_status": "features",
    "pooled_embeddings": "features",
    "document_embeddings": "documents",
    "document_sae": "documents",
    "document_features": "documents",
    "feature_labels": "labels",
    "feature_scores": "labels",
    "feature_associations": "analysis",
    "diff_features": "analysis",
    "diff_reports": "analysis",
    "feature_effects": "analysis",
    "criterion_effects": "analysis",
    "feature_clusters": "analysis",
    "document_clusters": "analysis",
    "document_cluster_features": "analysis",
}


def test_every_asset_has_its_domain_group_kinds_owners_and_a_description() -> None:
    specs = {spec.key.to_user_string(): spec for spec in definitions.defs.resolve_all_asset_specs()}
    assert set(specs) == set(GROUPS)
    for name, spec in specs.items():
        assert spec.group_name == GROUPS[name], name
        assert "parquet" in spec.kinds and 2 <= len(spec.kinds) <= 3, name
        assert spec.owners == ["team:interp-platform"], name
        assert spec.description and len(spec.description) > 40, name


def test_sensors_run_by_default() -> None:
    statuses = {s.name: s.default_status for s in definitions.defs.sensors}
    assert statuses and set(statuses.values()) == {DefaultSensorStatus.RUNNING}, statuses


def test_every_asset_describes_its_columns_before_any_run() -> None:
    """`dagster/column_schema` definition metadata from the one schema source (storage/schemas.py)."""
    from interp_assets.storage.schemas import TABLES

    for spec in definitions.defs.resolve_all_asset_specs():
        name = spec.key.to_user_string()
        columns = spec.metadata["dagster/column_schema"].schema.columns
        assert [(c.name, c.type, c.description) for c in columns] == [
            (n, t, meaning) for n, t, meaning, _ in TABLES[name].columns
        ], name
        assert all(c.description for c in columns), name


def test_every_warehouse_table_is_documented() -> None:
    from interp_assets.defs.assets import WAREHOUSE_TABLES
    from interp_assets.storage.schemas import TABLES

    assert set(TABLES) == set(WAREHOUSE_TABLES)


def test_lineage_shows_every_table_a_comparison_reads() -> None:
    from dagster import AssetKey

    graph = definitions.defs.resolve_asset_graph()
    parents = {k.to_user_string() for k in graph.get(AssetKey("diff_reports")).parent_keys}
    assert parents == {
        "raw_documents",
        "token_activations",
        "tokens",
        "pooled_embeddings",
        "activation_status",
        "feature_labels",
        "feature_scores",
        "document_sae",
        "document_features",
        "diff_features",
    }
    # the labels' and scores' steps read the documents and the token spans besides their inputs
    labels = {k.to_user_string() for k in graph.get(AssetKey("feature_labels")).parent_keys}
    assert labels == {
        "raw_documents",
        "token_activations",
        "tokens",
        "pooled_embeddings",
        "activation_status",
        "feature_associations",
    }
    scores = {k.to_user_string() for k in graph.get(AssetKey("feature_scores")).parent_keys}
    assert scores == {"feature_labels", "raw_documents", "token_activations", "tokens"}
    effects = {k.to_user_string() for k in graph.get(AssetKey("feature_effects")).parent_keys}
    assert effects == {
        "diff_reports",
        "diff_features",
        "token_activations",
        "raw_documents",
        "document_sae",
        "document_embeddings",
    }
    readers = {k.to_user_string() for k in graph.get(AssetKey("activation_status")).child_keys}
    assert readers == {
        "pooled_embeddings",
        "feature_labels",
        "feature_associations",
        "feature_clusters",
        "document_clusters",
        "document_cluster_features",
        "diff_features",
        "diff_reports",
    }
