"""What the benchmark scripts share: paths, memory readings, the machine and checkout, result files, tables
and synthetic pooled_embeddings.

Result files record paths relative to the repository (`shared/...` for the shared data beside it), never
the absolute paths of the machine that ran them.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
SHARED_DATA = ROOT.parent / "shared" / "data"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------------------------------
# Memory


def rss_now_mb() -> float:
    """This process's resident memory now, in MiB (Linux `/proc/self/statm`)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


# --------------------------------------------------------------------------------------------------
# The machine and the checkout


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def git_state() -> dict[str, Any]:
    """Commit and dirty product files of the checkout the numbers come from (empty outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "interp_assets", "io_managers", "resources"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    except OSError:
        return {}
    return {"commit": head.stdout.strip(), "dirty": [line[3:] for line in dirty.stdout.splitlines()]}


def cpu_gflops(seconds: float = 1.0, n: int = 1024) -> float:
    """How fast this machine multiplies float32 matrices now (numpy's BLAS, all its threads), in GFLOP/s:
    the best of repeated n x n products over about `seconds`. Recorded beside timings made on machines
    whose speed changes from hour to hour (shared VMs), so runs can be compared."""
    import time

    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - started) / 1e9)
    return round(best, 1)


def load_average() -> float:
    """The 1-minute load average (how busy the machine was: read it beside every timing)."""
    return os.getloadavg()[0]


# --------------------------------------------------------------------------------------------------
# Result files


def repo_relative(value: Any) -> Any:
    """`value` with every absolute path under the repository (or the shared data beside it) made relative
    to the repository; lists, tuples and dicts are walked."""
    if isinstance(value, dict):
        return {k: repo_relative(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [repo_relative(v) for v in value]
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str) and value.startswith("/"):
        for base, prefix in ((ROOT, ""), (ROOT.parent / "shared", "shared/")):
            try:
                rel = Path(value).relative_to(base)
            except ValueError:
                continue
            return prefix + rel.as_posix() if str(rel) != "." else (prefix.rstrip("/") or ".")
    return value


def write_results(payload: dict[str, Any], out: str | os.PathLike[str]) -> Path:
    """Write a benchmark's JSON result (paths made repo-relative) and say where."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(repo_relative(payload), indent=2, default=float) + "\n")
    print(f"wrote {repo_relative(path.resolve())}")
    return path


# --------------------------------------------------------------------------------------------------
# Tables


def print_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]], title: str | None = None
) -> None:
    """Print `rows` as a fixed-width table; `columns` are (header, key, format spec such as ",.0f")."""
    cells = [
        [format(row[key], spec) if row.get(key) is not None else "-" for _, key, spec in columns]
        for row in rows
    ]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _, _) in enumerate(columns)]
    if title:
        print(title)
    print(
        "  ".join(
            h.rjust(w) if i else h.ljust(w)
            for i, ((h, _, _), w) in enumerate(zip(columns, widths, strict=True))
        )
    )
    for c in cells:
        print(
            "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(c, widths, strict=True)))
        )


# --------------------------------------------------------------------------------------------------
# Synthetic pooled_embeddings


def feature_frequencies(
    width: int, mean_active: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Zipf-like per-feature document frequencies (capped at 0.6) summing to `mean_active`; random ids."""
    w = 1.0 / (np.arange(width) + 30.0) ** 1.1
    lo, hi = 0.0, 1e6
    for _ in range(100):  # bisection on the scale so that sum(min(c*w, cap)) == mean_active
        c = (lo + hi) / 2
        if np.minimum(c * w, 0.6).sum() < mean_active:
            lo = c
        else:
            hi = c
    by_rank = np.minimum(c * w, 0.6)
    freq = np.empty(width)
    ids = rng.permutation(width)
    freq[ids] = by_rank
    return freq, ids  # ids[r] = feature id of frequency rank r


def pooled_table(n_docs: int, freq: np.ndarray, rng: np.random.Generator) -> pl.DataFrame:
    """pooled_embeddings rows (README schema, without the dataset column) with P(doc has f) = freq[f]."""
    width = freq.size
    keys = []
    for f in range(width):
        p = freq[f]
        if p <= 0:
            continue
        # positions of a Bernoulli(p) process over n_docs by geometric gaps
        m = int(n_docs * p + 10 * np.sqrt(n_docs * p) + 20)
        pos = np.cumsum(rng.geometric(p, size=m)) - 1
        while pos[-1] < n_docs:
            pos = np.concatenate([pos, pos[-1] + np.cumsum(rng.geometric(p, size=m))])
        pos = pos[pos < n_docs]
        keys.append(pos.astype(np.int64) * width + f)
    key = np.sort(np.concatenate(keys))
    del keys
    n = key.size
    doc_id = (key // width).astype(np.int32)
    feature = (key % width).astype(np.int32)
    del key
    max_act = (rng.exponential(1.0, n) + 0.01).astype(np.float32)
    active = (1 + rng.poisson(2.0, n)).astype(np.int32)
    sum_act = (max_act * active * rng.uniform(0.5, 1.0, n)).astype(np.float32)
    doc_tokens = rng.integers(64, 512, n_docs).astype(np.int32)[doc_id]
    return pl.DataFrame(
        {
            "doc_id": doc_id,
            "feature": feature,
            "max_activation": max_act,
            "sum_activation": sum_act,
            "active_tokens": active,
            "doc_tokens": doc_tokens,
        }
    )
