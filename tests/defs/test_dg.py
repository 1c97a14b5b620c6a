"""`dg` accepts the project as it is laid out (`[tool.dg]` in pyproject.toml): `dg check defs` passes and
`dg list defs` lists every asset with its group, kinds and description."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import definitions

ROOT = Path(__file__).resolve().parents[2]
DG = Path(sys.executable).parent / "dg"  # from the dev extras (dagster-dg-cli)


def _dg(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "INTERP_DATA_DIR": str(tmp_path / "data")}
    env.pop("VIRTUAL_ENV", None)  # dg must find the project's environment on its own
    return subprocess.run(
        [str(DG), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_dg_check_defs_passes(tmp_path: Path) -> None:
    out = _dg(tmp_path, "check", "defs")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "All definitions loaded successfully." in out.stdout


def test_dg_list_defs_lists_every_asset_with_group_kinds_and_description(tmp_path: Path) -> None:
    out = _dg(tmp_path, "list", "defs", "--json")
    assert out.returncode == 0, out.stderr
    listed = {a["asset_key"]: a for a in json.loads(out.stdout)["assets"]}
    expected = {spec.key.to_user_string() for spec in definitions.defs.resolve_all_asset_specs()}
    assert set(listed) == expected
    for name, entry in listed.items():
        assert entry["group_name"] and entry["group_name"] != "default", name
        assert "parquet" in entry["kinds"], name
        assert entry["description"], name
