"""Sensors: new data drops, declared comparisons, and the DuckDB views after each successful run."""

import json

from dagster import (
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunStatusSensorContext,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    run_status_sensor,
    sensor,
)
from dagster_duckdb import DuckDBResource

from interp_assets.comparisons import load_comparisons
from interp_assets.defs.assets import WAREHOUSE_TABLES
from interp_assets.defs.jobs import dataset_job, diff_job, label_job
from interp_assets.defs.partitions import comparisons_partitions, datasets_partitions
from interp_assets.defs.readers import load_readers, readers_file
from interp_assets.defs.shared import data_version, latest_materialization
from interp_assets.ingest import DropError, clash_error, scan_drops
from interp_assets.warehouse import refresh_views_with_resource
from resources.storage import StorageResource


def plan_drop_runs(drops: list, cursor: dict[str, str]) -> tuple[list, dict[str, str]]:
    """Drops whose fingerprint differs from the one recorded in `cursor`, and the updated cursor."""
    changed = [d for d in drops if cursor.get(d.dataset) != d.fingerprint]
    updated = dict(cursor)
    updated.update({d.dataset: d.fingerprint for d in changed})
    return changed, updated


@sensor(
    default_status=DefaultSensorStatus.RUNNING,
    job=dataset_job,
    minimum_interval_seconds=30,
    description="Adds a dataset partition for each new or "
    "changed drop in <data_dir>/landing and runs its assets; an identical re-drop triggers nothing.",
)
def landing_sensor(context: SensorEvaluationContext, storage: StorageResource):
    if not storage.landing_dir.exists():
        return SkipReason(
            f"Landing folder {storage.landing_dir} does not exist yet; create it and drop files there."
        )
    bad_names: dict[str, DropError] = {}
    drops, clashes = scan_drops(storage.landing_dir, min_age_s=5.0, bad_names=bad_names)
    for name, paths in clashes.items():  # blocks only that dataset; the others go on
        context.log.warning(str(clash_error(name, paths)))
    for error in bad_names.values():  # so does a name that is not UTF-8
        context.log.warning(str(error))
    cursor = json.loads(context.cursor) if context.cursor else {}
    changed, updated = plan_drop_runs(drops, cursor)
    if not changed:
        return SkipReason("No new or changed drops.")
    existing = set(context.instance.get_dynamic_partitions(datasets_partitions.name))
    new_names = sorted({d.dataset for d in changed} - existing)
    return SensorResult(
        run_requests=[
            RunRequest(run_key=f"{d.dataset}:{d.fingerprint[:16]}", partition_key=d.dataset) for d in changed
        ],
        dynamic_partitions_requests=[datasets_partitions.build_add_request(new_names)] if new_names else [],
        cursor=json.dumps(updated, sort_keys=True),
    )


def stale_labels(instance, a: str, b: str) -> dict[str, str]:
    """Datasets of comparison (a, b) whose feature_labels were chosen without the partner's current data,
    each with the partner's current token_activations data version.

    feature_labels records the token_activations data version of each partner it compared against
    (`partner_versions`); a missing or different version means its "distinctive" features may miss some of
    the report's. Re-labeling costs only the new features (labels are cached).
    """
    stale = {}
    for ds, other in ((a, b), (b, a)):
        labels = latest_materialization(instance, "feature_labels", ds)
        current = data_version(instance, "token_activations", other)
        if labels is None or current is None:
            continue
        seen = labels.asset_materialization.metadata.get("partner_versions")
        if (seen.value if seen else {}).get(other) != current:
            stale[ds] = current
    return stale


@sensor(
    default_status=DefaultSensorStatus.RUNNING,
    jobs=[diff_job, label_job],
    minimum_interval_seconds=30,
    description="Runs diff_reports for each comparison declared in <data_dir>/config/comparisons.json once "
    "both datasets have fresh feature_scores; first re-labels a dataset whose labels predate its partner.",
)
def comparisons_sensor(context: SensorEvaluationContext, storage: StorageResource):
    path = storage.config_dir / "comparisons.json"
    if not path.exists():
        return SkipReason(f"No comparisons declared: write {path} (a JSON list of {{'a': ..., 'b': ...}}).")
    problems: list[str] = []
    try:
        comparisons = load_comparisons(path, problems)
    except ValueError as exc:
        return SkipReason(str(exc))
    for problem in problems[:20]:  # bad entries are skipped; the good ones still run
        context.log.warning(problem)
    cursor = json.loads(context.cursor) if context.cursor else {}
    existing = set(context.instance.get_dynamic_partitions(comparisons_partitions.name))
    requests, new_keys = [], []
    for comparison in comparisons:
        records = [
            latest_materialization(context.instance, "feature_scores", ds)
            for ds in (comparison.a, comparison.b)
        ]
        ids = [r.storage_id if r else None for r in records]
        if None in ids:
            continue
        relabel = stale_labels(context.instance, comparison.a, comparison.b)
        if relabel:
            for ds, partner_version in relabel.items():
                # one label run per dataset and tick, even when several of its partners changed
                if any(r.partition_key == ds and r.job_name == label_job.name for r in requests):
                    continue
                requests.append(
                    RunRequest(
                        job_name=label_job.name, partition_key=ds, run_key=f"labels:{ds}:{partner_version}"
                    )
                )
            continue
        stamp = f"{ids[0]}-{ids[1]}"
        if cursor.get(comparison.key) == stamp:
            continue
        cursor[comparison.key] = stamp
        if comparison.key not in existing:
            new_keys.append(comparison.key)
        requests.append(
            RunRequest(
                job_name=diff_job.name, run_key=f"{comparison.key}:{stamp}", partition_key=comparison.key
            )
        )
    if not requests:
        return SkipReason("No comparison has new inputs.")
    return SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[comparisons_partitions.build_add_request(new_keys)] if new_keys else [],
        cursor=json.dumps(cursor, sort_keys=True),
    )


@run_status_sensor(
    default_status=DefaultSensorStatus.RUNNING,
    run_status=DagsterRunStatus.SUCCESS,
    monitor_all_code_locations=False,
    description="(Re)builds the DuckDB views over the Parquet tables after every successful run.",
)
def warehouse_views_sensor(context: RunStatusSensorContext, storage: StorageResource, duckdb: DuckDBResource):
    counts = refresh_views_with_resource(duckdb, storage.parquet_base, WAREHOUSE_TABLES)
    context.log.info(f"DuckDB views refreshed: {counts}")


@run_status_sensor(
    default_status=DefaultSensorStatus.RUNNING,
    run_status=DagsterRunStatus.FAILURE,
    monitor_all_code_locations=False,
    description="(Re)builds the DuckDB views after a failed run too: it may have written segments before "
    "failing (a blocking check runs after its asset is stored), and views list segment files.",
)
def warehouse_views_after_failure_sensor(
    context: RunStatusSensorContext, storage: StorageResource, duckdb: DuckDBResource
):
    counts = refresh_views_with_resource(duckdb, storage.parquet_base, WAREHOUSE_TABLES)
    context.log.info(f"DuckDB views refreshed after a failed run: {counts}")


@sensor(
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
    description="Checks <data_dir>/config/readers.json (the extra readers): while it is invalid, each tick "
    "fails with what is wrong, where and what to do; the code location then loads without the extra readers "
    "and every other asset works. Reload the code location after fixing or changing the file.",
)
def readers_file_sensor(context: SensorEvaluationContext, storage: StorageResource):
    path = readers_file(storage.config_dir)
    if not path.exists():
        return SkipReason(f"No extra readers declared ({path} does not exist).")
    readers = load_readers(path)  # ValueError naming the file, the reader and the fix: a failed tick
    return SkipReason(f"{path} is valid: {len(readers)} extra reader(s), {sorted(readers)}.")
