"""A drop whose file name is not valid UTF-8 (issue #13) is reported, escaped, with what to do; the landing
scan, the sensor and every other drop go on."""

import os
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, build_sensor_context, materialize

from interp_assets.defs.assets import ALL_ASSETS
from interp_assets.defs.sensors import landing_sensor
from interp_assets.ingest import DropError, dataset_name_from_path, read_drop, scan_drops
from resources.local import local_resources


def _landing(root: Path) -> tuple[Path, str, str]:
    """good.csv, bad<0xff>.csv, a folder mixed/ holding part<0xfe>.csv, an unsupported notes<0xff>.txt."""
    landing = root / "landing"
    (landing / "mixed").mkdir(parents=True)
    (landing / "good.csv").write_text("text\nhello there\nsecond row\n")
    raw = os.fsencode(landing)
    bad = os.fsdecode(raw + b"/bad\xff.csv")
    Path(bad).write_bytes(b"text\nnot reachable by name\n")
    (landing / "mixed" / "ok.csv").write_text("text\nfine\n")
    Path(os.fsdecode(raw + b"/mixed/part\xfe.csv")).write_bytes(b"text\nalso fine\n")
    Path(os.fsdecode(raw + b"/notes\xff.txt")).write_bytes(b"ignored: not a supported file\n")
    for entry in landing.rglob("*"):
        os.utime(entry, (1, 1))  # old enough for the sensor's settle time
    os.utime(landing / "mixed", (1, 1))
    return landing, bad, dataset_name_from_path(bad)


def test_scan_reports_each_undecodable_name_escaped_and_keeps_the_other_drops(tmp_path: Path) -> None:
    landing, _, bad_dataset = _landing(tmp_path)
    bad_names: dict[str, DropError] = {}
    drops, clashes = scan_drops(landing, bad_names=bad_names)
    assert [d.dataset for d in drops] == ["good"] and clashes == {}
    assert sorted(bad_names) == sorted([bad_dataset, "mixed"])
    for dataset, part in ((bad_dataset, "bad\\xff.csv"), ("mixed", "mixed/part\\xfe.csv")):
        message = str(bad_names[dataset])
        message.encode("utf-8")  # printable and loggable: no lone surrogates left
        assert f"{landing}/{part}" in message and "not valid UTF-8" in message and "rename it" in message
    assert scan_drops(landing)[0] == drops  # without bad_names: the same drops


def test_reading_a_file_with_an_undecodable_name_raises_a_drop_error_naming_it(tmp_path: Path) -> None:
    _, bad, _ = _landing(tmp_path)
    with pytest.raises(DropError, match=r"bad\\xff\.csv: its name is not valid UTF-8.*rename it"):
        read_drop(bad, "bad")


def test_sensor_runs_the_good_drop_and_warns_about_the_bad_names(tmp_path: Path, capfd) -> None:
    landing, _, bad_dataset = _landing(tmp_path / "data")
    instance = DagsterInstance.ephemeral()
    resources = local_resources(tmp_path / "data")
    with build_sensor_context(instance=instance, resources={"storage": resources["storage"]}) as context:
        result = landing_sensor(context)
    assert [r.partition_key for r in result.run_requests] == ["good"]
    logged = capfd.readouterr().err
    assert "bad\\xff.csv: its name is not valid UTF-8" in logged and "mixed/part\\xfe.csv" in logged

    # a partition made for the bad name (by hand, or before this check) fails alone with the same message
    instance.add_dynamic_partitions("datasets", ["good", bad_dataset])
    raw = [a for a in ALL_ASSETS if AssetKey("raw_documents") in a.keys]
    assert materialize(raw, partition_key="good", instance=instance, resources=resources).success
    failed = materialize(
        raw, partition_key=bad_dataset, instance=instance, resources=resources, raise_on_error=False
    )
    assert not failed.success
    error = next(e for e in failed.all_events if e.event_type_value == "STEP_FAILURE")
    message = error.step_failure_data.error.to_string()
    assert "bad\\xff.csv: its name is not valid UTF-8" in message and "rename it" in message


def test_a_data_folder_whose_path_is_not_utf8_is_refused_with_what_to_do(tmp_path: Path) -> None:
    data = Path(os.fsdecode(os.fsencode(tmp_path) + b"/data\xff"))
    (data / "landing").mkdir(parents=True)
    (data / "landing" / "good.csv").write_text("text\nhello there\n")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("datasets", ["good"])
    by_name = {k.to_user_string(): a for a in ALL_ASSETS for k in a.keys}
    result = materialize(
        [by_name["raw_documents"]],
        partition_key="good",
        instance=instance,
        resources=local_resources(data),
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    message = str(failure.event_specific_data.error)
    assert "data\\xff is not valid UTF-8" in message and "set INTERP_DATA_DIR" in message
    assert sorted(p.name for p in data.iterdir()) == ["landing"]  # nothing half-written


def test_run_main_job_refuses_a_data_folder_that_is_not_utf8_up_front(tmp_path: Path, capsys) -> None:
    import importlib.util

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("run_main_job", root / "scripts" / "run_main_job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = os.fsdecode(os.fsencode(tmp_path) + b"/out\xfe")
    assert module.main(["--data-dir", data]) == 2
    err = capsys.readouterr().err
    assert "out\\xfe is not valid UTF-8" in err and "--data-dir" in err
    assert not os.path.exists(data)
