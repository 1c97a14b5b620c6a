"""The activation cache on an S3-compatible store (issue 16), against a real local S3 server (moto's server
mode, the `s3_server` fixture), without a model (test_cache_faults.fake_encode): chunks commit as whole
objects with their sums, an unchanged set encodes nothing, a damaged chunk is quarantined and encoded
again, uncommitted objects are swept only once old, and two writer processes commit into one cache at
once (locally and on S3) while a reader never sees a half-committed chunk."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

from interp_assets.engine.activation_cache import CHUNK_FILES, ActivationCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _cache_writer import PER_CHUNK, TOTAL  # noqa: E402
from _faults import flip_inside_data  # noqa: E402
from test_cache_faults import documents, fake_encode, table  # noqa: E402

WRITER = Path(__file__).resolve().parents[1] / "_cache_writer.py"


def _objects(url: str) -> dict[str, bytes]:
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in fs.ls(path, detail=False) if fs.isfile(p)}


def test_chunks_on_s3_commit_whole_with_their_sums_and_read_like_local_ones(s3_base, tmp_path):
    docs = documents(40)
    local = ActivationCache(tmp_path, "fp")
    local.encode_missing(fake_encode, docs, max_docs=20)
    cache = ActivationCache(f"{s3_base}/cache", "fp")
    assert cache.dir is None and cache.location == f"{s3_base}/cache/fp"
    stats = cache.encode_missing(fake_encode, docs, max_docs=20)
    assert (stats.encoded, stats.chunks_written) == (40, 2)

    objects = _objects(cache.location)
    chunks = cache.committed_chunks()
    assert len(chunks) == 2 and set(objects) == {f"{c}{s}" for c in chunks for s in CHUNK_FILES}
    for chunk in chunks:
        sums = cache.chunk_sums(chunk)
        for kind in ("acts", "docs"):
            body = objects[f"{chunk}.{kind}.parquet"]
            assert sums[kind] == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert table(cache, docs).equals(table(local, docs))
    assert cache.stored_activation_dtype() == "float16"

    again = ActivationCache(f"{s3_base}/cache", "fp")
    stats = again.encode_missing(fake_encode, docs, max_docs=20)
    assert (stats.reused, stats.chunks_written) == (40, 0)
    status = again.activation_status(docs.select("doc_id", "doc_hash"), "d")
    assert set(status.column("status").to_pylist()) == {"encoded"}


def test_a_damaged_chunk_on_s3_is_quarantined_and_its_documents_encoded_again(s3_base, tmp_path):
    docs = documents(40)
    root = f"{s3_base}/cache"
    ActivationCache(root, "fp").encode_missing(fake_encode, docs, max_docs=20)
    expected = table(ActivationCache(root, "fp"), docs)
    warnings: list[str] = []
    cache = ActivationCache(root, "fp", on_warning=warnings.append)
    chunk = cache.committed_chunks()[0]
    fs, folder = fsspec.core.url_to_fs(cache.location)
    local = tmp_path / "acts.parquet"
    local.write_bytes(fs.cat_file(f"{folder}/{chunk}.acts.parquet"))
    flip_inside_data(local)  # same size, footer intact
    fs.pipe_file(f"{folder}/{chunk}.acts.parquet", local.read_bytes())

    assert cache.verify_chunks(cache.committed_chunks()) == [chunk]
    (warning,) = warnings
    assert f"{cache.location}/{chunk}" in warning and "content checksum" in warning
    assert set(_objects(f"{cache.location}/quarantine")) == {f"{chunk}{s}" for s in CHUNK_FILES}
    stats = cache.encode_missing(fake_encode, docs, max_docs=20)
    assert (stats.encoded, stats.reused) == (20, 20)
    assert table(cache, docs).equals(expected)


def test_uncommitted_objects_on_s3_are_swept_only_once_old(s3_base):
    root = f"{s3_base}/cache"
    warnings: list[str] = []
    cache = ActivationCache(root, "fp", on_warning=warnings.append)
    cache.encode_missing(fake_encode, documents(10), max_docs=5)
    committed = set(_objects(cache.location))
    fs, folder = fsspec.core.url_to_fs(cache.location)
    crashed = ["00000000000000000001-deadbeef0000.acts.parquet", ".x.docs.parquet.ab12.tmp"]
    for name in crashed:
        fs.pipe_file(f"{folder}/{name}", b"partial")
    assert cache.sweep_orphans() == []  # young: may be another process's chunk in flight
    assert sorted(cache.sweep_orphans(min_age_s=0)) == sorted(crashed)
    assert set(_objects(cache.location)) == committed
    assert any("never committed" in w and "deadbeef" in w for w in warnings)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "s3":
        return f"{request.getfixturevalue('s3_base')}/cache"
    return str(tmp_path / "cache")


def test_two_writer_processes_commit_into_one_cache_and_a_reader_sees_only_committed_chunks(root, tmp_path):
    """Writers encode documents 0-59 and 30-89 of 90 (30 in common), 5 per chunk, at the same time."""
    writers = [
        subprocess.Popen(
            [sys.executable, str(WRITER), root, str(start), str(stop)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=os.environ.copy(),
        )
        for start, stop in ((0, 60), (30, TOTAL))
    ]
    warnings: list[str] = []
    reader = ActivationCache(root, "fp", on_warning=warnings.append)
    seen = [0]
    try:
        while any(w.poll() is None for w in writers):
            height = reader.document_index().height  # every chunk it lists is whole: none is quarantined
            assert height >= seen[-1] and warnings == []
            seen.append(height)
    finally:
        outputs = [w.communicate(timeout=120) for w in writers]
    stats = []
    for w, (out, err) in zip(writers, outputs, strict=True):
        assert w.returncode == 0, err.decode()
        stats.append(json.loads(out.decode().splitlines()[-1]))
    assert all(s["encoded"] + s["reused"] == 60 for s in stats)

    docs = documents(TOTAL)
    cache = ActivationCache(root, "fp", on_warning=warnings.append)
    assert cache.document_index().height == TOTAL and warnings == []
    chunks = cache.committed_chunks()
    assert len(chunks) == sum(s["chunks_written"] for s in stats)
    assert cache.verify_chunks(chunks) == []
    reference = ActivationCache(tmp_path / "reference", "fp")
    reference.encode_missing(fake_encode, docs, max_docs=PER_CHUNK)
    assert table(cache, docs).equals(table(reference, docs))
    names = set(_objects(cache.location)) if cache.dir is None else {p.name for p in cache.dir.iterdir()}
    assert names == {f"{c}{s}" for c in chunks for s in CHUNK_FILES}  # nothing half-committed is left
    print(f"reader saw {len(set(seen))} states: {sorted(set(seen))}")
