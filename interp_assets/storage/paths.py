"""Where everything lives on disk (or in an object store). One place, so every module agrees."""

from __future__ import annotations

import os
import re

DATA_DIR_ENV = "INTERP_DATA_DIR"
DEFAULT_DATA_DIR = "var"

_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def data_dir() -> str:
    """Root of all platform state: `$INTERP_DATA_DIR`, default `./var`."""
    return os.environ.get(DATA_DIR_ENV, DEFAULT_DATA_DIR)


def require_utf8_path(path: str | os.PathLike[str], what: str, fix: str) -> str:
    """`path` as text when it is valid UTF-8; else a ValueError that shows it (bad bytes as `\\xNN`), says
    why it cannot be used and what to do (`fix`). Parquet, DuckDB and the Dagster UI take only UTF-8
    paths, and Python keeps undecodable bytes of a path as lone surrogates that nothing else accepts."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(text).decode("utf-8", "backslashreplace")
        raise ValueError(
            f"The {what} {shown} is not valid UTF-8 (undecodable bytes shown as \\xNN); the Parquet, DuckDB "
            f"and Dagster libraries take only UTF-8 paths. {fix}"
        ) from None
    return text


def check_storage_key(key: str, what: str = "partition key") -> str:
    """Return `key` if it is safe as one path component (letters, digits, `_ . -`; no `..`), else raise."""
    if not isinstance(key, str) or not _SAFE_KEY.match(key) or ".." in key:
        raise ValueError(
            f"Unsafe {what} {key!r}: use 1-128 characters from letters, digits, '_', '.', '-' "
            "starting with a letter or digit, and no '..'."
        )
    return key


def table_path(parquet_base: str, table: str, partition: str | None = None) -> str:
    """Path of one table's Parquet file: `<base>/<table>/<partition>.parquet` or `<base>/<table>.parquet`."""
    check_storage_key(table, "table name")
    base = parquet_base.rstrip("/")
    if partition is None:
        return f"{base}/{table}.parquet"
    return f"{base}/{table}/{check_storage_key(partition)}.parquet"


def segments_path(parquet_base: str, table: str, partition: str) -> str:
    """Folder of a segmented table partition: `<base>/<table>/<partition>` (segment files + `_manifest.json`).

    It sits beside the single-file path `table_path(base, table, partition)`; a partition uses one of the two.
    """
    check_storage_key(table, "table name")
    return f"{parquet_base.rstrip('/')}/{table}/{check_storage_key(partition)}"


def reader_parquet_base(parquet_base: str, reader: str) -> str:
    """Tables of an extra reader (`<data_dir>/config/readers.json`): `<base>/readers/<reader>`, the same
    layout as the default reader's under `<base>`, so the two never share a file."""
    return f"{parquet_base.rstrip('/')}/readers/{check_storage_key(reader, 'reader name')}"
