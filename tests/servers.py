"""Throwaway servers the scaling-out tests start and stop themselves: PostgreSQL (Debian's `initdb` +
`pg_ctl`), Redis (`redis-server`) and dagster-celery workers, each on 127.0.0.1 in a temporary folder.

A server whose binaries are missing makes the test skip, saying which binary and where it was looked for;
anything else that goes wrong fails the test with the server's log.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN_DIRS = ("/usr/local/bin", "/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin")
VENV_BIN = Path(sys.executable).parent


def binary(name: str) -> str | None:
    """`name` on PATH or in one of BIN_DIRS (Debian keeps PostgreSQL's binaries off PATH)."""
    found = shutil.which(name)
    if found:
        return found
    return next((f"{d}/{name}" for d in BIN_DIRS if os.access(f"{d}/{name}", os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@contextlib.contextmanager
def postgres_server() -> Iterator[dict]:
    """A PostgreSQL server of our own: initdb + pg_ctl in a temporary folder, TCP on 127.0.0.1 only, trust
    authentication, fsync off, a database `dagster`. PostgreSQL refuses to run as root, so as root it runs
    as the `postgres` user (else `nobody`) through runuser; stopped and removed afterwards. Sets
    DAGSTER_PG_USER / DAGSTER_PG_PASSWORD while it runs; yields hostname, db_name and port."""
    initdb, pg_ctl = binary("initdb"), binary("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found on PATH or in " + ", ".join(BIN_DIRS))
    prefix: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="interp-pg-"))
    if os.geteuid() == 0:
        runuser = shutil.which("runuser") or shutil.which("su")
        if runuser is None:
            pytest.skip("running as root and neither runuser nor su is available to drop privileges")
        user = next((u for u in ("postgres", "nobody") if has_user(u)), None)
        if user is None:
            pytest.skip("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL")
        os.chown(folder, pwd.getpwnam(user).pw_uid, -1)
        prefix = [runuser, "-u", user, "--"] if runuser.endswith("runuser") else []
        if not prefix:
            pytest.skip("running as root: only `su` found; use runuser (util-linux) to run PostgreSQL")
    data, port = folder / "data", free_port()

    def run(*cmd: str) -> None:
        done = subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120, check=False)
        if done.returncode:
            log = (folder / "server.log").read_text() if (folder / "server.log").exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stdout}{done.stderr}{log}")

    run(initdb, "-D", str(data), "-A", "trust", "-U", "dagster", "-E", "UTF8", "--no-sync")
    options = f"-h 127.0.0.1 -p {port} -k {folder} -F"
    run(pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "server.log"), "-w", "-t", "60", "start")
    try:
        create_database({"port": port}, "dagster")
        os.environ["DAGSTER_PG_USER"], os.environ["DAGSTER_PG_PASSWORD"] = "dagster", "unused-with-trust"
        yield {"hostname": "127.0.0.1", "db_name": "dagster", "port": port}
    finally:
        for name in ("DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD"):
            os.environ.pop(name, None)
        run(pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def create_database(pg: dict, name: str) -> None:
    """CREATE DATABASE `name` on the server of `postgres_server`."""
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=pg["port"], user="dagster", dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    conn.close()


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A Redis server of our own on 127.0.0.1 and a free port, in the foreground (no daemonizing), in a
    temporary folder, without persistence (no RDB snapshots, no append-only file); yields its URL
    `redis://127.0.0.1:<port>` and stops it afterwards. Skips when `redis-server` is missing."""
    server = binary("redis-server")
    if server is None:
        pytest.skip(
            "redis-server not found on PATH or in " + ", ".join(BIN_DIRS) + " (Debian: apt-get install "
            "redis-server; .ci/run installs it when it can)"
        )
    folder = Path(tempfile.mkdtemp(prefix="interp-redis-"))
    port = free_port()
    log = open(folder / "server.log", "wb")  # noqa: SIM115 (closed below)
    args = ["--bind", "127.0.0.1", "--port", str(port), "--dir", str(folder), "--daemonize", "no"]
    proc = subprocess.Popen(
        [server, *args, "--save", "", "--appendonly", "no", "--protected-mode", "yes"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                log_text = (folder / "server.log").read_text()[-2000:]
                raise RuntimeError(f"redis-server did not start: {log_text}")
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}"
    finally:
        stop_group(proc, grace_s=15)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def celery_workers(
    names: list[str], queues: list[str], config_yaml: Path, env: dict[str, str], logs: Path
) -> Iterator[list[subprocess.Popen]]:
    """dagster-celery workers (`dagster-celery worker start`), one process each (`--concurrency 1`),
    consuming `queues`, with the executor config at `config_yaml` (broker and backend) and `env` (it must
    name the same DAGSTER_HOME, INTERP_* settings as the runs); each logs to `logs/<name>.log`. Waits until
    each says it is ready; stops each worker's process group afterwards."""
    cli = shutil.which("dagster-celery", path=str(VENV_BIN))
    if cli is None:
        pytest.skip(f"dagster-celery is not installed in {VENV_BIN} (the `dev` extras install it)")
    logs.mkdir(parents=True, exist_ok=True)
    env = {**env, "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', os.environ.get('PATH', ''))}"}
    procs: list[subprocess.Popen] = []
    files = []
    try:
        for name in names:
            log = open(logs / f"{name}.log", "wb")  # noqa: SIM115 (closed below)
            files.append(log)
            cmd = [cli, "worker", "start", "-A", "dagster_celery.app", "-y", str(config_yaml), "-n", name]
            cmd += ["-q", ",".join(queues), "--", "--concurrency=1", "--without-gossip", "--without-mingle"]
            procs.append(
                subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )
        deadline = time.monotonic() + 180  # generous: imports on a loaded 2-core machine
        for name, proc in zip(names, procs, strict=True):
            while b" ready." not in (logs / f"{name}.log").read_bytes():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"celery worker {name} did not start: {(logs / f'{name}.log').read_text()[-3000:]}"
                    )
                time.sleep(0.5)
        yield procs
    finally:
        for proc in procs:
            stop_group(proc)
        for log in files:
            log.close()


def stop_group(proc: subprocess.Popen, grace_s: float = 60) -> None:
    """SIGTERM to the process group the test started (a daemon or worker and its children), then SIGKILL
    to what is left after `grace_s` seconds: a parent alone would leave its children (a daemon's gRPC code
    server, a worker's pool processes) running."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
