"""The package layout's rules (see interp_assets/__init__.py) and the README's layout table."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "interp_assets"

# package (relative to interp_assets/) -> imported module prefixes it must never use
FORBIDDEN = {
    "engine": [
        "resources",
        "io_managers",
        "interp_assets.labels",
        "interp_assets.analysis",
        "interp_assets.defs",
    ],
    "storage": [
        "resources",
        "io_managers",
        "interp_assets.engine",
        "interp_assets.labels",
        "interp_assets.analysis",
    ],
    "analysis": ["resources", "io_managers", "interp_assets.engine", "interp_assets.labels"],
    "labels": ["resources", "io_managers"],
}
DAGSTER_SIDE = (
    "dagster",
    "dagster_celery",
    "dagster_duckdb",
    "dagster_webserver",
    "resources",
    "io_managers",
    "interp_assets.defs",
)


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in `path` names, at any depth (lazy imports included)."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def _uses(modules: set[str], prefix: str) -> list[str]:
    return sorted(m for m in modules if m == prefix or m.startswith(prefix + "."))


def _modules_outside_defs() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if "defs" not in p.relative_to(PACKAGE).parts]


def test_rule_checker_sees_lazy_and_from_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef f():\n    from dagster import asset\n    import resources.llm\n")
    modules = imported_modules(probe)
    assert _uses(modules, "dagster") == ["dagster", "dagster.asset"]
    assert _uses(modules, "resources") == ["resources.llm"]


# Entry points outside defs/ that run the assets on request: imported inside that function only, so
# importing the module stays free of Dagster (test_pure_modules_load_without_dagster checks that).
ON_DEMAND = {"interp_assets/notebook.py": {"interp_assets.defs.notebook_runs", "interp_assets.defs.readers"}}


def test_only_defs_imports_dagster_resources_or_io_managers():
    offenders = {
        str(path.relative_to(ROOT)): found
        for path in _modules_outside_defs()
        if (
            found := [
                m
                for prefix in DAGSTER_SIDE
                for m in _uses(imported_modules(path), prefix)
                if not any(
                    m == a or m.startswith(a + ".") for a in ON_DEMAND.get(str(path.relative_to(ROOT)), ())
                )
            ]
        )
    }
    assert not offenders, (
        f"only interp_assets/defs/ may import Dagster, resources or io_managers: {offenders}"
    )


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_its_docstring_allows(package):
    offenders = {}
    for path in sorted((PACKAGE / package).rglob("*.py")):
        modules = imported_modules(path)
        found = [m for prefix in FORBIDDEN[package] for m in _uses(modules, prefix)]
        if found:
            offenders[str(path.relative_to(ROOT))] = found
    assert not offenders, f"interp_assets/{package} imports what it must not: {offenders}"


def test_pure_modules_load_without_dagster():
    """Transitively too: importing every module outside defs/ leaves Dagster unloaded."""
    names = [
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in _modules_outside_defs()
    ]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "top = ('dagster', 'resources', 'io_managers')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in top))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=300
    )
    assert out.stdout.strip() == "[]", out.stdout


def readme_layout_paths() -> list[str]:
    """Paths the README's layout table names: the first column (`a/b.py`, `c.py` -> a/b.py, a/c.py) and,
    in a folder's row, the files and folders its description names (`x.py`, `sub/`) inside that folder."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    paths = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        first_cell, what = line.split("|")[1:3]
        folder = ""
        for name in re.findall(r"`([^`]+)`", first_cell):
            if "/" in name.rstrip("/"):
                folder = name.rstrip("/").rsplit("/", 1)[0] + "/"
                paths.append(name)
            else:
                paths.append(folder + name)
        if first_cell.strip().strip("`").endswith("/"):
            inside = first_cell.strip().strip("`")
            paths += [inside + n for n in re.findall(r"`([\w.]+\.py|\w+/)`", what)]
    return paths


def test_readme_layout_table_matches_the_tree():
    paths = readme_layout_paths()
    assert len(paths) > 20
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"README's layout table names paths that do not exist: {missing}"
    packages = sorted(p.parent.relative_to(ROOT).as_posix() + "/" for p in PACKAGE.glob("*/__init__.py"))
    unlisted = [p for p in packages if not any(x.startswith(p) for x in paths)]
    assert not unlisted, f"packages missing from README's layout table: {unlisted}"


def test_benchmark_results_record_repo_relative_paths():
    absolute = {}
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        found = re.findall(r'"(/(?:work|home|root|tmp|Users)/[^"]*)"', path.read_text())
        if found:
            absolute[path.name] = found[:3]
    assert not absolute, f"benchmark results hold machine paths (use _common.write_results): {absolute}"


def test_on_demand_imports_are_inside_functions():
    for rel, allowed in ON_DEMAND.items():
        tree = ast.parse((ROOT / rel).read_text())
        top = {
            node.module if isinstance(node, ast.ImportFrom) else alias.name
            for node in tree.body
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        }
        assert not top & allowed, f"{rel} imports {top & allowed} at module level"
