"""Dataset.from_frame: a DataFrame goes through the same assets, cache and storage as a dropped file."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from interp_assets.notebook import Dataset
from resources.sae_reader import SAEReaderResource

ROOT = Path(__file__).resolve().parents[2]


def _frame(n: int = 10) -> pl.DataFrame:
    rows = [
        json.loads(line)
        for line in (ROOT / "demo/landing/support_assistant_a.jsonl").read_text().splitlines()[:n]
    ]
    return pl.DataFrame({"body": [r["text"] for r in rows], "csat": [r["csat"] for r in rows]})


def test_a_polars_frame_becomes_an_asset_partition(tmp_path: Path) -> None:
    frame = _frame()
    ds = Dataset.from_frame(
        frame, text="body", data_dir=str(tmp_path), reader=SAEReaderResource(device="cpu")
    )
    assert ds.name.startswith("frame_") and len(ds) == 10
    assert ds.latents().shape == (10, 4096)
    again = Dataset.load(ds.name, data_dir=str(tmp_path))  # the same partition, read back
    assert (again.latents() != ds.latents()).nnz == 0
    assert "csat" in again.documents.columns
    assert (tmp_path / "parquet" / "token_activations" / ds.name / "_manifest.json").exists()


def test_a_pandas_frame_with_the_same_texts_is_the_same_dataset(tmp_path: Path) -> None:
    reader = SAEReaderResource(device="cpu")
    first = Dataset.from_frame(_frame(), text="body", data_dir=str(tmp_path), reader=reader)
    chunks = sorted((tmp_path / "cache" / "activations").rglob("*.acts.parquet"))
    second = Dataset.from_frame(_frame().to_pandas(), text="body", data_dir=str(tmp_path), reader=reader)
    assert second.name == first.name
    assert sorted((tmp_path / "cache" / "activations").rglob("*.acts.parquet")) == chunks  # nothing encoded
    np.testing.assert_array_equal(second.latents().toarray(), first.latents().toarray())


class _InterruptedReader(SAEReaderResource):
    """The reader of a user who interrupts the kernel as the encoding step starts."""

    def get_identity(self):
        os.kill(os.getpid(), signal.SIGINT)  # Dagster's handler turns it into the step's interruption
        return super().get_identity()


def test_an_interrupted_frame_stops_the_call_and_calling_again_goes_on(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt, match="interrupted; what was saved is kept"):
        Dataset.from_frame(_frame(), text="body", data_dir=str(tmp_path), reader=_InterruptedReader())
    ds = Dataset.from_frame(_frame(), text="body", data_dir=str(tmp_path), reader=SAEReaderResource())
    assert len(ds) == 10 and ds.latents().shape == (10, 4096)


def test_bad_frames_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no text column 'text'.*\['body', 'csat'\]"):
        Dataset.from_frame(_frame(), data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no rows"):
        Dataset.from_frame(_frame().head(0), text="body", data_dir=str(tmp_path))
    with pytest.raises(TypeError, match="pandas or polars DataFrame"):
        Dataset.from_frame([{"text": "a"}], data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="dataset name"):
        Dataset.from_frame(_frame(), text="body", name="../escape", data_dir=str(tmp_path))


def test_label_and_score_a_feature_from_the_notebook(tmp_path: Path) -> None:
    ds = Dataset.from_frame(
        _frame(80), text="body", data_dir=str(tmp_path), reader=SAEReaderResource(device="cpu")
    )
    counts = np.asarray((ds.latents() > 0).sum(axis=0)).ravel()
    feature = int(np.flatnonzero((counts >= 25) & (counts <= 55))[0])  # fires in some documents, not all
    row = ds.label_feature(feature, n_evidence=10, n_holdout=20)
    assert row["feature"] == feature and row["label"] and row["source"] == "offline:log-odds"
    assert len(row["evidence_doc_ids"]) > 0
    scores = ds.score_feature(feature, row, n_evidence=10, n_holdout=20, n_boot=100)
    assert scores["method"].to_list() == ["embedding"] and scores["label"][0] == row["label"]
    assert scores["n_positive"][0] > 0 and scores["n_negative"][0] > 0
    mine = ds.score_feature(feature, "weather forecasts", n_evidence=10, n_holdout=20, n_boot=100)
    assert mine["label"][0] == "weather forecasts" and mine["n_examples"][0] == scores["n_examples"][0]
    with pytest.raises(ValueError, match="outside this SAE"):
        ds.label_feature(5000)


def test_interp_embeds_readme_workflow_runs_with_the_migration_tables_names(tmp_path: Path) -> None:
    """interp_embed's quickstart and "commonly used methods", with the README's migration table."""
    df = _frame(60).rename({"body": "text"}).to_pandas()  # 2. prepare your data as a DataFrame
    # 3. create the dataset (interp_embed: Dataset(data=df, sae=sae, field="text", save_path=...))
    dataset = Dataset.from_frame(
        df, text="text", data_dir=str(tmp_path), reader=SAEReaderResource(device="cpu")
    )
    # 4. load it later without recomputation (interp_embed: Dataset.load_from_file(path))
    dataset = Dataset.load(dataset.name, data_dir=str(tmp_path))
    embeddings = dataset.latents()  # sparse (documents x features)
    assert embeddings.shape == (60, 4096)
    labels = dataset.feature_labels()  # stored labels (none yet: an empty frame with the columns)
    assert "label" in labels.columns
    counts = np.asarray((embeddings > 0).sum(axis=0)).ravel()
    feature = int(np.flatnonzero((counts >= 15) & (counts <= 45))[0])
    new_label = dataset.label_feature(feature=feature, n_evidence=10, n_holdout=10)  # sync here
    assert new_label["label"]
    annotated = dataset.row(0).token_activations(feature=feature)  # interp_embed: dataset[0].token_...
    assert annotated.replace("<<", "").replace(">>", "") == dataset.row(0).text
    top_documents = dataset.top_documents_for_feature(feature=feature)
    assert top_documents.height == 10 and "<<" in dataset.highlight(
        doc_id=int(top_documents["doc_id"][0]), feature=feature
    )
