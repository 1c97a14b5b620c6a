"""The shipped demo corpus: reproducible, parseable, and with exactly one large planted difference."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import polars as pl
import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "demo"
FILE_A = DEMO / "landing" / "support_assistant_a.jsonl"
FILE_B = DEMO / "landing" / "support_assistant_b.csv"
META = ["ticket_id", "topic", "customer_tier", "csat", "escalated"]

APOLOGY_REFUND = re.compile(r"\b(sorry|apolog\w*|refund\w*|money back|reimburs\w*)\b", re.IGNORECASE)
REFUND = re.compile(r"\b(refund\w*|money back|reimburs\w*)\b", re.IGNORECASE)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
WORD = re.compile(r"[a-z0-9']+")


def _load_generator() -> ModuleType:
    path = ROOT / "scripts" / "make_demo_corpus.py"
    spec = importlib.util.spec_from_file_location("make_demo_corpus", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    return _load_generator()


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    with FILE_A.open(encoding="utf-8") as f:
        a = [json.loads(line) for line in f]
    with FILE_B.open(encoding="utf-8", newline="") as f:
        b = list(csv.DictReader(f))
    for r in b:
        r["csat"] = int(r["csat"])
        assert r["escalated"] in ("true", "false")
        r["escalated"] = r["escalated"] == "true"
    return {"a": a, "b": b}


def _strip_planted(text: str) -> str:
    return " ".join(s for s in SENTENCE_END.split(text) if not APOLOGY_REFUND.search(s))


def _doc_freq(texts: list[str]) -> dict[str, float]:
    counts: dict[str, int] = {}
    for t in texts:
        for w in set(WORD.findall(t.lower())):
            counts[w] = counts.get(w, 0) + 1
    return {w: c / len(texts) for w, c in counts.items()}


def test_regenerating_reproduces_committed_files(gen: ModuleType, tmp_path: Path) -> None:
    gen.main(["--out", str(tmp_path)])
    for rel in ["landing/support_assistant_a.jsonl", "landing/support_assistant_b.csv", "comparisons.json"]:
        assert (tmp_path / rel).read_bytes() == (DEMO / rel).read_bytes(), rel


def test_comparisons_file() -> None:
    assert json.loads((DEMO / "comparisons.json").read_text(encoding="utf-8")) == [
        {"a": "support_assistant_a", "b": "support_assistant_b", "paired_on": "ticket_id"}
    ]


def test_files_parse_with_same_tickets(rows: dict[str, list[dict]]) -> None:
    a, b = rows["a"], rows["b"]
    assert len(a) == len(b) == 400
    ids = [r["ticket_id"] for r in a]
    assert ids == [r["ticket_id"] for r in b]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"T\d{4}", i) for i in ids)
    for r in a + b:
        assert list(r) == ["text", *META]
        assert r["text"].strip() and "\n" not in r["text"]
        assert r["csat"] in range(1, 6) and isinstance(r["escalated"], bool)
        assert r["customer_tier"] in ("free", "pro", "enterprise")
    # Same ticket -> same topic and tier in both datasets, hence identical topic distributions.
    for ra, rb in zip(a, b, strict=True):
        assert (ra["topic"], ra["customer_tier"]) == (rb["topic"], rb["customer_tier"])
    assert len({r["topic"] for r in a}) >= 10


def test_polars_reads_both_formats_alike() -> None:
    a = pl.read_ndjson(FILE_A)
    b = pl.read_csv(FILE_B)
    assert a.columns == b.columns == ["text", *META]
    assert a.schema["escalated"] == b.schema["escalated"] == pl.Boolean
    assert a.schema["csat"].is_integer() and b.schema["csat"].is_integer()
    assert any(not t.isascii() for t in b["text"])  # UTF-8 names survive the CSV round trip


def test_planted_rates(rows: dict[str, list[dict]]) -> None:
    rate = {k: sum(bool(APOLOGY_REFUND.search(r["text"])) for r in v) / len(v) for k, v in rows.items()}
    assert rate["b"] > 0.5
    assert rate["a"] < 0.1


def test_no_other_large_word_difference(rows: dict[str, list[dict]]) -> None:
    """Outside the apology/refund sentences, no word is much more frequent in B than in A.

    Planted sentences take the place of neutral ones (to keep lengths equal), so B has a little less
    neutral filler: function words and closings are up to ~0.15 more frequent in A. Nothing is
    noticeably more frequent in B.
    """
    df_a = _doc_freq([_strip_planted(r["text"]) for r in rows["a"]])
    df_b = _doc_freq([_strip_planted(r["text"]) for r in rows["b"]])
    diff = {w: df_b.get(w, 0.0) - df_a.get(w, 0.0) for w in set(df_a) | set(df_b)}
    assert max(diff.values()) <= 0.08, sorted(diff.items(), key=lambda kv: -kv[1])[:5]
    assert min(diff.values()) >= -0.2, sorted(diff.items(), key=lambda kv: kv[1])[:5]


def test_lengths_match(rows: dict[str, list[dict]]) -> None:
    mean = {k: sum(len(r["text"].split()) for r in v) / len(v) for k, v in rows.items()}
    assert abs(mean["a"] - mean["b"]) / mean["a"] < 0.05


def test_csat_higher_with_refund(rows: dict[str, list[dict]]) -> None:
    for v in rows.values():
        with_refund = [r["csat"] for r in v if REFUND.search(r["text"])]
        without = [r["csat"] for r in v if not REFUND.search(r["text"])]
        assert with_refund and sum(with_refund) / len(with_refund) > sum(without) / len(without) + 0.4


def test_neutral_fragments_are_free_of_planted_vocabulary(gen: ModuleType) -> None:
    assert not [f for f in gen._neutral_fragments() if APOLOGY_REFUND.search(f)]
    planted = gen.APOLOGIES + gen.REFUNDS + gen.APOLOGY_REFUNDS
    assert all(APOLOGY_REFUND.search(f) for f in planted)
