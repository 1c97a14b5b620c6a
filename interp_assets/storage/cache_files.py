"""Whole-file caches (document embeddings, labels, scores) that check their content before trusting it.

A cache file `<name>` is written atomically beside `<name>.sums.json`, which records the
`{"bytes", "sha256"}` of the file and of the few written before it. The record is written first and the
file replaced second, so a crash between the two leaves a file that the record still vouches for, and
two writers racing leave a file whose record is kept. Reading checks the file against the records. A file
that matches none of them, or that cannot be parsed, is moved to `quarantine/` beside it with a warning
naming both paths, and the cache starts empty: everything in a cache can be computed again, so a damaged
one costs time, never a wrong answer or a failed run. Local paths only (caches live in the data folder).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import polars as pl

from interp_assets.storage.checksums import bytes_problem, bytes_record, is_sha256
from interp_assets.storage.parquet import write_bytes_atomic

QUARANTINE = "quarantine"
RECORDS_KEPT = 4  # the current file's record and the last few before it (racing writers)
T = TypeVar("T")
_log = logging.getLogger(__name__)


def sums_path(path: Path) -> Path:
    """Where the records of cache file `path` live: `<name>.sums.json` beside it."""
    return path.with_name(f"{path.name}.sums.json")


def _is_record(record: Any) -> bool:
    if not isinstance(record, dict):
        return False
    return is_sha256(record.get("sha256")) and isinstance(record.get("bytes"), int)


def _records(path: Path) -> list[dict[str, Any]] | None:
    """The records of cache file `path`; None when it has none (written before records were kept).
    ValueError when the sums file exists but is not a list of records."""
    try:
        raw = sums_path(path).read_bytes()
    except FileNotFoundError:
        return None
    try:
        records = json.loads(raw)["records"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{sums_path(path).name} is not a list of records ({exc})") from None
    if not isinstance(records, list) or not all(map(_is_record, records)):
        raise ValueError(f"{sums_path(path).name} is not a list of records")
    return records


def write_cache_file(path: str | os.PathLike[str], payload: bytes) -> None:
    """Replace cache file `path` with `payload` atomically, its record written first (see the module)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        earlier = _records(path) or []
    except ValueError:
        earlier = []
    record = bytes_record(payload)
    kept = [record] + [r for r in earlier if r["sha256"] != record["sha256"]][: RECORDS_KEPT - 1]
    write_bytes_atomic(str(sums_path(path)), json.dumps({"records": kept}).encode())
    write_bytes_atomic(str(path), payload)


def quarantine(
    path: str | os.PathLike[str],
    problem: str,
    what: str,
    then: str,
    on_warning: Callable[[str], None] | None = None,
    companions: Sequence[Path] = (),
) -> Path:
    """Move `path` (a file or a folder) and its `companions` (its records, say) to `quarantine/` beside it,
    stamped, and warn: what is damaged and why, where it went, and `then` (what happens now). Returns the
    new path."""
    path = Path(path)
    target = path.parent / QUARANTINE
    target.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    moved = target / f"{path.name}.{stamp}"
    os.replace(path, moved)
    for companion in companions:
        with contextlib.suppress(FileNotFoundError):
            os.replace(companion, target / f"{companion.name}.{stamp}")
    (on_warning or _log.warning)(
        f"The {what} {path} is damaged ({problem}); moved it to {moved} and {then}. Delete the quarantined "
        "copy once you no longer need it."
    )
    return moved


def parquet_frame(payload: bytes) -> pl.DataFrame:
    """The Parquet file held in `payload` (a cache file's verified bytes) as a frame."""
    return pl.read_parquet(io.BytesIO(payload))


def load_cache_file(
    path: str | os.PathLike[str],
    parse: Callable[[bytes], T],
    what: str,
    on_warning: Callable[[str], None] | None = None,
    absent_ok: bool = True,
) -> T | None:
    """`parse` of the verified content of cache file `path`; None when there is no file, or when it was
    damaged (then it is quarantined, see `quarantine`). With `absent_ok=False`, no file is a
    FileNotFoundError instead (for a caller that listed the file and must tell "gone" from "damaged").

    A file without records (written before they were kept) is trusted when it parses and gets a record.
    """
    path = Path(path)
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        if absent_ok:
            return None
        raise
    try:
        records = _records(path)
        if records is not None:
            problems = [bytes_problem(payload, r) for r in records]
            if all(problems):  # an empty list of records vouches for nothing either
                many = f"matches none of {len(problems)} records"
                raise ValueError(problems[0] if len(problems) == 1 else many)
        value = parse(payload)
    except Exception as exc:  # noqa: BLE001 - any damage is handled the same way: quarantine, start empty
        problem = f"{type(exc).__name__}: {exc}"[:300]
        then = "started an empty one, so its entries will be computed again"
        quarantine(path, problem, what, then, on_warning, companions=[sums_path(path)])
        return None
    if records is None:
        with contextlib.suppress(OSError):
            record = json.dumps({"records": [bytes_record(payload)]}).encode()
            write_bytes_atomic(str(sums_path(path)), record)
    return value
