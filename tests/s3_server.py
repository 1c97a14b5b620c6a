"""A real local S3-compatible server for tests: moto's server mode, in a subprocess on 127.0.0.1.

The real clients run against it (s3fs through fsspec, boto3, DuckDB's httpfs where installed): it speaks
the S3 REST protocol, keeps objects in its own memory, and honours conditional writes (`If-Match`,
`If-None-Match: *`) as AWS S3 does. Credentials are dummies; nothing leaves the machine.

    with S3Server() as server:
        os.environ.update(server.env)  # AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ... for s3fs and boto3
        base = f"s3://{server.bucket}/some/prefix"
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any


def moto_missing() -> str | None:
    """Why the S3 tests cannot run here (moto's server or s3fs not installed), or None when they can."""
    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as exc:
        return (
            f"the object-storage tests need moto[server] and s3fs ({exc}); install the dev extras "
            "(`make setup`, or pip install -e '.[dev]')"
        )
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server:
    """moto's S3 server on a free port, with one bucket; `env` points s3fs/boto3 at it."""

    def __init__(self, bucket: str = "interp-tests") -> None:
        self.bucket = bucket
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self._proc: subprocess.Popen | None = None

    def start(self) -> S3Server:
        env = {**os.environ, **self.env}
        # its request log goes to a file (a pipe nobody reads would fill up and stall the server)
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 30
        while True:
            if self._proc.poll() is not None:
                self._log.seek(0)
                err = self._log.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"moto's S3 server exited at start (code {self._proc.returncode}): {err}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto: no answer on {self.endpoint} in 30 s") from None
                time.sleep(0.1)
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def client(self) -> Any:
        """A boto3 S3 client on this server (for setting up or inspecting objects)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._log.close()
        self._proc = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
