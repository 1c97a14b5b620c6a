"""ParquetIOManager: real Dagster materializations over real Parquet files, on a local folder and on a real
S3-compatible server (moto's server mode, started by the `s3_server` fixture)."""

import os
import uuid
from collections.abc import Iterator

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import (
    AllPartitionMapping,
    AssetExecutionContext,
    AssetIn,
    Config,
    DagsterInstance,
    DynamicPartitionsDefinition,
    Output,
    TableColumn,
    TableSchema,
    asset,
    materialize,
)

from interp_assets.storage.parquet import StreamedTable, read_table, table_exists, write_table
from interp_assets.storage.paths import table_path
from io_managers import ParquetIOManager

datasets = DynamicPartitionsDefinition(name="datasets")
SCHEMA = pa.schema([("dataset", pa.string()), ("doc_id", pa.int32()), ("activation", pa.float32())])


def _batch(dataset: str, start: int, n: int) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {
            "dataset": [dataset] * n,
            "doc_id": list(range(start, start + n)),
            "activation": [float(i) / 2 for i in range(start, start + n)],
        },
        schema=SCHEMA,
    )


@asset(partitions_def=datasets)
def arrow_docs(context: AssetExecutionContext) -> pa.Table:
    return pa.Table.from_batches([_batch(context.partition_key, 0, 3)])


@asset(partitions_def=datasets)
def polars_docs(context: AssetExecutionContext) -> pl.DataFrame:
    return pl.DataFrame(
        {"dataset": [context.partition_key] * 4, "text": ["a|b", "line1\nline2", "x" * 200, None]}
    )


class StreamConfig(Config):
    batches: int = 3
    fail_after: int = -1
    start: int = 0


@asset(partitions_def=datasets)
def streamed_docs(context: AssetExecutionContext, config: StreamConfig):
    """A generator of batches must be wrapped: Dagster iterates a *returned* generator as events."""

    def gen() -> Iterator[pa.RecordBatch]:
        for i in range(config.batches):
            if i == config.fail_after:
                raise RuntimeError("simulated crash mid-stream")
            yield _batch(context.partition_key, config.start + 10 * i, 10)

    return Output(gen())


@asset(partitions_def=datasets)
def declared_stream(context: AssetExecutionContext) -> StreamedTable:
    return StreamedTable(SCHEMA, (_batch(context.partition_key, i, 1) for i in range(7)))


@asset(partitions_def=datasets)
def doubled(streamed_docs: pl.LazyFrame) -> pl.DataFrame:
    assert isinstance(streamed_docs, pl.LazyFrame)
    return streamed_docs.with_columns((pl.col("activation") * 2).alias("activation")).collect()


@asset
def corpus_stats(streamed_docs: dict[str, pl.LazyFrame]) -> pl.DataFrame:
    """Unpartitioned downstream: the inferred mapping is AllPartitionMapping."""
    assert isinstance(streamed_docs, dict)
    return pl.DataFrame(
        {
            "dataset": list(streamed_docs),
            "rows": [lf.select(pl.len()).collect().item() for lf in streamed_docs.values()],
        }
    )


@asset(partitions_def=datasets, ins={"streamed_docs": AssetIn(partition_mapping=AllPartitionMapping())})
def all_seen(context: AssetExecutionContext, streamed_docs) -> pl.DataFrame:
    """Partitioned downstream, explicit AllPartitionMapping, no type annotation: still a dict."""
    assert isinstance(streamed_docs, dict), type(streamed_docs)
    return pl.DataFrame(
        {"seen_by": [context.partition_key] * len(streamed_docs), "dataset": sorted(streamed_docs)}
    )


@asset(key_prefix=["interp", "tables"])
def summary() -> pa.Table:
    return pa.table({"n": [1, 2]})


@asset(partitions_def=datasets)
def nothing(context: AssetExecutionContext) -> None:
    return None


@asset(
    partitions_def=datasets,
    metadata={
        "dagster/column_schema": TableSchema(
            columns=[TableColumn("doc_id", "int32", "document"), TableColumn("dataset", "string", "its set")]
        )
    },
)
def described_docs(context: AssetExecutionContext) -> pa.Table:
    return pa.Table.from_batches([_batch(context.partition_key, 0, 3)])


@pytest.fixture
def instance() -> DagsterInstance:
    return DagsterInstance.ephemeral()


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path) -> str:
    """The tables' base: a local folder, or a fresh prefix on the local S3 server (`s3://bucket/<id>`)."""
    if request.param == "s3":
        return f"{request.getfixturevalue('s3_base')}/parquet"
    return str(tmp_path / "parquet")


def _fs(path: str):
    fs, fspath = fsspec.core.url_to_fs(path)
    fs.invalidate_cache()
    return fs, fspath


def _isfile(path: str) -> bool:
    fs, fspath = _fs(path)
    return fs.isfile(fspath)


def _exists(path: str) -> bool:
    fs, fspath = _fs(path)
    return fs.exists(fspath)


def _listdir(path: str) -> list[str]:
    fs, fspath = _fs(path)
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(fspath, detail=False))


def _read_bytes(path: str) -> bytes:
    fs, fspath = _fs(path)
    return fs.cat_file(fspath)


def _parquet(path: str) -> pq.ParquetFile:
    return pq.ParquetFile(pa.BufferReader(_read_bytes(path)))


def _run(assets, base: str, instance: DagsterInstance, partition: str | None = None, **kw):
    return materialize(
        assets,
        resources={"io_manager": ParquetIOManager(base_path=base)},
        instance=instance,
        partition_key=partition,
        **kw,
    )


def _metadata(result, key: str) -> dict:
    (mat,) = [m for m in result.get_asset_materialization_events() if m.asset_key.path[-1] == key]
    return mat.materialization.metadata


def test_writes_each_format_at_table_path_and_reads_lazily(base, instance):
    instance.add_dynamic_partitions("datasets", ["alpha"])
    result = _run([arrow_docs, polars_docs, streamed_docs, declared_stream, doubled], base, instance, "alpha")
    assert result.success
    expected = [
        ("arrow_docs", 3),
        ("polars_docs", 4),
        ("streamed_docs", 30),
        ("declared_stream", 7),
        ("doubled", 30),
    ]
    for name, rows in expected:
        path = table_path(base, name, "alpha")
        assert _isfile(path), path
        assert _parquet(path).metadata.num_rows == rows
        assert _metadata(result, name)["row_count"].value == rows

    back = read_table(base, "streamed_docs", "alpha").collect()
    assert back["doc_id"].to_list() == list(range(30))
    assert result.output_for_node("doubled")["activation"].to_list() == [
        x * 2 for x in back["activation"].to_list()
    ]
    assert read_table(base, "arrow_docs", "alpha").collect().schema["doc_id"] == pl.Int32


def test_metadata_and_encodings(base, instance):
    instance.add_dynamic_partitions("datasets", ["alpha"])
    result = _run([polars_docs, streamed_docs], base, instance, "alpha")
    md = _metadata(result, "polars_docs")
    path = table_path(base, "polars_docs", "alpha")
    assert md["path"].value == path or os.path.samefile(md["path"].value, path)
    assert md["size_bytes"].value == len(_read_bytes(path))
    cols = md["dagster/column_schema"].schema.columns
    assert [c.name for c in cols] == ["dataset", "text"]
    preview = md["preview"].value
    lines = preview.splitlines()
    assert lines[0] == "| dataset | text |"
    assert len(lines) == 2 + 4  # header, separator, 4 rows (only 4 exist)
    assert "a\\|b" in preview and "line1\\nline2" in preview
    assert "x" * 200 not in preview and "…" in preview

    meta = _parquet(table_path(base, "streamed_docs", "alpha")).metadata.row_group(0)
    encodings = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    assert encodings["activation"].compression == "ZSTD"
    assert "BYTE_STREAM_SPLIT" in encodings["activation"].encodings
    assert "RLE_DICTIONARY" in encodings["dataset"].encodings


def test_recorded_column_schema_keeps_the_definitions_descriptions(base, instance):
    """The written schema (stored types, every column) with the meanings the asset's definition gives."""
    instance.add_dynamic_partitions("datasets", ["alpha"])
    md = _metadata(_run([described_docs], base, instance, "alpha"), "described_docs")
    cols = md["dagster/column_schema"].schema.columns
    assert [(c.name, c.type, c.description) for c in cols] == [
        ("dataset", "string", "its set"),
        ("doc_id", "int32", "document"),
        ("activation", "float", None),
    ]


def test_unpartitioned_asset_uses_last_key_component(base, instance):
    assert _run([summary], base, instance).success
    assert read_table(base, "summary").collect()["n"].to_list() == [1, 2]
    assert _listdir(base) == ["summary.parquet"]


def test_none_writes_nothing(base, instance):
    instance.add_dynamic_partitions("datasets", ["alpha"])
    assert _run([nothing], base, instance, "alpha").success
    assert not _exists(table_path(base, "nothing", "alpha"))


@pytest.mark.parametrize("n_partitions", [1, 2])
def test_all_partitions_input_is_always_a_dict(base, instance, n_partitions):
    keys = ["alpha", "beta"][:n_partitions]
    instance.add_dynamic_partitions("datasets", keys)
    for key in keys:
        assert _run([streamed_docs], base, instance, key).success

    stats = _run([corpus_stats, streamed_docs], base, instance, selection=[corpus_stats])
    assert stats.output_for_node("corpus_stats").sort("dataset").to_dicts() == [
        {"dataset": k, "rows": 30} for k in keys
    ]
    assert _isfile(table_path(base, "corpus_stats"))
    seen = _run([all_seen, streamed_docs], base, instance, "alpha", selection=[all_seen])
    assert seen.output_for_node("all_seen")["dataset"].to_list() == keys


def test_failed_stream_keeps_previous_file_and_leaves_no_temp(base, instance):
    instance.add_dynamic_partitions("datasets", ["alpha"])
    assert _run([streamed_docs], base, instance, "alpha").success
    path = table_path(base, "streamed_docs", "alpha")
    before = _read_bytes(path)

    config = {"ops": {"streamed_docs": {"config": {"batches": 5, "fail_after": 2, "start": 1000}}}}
    result = _run([streamed_docs], base, instance, "alpha", run_config=config, raise_on_error=False)
    assert not result.success
    assert _read_bytes(path) == before
    assert _listdir(path.rpartition("/")[0]) == ["alpha.parquet"]
    assert read_table(base, "streamed_docs", "alpha").collect()["doc_id"].min() == 0


def test_unsafe_partition_key_is_refused(base, instance):
    instance.add_dynamic_partitions("datasets", ["../escape"])
    result = _run([arrow_docs], base, instance, "../escape", raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert "Unsafe partition key '../escape'" in failure.step_failure_data.error.to_string()
    assert not _exists(f"{base.rpartition('/')[0]}/escape.parquet")
    with pytest.raises(ValueError, match="Unsafe partition key"):
        write_table(base, "t", "a/b", pa.table({"x": [1]}))


def test_missing_partition_says_what_to_materialize(base, instance):
    with pytest.raises(FileNotFoundError, match="materialize streamed_docs for partition gamma first"):
        read_table(base, "streamed_docs", "gamma")
    instance.add_dynamic_partitions("datasets", ["gamma"])
    result = _run(
        [doubled, streamed_docs], base, instance, "gamma", selection=[doubled], raise_on_error=False
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert (
        "materialize streamed_docs for partition gamma first" in failure.step_failure_data.error.to_string()
    )


def test_streams_and_empty_tables(tmp_path):
    base = str(tmp_path)
    meta = write_table(base, "empty", "p", StreamedTable(SCHEMA, iter(())))
    assert meta["row_count"] == 0 and "no rows" in meta["preview"]
    assert read_table(base, "empty", "p").collect().columns == ["dataset", "doc_id", "activation"]
    with pytest.raises(ValueError, match="StreamedTable"):
        write_table(base, "empty", "q", iter(()))
    assert not table_exists(base, "empty", "q")
    bad = StreamedTable(SCHEMA, [_batch("a", 0, 2), pa.record_batch({"other": [1]})])
    with pytest.raises(ValueError, match="Batch 1 .* share one schema"):
        write_table(base, "bad", "p", bad)
    assert os.listdir(tmp_path / "bad") == []
    # a LazyFrame is streamed too, and unpartitioned tables live at <base>/<table>.parquet
    write_table(base, "flat", None, pl.LazyFrame({"a": [1, 2, 3]}).filter(pl.col("a") > 1))
    assert os.path.isfile(tmp_path / "flat.parquet")
    assert read_table(base, "flat").collect()["a"].to_list() == [2, 3]


def test_memory_filesystem_round_trip():
    base = f"memory://interp-{uuid.uuid4().hex}/parquet"
    assert not table_exists(base, "docs", "alpha")
    meta = write_table(base, "docs", "alpha", (_batch("alpha", i * 5, 5) for i in range(4)))
    assert meta["row_count"] == 20 and meta["path"] == f"{base}/docs/alpha.parquet"
    assert table_exists(base, "docs", "alpha")
    frame = read_table(base, "docs", "alpha")
    assert isinstance(frame, pl.LazyFrame)
    assert frame.collect()["doc_id"].to_list() == list(range(20))
    import fsspec

    def crashing():
        yield _batch("alpha", 100, 5)
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        write_table(base, "docs", "alpha", crashing())
    fs = fsspec.filesystem("memory")
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(f"{base}/docs", detail=False)] == ["alpha.parquet"]
    assert read_table(base, "docs", "alpha").collect()["doc_id"].max() == 19


def test_io_manager_on_memory_filesystem(instance):
    base = f"memory://interp-{uuid.uuid4().hex}/parquet"
    instance.add_dynamic_partitions("datasets", ["alpha"])
    result = _run([streamed_docs, doubled], base, instance, "alpha")
    assert result.success
    assert read_table(base, "doubled", "alpha").collect().height == 30
