"""DuckDB warehouse: SQL views over the Parquet tables (Parquet stays the source of truth).

DuckDB lets one process hold a database file read-write, and while it does nobody else can open it
(a read-only holder also blocks writers). So every connection here is short-lived, and opening one
retries with jittered exponential backoff while another process holds the lock.

Tables on an object store (`INTERP_PARQUET_BASE=s3://...`): the views name the objects' URLs, and every
connection opened here lets DuckDB read them through fsspec (`register_object_store`), with the
platform's own credentials, since DuckDB's httpfs extension is downloaded at run time and may be missing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import duckdb
import fsspec
import polars as pl
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from interp_assets.storage.parquet import read_manifest, schema_of_manifest, segment_files
from interp_assets.storage.paths import data_dir

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_GLOB_CHARS = frozenset("*?[]{}")
DEFAULT_TIMEOUT_S = 60.0


class WarehouseLockedError(TimeoutError):
    """The DuckDB file stayed locked by another process for longer than the timeout."""


def default_db_path() -> str:
    """`<data_dir>/warehouse.duckdb`."""
    return os.path.join(data_dir(), "warehouse.duckdb")


def check_table_name(name: str) -> str:
    """Return `name` if it is a plain SQL identifier (letters, digits, `_`; max 63), else raise ValueError."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise ValueError(
            f"Invalid table name {name!r} for a DuckDB view: use 1-63 letters, digits or '_', "
            "starting with a letter or '_'."
        )
    return name


def sql_string_literal(value: str) -> str:
    """A single-quoted SQL string literal; embedded quotes are doubled so the value cannot end it."""
    return "'" + value.replace("'", "''") + "'"


def sql_identifier(name: str) -> str:
    """A double-quoted SQL identifier; embedded quotes are doubled so the name cannot end it."""
    return '"' + name.replace('"', '""') + '"'


def _is_lock_conflict(error: BaseException) -> bool:
    text = str(error).lower()
    if isinstance(error, duckdb.IOException):
        return "lock" in text
    # Same process, another live connection opened with other settings (read-only vs read-write).
    return isinstance(error, duckdb.ConnectionException) and "different configuration" in text


PARQUET_BASE_ENV = "INTERP_PARQUET_BASE"


def register_object_store(con: duckdb.DuckDBPyConnection, parquet_base: str | None = None) -> None:
    """Let `con` read the tables' object store through fsspec (`DuckDBPyConnection.register_filesystem`).

    `parquet_base` defaults to `$INTERP_PARQUET_BASE`; nothing is done for a local base. The filesystem
    is the one the platform writes with (s3fs: credentials and endpoint from the usual AWS_* variables,
    e.g. AWS_ENDPOINT_URL_S3), so SQL needs neither DuckDB's httpfs extension nor a DuckDB secret.
    """
    base = parquet_base or os.environ.get(PARQUET_BASE_ENV) or ""
    if "://" not in base:
        return
    try:
        fs, _ = fsspec.core.url_to_fs(base)
    except ImportError as exc:  # e.g. s3:// without s3fs
        raise ImportError(
            f"The tables' base {base} (INTERP_PARQUET_BASE or parquet_base) needs an fsspec filesystem that "
            f"is not installed ({exc}); install it (for s3://: pip install s3fs==2026.9.0, the release of "
            "the installed fsspec) or point INTERP_PARQUET_BASE at a local folder."
        ) from exc
    if not isinstance(fs, LocalFileSystem):
        fs.invalidate_cache()  # globs in views list the store afresh, not from a listing cached earlier
        con.register_filesystem(fs)


def _connect(
    db_path: str,
    read_only: bool,
    timeout_s: float,
    retries: int | None = None,
    parquet_base: str | None = None,
) -> duckdb.DuckDBPyConnection:
    """Open `db_path`, retrying lock conflicts with jittered backoff until `timeout_s` or `retries`; the
    connection reads an object-store `parquet_base` (`register_object_store`)."""
    deadline = time.monotonic() + timeout_s
    delay, attempt = 0.02, 0
    while True:
        try:
            con = duckdb.connect(db_path, read_only=read_only)
            try:
                register_object_store(con, parquet_base)
            except BaseException:
                con.close()
                raise
            return con
        except (duckdb.IOException, duckdb.ConnectionException) as error:
            if not _is_lock_conflict(error):
                raise
            attempt += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (retries is not None and attempt > retries):
                mode = "read-only" if read_only else "read-write"
                raise WarehouseLockedError(
                    f"Could not open the DuckDB warehouse {db_path} {mode}: another process kept it locked "
                    f"for {timeout_s:.1f}s ({attempt} attempts). Close long-lived DuckDB sessions on it "
                    f"(CLI, notebooks) or raise timeout_s. Last error: {error}"
                ) from error
            time.sleep(min(remaining, delay * random.uniform(0.5, 1.5)))
            delay = min(delay * 2, 0.5)


def connect_read_only(
    db_path: str,
    retries: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    parquet_base: str | None = None,
) -> duckdb.DuckDBPyConnection:
    """A read-only connection; retries while a writer holds the file. Close it soon (`with` works).
    Views over an object store read it through fsspec (`register_object_store`)."""
    if db_path != ":memory:" and not os.path.exists(db_path):
        raise FileNotFoundError(
            f"DuckDB warehouse {db_path} does not exist: build it with refresh_views() "
            "(materialize the warehouse asset) first."
        )
    return _connect(db_path, read_only=True, timeout_s=timeout_s, retries=retries, parquet_base=parquet_base)


def query(
    db_path: str,
    sql: str,
    params: Sequence[Any] | Mapping[str, Any] | None = None,
    timeout_s: float = 60.0,
    parquet_base: str | None = None,
) -> pl.DataFrame:
    """Run one read-only query (with `?`/`$name` parameters) and return a Polars DataFrame.

    `parquet_base` (default `$INTERP_PARQUET_BASE`): an object store the views read (`register_object_store`).
    """
    con = connect_read_only(db_path, timeout_s=timeout_s, parquet_base=parquet_base)
    try:
        relation = con.sql(sql, params=params)
        frame = pl.DataFrame() if relation is None else pl.from_arrow(relation.to_arrow_table())
    finally:
        con.close()
    assert isinstance(frame, pl.DataFrame)
    return frame


def _partition_entries(fs: fsspec.AbstractFileSystem, folder: str) -> tuple[list[str], list[str]]:
    """(single-file partition names `<p>.parquet`, sub-folder names) in a partitioned table's folder."""
    if not fs.isdir(folder):
        return [], []
    files, folders = [], []
    for info in fs.ls(folder, detail=True):
        name = info["name"].rstrip("/").rpartition("/")[2]
        if name.startswith("."):
            continue
        if info.get("type") == "directory":
            folders.append(name)
        elif name.endswith(".parquet"):
            files.append(name)
    return sorted(files), sorted(folders)


ORPHAN_AGE_S = 600  # a partition folder without a manifest this long after its last write is not mid-write


def _timestamp(stamp: Any) -> float:
    """A listing's modification time as seconds (S3 gives a datetime, local filesystems a number)."""
    return stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)


def _orphan_partitions(fs: fsspec.AbstractFileSystem, folder: str, names: list[str]) -> list[str]:
    """Partition folders that hold Parquet files but no manifest, untouched for `ORPHAN_AGE_S` seconds."""
    now = time.time()
    orphans = []
    for name in names:
        infos = [i for i in fs.ls(f"{folder}/{name}", detail=True) if str(i["name"]).endswith(".parquet")]
        ages = [
            now - _timestamp(i.get("mtime") or i.get("created") or i.get("LastModified") or now)
            for i in infos
        ]
        if infos and min(ages) > ORPHAN_AGE_S:
            orphans.append(name)
    return orphans


def table_source(parquet_base: str, table: str, problems: list[str] | None = None) -> str | None:
    """`read_parquet(...)` SQL over a table's Parquet files, or None when it has none.

    Partitioned tables of single files (`<base>/<table>/*.parquet`) are read with a glob so new partitions
    show up without a refresh; a base path containing glob characters is listed file by file instead.
    A table with segmented partitions (`<base>/<table>/<p>/_manifest.json`) lists its files: each such
    partition's current segments (the manifest's, never a half-written update's) plus the single files
    of the others, so its view must be refreshed after each write (`warehouse_views_sensor` does). The
    writer keeps the previous segments for one more write, so a view a little behind still reads.
    Unpartitioned tables read `<base>/<table>.parquet`. Local paths are made absolute.
    """
    check_table_name(table)
    fs, base = fsspec.core.url_to_fs(parquet_base)
    local = isinstance(fs, LocalFileSystem)
    if not local:
        fs.invalidate_cache()  # an object store's listings may be cached from before another process wrote
    if local:
        base = os.path.abspath(base)
        url_base = base
    else:
        url_base = parquet_base.rstrip("/")
    files, folders = _partition_entries(fs, f"{base}/{table}")
    segmented = {p: segment_files(f"{url_base}/{table}/{p}") for p in folders}
    if problems is not None:  # a lost manifest never silently drops a partition from the view
        unlisted = [p for p, urls in segmented.items() if urls is None]
        for p in _orphan_partitions(fs, f"{base}/{table}", unlisted):
            problems.append(
                f"partition folder {url_base}/{table}/{p} holds segment files but no _manifest.json, so it "
                f"is left out of the view; materialize {table} for partition {p!r} again"
            )
    segmented = {p: urls for p, urls in segmented.items() if urls is not None}
    options = "union_by_name = true, hive_partitioning = false"
    if segmented:
        singles = [f"{url_base}/{table}/{f}" for f in files if f.removesuffix(".parquet") not in segmented]
        urls = singles + [u for p in sorted(segmented) for u in segmented[p]]
        if not urls:  # only partitions of zero segments (every document rejected): an empty, typed view
            return _empty_source(read_manifest(f"{url_base}/{table}/{sorted(segmented)[0]}"))
        return f"read_parquet([{', '.join(sql_string_literal(u) for u in urls)}], {options})"
    if files:
        if _GLOB_CHARS.isdisjoint(url_base):
            return f"read_parquet({sql_string_literal(f'{url_base}/{table}/*.parquet')}, {options})"
        urls = [f"{url_base}/{table}/{f}" for f in files]
        return f"read_parquet([{', '.join(sql_string_literal(u) for u in urls)}], {options})"
    if fs.isfile(f"{base}/{table}.parquet"):
        return f"read_parquet({sql_string_literal(f'{url_base}/{table}.parquet')}, {options})"
    return None


def _empty_source(manifest: dict) -> str:
    """A zero-row SQL source with the columns and DuckDB types of a segmented table's Arrow schema."""
    schema = schema_of_manifest(manifest)
    # DuckDB reads float16 Parquet columns as FLOAT but cannot import an Arrow float16 type
    readable = pa.schema([f.with_type(pa.float32()) if f.type == pa.float16() else f for f in schema])
    types = duckdb.from_arrow(readable.empty_table()).types
    columns = ", ".join(
        f"CAST(NULL AS {t}) AS {sql_identifier(f.name)}" for f, t in zip(schema, types, strict=True)
    )
    return f"(SELECT {columns} WHERE false)"


class ViewRefreshError(ValueError):
    """Some views could not be refreshed; every other view was. `errors` maps table -> what went wrong."""

    def __init__(self, errors: Mapping[str, str], counts: Mapping[str, int]) -> None:
        self.errors = dict(errors)
        self.counts = dict(counts)
        listed = "; ".join(f"{table}: {problem.rstrip('.')}" for table, problem in self.errors.items())
        super().__init__(
            f"{len(self.errors)} DuckDB view(s) with problems (a view that cannot be built keeps its "
            f"previous definition; every other view is current): {listed}. Fix or re-materialize those "
            "partitions, then refresh again."
        )


ViewSource = tuple[str | None, str | None]
"""A table's view: its SQL source (None: no files) and what is wrong with it (None: nothing)."""


def apply_views(con: duckdb.DuckDBPyConnection, sources: Mapping[str, ViewSource]) -> dict[str, int]:
    """Create or replace one view per table (dropping views of tables without files), each in its own
    transaction: a table whose files cannot be read keeps its previous view and is reported in a
    `ViewRefreshError` raised after every other table was refreshed. Returns row counts."""
    counts: dict[str, int] = {}
    errors: dict[str, str] = {}
    for table, (source, problem) in sources.items():
        name = '"' + check_table_name(table) + '"'
        if problem is not None:
            errors[table] = problem
            if source is None:
                continue  # nothing readable: keep the previous view rather than drop it
        con.execute("BEGIN TRANSACTION")
        try:
            if source is None:
                con.execute(f"DROP VIEW IF EXISTS {name}")
            else:
                con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM {source}")
                row = con.execute(f"SELECT count(*) FROM {name}").fetchone()
                counts[table] = int(row[0]) if row else 0
            con.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            if not isinstance(exc, duckdb.Error):
                raise
            errors[table] = f"{type(exc).__name__}: {exc}"
    if errors:
        raise ViewRefreshError(errors, counts)
    return counts


# Views over other views, each with the tables it reads: created when every one of them has a view, dropped
# when one has none. token_activations_wide is token_activations in the shape it had before the tokens
# table held the token columns (the same join as `interp_assets.storage.parquet.with_tokens`).
JOINED_VIEWS: dict[str, tuple[tuple[str, ...], str]] = {
    "token_activations_wide": (
        ("token_activations", "tokens"),
        "SELECT a.dataset, a.doc_id, a.token_index, t.token, t.char_start, t.char_end, a.feature, "
        "a.activation FROM token_activations a JOIN tokens t "
        "ON a.dataset = t.dataset AND a.doc_id = t.doc_id AND a.token_index = t.token_index",
    ),
}


def apply_joined_views(con: duckdb.DuckDBPyConnection, tables: Sequence[str]) -> list[str]:
    """Create or replace each `JOINED_VIEWS` view that reads one of `tables` when all the views it reads
    exist, else drop it; returns the names of those that exist now. Their rows are not counted (a join
    over every row would make each refresh pay for it)."""
    existing = {
        row[0] for row in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
    }
    present = []
    for name, (reads, sql) in JOINED_VIEWS.items():
        if not set(reads) & set(tables):
            continue
        if set(reads) <= existing:
            con.execute(f"CREATE OR REPLACE VIEW {sql_identifier(check_table_name(name))} AS {sql}")
            present.append(name)
        else:
            con.execute(f"DROP VIEW IF EXISTS {sql_identifier(check_table_name(name))}")
    return present


def _sources(parquet_base: str, tables: Sequence[str]) -> dict[str, ViewSource]:
    for table in tables:
        check_table_name(table)
    sources: dict[str, ViewSource] = {}
    for table in tables:
        problems: list[str] = []
        try:
            source = table_source(parquet_base, table, problems)
        except (OSError, ValueError) as exc:  # one unreadable table never blocks the others
            sources[table] = (None, f"{type(exc).__name__}: {exc}")
            continue
        sources[table] = (source, "; ".join(problems) if problems else None)
    return sources


def refresh_views(
    db_path: str, parquet_base: str, tables: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S
) -> dict[str, int]:
    """(Re)build the views over `tables` in `db_path` with a short read-write connection.

    Returns row counts of the tables that have Parquet files; views of tables without files are dropped.
    The `JOINED_VIEWS` over them follow (`apply_joined_views`). Each table is refreshed on its own: one
    that fails keeps its previous view and is named in the `ViewRefreshError` raised once all the others
    are current.
    """
    sources = _sources(parquet_base, tables)
    if db_path != ":memory:":
        os.makedirs(os.path.dirname(os.path.abspath(db_path)), exist_ok=True)
        if not os.path.exists(db_path):
            created = _create_with_views(db_path, parquet_base, tables, sources)
            if created is not None:
                return created
    return _apply_all(
        _connect(db_path, read_only=False, timeout_s=timeout_s, parquet_base=parquet_base), tables, sources
    )


def _apply_all(
    con: duckdb.DuckDBPyConnection, tables: Sequence[str], sources: Mapping[str, ViewSource]
) -> dict[str, int]:
    """`apply_views` then `apply_joined_views` on `con`, which is closed afterwards."""
    try:
        try:
            return apply_views(con, sources)
        finally:  # also after a ViewRefreshError: every view that could be refreshed was
            apply_joined_views(con, tables)
    finally:
        con.close()


def _create_with_views(
    db_path: str, parquet_base: str, tables: Sequence[str], sources: Mapping[str, ViewSource]
) -> dict[str, int] | None:
    """Build a new warehouse at a private path and link it into place only once every view is in it, so a
    reader that sees the file never finds it without its views. Returns the row counts, or None when
    another process created `db_path` first (the caller then refreshes that one)."""
    private = f"{db_path}.{os.getpid()}-{random.getrandbits(32):08x}.new"
    try:
        con = duckdb.connect(private)
        try:
            register_object_store(con, parquet_base)
        except BaseException:
            con.close()
            raise
        problem: ViewRefreshError | None = None
        try:
            counts = _apply_all(con, tables, sources)
        except ViewRefreshError as exc:  # every other view is in: publish them, then report
            problem, counts = exc, exc.counts
        # _apply_all closed the connection, which checkpoints: the file holds everything, no WAL left
        try:
            os.link(private, db_path)  # atomic, and fails rather than replace a warehouse made meanwhile
        except OSError:  # made meanwhile (FileExistsError), or no hard links here: refresh in place
            return None
        if problem is not None:
            raise problem
        return counts
    finally:
        for leftover in (private, f"{private}.wal"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)


def refresh_views_with_resource(
    duckdb_resource: Any, parquet_base: str, tables: Sequence[str]
) -> dict[str, int]:
    """`refresh_views` on the database of a dagster-duckdb `DuckDBResource`.

    Goes through our own `_connect`, which retries both a lock held by another process and DuckDB's
    "different configuration" error when this process holds a read-only connection to the same file
    (`DuckDBResource.get_connection` retries only the former).
    """
    return refresh_views(duckdb_resource.database, parquet_base, tables)


def view_row_counts(db_path: str) -> pl.DataFrame:
    """Every view of the warehouse with its row count (`view`, `rows`), in name order."""
    views = query(db_path, "select view_name from duckdb_views() where not internal order by view_name")
    names = [check_table_name(n) for n in views["view_name"].to_list()]
    if not names:
        return pl.DataFrame(schema={"view": pl.String, "rows": pl.Int64})
    union = " union all ".join(
        f'select {sql_string_literal(n)} as "view", count(*) as "rows" from {sql_identifier(n)}'
        for n in names
    )
    return query(db_path, union)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m interp_assets.warehouse [--db PATH] [SQL]` (what `make sql Q="..."` runs): print the
    result of one read-only query, or without SQL every view and its row count."""
    parser = argparse.ArgumentParser(prog="python -m interp_assets.warehouse", description=main.__doc__)
    parser.add_argument("sql", nargs="?", help="a read-only query; omit it to list the views")
    parser.add_argument("--db", default=default_db_path(), help="the DuckDB file (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        frame = query(args.db, args.sql) if args.sql else view_row_counts(args.db)
    except (FileNotFoundError, duckdb.Error) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    with pl.Config(tbl_rows=100, tbl_cols=-1, fmt_str_lengths=80, tbl_width_chars=200):
        print(frame)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
