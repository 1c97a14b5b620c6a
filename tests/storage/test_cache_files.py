"""Whole-file caches (document embeddings, labels, scores) verify their content before trusting it: a file
with flipped bytes, a truncated one or one that cannot be parsed is quarantined with a warning naming it,
the cache starts empty and its entries are computed again; a crash between the record and the file, or
two writers racing, never costs a good file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from interp_assets.defs.shared import cached_document_embeddings
from interp_assets.ingest import doc_hash
from interp_assets.labels.embedding import DEFAULT_EMBEDDING_MODEL
from interp_assets.labels.labeling import Label, LabelCache
from interp_assets.labels.scoring import ScoreCache
from interp_assets.storage.cache_files import load_cache_file, sums_path, write_cache_file
from interp_assets.storage.checksums import bytes_record
from resources.storage import StorageResource
from tests._faults import flip_inside_data


def _labels(path: Path, n: int, warnings: list[str] | None = None) -> LabelCache:
    cache = LabelCache(path, on_warning=None if warnings is None else warnings.append)
    labels = [Label(f"label {i}", f"About {i}.", "offline") for i in range(n)]
    cache.put_many([("sae", i, f"h{i}", "offline", label) for i, label in enumerate(labels)])
    return cache


def _scores(path: Path, n: int) -> ScoreCache:
    cache = ScoreCache(path)
    cache.put_many({f"key{i}": {"auc": 0.5 + i / 1000, "status": "ok"} for i in range(n)})
    return cache


def test_a_written_cache_file_reads_back_and_keeps_the_last_records(tmp_path: Path) -> None:
    path = tmp_path / "c.bin"
    for i in range(6):
        write_cache_file(path, f"version {i}".encode())
    assert load_cache_file(path, bytes, "test cache") == b"version 5"
    records = json.loads(sums_path(path).read_bytes())["records"]
    assert records[0] == bytes_record(b"version 5") and len(records) == 4  # newest first, a few kept


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_a_damaged_label_cache_is_quarantined_and_labeled_again(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "cache" / "labels.parquet"
    _labels(path, 300)
    good = path.read_bytes()
    if damage == "flip":
        flip_inside_data(path)  # same size, readable footer: only the checksum tells
    elif damage == "truncate":
        path.write_bytes(good[: len(good) // 2])
    else:
        path.write_bytes(b"\x00" * len(good))
    warnings: list[str] = []
    cache = LabelCache(path, on_warning=warnings.append)
    assert len(cache) == 0  # nothing damaged is ever served
    assert len(warnings) == 1 and "label cache" in warnings[0] and str(path) in warnings[0]
    quarantined = sorted(p.name for p in (path.parent / "quarantine").iterdir())
    assert [n.split(".parquet")[0] for n in quarantined] == ["labels", "labels"]  # the file and its record
    # the next run labels again and its cache is whole
    _labels(path, 300)
    again = LabelCache(path)
    assert len(again) == 300
    assert again.get("sae", 7, "h7", "offline") == Label("label 7", "About 7.", "offline")


def test_a_score_cache_with_flipped_bytes_is_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "scores" / "d.parquet"
    _scores(path, 400)
    flip_inside_data(path)
    warnings: list[str] = []
    assert len(ScoreCache(path, on_warning=warnings.append)) == 0
    assert "score cache" in warnings[0] and str(path) in warnings[0]
    _scores(path, 400)
    assert ScoreCache(path).get("key3")["auc"] == 0.503


def test_a_crash_between_the_record_and_the_file_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "labels.json"
    _labels(path, 3)
    old = path.read_bytes()
    # the next write recorded its content, then the process died before replacing the file
    new = json.dumps([{"sae_id": "x", "feature": 1, "evidence_hash": "h", "labeler": "l", "label": "n",
                       "description": "N.", "source": "l"}]).encode()  # fmt: skip
    write_cache_file(path, new)
    path.write_bytes(old)
    cache = LabelCache(path)
    assert len(cache) == 3 and not (tmp_path / "quarantine").exists()


def test_two_writers_racing_leave_a_file_its_record_vouches_for(tmp_path: Path) -> None:
    path = tmp_path / "c.bin"
    write_cache_file(path, b"first")
    # writer 1 records "one"; writer 2 records "two" and replaces the file; writer 1 then replaces it
    write_cache_file(path, b"one")
    write_cache_file(path, b"two")
    path.write_bytes(b"one")
    assert load_cache_file(path, bytes, "test cache") == b"one"


def test_a_cache_written_before_records_is_trusted_when_it_parses_and_gets_a_record(tmp_path: Path) -> None:
    path = tmp_path / "scores.parquet"
    pl.DataFrame({"key": ["k"], "metrics": [json.dumps({"auc": 0.9})]}).write_parquet(path)
    assert ScoreCache(path).get("k") == {"auc": 0.9}
    assert json.loads(sums_path(path).read_bytes())["records"] == [bytes_record(path.read_bytes())]


def test_unreadable_records_quarantine_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.bin"
    write_cache_file(path, b"content")
    sums_path(path).write_text("{not json")
    warnings: list[str] = []
    assert load_cache_file(path, bytes, "test cache", warnings.append) is None
    assert "sums.json" in warnings[0] and not path.exists()


def test_a_damaged_embeddings_cache_is_quarantined_and_the_embeddings_computed_again(tmp_path: Path) -> None:
    storage = StorageResource(data_dir=str(tmp_path / "data"))
    animals = ["cat", "dog", "owl", "fox"] * 5
    texts = [f"The {w} sat on the mat near window {i}." for i, w in enumerate(animals)]
    docs = pl.DataFrame({"doc_hash": [doc_hash(t) for t in texts], "text": texts})
    model = DEFAULT_EMBEDDING_MODEL
    first, computed = cached_document_embeddings(storage, docs, model)
    assert computed == len(texts)
    (path,) = (storage.cache_dir / "embeddings").glob("*/*.parquet")  # one part, written by the first call
    flip_inside_data(path)
    warnings: list[str] = []
    again, computed = cached_document_embeddings(storage, docs, model, log=warnings.append)
    assert computed == len(texts)  # nothing damaged was reused
    assert any("document embeddings cache" in w and str(path) in w for w in warnings)
    np.testing.assert_allclose(again, first, atol=1e-6)
    third, computed = cached_document_embeddings(storage, docs, model)
    assert computed == 0
    np.testing.assert_array_equal(third, again)
