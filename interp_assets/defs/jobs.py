"""Jobs. Model-heavy steps run in one process so the reader model loads once per run.

A side table (document_rejects, activation_status, diff_features) is written by its main asset's step, so
every job that selects the main asset selects it too.
"""

from dagster import AssetSelection, define_asset_job, in_process_executor

from interp_assets.defs.partitions import comparisons_partitions, datasets_partitions

DATASET_ASSETS = [
    "raw_documents",
    "document_rejects",
    "token_activations",
    "activation_status",
    "pooled_embeddings",
    "feature_labels",
    "feature_scores",
    "feature_associations",
    "document_embeddings",
]

dataset_job = define_asset_job(
    "dataset_job",
    selection=AssetSelection.assets(*DATASET_ASSETS),
    partitions_def=datasets_partitions,
    executor_def=in_process_executor,
    description="Read one dataset's drop and compute its activations, pooled embeddings, labels and scores.",
)

embed_job = define_asset_job(
    "embed_job",
    selection=AssetSelection.assets(
        "raw_documents",
        "document_rejects",
        "token_activations",
        "activation_status",
        "pooled_embeddings",
        "feature_associations",
        "document_embeddings",
    ),
    partitions_def=datasets_partitions,
    executor_def=in_process_executor,
    description="Read one dataset's drop and compute its activations, pooled embeddings and metadata "
    "associations, and its document embeddings.",
)

label_job = define_asset_job(
    "label_job",
    selection=AssetSelection.assets("feature_labels", "feature_scores"),
    partitions_def=datasets_partitions,
    executor_def=in_process_executor,
    description="Label and score one dataset's features (after its comparison partners are embedded).",
)

diff_job = define_asset_job(
    "diff_job",
    selection=AssetSelection.assets(
        "document_sae", "document_features", "diff_features", "diff_reports", "feature_effects"
    ),
    partitions_def=comparisons_partitions,
    executor_def=in_process_executor,
    description="Train the comparison's document SAE, encode both datasets' documents with it, compare "
    "the two datasets in both feature families, render the report and add its causal evidence.",
)
