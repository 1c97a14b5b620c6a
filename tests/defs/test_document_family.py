"""Document-level features through the assets, on real DBpedia entity descriptions (shared/data/dbpedia).

A planted topic (15% of B's documents from one category that A lacks) must come out as a significant
B-direction feature whose top documents are that category, and random halves of one sample must give
no significant feature in either family. The full curve over 14 categories and 4 rates is
benchmarks/planted.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from dagster import DagsterInstance, materialize

from benchmarks.planted import load_dbpedia
from interp_assets.analysis.reports import top_features
from interp_assets.comparisons import comparison_key
from interp_assets.defs.assets import ALL_ASSETS
from interp_assets.engine.documents import DEFAULT_MEMBERS, LEXICAL_PROJECTION_FILE, document_sae_size
from interp_assets.storage.parquet import read_table
from interp_assets.storage.schemas import schema_mismatches, stored_schemas
from resources.local import local_resources

ROOT = Path(__file__).resolve().parents[2]
DBPEDIA = ROOT.parent / "shared" / "data" / "dbpedia" / "dbpedia.tsv"
BY_NAME = {k.path[-1]: a for a in ALL_ASSETS for k in a.keys}
DATASET_ASSETS = [
    BY_NAME[n] for n in ("raw_documents", "token_activations", "pooled_embeddings", "document_embeddings")
]
COMPARISON_ASSETS = [BY_NAME[n] for n in ("document_sae", "document_features", "diff_reports")]

pytestmark = pytest.mark.skipif(not DBPEDIA.exists(), reason=f"{DBPEDIA} (shared DBpedia sample) not found")


def _datasets(tmp_path: Path, drops: dict[str, pl.DataFrame]) -> tuple[DagsterInstance, dict, str]:
    """Materialize both datasets' assets and add their comparison; returns (instance, resources, key)."""
    (tmp_path / "landing").mkdir()
    (tmp_path / "config").mkdir()
    for name, frame in drops.items():
        frame.write_parquet(tmp_path / "landing" / f"{name}.parquet")
    a, b = drops
    (tmp_path / "config" / "comparisons.json").write_text(json.dumps([{"a": a, "b": b}]))
    instance = DagsterInstance.ephemeral()
    resources = local_resources(tmp_path)
    instance.add_dynamic_partitions("datasets", [a, b])
    for name in (a, b):
        assert materialize(DATASET_ASSETS, partition_key=name, instance=instance, resources=resources).success
    key = comparison_key(a, b)
    instance.add_dynamic_partitions("comparisons", [key])
    return instance, resources, key


def _run(tmp_path: Path, drops: dict[str, pl.DataFrame], run_config: dict | None = None) -> tuple[str, str]:
    """Materialize both datasets and their comparison; returns (parquet base, comparison key)."""
    instance, resources, key = _datasets(tmp_path, drops)
    result = materialize(
        COMPARISON_ASSETS, partition_key=key, instance=instance, resources=resources, run_config=run_config
    )
    assert result.success
    stored = stored_schemas(str(tmp_path / "parquet"))
    documents = {"document_embeddings", "document_sae", "document_features", "diff_features"}
    assert documents <= {t for t, _ in stored}
    problems = [p for (table, _), schema in stored.items() for p in schema_mismatches(table, schema)]
    assert not problems, problems  # the documented columns and types (interp_assets/storage/schemas.py)
    return str(tmp_path / "parquet"), key


def test_planted_topic_is_found_by_the_document_family(tmp_path: Path) -> None:
    data = load_dbpedia(DBPEDIA)
    rng = np.random.default_rng(0)
    categories = sorted(data["category"].unique().to_list())
    topic = categories[int(rng.integers(len(categories)))]
    cats = data["category"].to_numpy()
    others = rng.permutation(np.flatnonzero(cats != topic))
    planted = rng.choice(np.flatnonzero(cats == topic), size=45, replace=False)
    a_rows, b_rows = others[:300], np.r_[others[300:555], planted]
    base, key = _run(tmp_path, {"news_a": data[a_rows.tolist()], "news_b": data[b_rows.tolist()]})

    sae = read_table(base, "document_sae", key).collect().row(0, named=True)
    assert (sae["d_sae"], sae["k"]) == document_sae_size(600)
    assert sae["members"] == DEFAULT_MEMBERS and sae["n_features"] == DEFAULT_MEMBERS * sae["d_sae"]
    assert sae["fraction_variance_explained"] > 0.3
    # by default it reads each document's sentence embedding alone
    assert sae["d_in"] == 384 and not (Path(sae["model_path"]) / LEXICAL_PROJECTION_FILE).exists()
    features = read_table(base, "document_features", key).collect()
    assert features["feature"].max() < sae["n_features"]
    per_member = features.group_by("dataset", "doc_id", pl.col("feature") // sae["d_sae"]).len()
    assert per_member["len"].max() <= sae["k"]  # TopK: at most k per document in each member
    assert features.select("dataset", "doc_id").n_unique() == 600

    diff = read_table(base, "diff_features", key).collect()
    assert set(diff["family"].unique()) == {"token", "document"}
    document = diff.filter(pl.col("family") == "document")
    top_b = top_features(document, 5)["b"]
    assert top_b.height >= 1, "the planted topic gave no significant B-direction document feature"
    first = int(top_b["feature"][0])
    category = dict(
        read_table(base, "raw_documents", "news_b").select("doc_id", "category").collect().iter_rows()
    )
    strongest = (
        features.filter((pl.col("dataset") == "news_b") & (pl.col("feature") == first))
        .sort("activation", descending=True)
        .head(20)["doc_id"]
        .to_list()
    )
    purity = np.mean([category[d] == topic for d in strongest])
    assert purity >= 0.8, (topic, purity)
    assert top_b["label"][0]  # the report's document features carry their offline label

    report = read_table(base, "diff_reports", key).collect().row(0, named=True)
    assert report["document_significant_b"] >= 1
    markdown = Path(report["report_markdown_path"]).read_text()
    assert "token-level SAE features" in markdown and "document-level features" in markdown


def test_random_halves_of_one_sample_give_no_significant_feature(tmp_path: Path) -> None:
    data = load_dbpedia(DBPEDIA)
    sample = np.random.default_rng(1).choice(data.height, size=600, replace=False)
    lexical = {"ops": {"document_sae": {"config": {"lexical_dims": 128}}}}  # the lexical profile too
    base, key = _run(
        tmp_path, {"half_a": data[sample[:300].tolist()], "half_b": data[sample[300:].tolist()]}, lexical
    )
    sae = read_table(base, "document_sae", key).collect().row(0, named=True)
    # each document's sentence embedding (384) beside its lexical profile, saved beside the SAE
    assert sae["d_in"] == 384 + 128 and (Path(sae["model_path"]) / LEXICAL_PROJECTION_FILE).exists()
    diff = read_table(base, "diff_features", key).collect()
    for family in ("token", "document"):
        part = diff.filter(pl.col("family") == family)
        assert part.height > 0
        assert part["significant"].sum() == 0, (family, part.filter("significant").head())


def test_a_damaged_document_sae_is_set_aside_and_trained_again_to_the_same_features(tmp_path: Path) -> None:
    data = load_dbpedia(DBPEDIA)
    sample = np.random.default_rng(2).choice(data.height, size=160, replace=False)  # small: trained twice
    drops = {"part_a": data[sample[:80].tolist()], "part_b": data[sample[80:].tolist()]}
    base, key = _run(tmp_path, drops)
    sae = read_table(base, "document_sae", key).collect().row(0, named=True)
    folder = Path(sae["model_path"])
    report = json.loads((folder / "training_report.json").read_text())
    assert "member_00/sae_weights.safetensors" in report["files"]  # every saved file is recorded
    before = read_table(base, "document_features", key).collect()
    weights = folder / "member_00" / "sae_weights.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, still loadable: only the checksum tells
    weights.write_bytes(bytes(raw))

    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("comparisons", [key])
    resources = local_resources(tmp_path)
    failed = materialize(
        COMPARISON_ASSETS[:2],
        selection=["document_features"],
        partition_key=key,
        instance=instance,
        resources=resources,
        raise_on_error=False,
    )
    assert not failed.success  # never encodes with weights that are not the trained ones
    error = str(next(e for e in failed.all_events if e.is_step_failure).event_specific_data.error)
    assert "sae_weights.safetensors" in error and "Materialize document_sae" in error

    result = materialize(COMPARISON_ASSETS[:2], partition_key=key, instance=instance, resources=resources)
    warnings = [e.message for e in instance.all_logs(result.run_id) if e.level >= 30 and e.message]
    assert any("damaged" in w and str(folder) in w for w in warnings), warnings
    assert [p.name.split(".")[0] for p in (folder.parent / "quarantine").iterdir()] == [folder.name]
    after = read_table(base, "document_features", key).collect()
    assert after.equals(before)  # trained again from the same documents and seeds: the same features


def test_feature_effects_measure_the_document_features_when_the_comparison_has_a_document_sae(
    tmp_path: Path,
) -> None:
    data = load_dbpedia(DBPEDIA)
    sample = np.random.default_rng(3).choice(data.height, size=120, replace=False)
    drops = {"small_a": data[sample[:60].tolist()], "small_b": data[sample[60:].tolist()]}
    instance, resources, key = _datasets(tmp_path, drops)
    assert materialize(
        [BY_NAME["diff_reports"]], partition_key=key, instance=instance, resources=resources
    ).success
    base = str(tmp_path / "parquet")
    diff = read_table(base, "diff_features", key).filter(pl.col("family") == "token").collect()
    # a token feature that fires in about half the documents: some to edit, some to fix its signature
    freq = pl.max_horizontal("freq_a", "freq_b")
    row = diff.sort((freq - 0.5).abs()).row(0, named=True)
    small = {
        "features": [int(row["feature"])],
        "documents_per_feature": 5,
        "unaffected_documents": 2,
        "reference_documents": 20,
        "n_controls": 2,
        "n_boot": 100,
    }

    def effects_run() -> tuple[pl.DataFrame, dict]:
        run_config = {"ops": {"feature_effects": {"config": small}}}
        result = materialize(
            [BY_NAME["feature_effects"]],
            partition_key=key,
            instance=instance,
            resources=resources,
            run_config=run_config,
        )
        assert result.success
        event = result.asset_materializations_for_node("feature_effects")[0]
        return read_table(base, "feature_effects", key).collect(), event.metadata

    before, metadata = effects_run()  # no document SAE yet: the records are as without the document family
    assert set(before["score_name"]) == {"feature_signature", "comparison_direction"}
    assert metadata["downstream_features_measured"].value is False

    assert materialize(
        [BY_NAME["document_sae"]], partition_key=key, instance=instance, resources=resources
    ).success
    _, metadata = effects_run()  # the default embeddings are the SAE's own layer: not downstream of the edit
    assert metadata["downstream_features_measured"].value is False

    last = {"ops": {"document_embeddings": {"config": {"layer": -1}}}}
    for name in drops:
        assert materialize(
            DATASET_ASSETS,
            selection=["document_embeddings"],
            partition_key=name,
            instance=instance,
            resources=resources,
            run_config=last,
        ).success
    assert materialize(
        [BY_NAME["document_sae"]], partition_key=key, instance=instance, resources=resources
    ).success
    after, metadata = effects_run()  # its inputs changed: measured again, now with the document features
    assert metadata["downstream_features_measured"].value is True
    assert set(after["score_name"]) == {
        "feature_signature",
        "comparison_direction",
        "document_feature_shift",
        "document_features_flipped",
    }
    shift = after.filter(pl.col("score_name") == "document_feature_shift")
    assert set(shift["control_type"]) == {"target", "random_matched", "placebo"}
    placebo = shift.filter(pl.col("control_type") == "placebo").row(0, named=True)
    assert placebo["effect"] == 0.0 and placebo["baseline_score"] == 0.0
    target = shift.filter(pl.col("control_type") == "target").row(0, named=True)
    assert target["documents"] >= 1 and target["effect"] > 0.0
    problems = [
        p for (table, _), schema in stored_schemas(base).items() for p in schema_mismatches(table, schema)
    ]
    assert not problems, problems
