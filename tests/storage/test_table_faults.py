"""Faults of table files (issue #13): a segment whose bytes changed but whose size and Parquet footer did
not is found before it is kept; manifests written before checksums keep working and get them on the next
write; single-file writes report their checksum; a disk that fills up mid-write leaves the previous table
whole, and a retry completes."""

from __future__ import annotations

import errno
import hashlib
import json
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from polars.testing import assert_frame_equal

from interp_assets.storage.checksums import bytes_problem, bytes_record, checksum_problem, file_record
from interp_assets.storage.parquet import (
    KEEP,
    MANIFEST,
    SegmentedTable,
    read_manifest,
    read_table,
    stored_segments,
    table_segments,
    write_parquet_atomic,
    write_table,
)
from interp_assets.storage.paths import segments_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _faults import FullDisk, cut_points, flip_inside_data  # noqa: E402

SCHEMA = pa.schema([("dataset", pa.string()), ("doc_id", pa.int32()), ("value", pa.float32())])


def _rows(start: int, n: int) -> pa.Table:
    values = [((i * 2654435761) % 1000) / 7 for i in range(start, start + n)]  # not too compressible
    return pa.table(
        {
            "dataset": ["p"] * n,
            "doc_id": pa.array(range(start, start + n), pa.int32()),
            "value": pa.array(values, pa.float32()),
        },
        schema=SCHEMA,
    )


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_checksum_problem_names_size_then_content(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"hello world")
    record = file_record(str(path))
    assert record == bytes_record(b"hello world") and checksum_problem(str(path), record) is None
    assert checksum_problem(str(path), {}) is None  # nothing recorded, nothing to check
    path.write_bytes(b"hello World")
    assert "content checksum sha256" in checksum_problem(str(path), record)
    assert checksum_problem(str(path), {"bytes": 11}) is None  # size alone cannot see it
    path.write_bytes(b"hello")
    assert checksum_problem(str(path), record) == "5 bytes where 11 were recorded"
    assert bytes_problem(b"hello world", record) is None and bytes_problem(b"hellO world", record)


def test_manifest_and_single_file_writes_record_the_content_checksum(tmp_path):
    base = str(tmp_path)
    write_table(base, "t", "p", SegmentedTable(SCHEMA, {"a": _rows(0, 3), "b": _rows(3, 2)}))
    folder = segments_path(base, "t", "p")
    for entry in read_manifest(folder)["segments"]:
        assert entry["sha256"] == _sha256(f"{folder}/{entry['file']}")
    summary = write_parquet_atomic(str(tmp_path / "single.parquet"), _rows(0, 5))
    assert summary["sha256"] == _sha256(tmp_path / "single.parquet")


def test_a_segment_with_flipped_bytes_is_not_kept_and_is_named(tmp_path):
    base = str(tmp_path)
    write_table(base, "t", "p", SegmentedTable(SCHEMA, {"a": _rows(0, 20_000), "b": _rows(20_000, 10)}))
    before = read_table(base, "t", "p").collect()
    damaged = Path(table_segments(base, "t", "p")["a"])
    flip_inside_data(damaged)  # same size, footer intact: the checks before checksums kept it

    heard: list[str] = []
    assert list(stored_segments(base, "t", "p", SCHEMA, heard.append)) == ["b"]
    (message,) = heard
    assert str(damaged) in message and "content checksum" in message and "written again" in message

    # what the caller does next: writes it again, keeps the sound one
    write_table(base, "t", "p", SegmentedTable(SCHEMA, {"a": _rows(0, 20_000), "b": KEEP}))
    assert_frame_equal(read_table(base, "t", "p").collect(), before)
    assert list(stored_segments(base, "t", "p", SCHEMA)) == ["a", "b"]


def test_a_manifest_without_checksums_still_works_and_gets_them_on_the_next_write(tmp_path):
    base = str(tmp_path)
    write_table(base, "t", "p", SegmentedTable(SCHEMA, {"a": _rows(0, 3), "b": _rows(3, 2)}))
    folder = Path(segments_path(base, "t", "p"))
    manifest = json.loads((folder / MANIFEST).read_text())
    for entry in manifest["segments"]:
        del entry["sha256"]  # as an earlier version wrote it
    (folder / MANIFEST).write_text(json.dumps(manifest))

    assert list(stored_segments(base, "t", "p", SCHEMA)) == ["a", "b"]  # size and footer checked
    meta = write_table(base, "t", "p", SegmentedTable(SCHEMA, {"a": KEEP, "b": KEEP}))
    assert meta["segments_written"] == 0
    for entry in read_manifest(str(folder))["segments"]:
        assert entry["sha256"] == _sha256(folder / entry["file"])


@pytest.mark.parametrize("bad", ["", "xyz", "A" * 64, 5])
def test_a_manifest_with_a_malformed_checksum_is_refused(tmp_path, bad):
    base = str(tmp_path)
    write_table(base, "t", "p", SegmentedTable(SCHEMA, {"a": _rows(0, 3)}))
    path = Path(segments_path(base, "t", "p")) / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["segments"][0]["sha256"] = bad
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not a segment manifest"):
        read_table(base, "t", "p")


def _update() -> SegmentedTable:
    return SegmentedTable(SCHEMA, {"a": KEEP, "c": _rows(10_000, 4_000), "d": _rows(20_000, 2_000)})


def test_a_disk_that_fills_up_mid_write_leaves_the_previous_table_and_a_retry_completes(
    tmp_path, monkeypatch
):
    def stored(base: str) -> None:
        write_table(base, "t", "p", SegmentedTable(SCHEMA, {"a": _rows(0, 5_000), "b": _rows(5_000, 3_000)}))
        write_table(base, "single", None, _rows(0, 3_000))

    clean = str(tmp_path / "clean")
    stored(clean)
    with monkeypatch.context() as m:
        disk = FullDisk().install(m)
        write_table(clean, "t", "p", _update())  # two new segment files, then the manifest
        segmented_files = list(disk.files)
        assert len(segmented_files) == 3  # c, d, the manifest: each is cut
        write_table(clean, "single", None, _rows(50_000, 1_000))
    expected = {t: read_table(clean, t, p).collect() for t, p in (("t", "p"), ("single", None))}

    for budget in cut_points(segmented_files):
        base = str(tmp_path / f"cut{budget}")
        stored(base)
        folder = Path(segments_path(base, "t", "p"))
        manifest, before = (folder / MANIFEST).read_bytes(), read_table(base, "t", "p").collect()
        with monkeypatch.context() as m:
            FullDisk(budget).install(m)
            with pytest.raises(OSError) as failed:
                write_table(base, "t", "p", _update())
        assert failed.value.errno == errno.ENOSPC
        assert (folder / MANIFEST).read_bytes() == manifest, budget  # readers still see the previous table
        assert_frame_equal(read_table(base, "t", "p").collect(), before)
        assert list(stored_segments(base, "t", "p", SCHEMA)) == ["a", "b"], budget  # nothing kept is damaged
        assert not list(folder.glob(".*.tmp")), budget
        write_table(base, "t", "p", _update())  # the retry
        assert_frame_equal(read_table(base, "t", "p").collect(), expected["t"])

    base = str(tmp_path / "cut0")  # a single-file table: the previous file stays until the new one is whole
    before = read_table(base, "single").collect()
    with monkeypatch.context() as m:
        FullDisk(2_000).install(m)
        with pytest.raises(OSError):
            write_table(base, "single", None, _rows(50_000, 1_000))
    assert_frame_equal(read_table(base, "single").collect(), before)
    write_table(base, "single", None, _rows(50_000, 1_000))
    assert_frame_equal(read_table(base, "single").collect(), expected["single"])
