"""A real disk that fills up: the data folder on a small tmpfs. A dataset that does not fit fails with the
disk's own error, the dataset stored before it stays whole and readable, and once there is room the next
run completes with tables equal to a run on a roomy disk. Needs root (it mounts the tmpfs); skips, saying
so, where mounting is not allowed."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import polars as pl
import pytest
from dagster import DagsterInstance, materialize

from interp_assets.defs.assets import ALL_ASSETS
from interp_assets.storage.parquet import read_table
from resources.local import local_resources

ROOT = Path(__file__).resolve().parents[2]
SST2 = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"
BY_NAME = {k.to_user_string(): a for a in ALL_ASSETS for k in a.keys}
EMBED = [BY_NAME[n] for n in ("raw_documents", "token_activations", "pooled_embeddings")]
TABLES = {
    "raw_documents": ["doc_id"],
    "activation_status": ["doc_id"],
    "token_activations": ["doc_id", "token_index", "feature"],
    "pooled_embeddings": ["doc_id", "feature"],
}
DATASETS = {"first": (0, 60), "second": (60, 240)}


def _land(data: Path) -> None:
    if not SST2.is_file():
        pytest.skip(f"shared SST-2 data not found at {SST2} (expected beside the repository clone)")
    lines = [line.split("\t")[0] for line in SST2.read_text(encoding="utf-8").splitlines()[1:]]
    (data / "landing").mkdir(parents=True, exist_ok=True)
    for name, (start, end) in DATASETS.items():
        rows = [json.dumps({"text": t}) for t in lines[start:end]]
        (data / "landing" / f"{name}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")


def _run(data: Path, dataset: str):
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("datasets", [dataset])
    return materialize(
        EMBED, partition_key=dataset, instance=instance, resources=local_resources(data), raise_on_error=False
    )


def _digest(data: Path, dataset: str) -> dict[str, tuple[int, str]]:
    """Rows and a hash of the sorted content of each table of `dataset`."""
    out = {}
    for table, key in TABLES.items():
        frame = read_table(str(data / "parquet"), table, dataset).collect()
        frame = frame.with_columns(pl.col(pl.Categorical).cast(pl.String)).sort(key)
        out[table] = (frame.height, hashlib.sha256(frame.write_csv().encode()).hexdigest())
    return out


def _used_bytes(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


def _mount(point: Path, size: int, remount: bool = False) -> subprocess.CompletedProcess:
    options = f"{'remount,' if remount else ''}size={size}"
    return subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True
    )


@pytest.fixture
def small_disk(tmp_path: Path):
    """A tmpfs mount point (size set by the test); unmounted afterwards."""
    point = tmp_path / "small"
    point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; this user is not")
    mounted = _mount(point, 1 << 20)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not allowed here: {mounted.stderr.strip()}")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_a_full_disk_fails_only_the_dataset_that_did_not_fit_and_the_next_run_completes(
    tmp_path: Path, small_disk: Path
) -> None:
    roomy = tmp_path / "roomy"
    _land(roomy)
    assert _run(roomy, "first").success
    after_first = _used_bytes(roomy)
    assert _run(roomy, "second").success
    after_both = _used_bytes(roomy)
    reference = {name: _digest(roomy, name) for name in DATASETS}

    # room for the first dataset and half of what the second one writes
    size = after_first + (after_both - after_first) // 2
    assert _mount(small_disk, size, remount=True).returncode == 0
    data = small_disk / "data"
    _land(data)
    assert _run(data, "first").success
    full = _run(data, "second")
    assert not full.success
    failure = next(e for e in full.all_events if e.is_step_failure)
    assert "No space left on device" in str(failure.event_specific_data.error)  # the disk's own error
    assert _digest(data, "first") == reference["first"]  # what was stored before is whole

    assert _mount(small_disk, 4 * after_both, remount=True).returncode == 0  # the user makes room
    assert _run(data, "second").success
    assert _digest(data, "second") == reference["second"]
    assert _digest(data, "first") == reference["first"]
