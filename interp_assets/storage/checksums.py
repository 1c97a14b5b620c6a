"""Content checksums of stored files: recorded when a file is committed, checked before it is trusted.

A record is `{"bytes": size, "sha256": hex digest of the whole file}` (segment manifests, activation-cache
chunk sums, table metadata). Size and a readable Parquet footer catch truncated or replaced files; the
digest also catches bytes changed inside a file that keep its size and footer. Pure functions over local
paths or fsspec URLs; callers decide what a mismatch costs (quarantine, rewrite, recompute).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import fsspec

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def file_sha256(path: str) -> str:
    """Hex SHA-256 of the file at `path` (local path or fsspec URL), read in blocks."""
    fs, fspath = fsspec.core.url_to_fs(path)
    with fs.open(fspath, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_record(path: str) -> dict[str, Any]:
    """`{"bytes", "sha256"}` of the file at `path`: what to record when it is committed."""
    fs, fspath = fsspec.core.url_to_fs(path)
    return {"bytes": fs.size(fspath), "sha256": file_sha256(path)}


def is_sha256(value: Any) -> bool:
    """Whether `value` is a hex SHA-256 as records hold it (64 lower-case hex characters)."""
    return isinstance(value, str) and _SHA256.match(value) is not None


def checksum_problem(path: str, recorded: Mapping[str, Any], size: int | None = None) -> str | None:
    """Why the file at `path` is not the one `recorded` describes, or None when it matches.

    Checks what the record holds: `bytes` (against `size` when the caller already knows it), then
    `sha256` (the file is read only when its size matched). A record without either checks nothing.
    """
    if recorded.get("bytes") is not None and size is None:
        fs, fspath = fsspec.core.url_to_fs(path)
        size = fs.size(fspath)
    return _mismatch(size, lambda: file_sha256(path), recorded)


def bytes_record(payload: bytes) -> dict[str, Any]:
    """`{"bytes", "sha256"}` of `payload`, for a file about to be written with exactly these bytes."""
    return {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


def bytes_problem(payload: bytes, recorded: Mapping[str, Any]) -> str | None:
    """`checksum_problem` for a file already read into `payload`."""
    return _mismatch(len(payload), lambda: hashlib.sha256(payload).hexdigest(), recorded)


def _mismatch(size: int | None, digest: Callable[[], str], recorded: Mapping[str, Any]) -> str | None:
    if recorded.get("bytes") is not None and size != recorded["bytes"]:
        return f"{size} bytes where {recorded['bytes']} were recorded"
    if recorded.get("sha256") is not None:
        actual = digest()
        if actual != recorded["sha256"]:
            return f"content checksum sha256 {actual[:12]}... where {recorded['sha256'][:12]}... was recorded"
    return None
