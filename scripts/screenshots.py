"""The README's screenshots, taken again with headless Chromium: docs/screenshots/asset_graph.png (the Dagster
UI's global asset lineage, every group expanded) and docs/screenshots/diff_report.png (the demo comparison's
HTML report).

Runs `make demo` into the data folder when it holds no report yet, starts `make ui` on it (port 3000 must be
free), waits for any runs its sensors launch on a first start, takes both pictures through the Chrome
DevTools protocol (the graph needs a click and browser settings that a plain `--screenshot` cannot give),
and stops the UI. Needs `chromium` on PATH (Debian: apt-get install chromium).

Usage: .venv/bin/python scripts/screenshots.py [--data-dir /tmp/interp_screenshots]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import websocket  # websocket-client (an nnsight dependency)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "screenshots"
UI = "http://127.0.0.1:3000"
GROUPS = ["ingest", "features", "documents", "labels", "analysis"]
WIDTH, HEIGHT = 1400, 900


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except OSError:
        return False
    return True


def _wait(what: str, ready: Any, seconds: float) -> None:
    deadline = time.time() + seconds
    while not ready():
        if time.time() > deadline:
            raise TimeoutError(f"{what} not ready after {seconds:.0f} s")
        time.sleep(1)


def _stop(process: subprocess.Popen) -> None:
    """Stop a process group the way Ctrl-C does (Dagster shuts its services down), KILL after 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def dagster_ui(data_dir: Path) -> Iterator[None]:
    """`make ui` on `data_dir`, once it answers and no run its sensors launched is still going."""
    if _answers(f"{UI}/server_info"):
        raise RuntimeError(f"Something already listens on {UI}; stop it first.")
    home = data_dir / "dagster_home"
    (home / ".nux").mkdir(parents=True, exist_ok=True)
    (home / ".nux" / "nux.yaml").write_text("seen: 1\n")  # the first-visit dialog counts as seen
    log = open(data_dir / "screenshots_ui.log", "w")  # noqa: SIM115 (closed below)
    ui = subprocess.Popen(
        ["make", "-C", str(ROOT), "ui", f"INTERP_DATA_DIR={data_dir}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait("the Dagster UI", lambda: _answers(f"{UI}/server_info"), 300)
        from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

        busy = RunsFilter(
            statuses=[
                DagsterRunStatus.QUEUED,
                DagsterRunStatus.NOT_STARTED,
                DagsterRunStatus.STARTING,
                DagsterRunStatus.STARTED,
            ]
        )
        time.sleep(45)  # the code location loads and the sensors tick (every 30 s)
        with DagsterInstance.from_config(str(home)) as instance:
            _wait("the sensors' runs", lambda: instance.get_runs_count(busy) == 0, 1800)
        yield
    finally:
        _stop(ui)
        log.close()


class Browser:
    """One headless Chromium tab driven through the DevTools protocol."""

    def __init__(self) -> None:
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            raise RuntimeError("No chromium on PATH (Debian: apt-get install chromium).")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.process = subprocess.Popen(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--remote-debugging-port={port}",
                "--remote-allow-origins=*",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        _wait("chromium", lambda: _answers(f"http://127.0.0.1:{port}/json/version"), 60)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json") as response:
            page = next(t for t in json.load(response) if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60)
        self.calls = 0
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=WIDTH,
            height=HEIGHT,
            deviceScaleFactor=1,
            mobile=False,
        )

    def call(self, method: str, **params: Any) -> dict:
        self.calls += 1
        self.ws.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.calls:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def open(self, url: str, settle: float) -> None:
        self.call("Page.navigate", url=url)
        time.sleep(settle)

    def run(self, script: str) -> Any:
        return self.call("Runtime.evaluate", expression=script, returnByValue=True)["result"].get("value")

    def save(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        print(f"{path} ({path.stat().st_size // 1024} KB)")

    def close(self) -> None:
        self.ws.close()
        _stop(self.process)


def asset_graph(browser: Browser, path: Path) -> None:
    """The global lineage, top to bottom, every group expanded, navigation and asset tree collapsed."""
    browser.open(f"{UI}/server_info", 1)  # the UI's origin, for its settings in local storage
    browser.run(
        "localStorage.setItem('asset-graph-direction', JSON.stringify('vertical'));"
        "localStorage.setItem('dagster-nav-collapsed', 'true');"
    )
    # which groups are expanded is the page's `expanded` parameter: group ids, comma-separated, URL-encoded
    expanded = ",".join(f"global@global:{group}" for group in GROUPS)
    browser.open(f"{UI}/asset-groups?{urllib.parse.urlencode({'expanded': expanded})}", 15)
    toggled = (
        browser.run(  # hide the asset tree beside the graph (its toggle shows the panel_show_right icon)
            "(() => { const b = [...document.querySelectorAll('button')]"
            ".find(x => x.innerHTML.includes('panel_show_right')); if (b) b.click(); return !!b; })()"
        )
    )
    if not toggled:
        print("The asset tree's toggle was not found; the picture keeps the tree.")
    time.sleep(5)
    browser.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default="/tmp/interp_screenshots")
    data_dir = Path(parser.parse_args().data_dir).resolve()
    reports = sorted((data_dir / "reports").glob("*.html"))
    if not reports:
        subprocess.run(["make", "-C", str(ROOT), "demo", f"INTERP_DATA_DIR={data_dir}"], check=True)
        reports = sorted((data_dir / "reports").glob("*.html"))
    OUT.mkdir(parents=True, exist_ok=True)
    with dagster_ui(data_dir):
        browser = Browser()
        try:
            asset_graph(browser, OUT / "asset_graph.png")
            browser.open(reports[0].as_uri(), 3)
            browser.save(OUT / "diff_report.png")
        finally:
            browser.close()


if __name__ == "__main__":
    main()
