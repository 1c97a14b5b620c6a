"""Subprocess helper for tests/storage/test_object_storage.py (not collected: the name does not start with
`test_`): one writer of a segmented table partition, run as its own process so that two of them write
the same partition at once.

    python tests/_table_writer.py <base> <writer> <writes>

Writes `<writes>` versions of table `t`, partition `p`, each of two fresh segments whose rows all carry
`tag = writer * 1000 + i` (and 7 rows in all); prints one line per write.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402

from interp_assets.storage.parquet import SegmentedTable, write_table  # noqa: E402

SCHEMA = pa.schema([("tag", pa.int32()), ("row", pa.int32())])
ROWS = (3, 4)  # rows of the two segments


def version(tag: int) -> SegmentedTable:
    segments = {}
    start = 0
    for s, n in enumerate(ROWS):
        segments[f"t{tag}-{s}"] = pa.table({"tag": [tag] * n, "row": list(range(start, start + n))}, SCHEMA)
        start += n
    return SegmentedTable(SCHEMA, segments)


def main(base: str, writer: int, writes: int) -> int:
    for i in range(writes):
        write_table(base, "t", "p", version(writer * 1000 + i))
        print(f"writer {writer} wrote {i}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
