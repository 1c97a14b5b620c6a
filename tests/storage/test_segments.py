"""Segmented partitions (issue #6): token_activations and pooled_embeddings are stored as one Parquet
file per segment plus `_manifest.json`, so a re-run writes only the segments whose documents changed.

IO level (no model): write order, KEEP, retention and clean-up, a failure before the manifest swap, layout
switches, `memory://`, DuckDB views and the notebook over segmented tables. Asset level (the embedded
default reader on CPU, real Dagster runs, real SST-2 sentences): an unchanged drop writes no segment,
added documents write one new segment per table and give the tables of a from-scratch run, removed
documents rewrite only their segment, and a crash mid-write leaves the previous table.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from dagster import DagsterInstance, materialize
from dagster_duckdb import DuckDBResource
from polars.testing import assert_frame_equal

from interp_assets.defs.assets import ALL_ASSETS, WAREHOUSE_TABLES
from interp_assets.engine.activation_cache import ActivationCache
from interp_assets.engine.pooling import pool_token_activations
from interp_assets.notebook import Dataset
from interp_assets.storage.parquet import (
    DEBRIS_AGE_S,
    KEEP,
    MANIFEST,
    SegmentedTable,
    StreamedTable,
    read_manifest,
    read_table,
    read_token_activations_wide,
    stored_segments,
    table_exists,
    table_files,
    with_tokens,
    write_table,
)
from interp_assets.storage.paths import segments_path, table_path
from interp_assets.warehouse import query, refresh_views
from io_managers.parquet import ParquetIOManager
from resources.local import local_resources
from resources.storage import StorageResource

ROOT = Path(__file__).resolve().parents[2]
SST2 = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"
SCHEMA = pa.schema([("dataset", pa.string()), ("doc_id", pa.int32()), ("value", pa.float32())])
BY_NAME = {k.to_user_string(): a for a in ALL_ASSETS for k in a.keys}
EMBED = [BY_NAME[n] for n in ("raw_documents", "token_activations", "pooled_embeddings")]
SEGMENTED = ("token_activations", "tokens", "pooled_embeddings")
SORT = {
    "token_activations": ["doc_id", "token_index", "feature"],
    "tokens": ["doc_id", "token_index"],
    "pooled_embeddings": ["doc_id", "feature"],
}


def _rows(start: int, n: int, dataset: str = "p") -> pa.Table:
    return pa.table(
        {
            "dataset": [dataset] * n,
            "doc_id": pa.array(range(start, start + n), pa.int32()),
            "value": pa.array([i / 4 for i in range(start, start + n)], pa.float32()),
        },
        schema=SCHEMA,
    )


def _segment_files(folder: str | Path) -> dict[str, int]:
    """Every file in a partition folder but the manifest: name -> modification time (ns)."""
    return {p.name: p.stat().st_mtime_ns for p in Path(folder).iterdir() if p.name != MANIFEST}


def _doc_ids(base: str, table: str, partition: str = "p") -> list[int]:
    return read_table(base, table, partition).collect()["doc_id"].to_list()


# ------------------------------------------------------------------------------------------ IO level


def test_keep_reuses_files_and_replaced_segments_outlive_one_more_write(tmp_path):
    base = str(tmp_path)
    folder = segments_path(base, "t", "p")
    first = write_table(base, "t", "p", SegmentedTable(SCHEMA, {"a": _rows(0, 3), "b": _rows(3, 2)}))
    assert (first["row_count"], first["segments_written"], first["segments_kept"]) == (5, 2, 0)
    assert first["path"] == folder and first["size_bytes"] == sum(
        os.path.getsize(f) for f in table_files(base, "t", "p")
    )
    assert "| p | 0 | 0.0 |" in first["preview"]
    assert _doc_ids(base, "t") == [0, 1, 2, 3, 4]  # segments in the mapping's order
    files = _segment_files(folder)
    by_name = {n.split(".")[0]: n for n in files}

    # `a` kept (same file, untouched), `b` replaced by `c`: b's file stays for readers of the old manifest
    second = write_table(base, "t", "p", SegmentedTable(SCHEMA, {"a": KEEP, "c": pl.DataFrame(_rows(10, 4))}))
    assert (second["row_count"], second["segments_written"], second["segments_kept"]) == (7, 1, 1)
    assert _doc_ids(base, "t") == [0, 1, 2, 10, 11, 12, 13]
    after = _segment_files(folder)
    assert after[by_name["a"]] == files[by_name["a"]] and by_name["b"] in after
    manifest = read_manifest(folder)
    assert [e["name"] for e in manifest["segments"]] == ["a", "c"]
    assert [e["file"] for e in manifest["retained"]] == [by_name["b"]]
    assert manifest["rows"] == 7 and manifest["columns"][1] == ["doc_id", "int32"]
    assert set(stored_segments(base, "t", "p", SCHEMA)) == {"a", "c"}

    # nothing new: only the manifest is written, and b (replaced two writes ago) is deleted
    third = write_table(base, "t", "p", SegmentedTable(SCHEMA, {"a": KEEP, "c": KEEP}))
    assert (third["segments_written"], third["rows_written"], third["row_count"]) == (0, 0, 7)
    assert "| p | 0 | 0.0 |" in third["preview"]  # read from the kept file
    assert _segment_files(folder) == {n: t for n, t in after.items() if n != by_name["b"]}
    assert read_manifest(folder)["retained"] == []
    assert _doc_ids(base, "t") == [0, 1, 2, 10, 11, 12, 13]

    # an empty table still has its columns
    write_table(base, "t", "empty", SegmentedTable(SCHEMA, {}))
    assert table_exists(base, "t", "empty") and table_files(base, "t", "empty") == []
    assert read_table(base, "t", "empty").collect().schema == pl.Schema(
        {"dataset": pl.String, "doc_id": pl.Int32, "value": pl.Float32}
    )


def test_keep_needs_a_stored_segment_of_the_same_schema_and_names_are_checked(tmp_path):
    base = str(tmp_path)
    write_table(base, "t", "p", SegmentedTable(SCHEMA, {"a": _rows(0, 3)}))
    with pytest.raises(ValueError, match="Segment 'zz' .* is marked KEEP but is not in its manifest"):
        write_table(base, "t", "p", SegmentedTable(SCHEMA, {"zz": KEEP}))
    wider = SCHEMA.append(pa.field("extra", pa.int64()))
    assert stored_segments(base, "t", "p", wider) == {}
    with pytest.raises(ValueError, match="was stored with another schema"):
        write_table(base, "t", "p", SegmentedTable(wider, {"a": KEEP}))
    with pytest.raises(ValueError, match="Unsafe segment name '../a'"):
        write_table(base, "t", "p", SegmentedTable(SCHEMA, {"../a": _rows(0, 1)}))
    with pytest.raises(ValueError, match="Batch 0 .* share one schema"):
        write_table(base, "t", "p", SegmentedTable(SCHEMA, {"b": pa.table({"other": [1]})}))
    with pytest.raises(ValueError, match="needs a partition"):
        write_table(base, "t", None, SegmentedTable(SCHEMA, {}))
    assert _doc_ids(base, "t") == [0, 1, 2]  # every refused write left the table as it was


def _crashing(after: int) -> Iterator[pa.RecordBatch]:
    yield from _rows(100, after).to_batches()
    raise RuntimeError("simulated crash mid-segment")


def test_failure_before_the_manifest_swap_leaves_the_previous_table(tmp_path):
    base, db = str(tmp_path / "parquet"), str(tmp_path / "warehouse.duckdb")
    folder = Path(segments_path(base, "t", "p"))
    write_table(base, "t", "p", SegmentedTable(SCHEMA, {"a": _rows(0, 3), "b": _rows(3, 2)}))
    manifest = (folder / MANIFEST).read_bytes()
    before, files = read_table(base, "t", "p").collect(), _segment_files(folder)
    refresh_views(db, base, ["t"])

    update = {"a": KEEP, "b2": _rows(50, 4), "c": StreamedTable(SCHEMA, _crashing(2))}
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_table(base, "t", "p", SegmentedTable(SCHEMA, update))
    assert (folder / MANIFEST).read_bytes() == manifest
    assert_frame_equal(read_table(base, "t", "p").collect(), before)
    assert query(db, "select count(*) as n from t")["n"][0] == 5
    leftovers = set(_segment_files(folder)) - set(files)
    assert len(leftovers) == 1 and next(iter(leftovers)).startswith("b2.")  # complete, but never listed
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]  # the torn one was removed

    # the next write tolerates the leftover (a young one may be a concurrent write's) ...
    write_table(base, "t", "p", SegmentedTable(SCHEMA, {"a": KEEP, "b": KEEP}))
    assert leftovers <= set(_segment_files(folder))
    # ... and deletes it once it is older than DEBRIS_AGE_S
    old = time.time() - DEBRIS_AGE_S - 60
    os.utime(folder / next(iter(leftovers)), (old, old))
    write_table(base, "t", "p", SegmentedTable(SCHEMA, {"a": KEEP, "b": KEEP}))
    assert _segment_files(folder) == files
    assert_frame_equal(read_table(base, "t", "p").collect(), before)


@pytest.mark.parametrize(
    "entry",
    [
        {"name": "a", "file": "../../../outside.parquet", "rows": 1, "bytes": 1},
        {"name": "a", "file": "../../*.parquet", "rows": 1, "bytes": 1},
        {"name": "a", "file": "b.0123456789ab.parquet", "rows": 1, "bytes": 1},  # another segment's file
        {"name": "../a", "file": "../a.0123456789ab.parquet", "rows": 1, "bytes": 1},
        {"name": "a", "rows": 1, "bytes": 1},
        {"name": "a", "file": "a.0123456789ab.parquet", "rows": "1", "bytes": 1},
    ],
)
def test_a_hostile_manifest_is_refused_never_followed(tmp_path, entry):
    base = str(tmp_path / "parquet")
    write_table(base, "outside", None, _rows(100, 1))  # a table the manifest must not reach
    write_table(base, "t", "p", SegmentedTable(SCHEMA, {"a": _rows(0, 3)}))
    path = Path(segments_path(base, "t", "p")) / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["segments"] = [entry]
    path.write_text(json.dumps(manifest))
    for read in (lambda: read_table(base, "t", "p"), lambda: table_files(base, "t", "p")):
        with pytest.raises(ValueError, match="not a segment manifest.*delete that folder"):
            read()
    with pytest.raises(ValueError, match="not a segment manifest"):
        refresh_views(str(tmp_path / "warehouse.duckdb"), base, ["t"])


def test_a_kept_segment_that_vanished_mid_write_aborts_before_the_manifest_swap(tmp_path):
    base = str(tmp_path)
    folder = Path(segments_path(base, "t", "p"))
    write_table(base, "t", "p", SegmentedTable(SCHEMA, {"a": _rows(0, 3), "b": _rows(3, 2)}))
    manifest = (folder / MANIFEST).read_bytes()
    kept = next(n for n in _segment_files(folder) if n.startswith("a."))

    def sweep_then_rows() -> Iterator[pa.RecordBatch]:
        (folder / kept).unlink()  # what a concurrent write's clean-up could do
        yield from _rows(10, 2).to_batches()

    update = {"a": KEEP, "c": StreamedTable(SCHEMA, sweep_then_rows())}
    with pytest.raises(FileNotFoundError, match="vanished before its manifest was replaced"):
        write_table(base, "t", "p", SegmentedTable(SCHEMA, update))
    assert (folder / MANIFEST).read_bytes() == manifest  # the manifest never names a missing file


def test_glob_characters_in_the_base_path_are_read_literally(tmp_path):
    base = str(tmp_path / "run[1]*?")
    write_table(base, "t", "p", SegmentedTable(SCHEMA, {"a": _rows(0, 2), "b": _rows(2, 1)}))
    write_table(base, "one", "p", _rows(5, 2))
    assert _doc_ids(base, "t") == [0, 1, 2] and _doc_ids(base, "one") == [5, 6]


def test_switching_layouts_leaves_one_copy_of_the_partition(tmp_path):
    base = str(tmp_path)
    write_table(base, "t", "p", _rows(0, 2))  # a partition written before segments existed
    write_table(base, "t", "p", SegmentedTable(SCHEMA, {"a": _rows(0, 3)}))
    assert not os.path.exists(table_path(base, "t", "p"))
    assert _doc_ids(base, "t") == [0, 1, 2]
    write_table(base, "t", "p", _rows(7, 1))
    assert not os.path.exists(segments_path(base, "t", "p"))
    assert _doc_ids(base, "t") == [7] and table_files(base, "t", "p") == [table_path(base, "t", "p")]


def test_segments_on_a_memory_filesystem():
    base = f"memory://interp-{uuid.uuid4().hex}/parquet"
    write_table(base, "t", "p", SegmentedTable(SCHEMA, {"a": _rows(0, 3), "b": _rows(3, 2)}))
    meta = write_table(base, "t", "p", SegmentedTable(SCHEMA, {"a": KEEP, "c": _rows(9, 1)}))
    assert (meta["segments_written"], meta["segments_kept"]) == (1, 1)
    assert meta["path"] == f"{base}/t/p"
    assert table_exists(base, "t", "p") and _doc_ids(base, "t") == [0, 1, 2, 9]
    assert all(f.startswith(f"{base}/t/p/") for f in table_files(base, "t", "p"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_table(base, "t", "p", SegmentedTable(SCHEMA, {"a": KEEP, "d": _crashing(1)}))
    assert _doc_ids(base, "t") == [0, 1, 2, 9]
    fs = fsspec.filesystem("memory")
    assert not [p for p in fs.ls(f"{base}/t/p", detail=False) if p.endswith(".tmp")]


@pytest.mark.parametrize("odd_dir", ["plain", "sp ace [1] {x} *?", "it's; DROP VIEW t; --"])
def test_duckdb_views_read_segmented_and_single_file_partitions(tmp_path, odd_dir):
    base, db = str(tmp_path / odd_dir / "parquet"), str(tmp_path / "warehouse.duckdb")
    write_table(base, "t", "a", SegmentedTable(SCHEMA, {"s1": _rows(0, 3, "a"), "s2": _rows(3, 4, "a")}))
    write_table(base, "t", "b", _rows(0, 5, "b"))  # a partition in the single-file layout
    assert refresh_views(db, base, ["t"]) == {"t": 12}
    # an update replacing s2: the view built before it still reads (replaced segments outlive one write)
    write_table(base, "t", "a", SegmentedTable(SCHEMA, {"s1": KEEP, "s3": _rows(10, 1, "a")}))
    assert query(db, "select count(*) as n from t")["n"][0] == 12
    assert refresh_views(db, base, ["t"]) == {"t": 9}
    got = query(db, "select dataset, count(*) as n from t group by 1 order by 1").rows()
    assert got == [("a", 4), ("b", 5)]


def test_notebook_reads_segmented_tables(tmp_path):
    base = str(tmp_path / "parquet")
    docs = pl.DataFrame(
        {"dataset": "nb", "doc_id": pl.Series([0, 1, 2], dtype=pl.Int32), "doc_hash": ["h0", "h1", "h2"]}
    ).with_columns(text=pl.Series(["the cat sat", "a dog", "cat cat"]), source_file=pl.lit("f"), source_row=1)
    ta = pl.DataFrame(
        {
            "dataset": "nb",
            "doc_id": pl.Series([0, 0, 1, 2, 2], dtype=pl.Int32),
            "token_index": pl.Series([1, 2, 1, 1, 2], dtype=pl.Int32),
            "token": ["the", "cat", "dog", "cat", "cat"],
            "char_start": pl.Series([0, 4, 2, 0, 4], dtype=pl.Int32),
            "char_end": pl.Series([3, 7, 5, 3, 7], dtype=pl.Int32),
            "feature": pl.Series([1, 2, 1, 2, 2], dtype=pl.Int32),
            "activation": pl.Series([0.5, 1.5, 2.0, 1.0, 3.0], dtype=pl.Float32),
        }
    )
    doc_tokens = pl.DataFrame({"doc_id": [0, 1, 2], "pooled_tokens": [3, 2, 2]})
    pooled = pool_token_activations(ta, doc_tokens)
    write_table(base, "raw_documents", "nb", docs)
    for table, frame in (("token_activations", ta), ("pooled_embeddings", pooled)):
        parts = {"s0": frame.filter(pl.col("doc_id") < 2), "s1": frame.filter(pl.col("doc_id") >= 2)}
        write_table(base, table, "nb", SegmentedTable(frame.to_arrow().schema, parts))
    loaded = Dataset.load("nb", data_dir=str(tmp_path), d_sae=4)
    reference = Dataset.from_frames("nb", docs, pooled, token_activations=ta, d_sae=4)
    for aggregation in ("max", "mean", "count"):
        np.testing.assert_array_equal(
            loaded.latents(aggregation).toarray(), reference.latents(aggregation).toarray()
        )
    assert loaded.highlight(2, 2) == reference.highlight(2, 2) == "<<cat>> <<cat>>"


# --------------------------------------------------------------------------------------- asset level


def _sentences(n: int) -> list[str]:
    if not SST2.is_file():
        pytest.skip(f"shared SST-2 data not found at {SST2} (expected beside the repository clone)")
    lines = SST2.read_text(encoding="utf-8").splitlines()[1:]
    texts = list(dict.fromkeys(t for t in (line.split("\t")[0].strip() for line in lines[4000:]) if t))
    return texts[:n]


def _drop(data: Path, texts: list[str]) -> None:
    (data / "landing").mkdir(parents=True, exist_ok=True)
    with (data / "landing" / "ds.jsonl").open("w", encoding="utf-8") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text}) + "\n")


def _materialize(data: Path, instance: DagsterInstance, **kwargs: object):
    return materialize(
        EMBED, partition_key="ds", instance=instance, resources=local_resources(data), **kwargs
    )


def _tables(data: Path) -> dict[str, pl.DataFrame]:
    """The segmented tables of partition `ds`, sorted, dictionary columns as plain strings."""
    base = str(data / "parquet")
    return {
        t: read_table(base, t, "ds")
        .collect()
        .with_columns(pl.col(pl.Categorical).cast(pl.String))
        .sort(SORT[t])
        for t in SEGMENTED
    }


def _folders(data: Path) -> dict[str, dict[str, int]]:
    return {t: _segment_files(data / "parquet" / t / "ds") for t in SEGMENTED}


def _segment_names(data: Path, table: str) -> list[str]:
    return [e["name"] for e in read_manifest(str(data / "parquet" / table / "ds"))["segments"]]


def _io_metadata(result, table: str) -> dict:
    """The metadata of `table`'s materialization (tokens is written by the token_activations step)."""
    node = "token_activations" if table == "tokens" else table
    (event,) = [e for e in result.asset_materializations_for_node(node) if e.asset_key.path == [table]]
    return {k: v.value for k, v in event.metadata.items()}


@pytest.fixture(scope="module")
def incremental(tmp_path_factory):
    """One dataset through four drops: 40 documents, the same again, +10 new, then the last 3 removed."""
    texts = _sentences(50)
    data = tmp_path_factory.mktemp("segments") / "data"
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("datasets", ["ds"])
    steps = {}
    for step, drop in (
        ("full", texts[:40]),
        ("unchanged", texts[:40]),
        ("added", texts),
        ("removed", texts[:47]),
    ):
        _drop(data, drop)
        before = _folders(data) if step != "full" else None
        result = _materialize(data, instance)
        assert result.success
        checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        assert all(checks.values()) and len(checks) == 4, checks
        steps[step] = {
            "result": result,
            "before": before,
            "after": _folders(data),
            "tables": _tables(data),
            "names": {t: _segment_names(data, t) for t in SEGMENTED},
            "meta": {t: _io_metadata(result, t) for t in SEGMENTED},
        }
    return {"data": data, "texts": texts, "steps": steps}


def test_unchanged_drop_writes_no_segment(incremental):
    step = incremental["steps"]["unchanged"]
    assert step["after"] == step["before"]  # same files, untouched: only the manifests were written
    for table in SEGMENTED:
        meta = step["meta"][table]
        assert (meta["segments_written"], meta["segments_kept"], meta["rows_written"]) == (0, 1, 0)
        assert_frame_equal(step["tables"][table], incremental["steps"]["full"]["tables"][table])
    assert _io_metadata(step["result"], "token_activations")["encoded_now"] == 0


def test_added_documents_write_one_segment_per_table_and_equal_a_fresh_run(incremental, tmp_path):
    step = incremental["steps"]["added"]
    for table in SEGMENTED:
        new = set(step["after"][table]) - set(step["before"][table])
        assert len(new) == 1, (table, new)
        assert {n: step["after"][table][n] for n in step["before"][table]} == step["before"][table]
        assert (step["meta"][table]["segments_written"], step["meta"][table]["segments_kept"]) == (1, 1)
    assert sorted(set(step["tables"]["token_activations"]["doc_id"])) == list(range(50))

    # From scratch: a fresh data dir holding only the activation cache (so the documents' activations are
    # bit for bit the same); every segment is written anew, and the tables come out identical.
    fresh = tmp_path / "fresh"
    shutil.copytree(incremental["data"] / "cache", fresh / "cache")
    _drop(fresh, incremental["texts"])
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("datasets", ["ds"])
    result = _materialize(fresh, instance)
    assert result.success
    scratch = _tables(fresh)
    for table in SEGMENTED:
        assert _io_metadata(result, table)["segments_written"] == 2
        assert_frame_equal(step["tables"][table], scratch[table])
        # segment names are content keys: the same in both data dirs (for the same documents and cache)
        assert step["names"][table] == _segment_names(fresh, table)
    # pooled per segment == pooled over the whole table
    status = read_table(str(fresh / "parquet"), "activation_status", "ds").collect()
    whole = pool_token_activations(read_table(str(fresh / "parquet"), "token_activations", "ds"), status)
    assert_frame_equal(whole.sort(SORT["pooled_embeddings"]), scratch["pooled_embeddings"])


def test_removed_documents_rewrite_only_their_segment(incremental):
    steps = incremental["steps"]
    step = steps["removed"]
    for table in SEGMENTED:
        before, after = step["before"][table], step["after"][table]
        listed = {Path(f).name for f in table_files(str(incremental["data"] / "parquet"), table, "ds")}
        kept = listed & set(before)
        assert len(listed) == 2 and len(kept) == 1  # the first chunk's segment is kept as is ...
        assert after[next(iter(kept))] == before[next(iter(kept))]
        assert len(listed - set(before)) == 1  # ... the second one's is rewritten
        assert set(before) <= set(after)  # the replaced file outlives this write, unlisted
        assert (step["meta"][table]["segments_written"], step["meta"][table]["segments_kept"]) == (1, 1)
        expected = steps["added"]["tables"][table].filter(pl.col("doc_id") < 47)
        assert_frame_equal(step["tables"][table], expected)  # removed documents are gone, the rest intact


def test_warehouse_and_notebook_read_the_asset_tables(incremental):
    data = incremental["data"]
    base, db = str(data / "parquet"), str(data / "warehouse.duckdb")
    counts = refresh_views(db, base, WAREHOUSE_TABLES)
    tables = incremental["steps"]["removed"]["tables"]
    for table in SEGMENTED:
        assert counts[table] == tables[table].height
    docs = query(db, "select count(distinct doc_id) as n from token_activations where dataset = 'ds'")["n"][0]
    assert docs == 47
    ds = Dataset.load("ds", data_dir=str(data))
    latents = ds.latents("count")
    assert latents.shape[0] == 47 and latents.nnz == tables["pooled_embeddings"].height
    row = tables["token_activations"].row(0, named=True)
    assert "<<" in ds.highlight(doc_id=row["doc_id"], feature=row["feature"])


def test_tokens_hold_each_active_token_once_with_its_offsets(incremental):
    """tokens: one row per (doc_id, token_index) that token_activations refers to, no other, and its offsets
    cut the token's text out of the document (the embedded reader is uncased WordPiece)."""
    tables = incremental["steps"]["removed"]["tables"]
    tokens, acts = tables["tokens"], tables["token_activations"]
    assert tokens.select("doc_id", "token_index").is_duplicated().sum() == 0
    assert_frame_equal(
        tokens.select("doc_id", "token_index"),
        acts.select("doc_id", "token_index").unique().sort("doc_id", "token_index"),
    )
    texts = incremental["texts"]
    for doc_id, token, start, end in tokens.select("doc_id", "token", "char_start", "char_end").iter_rows():
        assert texts[doc_id][start:end].lower() == token.removeprefix("##"), (doc_id, token, start, end)
    # with a TopK SAE every pooled token has a nonzero: tokens holds every pooled token of the documents
    status = read_table(str(incremental["data"] / "parquet"), "activation_status", "ds").collect()
    per_doc = tokens.group_by("doc_id").len().sort("doc_id")
    assert per_doc["len"].to_list() == status.sort("doc_id")["pooled_tokens"].to_list()


def test_wide_view_and_with_tokens_are_the_join(incremental):
    """token_activations_wide (DuckDB) and `with_tokens` (Polars) give the same rows: every nonzero with its
    token's text and offsets, none lost to the join."""
    data = incremental["data"]
    base, db = str(data / "parquet"), str(data / "warehouse.duckdb")
    refresh_views(db, base, WAREHOUSE_TABLES)
    order = "dataset, doc_id, token_index, feature"
    view = query(db, f"select * from token_activations_wide order by {order}")
    wide = (
        with_tokens(read_table(base, "token_activations", "ds"), read_table(base, "tokens", "ds"))
        .with_columns(pl.col(pl.Categorical).cast(pl.String), pl.col("activation").cast(pl.Float32))
        .collect()
    )
    assert view.columns == wide.columns == [
        "dataset", "doc_id", "token_index", "token", "char_start", "char_end", "feature", "activation"
    ]  # fmt: skip
    assert view.height == wide.height == incremental["steps"]["removed"]["tables"]["token_activations"].height
    assert_frame_equal(view, wide.sort("dataset", "doc_id", "token_index", "feature"), check_dtypes=False)
    assert_frame_equal(
        wide,
        read_token_activations_wide(base, "ds")
        .collect()
        .with_columns(pl.col(pl.Categorical).cast(pl.String), pl.col("activation").cast(pl.Float32)),
    )


def test_crash_while_writing_segments_keeps_the_previous_table(tmp_path, monkeypatch):
    texts = _sentences(30)
    data = tmp_path / "data"
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("datasets", ["ds"])
    _drop(data, texts[:20])
    assert _materialize(data, instance).success
    before, files = _tables(data), _folders(data)
    manifests = {t: (data / "parquet" / t / "ds" / MANIFEST).read_bytes() for t in SEGMENTED}

    original = ActivationCache.iter_segment

    def crash_after_first_batch(self, *args, **kwargs):
        yield next(original(self, *args, **kwargs))
        raise RuntimeError("simulated crash while writing a segment")

    monkeypatch.setattr(ActivationCache, "iter_segment", crash_after_first_batch)
    original_tokens = ActivationCache.iter_tokens_segment

    def tokens_crash_after_first_batch(self, *args, **kwargs):
        yield next(original_tokens(self, *args, **kwargs))
        raise RuntimeError("simulated crash while writing a segment")

    monkeypatch.setattr(ActivationCache, "iter_tokens_segment", tokens_crash_after_first_batch)
    _drop(data, texts)
    failed = _materialize(data, instance, raise_on_error=False)
    assert not failed.success
    for table in SEGMENTED:
        assert (data / "parquet" / table / "ds" / MANIFEST).read_bytes() == manifests[table]
        assert_frame_equal(_tables(data)[table], before[table])
    assert _folders(data) == files  # the torn segment's temp file is gone too

    monkeypatch.undo()
    again = _materialize(data, instance)
    assert again.success
    meta = _io_metadata(again, "token_activations")
    assert meta["encoded_now"] == 0 and (meta["segments_written"], meta["segments_kept"]) == (1, 1)
    assert sorted(set(_tables(data)["token_activations"]["doc_id"])) == list(range(30))


def test_views_are_refreshed_after_a_failed_run_that_wrote_segments(tmp_path):
    from dagster import (
        AssetIn,
        DagsterEventType,
        StaticPartitionsDefinition,
        asset,
        build_run_status_sensor_context,
    )

    from interp_assets.defs.sensors import warehouse_views_after_failure_sensor

    parts = StaticPartitionsDefinition(["p"])
    state = {"start": 0}

    @asset(name="token_activations", partitions_def=parts, io_manager_key="parquet_io_manager")
    def writes_segments():
        state["start"] += 10
        return SegmentedTable(SCHEMA, {f"s{state['start']}": _rows(state["start"], 2)})

    @asset(partitions_def=parts, ins={"upstream": AssetIn("token_activations")})
    def fails_after_the_write(upstream):
        raise RuntimeError("downstream failure")

    storage = StorageResource(data_dir=str(tmp_path))
    duckdb = DuckDBResource(database=str(tmp_path / "warehouse.duckdb"))
    resources = {"parquet_io_manager": ParquetIOManager(base_path=storage.parquet_base)}
    instance = DagsterInstance.ephemeral()
    for _ in range(3):  # the previous segments outlive one write only: the view must follow every write
        result = materialize(
            [writes_segments, fails_after_the_write],
            partition_key="p",
            instance=instance,
            resources=resources,
            raise_on_error=False,
        )
        assert not result.success
        (entry,) = instance.all_logs(result.run_id, of_type=DagsterEventType.RUN_FAILURE)
        context = build_run_status_sensor_context(
            sensor_name="warehouse_views_after_failure_sensor",
            dagster_event=entry.dagster_event,
            dagster_instance=instance,
            dagster_run=instance.get_run_by_id(result.run_id),
            resources={"storage": storage, "duckdb": duckdb},
        )
        warehouse_views_after_failure_sensor(context)
        rows = query(str(tmp_path / "warehouse.duckdb"), "select doc_id from token_activations order by 1")
        assert rows["doc_id"].to_list() == [state["start"], state["start"] + 1]


def test_a_partition_of_zero_segments_gives_an_empty_typed_view(tmp_path):
    from interp_assets.engine.activation_cache import token_activations_schema

    base, db = str(tmp_path / "parquet"), str(tmp_path / "warehouse.duckdb")
    schema = token_activations_schema("float16")  # dictionary strings, float16: types DuckDB must map
    write_table(base, "token_activations", "all_rejected", SegmentedTable(schema, {}))
    refresh_views(db, base, ["token_activations"])
    assert query(db, "select count(*) as n from token_activations")["n"][0] == 0
    columns = query(db, "select column_name, column_type from (describe token_activations)")
    assert columns["column_name"].to_list() == schema.names
    assert dict(zip(columns["column_name"], columns["column_type"], strict=True))["activation"] == "FLOAT"
