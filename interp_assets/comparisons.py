"""Declared comparisons (`<data_dir>/config/comparisons.json`), their partition keys (`A__vs__B`), and
per-dataset ingest settings (`<data_dir>/config/datasets.json`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from interp_assets.storage.paths import check_storage_key

COMPARISON_SEPARATOR = "__vs__"
MAX_COMPARISONS_FILE_BYTES = 4_000_000  # a few tens of thousands of comparisons; a sensor tick stays short
MAX_COMPARISONS = 10_000


def comparison_key(dataset_a: str, dataset_b: str) -> str:
    """Partition key of the comparison of dataset A with dataset B: `A__vs__B`."""
    check_storage_key(dataset_a, "dataset name")
    check_storage_key(dataset_b, "dataset name")
    for name in (dataset_a, dataset_b):
        if COMPARISON_SEPARATOR in name:
            raise ValueError(
                f"Dataset name {name!r} contains {COMPARISON_SEPARATOR!r}, which separates the two datasets "
                "of a comparison key: rename the dataset (its drop file) to compare it."
            )
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

    def partner(self, dataset: str) -> str:
        """The other dataset of this comparison (`dataset` must be one of its two)."""
        if dataset not in (self.a, self.b):
            raise ValueError(f"{dataset!r} is not part of comparison {self.key}.")
        return self.b if dataset == self.a else self.a


def load_comparisons(path: Path, errors: list[str] | None = None) -> list[Comparison]:
    """Read a comparisons file: a JSON list of {"a": ..., "b": ..., "paired_on": optional}. Missing -> [].

    Entries are checked one by one: a bad entry (not an object, a self-comparison, a name that is not a
    valid dataset name or contains `__vs__`, a repeat of an earlier comparison) is left out with a message
    in `errors` (or logged as a warning) and never hides the good ones. A file that is not a JSON list, is
    larger than `MAX_COMPARISONS_FILE_BYTES`, nests too deeply or holds more than `MAX_COMPARISONS`
    entries raises ValueError naming the file.
    """
    if not path.exists():
        return []
    size = path.stat().st_size
    if size > MAX_COMPARISONS_FILE_BYTES:
        raise ValueError(
            f"{path}: {size:,} bytes, more than the {MAX_COMPARISONS_FILE_BYTES:,} a comparisons file may "
            f"hold (at most {MAX_COMPARISONS:,} comparisons); split the work or remove unused entries."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f'{path}: not valid JSON ({exc}). Expected a list like [{{"a": "dataset_a", "b": "dataset_b"}}].'
        ) from exc
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply; expected a flat list of comparisons.") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of comparisons, got {type(data).__name__}.")
    if len(data) > MAX_COMPARISONS:
        raise ValueError(f"{path}: {len(data):,} entries; at most {MAX_COMPARISONS:,} comparisons are read.")
    problems: list[str] = []
    out: list[Comparison] = []
    seen: set[str] = set()
    for i, item in enumerate(data):
        where = f"{path}: entry {i}"
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("a"), str)
            or not isinstance(item.get("b"), str)
        ):
            problems.append(
                f"{where} must be an object with string fields 'a' and 'b'; got {str(item)[:200]}."
            )
            continue
        paired = item.get("paired_on")
        if paired is not None and not isinstance(paired, str):
            problems.append(f"{where}: 'paired_on' must be a column name (string).")
            continue
        try:
            key = comparison_key(item["a"], item["b"])
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if key in seen:
            problems.append(f"{where}: repeats the comparison {key!r}; only the first is used.")
            continue
        seen.add(key)
        out.append(Comparison(item["a"], item["b"], paired))
    if errors is not None:
        errors.extend(problems)
    else:
        for problem in problems:
            logging.getLogger(__name__).warning(problem)
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
