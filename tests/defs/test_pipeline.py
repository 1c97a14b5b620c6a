"""End-to-end backbone: sensors, the full asset chain, bad drops, DuckDB, and the webserver's GraphQL."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import polars as pl
import pytest
from dagster import DagsterInstance, build_sensor_context, materialize

from interp_assets.defs.assets import ALL_ASSETS, WAREHOUSE_TABLES
from interp_assets.defs.sensors import comparisons_sensor, landing_sensor
from interp_assets.notebook import Dataset
from interp_assets.storage.parquet import read_table
from interp_assets.storage.schemas import schema_mismatches, stored_schemas
from interp_assets.warehouse import query, refresh_views
from resources.local import local_resources
from resources.storage import StorageResource

ROOT = Path(__file__).resolve().parents[2]


def _small_demo(landing: Path, n: int = 80) -> None:
    landing.mkdir(parents=True)
    lines = (ROOT / "demo/landing/support_assistant_a.jsonl").read_text().splitlines()[:n]
    (landing / "support_assistant_a.jsonl").write_text("\n".join(lines) + "\n")
    rows = pl.read_csv(ROOT / "demo/landing/support_assistant_b.csv").head(n)
    rows.write_csv(landing / "support_assistant_b.csv")


def test_definitions_load_without_torch_sae_lens_or_scipy():
    """Every UI reload and sensor tick imports the definitions: the heavy libraries load on first use."""
    heavy = ("torch", "sae_lens", "transformers", "scipy.stats", "scipy.special")
    code = f"import sys, definitions; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_landing_sensor_adds_partitions_and_ignores_identical_redrop(tmp_path):
    _small_demo(tmp_path / "landing", n=5)
    for p in (tmp_path / "landing").iterdir():
        os.utime(p, (time.time() - 60, time.time() - 60))
    instance = DagsterInstance.ephemeral()
    storage = StorageResource(data_dir=str(tmp_path))
    ctx = build_sensor_context(instance=instance, resources={"storage": storage})
    result = landing_sensor(ctx)
    assert sorted(r.partition_key for r in result.run_requests) == [
        "support_assistant_a",
        "support_assistant_b",
    ]
    assert sorted(result.dynamic_partitions_requests[0].partition_keys) == [
        "support_assistant_a",
        "support_assistant_b",
    ]
    # identical re-drop (new mtime, same bytes): nothing
    shutil.copy(tmp_path / "landing/support_assistant_a.jsonl", tmp_path / "copy.jsonl")
    shutil.copy(tmp_path / "copy.jsonl", tmp_path / "landing/support_assistant_a.jsonl")
    os.utime(tmp_path / "landing/support_assistant_a.jsonl", (time.time() - 60, time.time() - 60))
    again = landing_sensor(
        build_sensor_context(instance=instance, resources={"storage": storage}, cursor=result.cursor)
    )
    assert not getattr(again, "run_requests", None)
    # a changed drop: one run for that dataset only
    with open(tmp_path / "landing/support_assistant_a.jsonl", "a") as fh:
        fh.write(json.dumps({"text": "A brand new reply about a refund."}) + "\n")
    os.utime(tmp_path / "landing/support_assistant_a.jsonl", (time.time() - 60, time.time() - 60))
    changed = landing_sensor(
        build_sensor_context(instance=instance, resources={"storage": storage}, cursor=result.cursor)
    )
    assert [r.partition_key for r in changed.run_requests] == ["support_assistant_a"]


def test_full_chain_on_embedded_default_with_a_bad_drop(tmp_path):
    data = tmp_path / "data"
    _small_demo(data / "landing")
    (data / "landing" / "broken.csv").write_text("title,body\nx,y\n")  # no text column
    (data / "config").mkdir()
    shutil.copy(ROOT / "demo/comparisons.json", data / "config/comparisons.json")
    instance = DagsterInstance.ephemeral()
    names = ["support_assistant_a", "support_assistant_b", "broken"]
    instance.add_dynamic_partitions("datasets", names)
    resources = local_resources(data)
    by_name = {k.to_user_string(): a for a in ALL_ASSETS for k in a.keys}
    embed = [by_name[n] for n in ("raw_documents", "token_activations", "pooled_embeddings")]
    label = [by_name[n] for n in ("feature_labels", "feature_scores", "feature_associations")]

    bad = materialize(
        embed, partition_key="broken", instance=instance, resources=resources, raise_on_error=False
    )
    assert not bad.success
    failure = [e for e in bad.all_events if e.event_type_value == "STEP_FAILURE"][0]
    message = failure.step_failure_data.error.to_string()
    assert "broken.csv" in message and "text" in message

    for ds in names[:2]:
        assert materialize(embed, partition_key=ds, instance=instance, resources=resources).success
    for ds in names[:2]:
        assert materialize(
            embed + label, partition_key=ds, instance=instance, resources=resources, selection=label
        ).success
    key = "support_assistant_a__vs__support_assistant_b"
    instance.add_dynamic_partitions("comparisons", [key])
    result = materialize([by_name["diff_reports"]], partition_key=key, instance=instance, resources=resources)
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"report_features_labeled": True}

    def diff_run(config: dict | None = None):
        run_config = {"ops": {"diff_reports": {"config": config}}} if config else None
        run = materialize(
            [by_name["diff_reports"]],
            partition_key=key,
            instance=instance,
            resources=resources,
            run_config=run_config,
        )
        assert run.success
        reused = {
            m.asset_key.to_user_string(): "reused_stored_table" in m.metadata
            for m in run.asset_materializations_for_node("diff_reports")
        }
        assert {e.check_name: e.passed for e in run.get_asset_check_evaluations()} == checks
        return reused

    small = {
        "top_n": 1,
        "documents_per_feature": 6,
        "reference_documents": 20,
        "n_controls": 3,
        "n_boot": 100,
    }

    def effects_run():
        run = materialize(
            [by_name["feature_effects"]],
            partition_key=key,
            instance=instance,
            resources=resources,
            run_config={"ops": {"feature_effects": {"config": small}}},
        )
        assert run.success
        return run

    effects_run()

    # Nothing changed: both tables and the report files are kept; a changed setting or a lost report file
    # computes the diff again, and feature_effects, unchanged, puts its section back into the new report.
    report_md = data / "reports" / f"{key}.md"
    written = report_md.stat().st_mtime_ns
    assert diff_run() == {"diff_features": True, "diff_reports": True}
    assert report_md.stat().st_mtime_ns == written
    assert diff_run({"top_n": 5}) == {"diff_features": False, "diff_reports": False}
    report_md.unlink()
    assert diff_run() == {"diff_features": False, "diff_reports": False}
    assert "## Causal evidence" not in report_md.read_text()
    effects_again = effects_run()
    assert (
        "reused_stored_table" in effects_again.asset_materializations_for_node("feature_effects")[0].metadata
    )
    tiny = {"top_n": 1, "documents_per_feature": 6, "reference_documents": 40, "n_controls": 3, "n_boot": 100}

    def criterion_run(criterion: str):
        return materialize(
            [by_name["criterion_effects"]],
            partition_key="support_assistant_b",
            instance=instance,
            resources=resources,
            run_config={"ops": {"criterion_effects": {"config": tiny | {"criterion": criterion}}}},
            raise_on_error=False,
        )

    assert criterion_run("escalated").success
    for criterion, expected in (("topic=volcanoes", "choose one of"), ("csat", "is numeric")):
        failed = criterion_run(criterion)
        assert not failed.success
        error = [e for e in failed.all_events if e.event_type_value == "STEP_FAILURE"][0]
        assert expected in error.step_failure_data.error.to_string()

    db = data / "warehouse.duckdb"
    counts = refresh_views(str(db), str(data / "parquet"), WAREHOUSE_TABLES)
    for table in (
        "raw_documents",
        "token_activations",
        "pooled_embeddings",
        "feature_labels",
        "feature_scores",
        "diff_features",
        "diff_reports",
        "activation_status",
        "feature_associations",
        "feature_effects",
        "criterion_effects",
    ):
        assert counts.get(table, 0) > 0, table
    effects_table = query(str(db), "select * from feature_effects where score_name = 'feature_signature'")
    assert set(effects_table["control_type"]) == {"target", "random_matched", "placebo"}
    by_criterion = query(str(db), "select distinct criterion, score_name from criterion_effects")
    assert set(by_criterion["criterion"]) == {"escalated"}
    assert set(by_criterion["score_name"]) == {"feature_signature", "criterion_direction"}
    kinds = effects_table["control_type"].to_list()
    assert kinds.count("random_matched") == 3 * kinds.count("target") and kinds.count("target") >= 1
    # Every stored table has the columns and types its documentation (storage/schemas.py) gives.
    stored = stored_schemas(str(data / "parquet"))
    documents = {"document_embeddings", "document_sae", "document_features"}  # test_document_family.py
    on_demand = {"feature_clusters", "document_clusters", "document_cluster_features"}  # cluster tests
    readers = {"feature_matches"}  # only with extra readers: test_feature_matches.py
    assert {t for t, _ in stored} == set(WAREHOUSE_TABLES) - documents - on_demand - readers
    problems = [p for (table, _), schema in stored.items() for p in schema_mismatches(table, schema)]
    assert not problems, problems
    # Criteria: booleans, numbers and each topic level are tested; the id column is not.
    criteria = query(
        str(db),
        "select criterion, count(*) filter (where significant) as n_significant, "
        "bool_and(q_value >= p_value) as q_not_below_p from feature_associations "
        "where dataset = 'support_assistant_b' group by criterion",
    )
    tested = set(criteria["criterion"].to_list())
    assert {"csat", "escalated"} <= tested and any(c.startswith("topic=") for c in tested)
    assert not any(c.startswith("ticket_id") for c in tested)
    assert all(criteria["q_not_below_p"].to_list())
    assert criteria.filter(criteria["criterion"].str.starts_with("topic="))["n_significant"].sum() > 0
    # ...and the top features of each criterion got labels ("which features go with escalated?" is named)
    labeled = query(
        str(db),
        "select count(*) as n from feature_labels l join feature_associations a on a.feature = l.feature "
        "and a.dataset = l.dataset where l.selected_because like '%associated:%' and a.significant",
    )
    assert labeled["n"][0] > 0
    assert query(str(db), "select count(*) as n from raw_documents")["n"][0] == 160
    report = query(str(db), "select * from diff_reports")
    md = Path(report["report_markdown_path"][0]).read_text()
    assert "support\\_assistant\\_b" in md and "<<" in md
    assert md.count("## Causal evidence") == 1 and "feature\\_signature" in md
    html = Path(report["report_html_path"][0]).read_text()
    assert "<svg" in html
    # The features most over-represented in B carry apology / refund labels.
    top_b = query(
        str(db),
        "select l.label from diff_features f join feature_labels l on l.feature = f.feature and l.dataset = "
        "f.dataset_b where f.significant and f.direction = 'b' order by f.q_value limit 3",
    )["label"].to_list()
    assert any(w in " ".join(top_b) for w in ("sorry", "apolog", "refund")), top_b

    # Re-running an unchanged dataset encodes nothing.
    again = materialize(embed, partition_key="support_assistant_a", instance=instance, resources=resources)
    meta = next(
        e
        for e in again.asset_materializations_for_node("token_activations")
        if e.asset_key.path == ["token_activations"]
    ).metadata
    assert meta["encoded_now"].value == 0 and meta["reused_from_cache"].value == 80
    assert meta["reader_loaded"].value is False  # the fingerprint came from config files, no model load
    again_checks = {e.check_name: e.passed for e in again.get_asset_check_evaluations()}
    assert again_checks["every_document_accounted_for"] and again_checks["activations_finite_and_positive"]

    # The comparisons sensor: labels chosen against the partner's current data -> straight to the diff;
    # an unchanged re-run of A (same data version) does not make B's labels stale.
    def evaluate():
        return comparisons_sensor(
            build_sensor_context(instance=instance, resources={"storage": resources["storage"]})
        )

    requests = evaluate().run_requests
    assert [(r.job_name, r.partition_key) for r in requests] == [("diff_job", key)]
    # A changed drop of B: A's labels predate B's new activations, so A is re-labeled before any diff.
    with open(data / "landing" / "support_assistant_b.csv", "a") as fh:
        fh.write('"Sorry again, your refund is on its way.",T9999,billing,free,2,true\n')
    assert materialize(
        embed, partition_key="support_assistant_b", instance=instance, resources=resources
    ).success
    requests = evaluate().run_requests
    assert [(r.job_name, r.partition_key) for r in requests] == [("label_job", "support_assistant_a")]
    assert materialize(
        embed + label,
        partition_key="support_assistant_a",
        instance=instance,
        resources=resources,
        selection=label,
    ).success
    requests = evaluate().run_requests
    assert [(r.job_name, r.partition_key) for r in requests] == [("diff_job", key)]

    # An unchanged re-run of the label steps reads every label and score back from the caches.
    rerun = materialize(
        embed + label,
        partition_key="support_assistant_a",
        instance=instance,
        resources=resources,
        selection=label,
    )
    labels_meta = rerun.asset_materializations_for_node("feature_labels")[0].metadata
    scores_meta = rerun.asset_materializations_for_node("feature_scores")[0].metadata
    assert labels_meta["labels_recomputed"].value == 0 and labels_meta["labeled_features"].value > 0
    assert scores_meta["scores_recomputed"].value == 0 and scores_meta["texts_embedded_now"].value == 0
    assert scores_meta["scored_labels"].value > 0
    # nothing they read changed since the last run: the stored tables are kept, not even rebuilt
    assert labels_meta["reused_stored_table"].value and scores_meta["reused_stored_table"].value

    # another labeling setting: labels are chosen again (from the label cache) and scored again
    def label_run(n_frequent: int):
        return materialize(
            embed + label,
            partition_key="support_assistant_a",
            instance=instance,
            resources=resources,
            selection=label,
            run_config={"ops": {"feature_labels": {"config": {"n_frequent": n_frequent}}}},
        )

    changed = label_run(5)
    labeled_before = labels_meta["labeled_features"].value
    labels_meta = changed.asset_materializations_for_node("feature_labels")[0].metadata
    scores_meta = changed.asset_materializations_for_node("feature_scores")[0].metadata
    assert "reused_stored_table" not in labels_meta and "reused_stored_table" not in scores_meta
    assert labels_meta["label_status"].value == {"ok": labels_meta["labeled_features"].value}  # offline
    assert labels_meta["heldout_dropped"].value == 0  # content groups already keep the sides apart
    assert scores_meta["score_status"].value == {"ok": scores_meta["scored_labels"].value}
    n_labeled = read_table(str(data / "parquet"), "feature_labels", "support_assistant_a").collect().height
    assert n_labeled == labels_meta["labeled_features"].value < labeled_before
    # a stored table that went missing is computed again, not "reused"
    shutil.rmtree(data / "parquet" / "feature_scores")
    again = label_run(5)
    assert again.asset_materializations_for_node("feature_labels")[0].metadata["reused_stored_table"].value
    assert "reused_stored_table" not in again.asset_materializations_for_node("feature_scores")[0].metadata
    assert read_table(str(data / "parquet"), "feature_scores", "support_assistant_a").collect().height > 0
    # The SAE width is stored with the data: a notebook matrix has every feature's column.
    assert Dataset.load("support_assistant_a", data_dir=str(data)).latents().shape == (80, 4096)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_webserver_serves_assets_and_partitions(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    env = dict(os.environ, DAGSTER_HOME=str(home), INTERP_DATA_DIR=str(tmp_path / "data"))
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from dagster import DagsterInstance; "
            "DagsterInstance.get().add_dynamic_partitions('datasets', ['demo_one'])",
        ],
        env=env,
        check=True,
        cwd=ROOT,
    )
    port = _free_port()
    webserver = shutil.which("dagster-webserver", path=str(Path(sys.executable).parent))
    proc = subprocess.Popen(
        [webserver, "-f", "definitions.py", "-h", "127.0.0.1", "-p", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        query_text = "{ assetNodes { assetKey { path } partitionKeys } }"
        deadline = time.time() + 90
        data = None
        while time.time() < deadline:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/graphql",
                    data=json.dumps({"query": query_text}).encode(),
                    headers={"Content-Type": "application/json"},
                )
                data = json.loads(urllib.request.urlopen(req, timeout=5).read())
                if data.get("data", {}).get("assetNodes"):
                    break
            except OSError:
                pass
            time.sleep(1)
        assert data is not None, "webserver did not answer"
        nodes = {"/".join(n["assetKey"]["path"]): n for n in data["data"]["assetNodes"]}
        assert {
            "raw_documents",
            "token_activations",
            "pooled_embeddings",
            "feature_labels",
            "feature_scores",
            "diff_reports",
        } <= set(nodes)
        assert nodes["raw_documents"]["partitionKeys"] == ["demo_one"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("name", ["../../etc/passwd.csv", "a'b;drop table x.csv", "données été.jsonl"])
def test_hostile_drop_names_stay_inside_storage(tmp_path, name):
    from interp_assets.ingest import list_drops

    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / Path(name).name).write_text(
        'text\n"hello there"\n' if name.endswith(".csv") else '{"text": "hi"}\n'
    )
    (drop,) = list_drops(landing)
    from interp_assets.storage.paths import table_path

    path = Path(table_path(str(tmp_path / "parquet"), "raw_documents", drop.dataset)).resolve()
    assert str(path).startswith(str((tmp_path / "parquet").resolve()))
