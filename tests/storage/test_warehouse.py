"""DuckDB warehouse: views over real Parquet files, injection safety, and cross-process locking."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pytest
from dagster import AssetExecutionContext, DagsterInstance, asset, materialize
from dagster_duckdb import DuckDBResource

from interp_assets.storage.parquet import write_table
from interp_assets.warehouse import (
    ViewRefreshError,
    WarehouseLockedError,
    connect_read_only,
    query,
    refresh_views,
    refresh_views_with_resource,
)

REPO = Path(__file__).resolve().parents[2]


def _docs(dataset: str, n: int, version: int = 0) -> pa.Table:
    return pa.table(
        {
            "dataset": [dataset] * n,
            "doc_id": pa.array(range(n), pa.int32()),
            "version": [version] * n,
        }
    )


def _python(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_views_over_partitioned_and_flat_tables(tmp_path, monkeypatch):
    base, db = str(tmp_path / "parquet"), str(tmp_path / "wh" / "warehouse.duckdb")
    write_table(base, "raw_documents", "alpha", _docs("alpha", 3))
    write_table(base, "raw_documents", "beta", _docs("beta", 5))
    write_table(base, "summary", None, pa.table({"n": [1, 2]}))

    counts = refresh_views(db, base, ["raw_documents", "summary", "pooled_embeddings"])
    assert counts == {"raw_documents": 8, "summary": 2}

    # views hold absolute paths: the database works from any working directory
    monkeypatch.chdir(tmp_path / "wh")
    got = query(db, "SELECT dataset, count(*) AS n FROM raw_documents GROUP BY dataset ORDER BY dataset")
    assert got.to_dicts() == [{"dataset": "alpha", "n": 3}, {"dataset": "beta", "n": 5}]
    assert query(db, "SELECT count(*) AS n FROM raw_documents WHERE dataset = ?", ["beta"])["n"][0] == 5
    with connect_read_only(db) as con:
        views = {
            r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
        }
    assert views == {"raw_documents", "summary"}

    # a new partition with an extra column: union_by_name fills nulls; a removed table's view is dropped
    write_table(
        base, "raw_documents", "gamma", _docs("gamma", 2).append_column("label", pa.array(["x", "y"]))
    )
    os.remove(tmp_path / "parquet" / "summary.parquet")
    assert refresh_views(db, base, ["raw_documents", "summary"]) == {"raw_documents": 10}
    labels = query(db, "SELECT count(label) AS labelled, count(*) AS n FROM raw_documents")
    assert labels.to_dicts() == [{"labelled": 2, "n": 10}]
    with pytest.raises(duckdb.CatalogException):
        query(db, "SELECT * FROM summary")


@pytest.mark.parametrize("odd_dir", ["it's; DROP VIEW t; --", "sp ace [1] {x} *?"])
def test_paths_with_quotes_and_glob_characters_cannot_inject(tmp_path, odd_dir):
    base, db = str(tmp_path / odd_dir / "parquet"), str(tmp_path / "warehouse.duckdb")
    write_table(base, "t", "a", _docs("a", 4))
    write_table(base, "t", "b", _docs("b", 6))
    # a file dropped by hand whose name holds a quote is just another file
    write_table(base, "t", "c", _docs("c", 1))
    os.rename(Path(base) / "t" / "c.parquet", Path(base) / "t" / "o'brien'); DROP VIEW t; --.parquet")
    assert refresh_views(db, base, ["t"]) == {"t": 11}
    assert query(db, "SELECT count(DISTINCT dataset) AS d FROM t")["d"][0] == 3


@pytest.mark.parametrize("bad", ['t"; DROP VIEW x; --', "1abc", "a b", "", "x" * 64, "t'"])
def test_invalid_table_names_are_refused_before_touching_the_db(tmp_path, bad):
    db = tmp_path / "warehouse.duckdb"
    with pytest.raises(ValueError, match="Invalid table name"):
        refresh_views(str(db), str(tmp_path), ["ok", bad])
    assert not db.exists()


def test_missing_database_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="refresh_views"):
        query(str(tmp_path / "nope.duckdb"), "SELECT 1")


def test_a_new_warehouse_appears_only_with_its_views(tmp_path, monkeypatch):
    """Readers wait for the file to exist; the first refresh must not expose it before its views."""
    import interp_assets.warehouse as warehouse

    base, db = str(tmp_path / "parquet"), tmp_path / "warehouse.duckdb"
    write_table(base, "raw_documents", "a", _docs("a", 3))
    write_table(base, "t", "a", _docs("a", 2))
    seen_while_building: list[bool] = []
    real_apply_views = warehouse.apply_views

    def watching_apply_views(con, sources):
        seen_while_building.append(db.exists())
        return real_apply_views(con, sources)

    monkeypatch.setattr(warehouse, "apply_views", watching_apply_views)
    assert refresh_views(str(db), base, ["raw_documents", "t"]) == {"raw_documents": 3, "t": 2}
    assert seen_while_building == [False]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parquet", "warehouse.duckdb"]  # no leftovers
    assert query(str(db), "SELECT count(*) AS n FROM t")["n"][0] == 2

    # once it exists, refreshes update it in place (readers hold it open; it is never swapped)
    inode = db.stat().st_ino
    write_table(base, "t", "b", _docs("b", 4))
    assert refresh_views(str(db), base, ["raw_documents", "t"]) == {"raw_documents": 3, "t": 6}
    assert seen_while_building == [False, True] and db.stat().st_ino == inode

    # a view that cannot be built is still reported on a new warehouse, with the good views published
    db.unlink()
    (tmp_path / "parquet" / "t" / "b.parquet").write_bytes(b"not parquet")
    with pytest.raises(ViewRefreshError, match="t:"):
        refresh_views(str(db), base, ["raw_documents", "t"])
    assert query(str(db), "SELECT count(*) AS n FROM raw_documents")["n"][0] == 3


def test_lock_held_by_another_process_times_out_clearly(tmp_path):
    base, db = str(tmp_path / "parquet"), str(tmp_path / "warehouse.duckdb")
    write_table(base, "t", "a", _docs("a", 1))
    refresh_views(db, base, ["t"])
    holder = _python(
        """
        import sys, duckdb
        con = duckdb.connect(sys.argv[1])
        print("held", flush=True)
        sys.stdin.read()
        """,
        db,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WarehouseLockedError, match="another process kept it locked"):
            refresh_views(db, base, ["t"], timeout_s=0.5)
        with pytest.raises(WarehouseLockedError):
            connect_read_only(db, timeout_s=0.3)
    finally:
        holder.communicate(timeout=30)
    # once the holder is gone, everything works again
    assert refresh_views(db, base, ["t"]) == {"t": 1}


def test_reader_process_and_refreshing_writer_never_clash(tmp_path):
    base, db = str(tmp_path / "parquet"), str(tmp_path / "warehouse.duckdb")
    n = 500
    for ds in ("a", "b"):
        write_table(base, "docs", ds, _docs(ds, n, version=0))
    refresh_views(db, base, ["docs"])

    reader = _python(
        """
        import json, sys, time
        from interp_assets.warehouse import query
        db, n, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
        ok, bad, versions = 0, [], set()
        sql = ("SELECT dataset, count(*) AS n, min(version) AS lo, max(version) AS hi, sum(doc_id) AS s "
               "FROM docs GROUP BY dataset ORDER BY dataset")
        end = time.monotonic() + seconds
        # read for `seconds`, and on a loaded machine up to 4x longer until two versions were seen
        while time.monotonic() < end or (len(versions) < 2 and time.monotonic() < end + 3 * seconds):
            try:
                rows = query(db, sql).to_dicts()
            except Exception as e:
                bad.append(f"{type(e).__name__}: {e}")
                continue
            expected_sum = n * (n - 1) // 2
            if [r["dataset"] for r in rows] != ["a", "b"] or any(
                r["n"] != n or r["lo"] != r["hi"] or r["s"] != expected_sum for r in rows
            ):
                bad.append(f"inconsistent: {rows}")
            else:
                ok += 1
                versions.update(r["lo"] for r in rows)
        print(json.dumps({"ok": ok, "bad": bad[:5], "n_bad": len(bad), "versions": len(versions)}))
        """,
        db,
        str(n),
        "4",
    )
    refreshes, version = 0, 0
    while reader.poll() is None:
        version += 1
        for ds in ("a", "b"):
            write_table(base, "docs", ds, _docs(ds, n, version=version))
        assert refresh_views(db, base, ["docs"], timeout_s=30) == {"docs": 2 * n}
        refreshes += 1
        time.sleep(0.01)
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["n_bad"] == 0, report["bad"]
    assert report["ok"] >= 10 and refreshes >= 10, (report, refreshes)
    assert report["versions"] >= 2  # the reader really saw the data change underneath it


def test_refresh_through_dagster_duckdb_resource(tmp_path):
    base, db = str(tmp_path / "parquet"), str(tmp_path / "warehouse.duckdb")
    write_table(base, "raw_documents", "alpha", _docs("alpha", 7))

    @asset
    def warehouse(context: AssetExecutionContext, warehouse_db: DuckDBResource) -> None:
        counts = refresh_views_with_resource(warehouse_db, base, ["raw_documents", "feature_labels"])
        context.add_output_metadata({"row_counts": counts})

    result = materialize(
        [warehouse],
        resources={"warehouse_db": DuckDBResource(database=db)},
        instance=DagsterInstance.ephemeral(),
    )
    assert result.success
    (mat,) = result.get_asset_materialization_events()
    assert mat.materialization.metadata["row_counts"].value == {"raw_documents": 7}
    assert query(db, "SELECT count(*) AS n FROM raw_documents")["n"][0] == 7
    # the resource's connection was closed: a read-write open from another process succeeds at once
    other = _python("import sys, duckdb; duckdb.connect(sys.argv[1]).close(); print('ok')", db)
    out, err = other.communicate(timeout=60)
    assert out.strip() == "ok", err
    assert isinstance(query(db, "SELECT 1 AS x"), pl.DataFrame)


def test_one_unreadable_table_leaves_every_other_view_current(tmp_path):
    base = str(tmp_path / "parquet")
    db = str(tmp_path / "warehouse.duckdb")
    write_table(base, "good", "p", _docs("p", 3))
    write_table(base, "bad", "p", _docs("p", 2))
    assert refresh_views(db, base, ["bad", "good"]) == {"bad": 2, "good": 3}
    write_table(base, "good", "q", _docs("q", 4))  # new data in the good table
    bad_file = next((tmp_path / "parquet" / "bad").rglob("*.parquet"))
    bad_file.write_bytes(bad_file.read_bytes()[:20])  # truncated
    with pytest.raises(ViewRefreshError) as info:
        refresh_views(db, base, ["bad", "good"])
    assert list(info.value.errors) == ["bad"] and info.value.counts == {"good": 7}
    assert bad_file.name in str(info.value)  # the error names the file
    assert query(db, "select count(*) as n from good")["n"][0] == 7


def test_a_lost_manifest_is_reported_and_never_silently_drops_the_view(tmp_path):
    from interp_assets.storage.parquet import SegmentedTable

    base = str(tmp_path / "parquet")
    db = str(tmp_path / "warehouse.duckdb")
    docs = _docs("p", 3)
    write_table(base, "t", "p", SegmentedTable(docs.schema, {"s1": docs}))
    write_table(base, "t", "q", SegmentedTable(docs.schema, {"s1": _docs("q", 2)}))
    assert refresh_views(db, base, ["t"]) == {"t": 5}
    folder = tmp_path / "parquet" / "t" / "q"
    (folder / "_manifest.json").unlink()
    # just written (a first write before its manifest): not an error yet
    assert refresh_views(db, base, ["t"]) == {"t": 3}
    for f in folder.glob("*.parquet"):
        os.utime(f, (1, 1))  # long untouched: a lost manifest
    with pytest.raises(ViewRefreshError, match="no _manifest.json") as info:
        refresh_views(db, base, ["t"])
    assert str(folder) in str(info.value) and info.value.counts == {"t": 3}
    assert query(db, "select count(*) as n from t")["n"][0] == 3  # the readable partition stays


def test_command_line_lists_views_or_runs_one_query(tmp_path, capsys):
    """`python -m interp_assets.warehouse` is what `make sql` runs."""
    from interp_assets.warehouse import main

    base, db = str(tmp_path / "parquet"), str(tmp_path / "w.duckdb")
    write_table(base, "pooled_embeddings", "a", pl.DataFrame({"doc_id": [1, 2, 3]}))
    refresh_views(db, base, ["pooled_embeddings", "raw_documents"])
    assert main(["--db", db]) == 0
    listing = capsys.readouterr().out
    assert "│ pooled_embeddings ┆ 3 " in listing and "raw_documents" not in listing
    assert main(["--db", db, "select sum(doc_id) as total from pooled_embeddings"]) == 0
    assert "total" in capsys.readouterr().out
    assert main(["--db", db, "select nope from pooled_embeddings"]) == 1
    assert "nope" in capsys.readouterr().err
    assert main(["--db", str(tmp_path / "missing.duckdb")]) == 1
