"""The comparisons file is read entry by entry: a bad entry is named and skipped, never hides good ones."""

import json
from pathlib import Path

import pytest

from interp_assets.comparisons import (
    MAX_COMPARISONS,
    comparison_key,
    load_comparisons,
    parse_comparison_key,
)


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_bad_entries_are_named_and_the_good_ones_kept(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "comparisons.json",
        [
            {"a": "x", "b": "y"},
            {"a": "x", "b": "x"},  # self-comparison
            {"a": "p__vs__q", "b": "z"},  # would collide with the key separator
            "not an object",
            {"a": "x", "b": "y"},  # repeat
            {"a": "../etc", "b": "y"},
            {"a": "y", "b": "z", "paired_on": 3},
            {"a": "y", "b": "z", "paired_on": "prompt_id"},
        ],
    )
    errors: list[str] = []
    comparisons = load_comparisons(path, errors)
    assert [(c.a, c.b, c.paired_on) for c in comparisons] == [("x", "y", None), ("y", "z", "prompt_id")]
    assert len(errors) == 6
    for i, needle in [
        (1, "two different datasets"),
        (2, "__vs__"),
        (3, "object"),
        (4, "repeats"),
        (6, "paired_on"),
    ]:
        assert any(f"entry {i}" in e and needle in e for e in errors), (i, errors)
    assert all(str(path) in e for e in errors)


def test_every_key_parses_back() -> None:
    assert parse_comparison_key(comparison_key("a_b", "c")) == ("a_b", "c")
    with pytest.raises(ValueError, match="__vs__"):
        comparison_key("a__vs__b", "c")


def test_whole_file_problems_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nested too deeply"):
        load_comparisons(_write_raw(tmp_path / "deep.json", "[" * 100_000 + "]" * 100_000))
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_comparisons(_write(tmp_path / "obj.json", {"a": "x"}))
    with pytest.raises(ValueError, match="at most"):
        load_comparisons(
            _write(tmp_path / "many.json", [{"a": "x", "b": f"y{i}"} for i in range(MAX_COMPARISONS + 1)])
        )
    with pytest.raises(ValueError, match="not valid JSON"):
        load_comparisons(_write_raw(tmp_path / "bad.json", "[{"))
    assert load_comparisons(tmp_path / "missing.json") == []


def _write_raw(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_comparisons_partner_of_each_side() -> None:
    from interp_assets.comparisons import Comparison

    c = Comparison("a", "b")
    assert (c.partner("a"), c.partner("b")) == ("b", "a")
    with pytest.raises(ValueError, match="not part of comparison"):
        c.partner("z")
