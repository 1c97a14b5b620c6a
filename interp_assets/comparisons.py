"""Declared comparisons (`<data_dir>/config/comparisons.json`), their partition keys (`A__vs__B`), and
per-dataset ingest settings (`<data_dir>/config/datasets.json`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from interp_assets.storage.paths import check_storage_key

COMPARISON_SEPARATOR = "__vs__"


def comparison_key(dataset_a: str, dataset_b: str) -> str:
    """Partition key of the comparison of dataset A with dataset B: `A__vs__B`."""
    check_storage_key(dataset_a, "dataset name")
    check_storage_key(dataset_b, "dataset name")
    if dataset_a == dataset_b:
        raise ValueError(f"A comparison needs two different datasets; both are {dataset_a!r}.")
    return check_storage_key(f"{dataset_a}{COMPARISON_SEPARATOR}{dataset_b}", "comparison key")


def parse_comparison_key(key: str) -> tuple[str, str]:
    """Inverse of `comparison_key`."""
    a, sep, b = key.partition(COMPARISON_SEPARATOR)
    if not sep or not a or not b or COMPARISON_SEPARATOR in b:
        raise ValueError(
            f"Comparison key {key!r} is not of the form '<dataset_a>{COMPARISON_SEPARATOR}<dataset_b>'."
        )
    return a, b


@dataclass(frozen=True)
class Comparison:
    """Dataset A compared with dataset B; `paired_on` names a key column shared by both (optional)."""

    a: str
    b: str
    paired_on: str | None = None

    @property
    def key(self) -> str:
        return comparison_key(self.a, self.b)


def load_comparisons(path: Path) -> list[Comparison]:
    """Read a comparisons file: a JSON list of {"a": ..., "b": ..., "paired_on": optional}. Missing -> []."""
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f'{path}: not valid JSON ({exc}). Expected a list like [{{"a": "dataset_a", "b": "dataset_b"}}].'
        ) from exc
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of comparisons, got {type(data).__name__}.")
    out = []
    for i, item in enumerate(data):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("a"), str)
            or not isinstance(item.get("b"), str)
        ):
            raise ValueError(
                f"{path}: entry {i} must be an object with string fields 'a' and 'b'; got {item!r}."
            )
        paired = item.get("paired_on")
        if paired is not None and not isinstance(paired, str):
            raise ValueError(f"{path}: entry {i}: 'paired_on' must be a column name (string).")
        try:
            check_storage_key(item["a"], "dataset name")
            check_storage_key(item["b"], "dataset name")
        except ValueError as exc:
            raise ValueError(f"{path}: entry {i}: {exc}") from exc
        out.append(Comparison(item["a"], item["b"], paired))
    return out


def find_comparison(path: Path, key: str) -> Comparison:
    """The declared comparison with partition key `key`, or one built from the key with no pairing."""
    for comparison in load_comparisons(path):
        if comparison.key == key:
            return comparison
    a, b = parse_comparison_key(key)
    return Comparison(a, b)


def load_dataset_settings(path: Path) -> dict[str, dict]:
    """Per-dataset ingest settings, e.g. {"sst2_train": {"text_column": "sentence"}}. Missing -> {}."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}).") from exc
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f'{path}: expected {{"<dataset>": {{"text_column": "..."}}}}.')
    return data
