"""Tables on an S3-compatible store (issue 16), against a real local S3 server (moto's server mode, the
`s3_server` fixture): segmented partitions (KEEP, retention, a crash before the manifest swap, damaged
segments, layout switches); two writer processes on one partition at once, locally and on S3: every
write counts once in the manifest chain, readers only ever see one whole version, and no file is left
that no manifest lists; DuckDB views over the objects; and the embedding chain (the embedded default
reader) with its tables and activation cache on S3, equal to a local run. The IO manager's own tests run
on S3 too (test_parquet_io_manager.py), the activation cache's in tests/engine/test_cache_s3.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance, materialize
from dagster_duckdb import DuckDBResource
from polars.testing import assert_frame_equal

from interp_assets.defs.assets import ALL_ASSETS
from interp_assets.storage.parquet import (
    KEEP,
    MANIFEST,
    SegmentedTable,
    StreamedTable,
    read_manifest,
    read_table,
    stored_segments,
    table_exists,
    table_files,
    table_segments,
    write_table,
)
from interp_assets.storage.paths import segments_path, table_path
from interp_assets.warehouse import query, refresh_views
from io_managers.parquet import ParquetIOManager
from resources.local import local_resources
from resources.storage import StorageResource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _faults import flip_inside_data  # noqa: E402
from _table_writer import ROWS  # noqa: E402

WRITER = Path(__file__).resolve().parents[1] / "_table_writer.py"
SCHEMA = pa.schema([("dataset", pa.string()), ("doc_id", pa.int32()), ("value", pa.float32())])
WRITES = 12  # per writer


def _rows(start: int, n: int) -> pa.Table:
    values = [((i * 2654435761) % 1000) / 7 for i in range(start, start + n)]
    return pa.table(
        {
            "dataset": ["p"] * n,
            "doc_id": pa.array(range(start, start + n), pa.int32()),
            "value": pa.array(values, pa.float32()),
        },
        schema=SCHEMA,
    )


def _names(folder: str) -> set[str]:
    fs, path = fsspec.core.url_to_fs(folder)
    fs.invalidate_cache()
    return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}


def _doc_ids(base: str) -> list[int]:
    return read_table(base, "t", "p").collect()["doc_id"].to_list()


def _crashing(after: int) -> Iterator[pa.RecordBatch]:
    yield from _rows(100, after).to_batches()
    raise RuntimeError("simulated crash mid-segment")


def test_segmented_partitions_on_s3(s3_base, tmp_path):
    base = f"{s3_base}/parquet"
    folder = segments_path(base, "t", "p")
    first = write_table(base, "t", "p", SegmentedTable(SCHEMA, {"a": _rows(0, 3), "b": _rows(3, 20_000)}))
    assert first["path"] == folder and (first["segments_written"], first["row_count"]) == (2, 20_003)
    assert all(f.startswith(f"{folder}/") for f in table_files(base, "t", "p"))
    files = _names(folder)

    # KEEP a, replace b: b's object stays for readers of the previous manifest, one more write
    second = write_table(base, "t", "p", SegmentedTable(SCHEMA, {"a": KEEP, "c": _rows(50, 4)}))
    assert (second["segments_written"], second["segments_kept"]) == (1, 1)
    assert _doc_ids(base) == [0, 1, 2, 50, 51, 52, 53]
    assert files <= _names(folder) and read_manifest(folder)["version"] == 2

    # a crash while writing a segment: the previous table, and no object of the torn write
    before = _names(folder)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_table(
            base, "t", "p", SegmentedTable(SCHEMA, {"a": KEEP, "d": StreamedTable(SCHEMA, _crashing(2))})
        )
    assert _names(folder) == before and _doc_ids(base) == [0, 1, 2, 50, 51, 52, 53]

    # the next write deletes b (replaced two writes ago)
    write_table(base, "t", "p", SegmentedTable(SCHEMA, {"a": KEEP, "c": KEEP}))
    assert {n.split(".")[0] for n in _names(folder)} == {"a", "c", MANIFEST.split(".")[0]}

    # a segment whose bytes changed on the store (size and footer kept) is not kept, and is named
    damaged = table_segments(base, "t", "p")["a"]
    local = tmp_path / "a.parquet"
    fs, path = fsspec.core.url_to_fs(damaged)
    local.write_bytes(fs.cat_file(path))
    flip_inside_data(local, n=1)
    fs.pipe_file(path, local.read_bytes())
    heard: list[str] = []
    assert list(stored_segments(base, "t", "p", SCHEMA, heard.append)) == ["c"]
    assert damaged in heard[0] and "content checksum" in heard[0]

    # switching to the single-file layout removes the folder; back to segments removes the file
    write_table(base, "t", "p", _rows(7, 2))
    assert not table_exists(base, "t", "other") and _doc_ids(base) == [7, 8]
    assert table_files(base, "t", "p") == [table_path(base, "t", "p")] and "p" not in _names(f"{base}/t")
    write_table(base, "t", "p", SegmentedTable(SCHEMA, {"a": _rows(0, 1)}))
    assert _names(f"{base}/t") == {"p"} and _doc_ids(base) == [0]
    with fsspec.open(table_files(base, "t", "p")[0], "rb") as f:
        assert pq.read_metadata(f).num_rows == 1


def test_duckdb_views_read_tables_on_s3_through_fsspec(s3_base, tmp_path, monkeypatch):
    """DuckDB's httpfs extension is not installed here (it is downloaded at run time): the warehouse lets
    DuckDB read the objects through the platform's own fsspec filesystem instead."""
    base, db = f"{s3_base}/parquet", str(tmp_path / "warehouse.duckdb")
    write_table(base, "t", "a", SegmentedTable(SCHEMA, {"s1": _rows(0, 3), "s2": _rows(3, 4)}))
    write_table(base, "t", "b", _rows(10, 5))  # a partition in the single-file layout
    write_table(base, "flat", None, _rows(0, 2))
    assert refresh_views(db, base, ["t", "flat"]) == {"t": 12, "flat": 2}
    sql = "select count(*) as n, sum(doc_id) as s from t"
    assert query(db, sql, parquet_base=base).row(0) == (12, sum(range(7)) + sum(range(10, 15)))
    # a view one write behind still reads: the replaced segment is kept for one more write
    write_table(base, "t", "a", SegmentedTable(SCHEMA, {"s1": KEEP, "s3": _rows(50, 1)}))
    monkeypatch.setenv("INTERP_PARQUET_BASE", base)  # what `make sql` reads
    assert query(db, "select count(*) as n from t")["n"][0] == 12
    assert refresh_views(db, base, ["t"]) == {"t": 9}
    assert query(db, "select count(*) as n from flat")["n"][0] == 2


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path) -> str:
    if request.param == "s3":
        return f"{request.getfixturevalue('s3_base')}/parquet"
    return str(tmp_path / "parquet")


def test_two_writers_of_one_partition_lose_no_write_and_readers_see_whole_versions(base):
    """Two processes write 12 versions each of one partition while this one reads it in a loop."""
    from _table_writer import version

    write_table(base, "t", "p", version(0))
    writers = [
        subprocess.Popen(
            [sys.executable, str(WRITER), base, str(w), str(WRITES)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=os.environ.copy(),
        )
        for w in (1, 2)
    ]
    reads, tags_seen, behind = 0, set(), 0
    try:
        while any(w.poll() is None for w in writers):
            try:
                frame = read_table(base, "t", "p").collect()
            except FileNotFoundError:
                behind += 1  # resolved a manifest two writes old: its files may be gone, read again
                continue
            tags = set(frame["tag"].to_list())
            assert len(tags) == 1, f"a read mixed versions {sorted(tags)}"  # never a torn table
            assert frame["row"].to_list() == list(range(sum(ROWS)))  # and always a whole one
            tags_seen |= tags
            reads += 1
    finally:
        outputs = [w.communicate(timeout=120) for w in writers]
    for w, (out, err) in zip(writers, outputs, strict=True):
        assert w.returncode == 0, err.decode()
        assert out.decode().count(" wrote ") == WRITES

    folder = segments_path(base, "t", "p")
    manifest = read_manifest(folder)
    # each manifest replaced exactly the one it was built on: every write counted once
    assert manifest["version"] == 1 + 2 * WRITES
    last = {e["name"].split("-")[0] for e in manifest["segments"]}
    assert last in ({f"t{1000 + WRITES - 1}"}, {f"t{2000 + WRITES - 1}"})
    assert len(manifest["retained"]) == 2  # the version before it, for readers that resolved it
    # every other version's files were deleted: none was left unlisted by a lost manifest
    listed = {e["file"] for e in manifest["segments"] + manifest["retained"]}
    assert _names(folder) == listed | {MANIFEST}
    assert reads > 0 and tags_seen, (reads, behind)
    print(f"{reads} whole reads of {len(tags_seen)} versions; {behind} reads retried")


# --------------------------------------------------------------------------------------- asset level


def test_the_embedding_chain_with_tables_and_cache_on_s3_equals_a_local_run(s3_base, tmp_path):
    """raw_documents -> token_activations -> pooled_embeddings of 24 SST-2 sentences (the embedded default
    reader on CPU) with INTERP_PARQUET_BASE and INTERP_ACTIVATION_CACHE on the S3 server: the same tables
    as a local run, and a second run of the same drop encodes and writes nothing."""
    sst2 = Path(__file__).resolve().parents[3] / "shared" / "data" / "sst2" / "train.tsv"
    if not sst2.is_file():
        pytest.skip(f"shared SST-2 data not found at {sst2} (expected beside the repository clone)")
    lines = sst2.read_text(encoding="utf-8").splitlines()[1:]
    rows = (line.split("\t")[0].strip() for line in lines[6000:6100])
    texts = list(dict.fromkeys(t for t in rows if t))[:24]
    by_name = {k.to_user_string(): a for a in ALL_ASSETS for k in a.keys}
    chain = [by_name[n] for n in ("raw_documents", "token_activations", "pooled_embeddings")]
    base, cache = f"{s3_base}/parquet", f"{s3_base}/cache/activations"

    def run(data: Path, remote: bool):
        (data / "landing").mkdir(parents=True, exist_ok=True)
        (data / "landing" / "ds.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        overrides = {}
        if remote:
            overrides = {
                "storage": StorageResource(
                    data_dir=str(data), parquet_base_url=base, activation_cache_url=cache
                ),
                "parquet_io_manager": ParquetIOManager(base_path=base),
                "duckdb": DuckDBResource(database=str(data / "warehouse.duckdb")),
            }
        instance = DagsterInstance.ephemeral()
        instance.add_dynamic_partitions("datasets", ["ds"])
        result = materialize(
            chain, partition_key="ds", instance=instance, resources=local_resources(data, **overrides)
        )
        assert result.success
        return result

    def tables(parquet_base: str) -> dict[str, pl.DataFrame]:
        sort = {
            "token_activations": ["doc_id", "token_index", "feature"],
            "pooled_embeddings": ["doc_id", "feature"],
            "activation_status": ["doc_id"],
        }
        return {
            t: read_table(parquet_base, t, "ds")
            .collect()
            .with_columns(pl.col(pl.Categorical).cast(pl.String))
            .sort(s)
            for t, s in sort.items()
        }

    run(tmp_path / "local", remote=False)
    run(tmp_path / "remote", remote=True)
    local, remote = tables(str(tmp_path / "local" / "parquet")), tables(base)
    for table in local:
        assert remote[table].height >= len(texts)
        assert_frame_equal(remote[table], local[table])
    # tables and the activation cache are on the store; the embeddings cache stays local (StorageResource)
    assert not (tmp_path / "remote" / "parquet").exists()
    assert not (tmp_path / "remote" / "cache" / "activations").exists()
    assert _names(cache)  # the cache's fingerprint folder is on the store

    again = run(tmp_path / "remote", remote=True)
    meta = {
        k: v.value
        for k, v in next(
            e
            for e in again.asset_materializations_for_node("token_activations")
            if e.asset_key.path == ["token_activations"]
        ).metadata.items()
    }
    assert meta["encoded_now"] == 0 and meta["segments_written"] == 0
