"""The main job on the embedded default: ingest the demo drops, materialize the whole graph, print where
the report and the DuckDB file are. Usage: python scripts/run_main_job.py [--landing demo/landing]"""

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--landing", default=str(ROOT / "demo" / "landing"), help="folder of drops to ingest")
    parser.add_argument("--comparisons", default=str(ROOT / "demo" / "comparisons.json"))
    parser.add_argument("--data-dir", default=os.environ.get("INTERP_DATA_DIR", str(ROOT / "var")))
    args = parser.parse_args()
    data_dir = Path(args.data_dir).resolve()
    os.environ["INTERP_DATA_DIR"] = str(data_dir)
    home = data_dir / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    sys.path.insert(0, str(ROOT))

    import warnings

    from dagster import BetaWarning, DagsterInstance

    # data_version on Output is a beta parameter: the run needs it, the reader of this output does not
    warnings.filterwarnings("ignore", category=BetaWarning)

    from interp_assets.comparisons import load_comparisons
    from interp_assets.ingest import clash_error, copy_drop_files, printable_path, scan_drops
    from interp_assets.warehouse import ViewRefreshError, query, refresh_views

    landing = data_dir / "landing"
    (data_dir / "config").mkdir(parents=True, exist_ok=True)
    landing.mkdir(parents=True, exist_ok=True)
    for skipped in copy_drop_files(args.landing, landing):
        why = "not a regular file (symbolic links are never followed)"
        print(f"Skipped {printable_path(skipped)}: {why}.", flush=True)
    shutil.copy(args.comparisons, data_dir / "config" / "comparisons.json")

    import definitions
    from interp_assets.defs.run_recovery import local_run_tags, recover_dead_local_runs

    defs = definitions.defs
    instance = DagsterInstance.get()
    for run_id in recover_dead_local_runs(instance):
        print(
            f"A killed earlier run {run_id} held the model pool: marked failed, its slot freed.", flush=True
        )
    tags = local_run_tags()
    bad_names: dict = {}
    drops, clashes = scan_drops(landing, bad_names=bad_names)
    for name, paths in clashes.items():
        print(f"Skipped dataset {name!r}: {clash_error(name, paths)}", flush=True)
    for name, error in bad_names.items():
        print(f"Skipped dataset {name!r}: {error}", flush=True)
    names = [d.dataset for d in drops]
    instance.add_dynamic_partitions(
        "datasets", [n for n in names if not instance.has_dynamic_partition("datasets", n)]
    )
    for job_name in ("embed_job", "label_job"):
        job = defs.resolve_job_def(job_name)
        for name in names:
            print(f"== {job_name} [{name}]", flush=True)
            result = job.execute_in_process(
                partition_key=name, instance=instance, raise_on_error=False, tags=tags
            )
            if not result.success:
                print(
                    f"   {job_name} failed for {name}; see the run in the UI. Other datasets go on.",
                    flush=True,
                )
    comparisons = [
        c for c in load_comparisons(data_dir / "config" / "comparisons.json") if {c.a, c.b} <= set(names)
    ]
    keys = [c.key for c in comparisons]
    instance.add_dynamic_partitions(
        "comparisons", [k for k in keys if not instance.has_dynamic_partition("comparisons", k)]
    )
    diff_job = defs.resolve_job_def("diff_job")
    for key in keys:
        print(f"== diff_job [{key}]", flush=True)
        diff_job.execute_in_process(partition_key=key, instance=instance, raise_on_error=True, tags=tags)

    from interp_assets.defs.assets import WAREHOUSE_TABLES

    db = data_dir / "warehouse.duckdb"
    try:
        counts = refresh_views(str(db), definitions.PARQUET_BASE, WAREHOUSE_TABLES)
    except ViewRefreshError as exc:  # the other views are current; say which failed and go on
        print(f"\n{exc}", flush=True)
        counts = exc.counts
    print("\nDuckDB tables (rows):")
    for table, n in counts.items():
        print(f"  {table:20s} {n}")
    for key in keys:
        top = query(str(db), "select * from diff_reports where comparison = ?", [key])
        print(f"\nReport {key}:\n  {top['report_markdown_path'][0]}\n  {top['report_html_path'][0]}")
        print(
            query(
                str(db),
                "select f.feature, f.freq_a, f.freq_b, f.q_value, l.label from diff_features f "
                "left join (select distinct on (feature) feature, label from feature_labels "
                "where dataset = ?) l using (feature) where comparison = ? and family = 'token' and "
                "significant and direction = 'b' order by q_value, abs(freq_diff) desc limit 8",
                [key.split("__vs__")[1], key],
            )
        )
        print("Document-level features (the comparison's document SAE) more frequent in B:")
        print(
            query(
                str(db),
                "select feature, freq_a, freq_b, q_value, label from diff_features where comparison = ? "
                "and family = 'document' and significant and direction = 'b' "
                "order by q_value, abs(freq_diff) desc limit 5",
                [key],
            )
        )
    if "feature_associations" in counts and names:
        print(f"\nCriteria: features that go with metadata columns of {names[-1]} (feature_associations):")
        print(
            query(
                str(db),
                "select a.criterion, a.feature, l.label, round(a.effect, 3) as effect, a.q_value "
                "from feature_associations a left join (select distinct on (feature) feature, label "
                "from feature_labels where dataset = ?) l using (feature) where a.dataset = ? and "
                "a.significant qualify row_number() over (partition by a.criterion order by a.q_value) = 1 "
                "order by a.q_value limit 8",
                [names[-1], names[-1]],
            )
        )
    print(f'\nDuckDB file: {db}\n  duckdb {db} "select count(*) from token_activations"')
    print(f"Dagster UI:  DAGSTER_HOME={home} INTERP_DATA_DIR={data_dir} dagster dev -f definitions.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
