"""Dataset.from_frame: a DataFrame goes through the same assets, cache and storage as a dropped file."""

import json
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
    assert ds.latents().shape == (10, 2048)
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
