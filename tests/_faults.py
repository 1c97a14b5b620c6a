"""Faults for tests: bytes flipped inside a Parquet file (size and footer kept), a disk that fills up."""

from __future__ import annotations

import errno
import io
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from interp_assets.storage import parquet


def flip_inside_data(path: Path, n: int = 4) -> int:
    """Flip `n` bytes in the middle of the largest column chunk of the first row group; returns the offset.

    The file keeps its size and its footer (asserted), so only a content checksum can tell.
    """
    meta = pq.read_metadata(path)
    chunks = [meta.row_group(0).column(i) for i in range(meta.num_columns)]
    chunk = max(chunks, key=lambda c: c.total_compressed_size)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    offset = start + chunk.total_compressed_size // 2
    raw = bytearray(path.read_bytes())
    size = len(raw)
    for i in range(offset, offset + n):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert path.stat().st_size == size and pq.read_metadata(path).num_rows == meta.num_rows
    return offset


class FullDisk:
    """Every file `interp_assets.storage.parquet` writes (Parquet files, manifests, cache sums) goes through
    here; once `budget` bytes are written in all, a write stores what still fits and raises ENOSPC.
    `budget=None` never fills: `written` and `files` (bytes per file, in order) then measure what a run
    writes. Install with `install`."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = budget
        self.written = 0
        self.files: list[int] = []

    def open(self, path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if "w" not in mode:
            return open(path, mode, *args, **kwargs)
        disk = self
        disk.files.append(0)

        class _File(io.FileIO):
            def write(self, data: Any) -> int:
                data = bytes(data)
                room = len(data) if disk.budget is None else max(0, disk.budget - disk.written)
                if len(data) > room:
                    disk.written += super().write(data[:room]) if room else 0
                    raise OSError(errno.ENOSPC, "No space left on device (simulated)", str(path))
                disk.written += len(data)
                disk.files[-1] += len(data)
                return super().write(data)

        return _File(path, mode)

    def install(self, monkeypatch: Any) -> FullDisk:
        real = parquet._write_stream

        def write_stream(sink: Any, *args: Any) -> Any:
            if not isinstance(sink, str):
                return real(sink, *args)
            with self.open(sink, "wb") as f:
                return real(f, *args)

        monkeypatch.setattr(parquet, "_write_stream", write_stream)
        monkeypatch.setattr(parquet, "open", self.open, raising=False)
        return self


def cut_points(files: list[int]) -> list[int]:
    """Byte budgets that stop a run whose files are `files` bytes long (`FullDisk.files`) in each file:
    before its first byte, after it, in its middle and one byte short of its end."""
    cuts, start = set(), 0
    for size in files:
        cuts.update(start + c for c in (0, 1, size // 2, size - 1) if 0 <= c < size)
        start += size
    return sorted(cuts)


KILL_POINTS = ("acts", "sums", "marker", "commit")


def install_kill_point(point: str, chunk: int) -> None:
    """Make this process die (`os._exit(137)`, no cleanup, as SIGKILL) at one point of the `chunk`-th
    (1-based) activation-cache commit. A commit writes the `.acts` file, then `.sums.json`, then the `.docs`
    commit marker, each atomically:
    - `acts`: mid-write of the `.acts` file (half of it in its temp file);
    - `sums`: after the `.acts` file, before its sums and marker;
    - `marker`: mid-write of the `.docs` marker (half of it in its temp file), the other files in place;
    - `commit`: just after the marker: the chunk is committed, the next one not begun.
    For worker processes only: the patch is never undone."""
    import os
    import sys

    from interp_assets.engine import activation_cache

    if point not in KILL_POINTS or chunk < 1:
        raise ValueError(f"kill point must be one of {KILL_POINTS} with a chunk >= 1; got {point}:{chunk}")
    real_parquet, real_bytes = activation_cache.write_parquet_atomic, activation_cache.write_bytes_atomic
    seen = {"acts": 0, "marker": 0}

    def die() -> None:
        sys.stdout.flush()
        os._exit(137)

    def torn(path: str, payload: bytes) -> None:
        with open(parquet._tmp_name(path), "wb") as f:
            f.write(payload[: len(payload) // 2])
        die()

    def write_acts(path: str, data: Any) -> Any:
        seen["acts"] += 1
        if point == "acts" and seen["acts"] == chunk:
            torn(path, parquet.parquet_bytes(data))
        written = real_parquet(path, data)
        if point == "sums" and seen["acts"] == chunk:
            die()
        return written

    def write_small(path: str, payload: bytes) -> None:
        marker = path.endswith(".docs.parquet")
        seen["marker"] += marker
        if marker and point == "marker" and seen["marker"] == chunk:
            torn(path, payload)
        real_bytes(path, payload)
        if marker and point == "commit" and seen["marker"] == chunk:
            die()

    activation_cache.write_parquet_atomic = write_acts
    activation_cache.write_bytes_atomic = write_small
