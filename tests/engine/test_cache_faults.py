"""Faults of the activation cache (issue #13), without a model: a chunk whose bytes changed but whose size
and Parquet footer did not is quarantined before its rows are trusted, and its documents count as not
encoded; chunks committed before checksums keep working and get them when first read; a disk that fills
up mid-commit leaves every committed chunk whole, and a retry completes."""

from __future__ import annotations

import errno
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from interp_assets.engine.activation_cache import ActivationCache, token_activations_schema
from interp_assets.engine.activations import EncodedTexts, activation_fields
from interp_assets.ingest import doc_hash

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _faults import FullDisk, cut_points, flip_inside_data  # noqa: E402

FEATURES = 997


def fake_encode(texts: list[str]) -> EncodedTexts:
    """One row per (word, 3 features), deterministic in the text: enough rows for real data pages."""
    cols: dict[str, list] = {k: [] for k in ("doc_index", "token_index", "token", "start", "end", "f", "a")}
    for d, text in enumerate(texts):
        pos = 0
        for t, word in enumerate(text.split()):
            start = text.index(word, pos)
            pos = start + len(word)
            seed = int(doc_hash(word)[:8], 16)
            for f in sorted({(seed >> s) % FEATURES for s in (0, 7, 14)}):
                cols["doc_index"].append(d)
                cols["token_index"].append(t)
                cols["token"].append(word)
                cols["start"].append(start)
                cols["end"].append(pos)
                cols["f"].append(f)
                cols["a"].append(0.5 + (seed % 1000) / 100)
    vocab = sorted(set(cols["token"]))
    token = pa.DictionaryArray.from_arrays(
        pa.array([vocab.index(w) for w in cols["token"]], pa.int32()), pa.array(vocab, pa.string())
    )
    fields = activation_fields("float16")
    acts = pa.table(
        [
            pa.array(cols["doc_index"], pa.int32()),
            pa.array(cols["token_index"], pa.int32()),
            token,
            pa.array(cols["start"], pa.int32()),
            pa.array(cols["end"], pa.int32()),
            pa.array(cols["f"], pa.int32()),
            pa.array(np.array(cols["a"], dtype=np.float16), pa.float16()),
        ],
        names=["doc_index", "token_index", "token", "char_start", "char_end", *(f.name for f in fields)],
    )
    n = len(texts)
    lengths = np.array([len(t.split()) for t in texts], dtype=np.int32)
    return EncodedTexts(acts, lengths + 2, lengths, np.zeros(n, dtype=bool))


def documents(n: int, offset: int = 0) -> pl.DataFrame:
    texts = [f"document {i} says " + " ".join(f"w{(i * 31 + j) % 400}" for j in range(60)) for i in range(n)]
    texts = [f"{offset}: {t}" for t in texts]
    return pl.DataFrame(
        {"doc_id": list(range(n)), "doc_hash": [doc_hash(t) for t in texts], "text": texts}
    ).with_columns(pl.col("doc_id").cast(pl.Int32))


def table(cache: ActivationCache, docs: pl.DataFrame) -> pl.DataFrame:
    schema = token_activations_schema("float16")
    batches = list(cache.iter_token_activations(docs.select("doc_id", "doc_hash"), "d", schema))
    frame = pl.from_arrow(pa.Table.from_batches(batches, schema))
    return frame.sort("doc_id", "token_index", "feature")  # chunk order changes when one is encoded again


@pytest.fixture
def cache_with_two_chunks(tmp_path):
    warnings: list[str] = []
    cache = ActivationCache(tmp_path, "fp", on_warning=warnings.append)
    docs = documents(40)
    stats = cache.encode_missing(fake_encode, docs, max_docs=20)
    assert stats.chunks_written == 2
    return tmp_path / "fp", docs, warnings


def test_committed_chunks_record_the_sums_of_both_files(cache_with_two_chunks):
    folder, _, _ = cache_with_two_chunks
    chunks = ActivationCache(folder.parent, "fp").committed_chunks()
    for chunk in chunks:
        sums = ActivationCache(folder.parent, "fp").chunk_sums(chunk)
        for kind in ("acts", "docs"):
            path = folder / f"{chunk}.{kind}.parquet"
            assert sums[kind]["bytes"] == path.stat().st_size
            assert sums[kind]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_flipped_bytes_in_an_activations_file_quarantine_the_chunk_before_its_rows_are_read(
    cache_with_two_chunks,
):
    folder, docs, _ = cache_with_two_chunks
    expected = table(ActivationCache(folder.parent, "fp"), docs)
    first = sorted(folder.glob("*.acts.parquet"))[0]
    flip_inside_data(first)

    warnings: list[str] = []
    cache = ActivationCache(folder.parent, "fp", on_warning=warnings.append)
    assert cache.document_index().height == 40  # the index reads only footers of activation files
    chunk = first.name.removesuffix(".acts.parquet")
    assert cache.verify_chunks(cache.committed_chunks()) == [chunk]
    (warning,) = warnings
    assert str(folder / chunk) in warning and "content checksum" in warning and "quarantine" in warning
    assert not first.exists() and (folder / "quarantine" / first.name).exists()

    # its documents are no longer cached: encoding again gives the undamaged table
    stats = cache.encode_missing(fake_encode, docs, max_docs=20)
    assert (stats.encoded, stats.reused) == (20, 20)
    assert table(cache, docs).equals(expected)


def test_reading_a_damaged_chunk_directly_quarantines_it_and_says_what_to_do(cache_with_two_chunks):
    folder, docs, _ = cache_with_two_chunks
    first = sorted(folder.glob("*.acts.parquet"))[0]
    flip_inside_data(first)
    warnings: list[str] = []
    cache = ActivationCache(folder.parent, "fp", on_warning=warnings.append)
    with pytest.raises(ValueError, match="moved to quarantine .* run the step again"):
        table(cache, docs)
    assert len(warnings) == 1 and not first.exists()


def test_flipped_bytes_in_a_documents_file_quarantine_the_chunk_when_the_index_is_read(
    cache_with_two_chunks,
):
    folder, docs, _ = cache_with_two_chunks
    first = sorted(folder.glob("*.docs.parquet"))[0]
    flip_inside_data(first, n=1)
    warnings: list[str] = []
    cache = ActivationCache(folder.parent, "fp", on_warning=warnings.append)
    assert cache.document_index().height == 20
    (warning,) = warnings
    assert first.name in warning
    assert not first.exists() and (folder / "quarantine" / first.name).exists()


def test_chunks_committed_before_checksums_are_read_as_before_and_get_sums_when_first_verified(
    cache_with_two_chunks,
):
    folder, docs, _ = cache_with_two_chunks
    expected = table(ActivationCache(folder.parent, "fp"), docs)
    sums = sorted(folder.glob("*.sums.json"))
    recorded = [p.read_bytes() for p in sums]
    for p in sums:
        p.unlink()  # as an earlier version committed them

    warnings: list[str] = []
    cache = ActivationCache(folder.parent, "fp", on_warning=warnings.append)
    assert cache.document_index().height == 40
    assert table(cache, docs).equals(expected) and warnings == []
    assert [p.read_bytes() for p in sorted(folder.glob("*.sums.json"))] == recorded


def test_unreadable_sums_quarantine_their_chunk(cache_with_two_chunks):
    folder, _, _ = cache_with_two_chunks
    sums = sorted(folder.glob("*.sums.json"))[0]
    sums.write_text("{not json")
    warnings: list[str] = []
    assert ActivationCache(folder.parent, "fp", on_warning=warnings.append).document_index().height == 20
    assert sums.name in warnings[0] and not sums.exists()


def test_a_disk_that_fills_up_mid_commit_leaves_committed_chunks_whole_and_a_retry_completes(
    tmp_path, monkeypatch
):
    docs = documents(60)
    clean = ActivationCache(tmp_path / "clean", "fp")
    with monkeypatch.context() as m:
        disk = FullDisk().install(m)
        clean.encode_missing(fake_encode, docs, max_docs=20)
    expected = table(clean, docs)
    assert len(disk.files) == 9  # 3 chunks x (acts, sums, docs): each is cut
    for budget in cut_points(disk.files):  # cuts inside every file of the three chunks
        root = tmp_path / f"cut{budget}"
        warnings: list[str] = []
        with monkeypatch.context() as m:
            FullDisk(budget).install(m)
            with pytest.raises(OSError) as failed:
                ActivationCache(root, "fp").encode_missing(fake_encode, docs, max_docs=20)
        assert failed.value.errno == errno.ENOSPC
        assert not list((root / "fp").glob(".*.tmp")), budget  # the torn file is removed

        retry = ActivationCache(root, "fp", on_warning=warnings.append)
        committed = retry.committed_chunks()
        assert retry.verify_chunks(committed) == [] and warnings == [], budget  # nothing committed is damaged
        stats = retry.encode_missing(fake_encode, docs, max_docs=20)
        assert (stats.reused, stats.encoded) == (20 * len(committed), 60 - 20 * len(committed)), budget
        assert table(retry, docs).equals(expected), budget


def test_files_of_chunks_a_crash_left_uncommitted_are_swept_once_old(cache_with_two_chunks):
    folder, docs, warnings = cache_with_two_chunks
    committed = sorted(p.name for p in folder.iterdir())
    # a crash after the activations (and sums) were written but before the .docs commit marker, and one
    # mid-write (an atomic write's temp file); a third chunk is "in flight" in another process right now
    crashed = [folder / "00000000000000000001-deadbeef0000.acts.parquet", folder / ".x.docs.parquet.ab12.tmp"]
    crashed.append(folder / "00000000000000000001-deadbeef0000.sums.json")
    in_flight = folder / f"{time.time_ns():020d}-cafe00000000.acts.parquet"
    for path in [*crashed, in_flight]:
        path.write_bytes(b"partial")
    hour_ago = time.time() - 2 * 3600
    for path in crashed:
        os.utime(path, (hour_ago, hour_ago))
    cache = ActivationCache(folder.parent, "fp", on_warning=warnings.append)
    stats = cache.encode_missing(fake_encode, docs, max_docs=20)
    assert stats.reused == 40 and stats.chunks_written == 0  # committed chunks untouched and used
    assert not any(p.exists() for p in crashed) and in_flight.exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted([*committed, in_flight.name])
    assert any("never committed" in w and "deadbeef" in w for w in warnings)
    assert cache.sweep_orphans() == []  # nothing old is left; the fresh file waits for its owner
    assert cache.sweep_orphans(min_age_s=0) == [in_flight.name]
