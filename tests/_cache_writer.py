"""Subprocess helper for tests/engine/test_cache_s3.py (not collected: the name does not start with
`test_`): one writer of an activation cache, run as its own process so that two of them commit chunks into
one cache at once. No model: test_cache_faults.fake_encode stands in for the reader.

    python tests/_cache_writer.py <cache_root> <start> <stop>

Encodes documents [start, stop) of test_cache_faults.documents(TOTAL), 5 per chunk, into
`<cache_root>/fp/`; prints the EncodeStats as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS / "engine")]

from test_cache_faults import documents, fake_encode  # noqa: E402

from interp_assets.engine.activation_cache import ActivationCache  # noqa: E402

TOTAL = 90
PER_CHUNK = 5


def main(root: str, start: int, stop: int) -> int:
    docs = documents(TOTAL)[start:stop]
    stats = ActivationCache(root, "fp").encode_missing(fake_encode, docs, max_docs=PER_CHUNK)
    print(json.dumps(dataclasses.asdict(stats)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
