"""The asset chain, as thin Dagster wiring around the pure modules.

raw_documents -> token_activations -> pooled_embeddings -> feature_labels -> feature_scores -> diff_reports

All but diff_reports are partitioned by dataset; diff_reports is partitioned by comparison (`A__vs__B`)
and loads the two datasets' partitions explicitly. The side tables document_rejects, tokens,
activation_status and diff_features are assets too: extra outputs (`multi_asset`) of the raw_documents,
token_activations and diff_reports steps, so ALL_ASSETS holds one definition per step (iterate `.keys` for
every asset).
"""

from interp_assets.defs.analysis_assets import diff_reports, feature_associations
from interp_assets.defs.causal_assets import criterion_effects, feature_effects
from interp_assets.defs.cluster_assets import document_clusters, feature_clusters
from interp_assets.defs.document_assets import document_embeddings, document_features, document_sae
from interp_assets.defs.feature_assets import pooled_embeddings, token_activations
from interp_assets.defs.ingest_assets import raw_documents
from interp_assets.defs.label_assets import feature_labels, feature_scores

ALL_ASSETS = [
    raw_documents,
    token_activations,
    pooled_embeddings,
    feature_labels,
    feature_scores,
    feature_associations,
    document_embeddings,
    document_sae,
    document_features,
    diff_reports,
    feature_effects,
    criterion_effects,
    feature_clusters,
    document_clusters,
]
# Not listed above: the assets of extra readers and feature_matches, which exist only when
# `<data_dir>/config/readers.json` declares readers (`matching_assets.reader_assets`, in definitions.py).

WAREHOUSE_TABLES = [
    "raw_documents",
    "document_rejects",
    "token_activations",
    "tokens",
    "activation_status",
    "pooled_embeddings",
    "feature_labels",
    "feature_scores",
    "feature_associations",
    "document_embeddings",
    "document_sae",
    "document_features",
    "diff_features",
    "diff_reports",
    "feature_effects",
    "criterion_effects",
    "feature_clusters",
    "document_clusters",
    "document_cluster_features",
    "feature_matches",
]
