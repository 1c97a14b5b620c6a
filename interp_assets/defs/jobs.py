"""Jobs. Model-heavy steps run in one process so the reader model loads once per run.

A side table (document_rejects, activation_status, diff_features) is written by its main asset's step, so
every job that selects the main asset selects it too.

`INTERP_EXECUTOR=celery` (read when the definitions load, so set it alike for the process that launches a
run and for every worker) runs each step of these jobs as a task of dagster-celery's executor instead: the
model steps on the `sae_model` queue (`MODEL_STEP_TAGS`), the others on `dagster`, still bounded across
runs and workers by the `sae_model` pool (README, "Scaling out").
"""

import os
import sys

from dagster import AssetSelection, ExecutorDefinition, define_asset_job, in_process_executor

from interp_assets.defs.partitions import comparisons_partitions, datasets_partitions

EXECUTORS = ("in_process", "celery")


def job_executor(name: str | None = None) -> ExecutorDefinition:
    """The executor of the jobs: `name`, else `INTERP_EXECUTOR` from the environment, else in_process."""
    name = name or os.environ.get("INTERP_EXECUTOR") or "in_process"
    if name == "in_process":
        return in_process_executor
    if name != "celery":
        raise ValueError(
            f"INTERP_EXECUTOR={name!r} is not an executor these jobs know; set it to one of "
            f"{', '.join(EXECUTORS)} (or unset it for in_process) where definitions.py is loaded."
        )
    try:
        from dagster_celery import celery_executor
    except ImportError as exc:
        raise ImportError(
            "INTERP_EXECUTOR=celery needs the dagster-celery package, which is not installed for "
            f"{sys.executable}: install the `dev` extras "
            "(pip install -e '.[dev]') or dagster-celery==0.29.27 with celery[redis]."
        ) from exc
    return celery_executor


EXECUTOR = job_executor()

DATASET_ASSETS = [
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
]

dataset_job = define_asset_job(
    "dataset_job",
    selection=AssetSelection.assets(*DATASET_ASSETS),
    partitions_def=datasets_partitions,
    executor_def=EXECUTOR,
    description="Read one dataset's drop and compute its activations, pooled embeddings, labels and scores.",
)

embed_job = define_asset_job(
    "embed_job",
    selection=AssetSelection.assets(
        "raw_documents",
        "document_rejects",
        "token_activations",
        "tokens",
        "activation_status",
        "pooled_embeddings",
        "feature_associations",
        "document_embeddings",
    ),
    partitions_def=datasets_partitions,
    executor_def=EXECUTOR,
    description="Read one dataset's drop and compute its activations, pooled embeddings and metadata "
    "associations, and its document embeddings.",
)

label_job = define_asset_job(
    "label_job",
    selection=AssetSelection.assets("feature_labels", "feature_scores"),
    partitions_def=datasets_partitions,
    executor_def=EXECUTOR,
    description="Label and score one dataset's features (after its comparison partners are embedded).",
)

diff_job = define_asset_job(
    "diff_job",
    selection=AssetSelection.assets(
        "document_sae", "document_features", "diff_features", "diff_reports", "feature_effects"
    ),
    partitions_def=comparisons_partitions,
    executor_def=EXECUTOR,
    description="Train the comparison's document SAE, encode both datasets' documents with it, compare "
    "the two datasets in both feature families, render the report and add its causal evidence.",
)
