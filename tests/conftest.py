"""Test session setup: the tests never read or write the developer's data folder.

`definitions.py` reads `$INTERP_DATA_DIR/config/` (extra readers) when it is imported, and resources
built from it write under `$INTERP_DATA_DIR`; the default `./var` would make tests depend on, and change,
what a developer has there. Tests that need a data folder of their own still pass one explicitly.
"""

import atexit
import os
import shutil
import signal
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/s3_server.py

_DATA_DIR = tempfile.mkdtemp(prefix="interp_tests_")
os.environ["INTERP_DATA_DIR"] = _DATA_DIR
atexit.register(shutil.rmtree, _DATA_DIR, ignore_errors=True)

# A shell starts a background job (`make test &`, a CI step run with `&`) with SIGINT ignored. Around every
# in-process run on the main thread Dagster maps SIGTERM to SIGINT's handler, and afterwards leaves SIGTERM
# ignored too; a run on another thread (several tests run one there) then starts its compute-log `tail`
# processes ignoring SIGTERM, and Dagster waits 30 s for each to end. Ctrl-C semantics for the tests.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server (tests/s3_server.py), started once for the session and stopped after it."""
    from s3_server import S3Server, moto_missing

    missing = moto_missing()
    if missing:
        pytest.skip(missing)
    with S3Server() as server:
        yield server


@pytest.fixture
def s3_base(s3_server, monkeypatch) -> str:
    """A fresh `s3://bucket/<prefix>` on the session's S3 server; s3fs (in this process and in the
    processes it starts) reaches it through the AWS_* variables, set for this test only."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return f"s3://{s3_server.bucket}/{uuid.uuid4().hex[:12]}"
