"""Two drops that map to one dataset name block only that dataset, never the landing folder; no entry point
follows a symbolic link out of the folder it was given."""

import os
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, build_sensor_context, materialize

from interp_assets.defs.assets import ALL_ASSETS
from interp_assets.defs.sensors import landing_sensor
from interp_assets.ingest import DropError, copy_drop_files, list_drops, scan_drops
from resources.local import local_resources


def _landing(root: Path) -> Path:
    landing = root / "landing"
    landing.mkdir(parents=True)
    (landing / "good.csv").write_text("text\nhello there\nsecond row\n")
    (landing / "d.csv").write_text("text\nold drop\n")
    (landing / "d.jsonl").write_text('{"text": "new drop"}\n')  # added before the old one was removed
    (landing / "x.csv").write_text("text\na file\n")
    (landing / "x").mkdir()
    (landing / "x" / "part.csv").write_text("text\na folder\n")
    return landing


def test_scan_drops_reports_each_clash_and_keeps_every_other_dataset(tmp_path: Path) -> None:
    landing = _landing(tmp_path)
    drops, clashes = scan_drops(landing)
    assert [d.dataset for d in drops] == ["good"] == [d.dataset for d in list_drops(landing)]
    assert sorted(clashes) == ["d", "x"]
    assert sorted(Path(p).name for p in clashes["d"]) == ["d.csv", "d.jsonl"]
    assert sorted(Path(p).name for p in clashes["x"]) == ["x", "x.csv"]


def test_a_clash_fails_only_its_own_partition_naming_both_files(tmp_path: Path) -> None:
    landing = _landing(tmp_path / "data")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("datasets", ["good", "d"])
    resources = local_resources(tmp_path / "data")
    raw = [a for a in ALL_ASSETS if AssetKey("raw_documents") in a.keys]
    assert materialize(raw, partition_key="good", instance=instance, resources=resources).success
    bad = materialize(raw, partition_key="d", instance=instance, resources=resources, raise_on_error=False)
    assert not bad.success
    failure = next(e for e in bad.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.step_failure_data.error.to_string()
    assert "d.csv" in message and "d.jsonl" in message and "other datasets are not affected" in message
    # the sensor still runs the good drop
    os.utime(landing / "good.csv", (1, 1))  # old enough for the sensor's settle time
    context = build_sensor_context(instance=instance, resources={"storage": resources["storage"]})
    result = landing_sensor(context)
    assert [r.partition_key for r in result.run_requests] == ["good"]


def test_copying_drops_never_follows_a_symbolic_link(tmp_path: Path) -> None:
    secret = tmp_path / "elsewhere" / "secret.csv"
    secret.parent.mkdir()
    secret.write_text("text\nprivate\n")
    source = tmp_path / "source"
    source.mkdir()
    (source / "ok.csv").write_text("text\nfine\n")
    (source / "link.csv").symlink_to(secret)
    (source / "sub").mkdir()
    landing = tmp_path / "landing"
    skipped = copy_drop_files(source, landing)
    assert sorted(Path(p).name for p in skipped) == ["link.csv", "sub"]
    assert sorted(p.name for p in landing.iterdir()) == ["ok.csv"]


def test_clash_error_is_a_drop_error() -> None:
    from interp_assets.ingest import clash_error

    error = clash_error("d", ["/l/d.csv", "/l/d.jsonl"])
    assert isinstance(error, DropError) and "d.csv" in str(error) and "d.jsonl" in str(error)
    with pytest.raises(DropError):
        raise error
