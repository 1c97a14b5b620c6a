"""Extra readers (config/readers.json) and feature_matches, through dagster.materialize on the embedded
reader: each extra reader has its own token_activations -> pooled_embeddings lineage and tables, an SAE
matched with a copy of itself gives the identity, a narrower SAE on the same residual stream gets decoder
cosines, rows are per dataset partition, and bad readers or documents fail saying what to fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from dagster import (
    AssetKey,
    DagsterInstance,
    Definitions,
    build_sensor_context,
    instance_for_test,
    materialize,
)

from interp_assets.defs.assets import ALL_ASSETS
from interp_assets.defs.matching_assets import reader_assets, reader_resources
from interp_assets.defs.readers import load_readers
from interp_assets.defs.sensors import readers_file_sensor
from interp_assets.storage.parquet import read_table, write_table
from interp_assets.storage.schemas import TABLES, schema_mismatches, stored_schemas
from resources.local import local_resources
from resources.storage import StorageResource

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SAE = ROOT / "resources/default_sae"
DATASETS = ("alpha", "beta")
D_NARROW = 64


def _narrow_sae(folder: Path) -> Path:
    """A random 64-feature TopK SAE on the embedded reader's residual stream (same hook as the default)."""
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    hook = json.loads((DEFAULT_SAE / "cfg.json").read_text())["metadata"]["hook_name"]
    torch.manual_seed(3)
    cfg = TopKSAEConfig(
        d_in=384, d_sae=D_NARROW, k=4, dtype="float32", device="cpu", metadata=SAEMetadata(hook_name=hook)
    )
    TopKSAE(cfg).save_model(folder)
    return folder


def _write_config(data: Path, readers: dict) -> dict:
    (data / "config").mkdir(parents=True, exist_ok=True)
    (data / "config/readers.json").write_text(json.dumps(readers))
    return load_readers(data / "config/readers.json")


def _drops(landing: Path) -> None:
    landing.mkdir(parents=True)
    lines = (ROOT / "demo/landing/support_assistant_a.jsonl").read_text().splitlines()
    (landing / "alpha.jsonl").write_text("\n".join(lines[:10]) + "\n")
    (landing / "beta.jsonl").write_text("\n".join(lines[10:16]) + "\n")


def _assets(readers: dict) -> list:
    by_name = {k.to_user_string(): a for a in ALL_ASSETS for k in a.keys}
    default = [by_name[n] for n in ("raw_documents", "token_activations", "pooled_embeddings")]
    return default + reader_assets(readers)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, DagsterInstance, dict]:
    """Two datasets read by the default reader, by `copy` (a copy of the default SAE, matched with the
    default reader) and by `narrow` (a random 64-feature SAE, matched with `copy`), with feature_matches."""
    data = tmp_path_factory.mktemp("matches")
    _drops(data / "landing")
    shutil.copytree(DEFAULT_SAE, data / "sae_copy")
    readers = _write_config(
        data,
        {
            "copy": {"sae_path": str(data / "sae_copy"), "device": "cpu"},
            "narrow": {
                "sae_path": str(_narrow_sae(data / "sae_narrow")),
                "device": "cpu",
                "match_with": "copy",
            },
        },
    )
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("datasets", list(DATASETS))
    resources = local_resources(data) | reader_resources(readers, str(data / "parquet"))
    for dataset in DATASETS:
        result = materialize(_assets(readers), partition_key=dataset, instance=instance, resources=resources)
        assert result.success
    return data, readers, instance, resources


def test_each_extra_reader_has_its_own_tables(pipeline) -> None:
    data, *_ = pipeline
    base = data / "parquet"
    for dataset in DATASETS:
        default = read_table(str(base), "pooled_embeddings", dataset).sort("doc_id", "feature").collect()
        copy = read_table(str(base / "readers/copy"), "pooled_embeddings", dataset)
        assert copy.sort("doc_id", "feature").collect().equals(default)  # same SAE: same table, own files
        narrow = read_table(str(base / "readers/narrow"), "pooled_embeddings", dataset).collect()
        assert narrow.height and narrow["feature"].max() < D_NARROW
        assert (base / "readers/narrow/token_activations" / dataset / "_manifest.json").exists()
        assert (base / "readers/narrow/tokens" / dataset / "_manifest.json").exists()
        assert (base / "readers/narrow/activation_status" / f"{dataset}.parquet").exists()
    stored = stored_schemas(str(base / "readers/narrow"))  # the default reader's layout and schemas
    assert {t for t, _ in stored} == {"token_activations", "tokens", "activation_status", "pooled_embeddings"}
    assert [p for (table, _), schema in stored.items() for p in schema_mismatches(table, schema)] == []


def test_feature_matches_has_its_documented_columns_and_one_partition_per_dataset(pipeline) -> None:
    data, *_ = pipeline
    for dataset in DATASETS:
        table = read_table(str(data / "parquet"), "feature_matches", dataset).collect()
        assert table.columns == [name for name, *_ in TABLES["feature_matches"].columns]
        assert schema_mismatches("feature_matches", table.to_arrow().schema) == []
        assert table["dataset"].unique().to_list() == [dataset]
        pairs = table.group_by("reader_a", "reader_b").len().sort("reader_b")
        assert pairs.rows() == [("default", "copy", 4096), ("copy", "narrow", 4096)]
        encoded = read_table(str(data / "parquet"), "activation_status", dataset).collect()
        assert table["documents"].unique().to_list() == [encoded.filter(pl.col("status") == "encoded").height]


def test_an_sae_matched_with_a_copy_of_itself_gives_the_identity(pipeline) -> None:
    data, *_ = pipeline
    for dataset in DATASETS:
        table = read_table(str(data / "parquet"), "feature_matches", dataset).collect()
        same = table.filter(pl.col("reader_b") == "copy")
        fired = read_table(str(data / "parquet"), "pooled_embeddings", dataset).collect()["feature"].unique()
        matched = same.filter(pl.col("match_b").is_not_null())
        assert sorted(matched["feature_a"].to_list()) == sorted(fired.to_list())
        assert matched["match_b"].to_list() == matched["feature_a"].to_list()
        assert matched["best_b"].to_list() == matched["feature_a"].to_list()
        assert matched["match_correlation"].to_numpy() == pytest.approx(1.0)
        assert matched["decoder_cosine"].to_numpy() == pytest.approx(1.0, abs=1e-5)


def test_the_strongest_matches_carry_both_offline_labels_and_their_similarity(pipeline) -> None:
    """A copy of an SAE: the same feature gets the same label from both readers (similarity 1). The random
    narrow SAE's labels differ from the copy's more often than not, and only the strongest 50 are labeled."""
    data, *_ = pipeline
    table = read_table(str(data / "parquet"), "feature_matches", "alpha").collect()
    same = table.filter((pl.col("reader_b") == "copy") & pl.col("label_similarity").is_not_null())
    assert 0 < same.height <= 50
    assert same["label_a"].to_list() == same["label_b"].to_list()
    assert all(label for label in same["label_a"].to_list())
    assert same["label_similarity"].to_numpy() == pytest.approx(1.0, abs=1e-5)
    narrow = table.filter((pl.col("reader_b") == "narrow") & pl.col("label_similarity").is_not_null())
    assert 0 < narrow.height <= 50
    unlabeled = table.filter(
        (pl.col("reader_b") == "narrow")
        & pl.col("match_b").is_not_null()
        & pl.col("label_similarity").is_null()
    )
    assert unlabeled.is_empty() or narrow["match_correlation"].min() >= unlabeled["match_correlation"].max()
    assert narrow["label_similarity"].median() < 1.0 and narrow["label_similarity"].min() > -1.0


def test_a_narrower_sae_on_the_same_stream_is_matched_one_to_one_with_decoder_cosines(pipeline) -> None:
    data, *_ = pipeline
    table = read_table(str(data / "parquet"), "feature_matches", "alpha").collect()
    narrow = table.filter(pl.col("reader_b") == "narrow")
    matched = narrow.filter(pl.col("match_b").is_not_null())
    assert 0 < matched.height <= D_NARROW
    assert matched["match_b"].n_unique() == matched.height  # one-to-one
    assert narrow["best_b"].drop_nulls().n_unique() < narrow["best_b"].drop_nulls().len()  # many-to-one
    cosines = matched["decoder_cosine"].to_numpy()
    assert np.all(np.isfinite(cosines)) and np.all(np.abs(cosines) <= 1 + 1e-9)


def test_reader_assets_are_cataloged_like_the_default_ones(pipeline) -> None:
    _, readers, _, resources = pipeline
    defs = Definitions(assets=_assets(readers), resources=resources)
    specs = {s.key.to_user_string(): s for s in defs.resolve_all_asset_specs()}
    specs = {k: s for k, s in specs.items() if len(s.key.path) > 1 or k == "feature_matches"}
    assert {
        "copy/token_activations",
        "copy/activation_status",
        "narrow/pooled_embeddings",
        "feature_matches",
    } <= set(specs)
    for name, spec in specs.items():
        table = spec.key.path[-1]
        assert spec.group_name == ("analysis" if table == "feature_matches" else "features"), name
        assert "parquet" in spec.kinds and 2 <= len(spec.kinds) <= 3, name
        assert spec.owners == ["team:interp-platform"], name
        assert spec.description and len(spec.description) > 40, name
        columns = spec.metadata["dagster/column_schema"].schema.columns
        assert [c.name for c in columns] == [n for n, *_ in TABLES[table].columns], name
    assert specs["narrow/token_activations"].group_name == "features"
    graph = defs.resolve_asset_graph()
    parents = {k.to_user_string() for k in graph.get(AssetKey("feature_matches")).parent_keys}
    assert parents == {
        f"{reader}{table}"
        for reader in ("", "copy/", "narrow/")
        for table in ("pooled_embeddings", "activation_status")
    }
    lineage = {k.to_user_string() for k in graph.get(AssetKey(["narrow", "pooled_embeddings"])).parent_keys}
    assert lineage == {"narrow/token_activations", "narrow/activation_status"}


def test_datasets_without_common_documents_fail_saying_what_to_materialize(pipeline, tmp_path: Path) -> None:
    data, readers, _, _ = pipeline
    copy = tmp_path / "data"
    shutil.copytree(data / "parquet", copy / "parquet")
    status_base = str(copy / "parquet/readers/copy")
    status = read_table(status_base, "activation_status", "alpha").collect()
    write_table(
        status_base, "activation_status", "alpha", status.with_columns(pl.lit("other").alias("doc_hash"))
    )
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("datasets", ["alpha"])
    resources = local_resources(copy) | reader_resources(readers, str(copy / "parquet"))
    matches = [a for a in reader_assets(readers) if AssetKey("feature_matches") in a.keys]
    result = materialize(
        matches, partition_key="alpha", instance=instance, resources=resources, raise_on_error=False
    )
    assert not result.success
    failure = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0]
    message = failure.step_failure_data.error.to_string()
    assert "'default' and 'copy' have 0 document(s) in common" in message
    assert "copy/token_activations" in message and "'alpha'" in message


def test_a_reader_whose_sae_is_missing_fails_naming_it_and_its_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _drops(data / "landing")
    readers = _write_config(data, {"ghost": {"sae_path": str(tmp_path / "nowhere"), "device": "cpu"}})
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("datasets", ["beta"])
    resources = local_resources(data) | reader_resources(readers, str(data / "parquet"))
    by_key = {k.to_user_string(): a for a in _assets(readers) for k in a.keys}
    selection = [by_key["raw_documents"], by_key["ghost/token_activations"]]
    result = materialize(
        selection, partition_key="beta", instance=instance, resources=resources, raise_on_error=False
    )
    assert not result.success
    failure = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0]
    message = failure.step_failure_data.error.to_string()
    assert "Reader 'ghost' cannot be loaded" in message and "nowhere" in message and "readers.json" in message


@pytest.mark.parametrize(
    ("readers", "expected"),
    [
        ({"seed1": {"match_with": "seed2"}}, "'match_with' 'seed2', which is not a reader"),
        ({"seed1": {"match_with": "seed1"}}, "'match_with' 'seed1', which is not a reader"),
        ({"seed1": {"sae_pth": "/x"}}, "unknown field(s) ['sae_pth']"),
        ({"seed1": {"max_length": "long"}}, "reader 'seed1' is invalid"),
        ({"seed1": {"activation_dtype": "int8"}}, "reader 'seed1' is invalid: activation_dtype"),
        ({"Seed-1": {}}, "reader name 'Seed-1' is not allowed"),
        ({"default": {}}, "reader name 'default' is not allowed"),
        ({"seed1": "/models/sae"}, "must be an object of SAEReaderResource fields"),
        (["seed1"], "expected a JSON object mapping reader names"),
    ],
)
def test_bad_readers_files_say_what_where_and_how_to_fix(tmp_path: Path, readers, expected: str) -> None:
    path = tmp_path / "readers.json"
    path.write_text(json.dumps(readers))
    with pytest.raises(ValueError) as error:
        load_readers(path)
    assert expected in str(error.value) and str(path) in str(error.value)


def test_definitions_build_the_readers_of_the_data_dir_and_survive_a_bad_file(tmp_path: Path) -> None:
    """The code location reads `<data_dir>/config/readers.json` when it loads."""
    _write_config(tmp_path, {"copy": {"sae_path": str(DEFAULT_SAE)}})
    code = (
        "import definitions; "
        "print(sorted(s.key.to_user_string() for s in definitions.defs.resolve_all_asset_specs())); "
        "job = definitions.defs.resolve_job_def('readers_job'); "
        "print(sorted(k.to_user_string() for k in job.asset_layer.selected_asset_keys))"
    )
    env = {**os.environ, "INTERP_DATA_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    specs, job = out.stdout.strip().splitlines()
    for key in ("copy/token_activations", "copy/pooled_embeddings", "feature_matches"):
        assert f"'{key}'" in specs
    assert (
        job
        == "['copy/activation_status', 'copy/pooled_embeddings', 'copy/token_activations', 'copy/tokens', "
        "'feature_matches']"
    )
    storage = StorageResource(data_dir=str(tmp_path))
    valid = readers_file_sensor(build_sensor_context(resources={"storage": storage}))
    assert "is valid: 1 extra reader(s), ['copy']" in valid.skip_message
    # a bad file costs only the extra readers: every other asset loads, the error is said and kept visible
    (tmp_path / "config/readers.json").write_text(json.dumps({"copy": {"match_with": "nobody"}}))
    code = "import definitions; print(sorted(s.key.to_user_string() for s in definitions.defs.resolve_all_asset_specs()))"  # noqa: E501
    bad = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode == 0, bad.stderr
    assert "'token_activations'" in bad.stdout
    assert "copy/" not in bad.stdout and "feature_matches" not in bad.stdout
    assert "Extra readers not loaded" in bad.stderr and "readers.json: reader 'copy'" in bad.stderr
    with pytest.raises(ValueError, match=r"readers\.json: reader 'copy'.*'nobody'"):
        readers_file_sensor(build_sensor_context(resources={"storage": storage}))


def test_notebook_and_warehouse_read_extra_readers_and_matches(pipeline) -> None:
    from interp_assets.notebook import Dataset
    from interp_assets.warehouse import query, refresh_views

    data, *_ = pipeline
    copy = Dataset.load("alpha", str(data), reader="copy")
    narrow = Dataset.load("alpha", str(data), reader="narrow")
    assert (copy.d_sae, narrow.d_sae) == (4096, D_NARROW)
    with pytest.raises(FileNotFoundError, match="ghost/pooled_embeddings") as error:
        Dataset.load("alpha", str(data), reader="ghost")
    assert "Reader 'ghost' is not declared in" in str(error.value) and "['copy', 'narrow']" in str(
        error.value
    )
    # the notebook's matching sees the same signatures as the asset (best correlations are tie-free)
    mine = copy.match_features(narrow)
    stored = read_table(str(data / "parquet"), "feature_matches", "alpha").filter(
        pl.col("reader_b") == "narrow"
    )
    stored = stored.sort("feature_a").collect()
    assert mine["best_correlation"].to_list() == pytest.approx(stored["best_correlation"].to_list())

    db = str(data / "warehouse.duckdb")
    refresh_views(db, str(data / "parquet"), ["feature_matches"])
    counts = query(db, "select dataset, count(*) as n from feature_matches group by dataset order by dataset")
    assert counts.rows() == [("alpha", 2 * 4096), ("beta", 2 * 4096)]


def test_a_successful_dataset_run_requests_the_extra_readers_for_that_dataset(tmp_path: Path) -> None:
    from dagster import DagsterEvent, DagsterEventType, DagsterRunStatus, build_run_status_sensor_context
    from dagster._core.test_utils import create_run_for_test

    from interp_assets.defs.matching_assets import reader_jobs, reader_sensors

    readers = _write_config(tmp_path, {"copy": {"sae_path": str(DEFAULT_SAE)}})
    (sensor,) = reader_sensors(reader_jobs(readers))
    assert reader_sensors([]) == []  # no readers, no sensor
    with instance_for_test() as instance:
        tags = {"dagster/partition": "alpha"}
        success = DagsterRunStatus.SUCCESS
        run = create_run_for_test(instance, job_name="dataset_job", tags=tags, status=success)
        event = DagsterEvent(DagsterEventType.RUN_SUCCESS.value, job_name="dataset_job")
        context = build_run_status_sensor_context(
            sensor_name=sensor.name, dagster_instance=instance, dagster_run=run, dagster_event=event
        )
        request = sensor(context)
    assert request.partition_key == "alpha" and request.run_key == f"readers:{run.run_id}"
    assert sensor.job_name == "readers_job"
