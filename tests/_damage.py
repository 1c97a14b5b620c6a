"""Damage that size and footer checks cannot see: bytes flipped inside a Parquet file's data pages."""

from pathlib import Path

import pyarrow.parquet as pq


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
