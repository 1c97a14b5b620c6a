"""Tests of interp_assets.analysis.reports: highlighting, excerpts, examples and safe Markdown / HTML
rendering."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import numpy as np
import polars as pl
import pytest

from interp_assets.analysis.associations import feature_associations
from interp_assets.analysis.diffing import diff_features
from interp_assets.analysis.reports import (
    escape_markdown,
    excerpt,
    highlight_text,
    merge_spans,
    render_associations_markdown,
    render_html,
    render_markdown,
    report_examples,
    scatter_svg,
    top_examples,
)

EVIL = "<script>alert(1)</script> total | cost << 5 >> `rm -rf` [link](http://x) **bold**"


def test_merge_spans_overlapping_adjacent_and_clipped() -> None:
    assert merge_spans([(6, 11), (0, 5), (4, 7), (11, 13), (20, 20), (30, 40)], length=35) == [
        (0, 13),
        (30, 35),
    ]


def test_highlight_text_merges_and_escapes() -> None:
    assert highlight_text("hello world foo", [(6, 11), (0, 5), (4, 7)]) == "<<hello world>> foo"
    # adjacent tokens become one highlight; unsorted input is fine
    assert highlight_text("abcdef", [(3, 6), (0, 3)], "[", "]") == "[abcdef]"
    assert highlight_text("a<b", [(2, 3)], "<mark>", "</mark>", escape=lambda s: s.replace("<", "&lt;")) == (
        "a&lt;<mark>b</mark>"
    )
    assert highlight_text("no spans", []) == "no spans"


def test_excerpt_trims_around_first_span() -> None:
    text = "a" * 100 + "TOKEN" + "b" * 100
    out, spans = excerpt(text, [(100, 105), (108, 110), (190, 200)], window=10)
    assert out == "…" + "a" * 10 + "TOKEN" + "b" * 10 + "…"
    # spans shifted by -90 + 1 (the leading ellipsis); the one at 190-200 is outside the window
    assert spans == [(11, 16), (19, 21)]
    assert out[11:16] == "TOKEN"
    short, sp = excerpt("tiny TOKEN", [(5, 10)], window=80)
    assert (short, sp) == ("tiny TOKEN", [(5, 10)])
    # a span crossing the window edge is clipped
    _, sp2 = excerpt("x" * 50 + "ab" + "y" * 50, [(50, 52), (55, 70)], window=5)
    assert sp2 == [(6, 8), (11, 13)]


def test_escape_markdown() -> None:
    assert escape_markdown("a|b") == r"a\|b"
    assert escape_markdown("x << y >> z") == "x &lt;&lt; y &gt;&gt; z"
    assert escape_markdown("`code`\nnext") == r"\`code\` next"
    assert escape_markdown("[l](u) *e* _i_ # h & co") == r"\[l\]\(u\) \*e\* \_i\_ \# h &amp; co"


def _fixture() -> tuple[pl.DataFrame, ...]:
    """Two tiny datasets: feature 5 fires in most of A's docs, feature 9 in most of B's."""
    texts_a = [EVIL + f" cat {i}" for i in range(40)]
    texts_b = [f"doc {i}: the dog barked | loudly" for i in range(40)]
    docs_a = pl.DataFrame({"dataset": "A", "doc_id": np.arange(40, dtype=np.int32), "text": texts_a})
    docs_b = pl.DataFrame({"dataset": "B", "doc_id": np.arange(40, dtype=np.int32), "text": texts_b})

    def tokens(texts: list[str], feature: int, word: str, n_docs: int) -> pl.DataFrame:
        rows = []
        for d in range(n_docs):
            s = texts[d].index(word)
            rows.append((d, 3, word, s, s + len(word), feature, 1.0 + d))
            if feature == 5:  # also the <script> token, overlapping nothing
                rows.append((d, 0, "<script>", 0, 8, feature, 0.5))
        return pl.DataFrame(
            rows,
            schema=["doc_id", "token_index", "token", "char_start", "char_end", "feature", "activation"],
            orient="row",
        )

    ta_a = tokens(texts_a, 5, "cat", 30)
    ta_b = tokens(texts_b, 9, "dog", 35)

    def pool(ta: pl.DataFrame) -> pl.DataFrame:
        return ta.group_by("doc_id", "feature").agg(max_activation=pl.col("activation").max())

    return docs_a, docs_b, ta_a, ta_b, pool(ta_a), pool(ta_b)


def test_top_examples_orders_by_max_activation() -> None:
    docs_a, _, ta_a, _, _, _ = _fixture()
    ex = top_examples(ta_a, docs_a, 5, n=3)
    assert [e["doc_id"] for e in ex] == [29, 28, 27]
    assert ex[0]["max_activation"] == pytest.approx(30.0)
    s = ex[0]["text"].index("cat")
    assert ex[0]["spans"] == [(0, 8), (s, s + 3)]
    assert top_examples(ta_a, docs_a, 12345) == []


def _render_inputs() -> dict:
    docs_a, docs_b, ta_a, ta_b, pa, pb = _fixture()
    diff = diff_features(pa, 40, pb, 40, n_features=64)
    labels = pl.DataFrame(
        {
            "dataset": ["A", "B"],
            "feature": pl.Series([5, 9], dtype=pl.Int32),
            "label": ["<img src=x onerror=alert(2)> | cats", "dogs"],
            "description": ["Mentions of cats <b>", "Dogs."],
        }
    )
    scores = pl.DataFrame(
        {
            "feature": pl.Series([5], dtype=pl.Int32),
            "f1": [0.4],
            "auc": [0.8],
            "length_baseline_auc": [0.55],
            "beats_length_baseline": [True],
        }
    )
    examples = report_examples(diff, ta_a, docs_a, ta_b, docs_b, top_n=5)
    return {
        "diff": diff,
        "labels": labels,
        "scores": scores,
        "examples": examples,
        "name_a": "A|<i>",
        "name_b": "B",
        "n_docs_a": 40,
        "n_docs_b": 40,
        "n_features": 64,
    }


def test_report_examples_come_from_the_right_side() -> None:
    inp = _render_inputs()
    ex = inp["examples"]
    assert set(ex) == {5, 9}
    assert all("cat" in e["text"] for e in ex[5]) and all("dog" in e["text"] for e in ex[9])


def test_render_markdown_content_and_escaping() -> None:
    inp = _render_inputs()
    md = render_markdown(**inp)
    assert md.startswith("# A\\|&lt;i&gt; vs B: feature differences")
    assert "- Documents: **A\\|&lt;i&gt;** 40 · **B** 40" in md
    assert "Features tested: 64 (2 active in either dataset)" in md
    assert "Significant at FDR 0.05: **2**" in md
    # table row of feature 5: label escaped, AUC beside length alone, freqs and diff with CI
    row = next(line for line in md.splitlines() if line.startswith("| 5 |"))
    assert "&lt;img src=x onerror=alert\\(2\\)&gt; \\| cats" in row
    assert (
        "AUC 0.80 (length alone: 0.55)" in row and "75.00%" in row and "0.00%" in row and "+75.00% [" in row
    )
    # each table row has exactly 8 unescaped pipes (7 cells)
    for line in md.splitlines():
        if line.startswith("| 5 |") or line.startswith("| 9 |"):
            assert len(re.findall(r"(?<!\\)\|", line)) == 8
    # no raw HTML from documents or labels survives, the << >> from the document is escaped
    assert "<script>" not in md and "<img" not in md and "<b>" not in md and "<i>" not in md
    # the <script> token itself is highlighted, as escaped text
    assert "<<&lt;script&gt;>>alert\\(1\\)&lt;/script&gt;" in md
    assert "cost &lt;&lt; 5 &gt;&gt;" in md
    assert "\\`rm -rf\\`" in md
    assert "<<cat>>" not in md and "<<&#99;at>>" in md  # a letter after << is an entity: no `<cat>` tag
    # three examples per feature, best first
    ex_lines = [line for line in md.splitlines() if line.startswith("- doc ")]
    assert len(ex_lines) == 6
    assert ex_lines[0].startswith("- doc 29 (max 30)")


def test_render_markdown_without_significant_features() -> None:
    pa = pl.DataFrame({"doc_id": [0, 1], "feature": [1, 1], "max_activation": [1.0, 1.0]})
    diff = diff_features(pa, 10, pa, 10)
    md = render_markdown(diff, name_a="x", name_b="y", n_docs_a=10, n_docs_b=10)
    assert "No feature is significantly more frequent in x." in md
    assert "No feature is significantly more frequent in y." in md


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []
        self.titles: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)
        self._in_title = tag == "title"

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._in_title:
            self.titles.append(data)


def test_render_html_is_standalone_and_escaped() -> None:
    inp = _render_inputs()
    page = render_html(**inp)
    assert page.startswith("<!DOCTYPE html>")
    parsed = _Collector()
    parsed.feed(page)
    # the only tags are ours: no script/img/i/b from documents, labels or names
    assert not {"script", "img", "i", "link", "iframe"} & set(parsed.tags)
    assert parsed.tags.count("b") == 3  # ours: the two dataset names and the significant count
    # ... they are visible as text
    text = "".join(parsed.text)
    assert "<script>alert(1)</script> total | cost << 5 >>" in text
    assert "<img src=x onerror=alert(2)> | cats" in text
    # no external resources
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert "<style>" in page and "<svg" in page
    # highlights
    assert "<mark>cat</mark>" in page and "<mark>&lt;script&gt;</mark>" in page
    # scatter: one circle per tested feature, colored by direction, with tooltips
    assert page.count("<circle") == 2
    assert 'fill="#d95f02"' in page and 'fill="#1b78b4"' in page
    assert any(t.startswith("feature 5: <img src=x onerror=alert(2)> | cats") for t in parsed.titles)


def test_scatter_svg_caps_points_but_keeps_significant() -> None:
    rng = np.random.default_rng(0)
    n = 300
    diff = pl.DataFrame(
        {
            "feature": np.arange(n, dtype=np.int32),
            "freq_a": rng.random(n) * 0.2,
            "freq_b": rng.random(n) * 0.2,
            "freq_diff": np.zeros(n),
            "freq_diff_ci_low": np.zeros(n),
            "freq_diff_ci_high": np.zeros(n),
            "q_value": np.ones(n),
            "significant": np.arange(n) < 7,
            "direction": ["a"] * n,
        }
    )
    svg = scatter_svg(diff, name_a="a", name_b="b", max_points=50)
    assert svg.count("<circle") == 50
    assert svg.count('fill="#d95f02"') == 7
    # axis labels never crowd: x-axis tick labels at least 30 px apart
    import re

    xs = [float(m) for m in re.findall(r'<text x="([0-9.]+)" y="[0-9.]+" text-anchor="middle">[0-9.]+<', svg)]
    assert len(xs) >= 3 and all(b - a >= 30 for a, b in zip(xs, xs[1:], strict=False))
    assert ">0.001<" not in svg  # too close to 0 at this range: left out


def test_render_associations_markdown() -> None:
    rng = np.random.default_rng(2)
    n = 300
    flag = rng.random(n) < 0.5
    rows = [(d, 4, 2.0) for d in range(n) if rng.random() < (0.7 if flag[d] else 0.1)]
    rows += [(d, 1, 1.0) for d in range(n) if rng.random() < 0.3]
    pool = pl.DataFrame(rows, schema=["doc_id", "feature", "max_activation"], orient="row")
    docs = pl.DataFrame({"doc_id": np.arange(n), "is_refusal": flag, "note": ["x"] * n})
    assoc = feature_associations(pool, docs["doc_id"], docs["is_refusal"], dataset="chat").table
    labels = pl.DataFrame({"feature": [4], "label": ["apology | <b>sorry</b>"]})
    md = render_associations_markdown(assoc, column="is_refusal", dataset="chat", labels=labels)
    assert "# Features associated with `is\\_refusal` in chat" in md
    assert "Documents with a value: 300" in md
    row = next(line for line in md.splitlines() if line.startswith("| 4 |"))
    assert "apology \\| &lt;b&gt;sorry&lt;/b&gt;" in row
    assert "| 1 |" not in md


def test_report_shows_the_score_that_carries_evidence_and_flags_unclear_labels() -> None:
    from interp_assets.analysis.reports import _score_text

    clear = {"auc": 0.81, "f1": 0.5, "length_baseline_auc": 0.6, "beats_length_baseline": True}
    assert _score_text(clear) == "AUC 0.81 (length alone: 0.60)"
    unclear = {"auc": 0.58, "length_baseline_auc": 0.71, "beats_length_baseline": False}
    assert _score_text(unclear) == "unclear: AUC 0.58 (length alone: 0.71)"
    llm = {"auc": None, "f1": 0.7, "balanced_accuracy": 0.66, "length_baseline_auc": 0.55}
    assert _score_text(llm | {"beats_length_baseline": True}) == "balanced accuracy 0.66 (length alone: 0.55)"
    assert _score_text({"auc": None, "f1": 0.7}) == "–"  # F1 alone does not tell real from wrong labels
    assert _score_text(None) == "–"


def test_report_summary_names_both_directions_top_features_first() -> None:
    from interp_assets.analysis.reports import render_html, render_markdown

    n = 6
    diff = pl.DataFrame(
        {
            "feature": np.arange(n, dtype=np.int32),
            "docs_a": [50, 5, 5, 5, 5, 5],
            "docs_b": [5, 50, 60, 70, 80, 5],
            "freq_a": [0.5, 0.05, 0.05, 0.05, 0.05, 0.05],
            "freq_b": [0.05, 0.5, 0.6, 0.7, 0.8, 0.05],
            "freq_diff": [0.45, -0.45, -0.55, -0.65, -0.75, 0.0],
            "freq_diff_ci_low": np.zeros(n),
            "freq_diff_ci_high": np.zeros(n),
            "p_value": [1e-9] * 5 + [1.0],
            "q_value": [1e-8, 1e-8, 1e-9, 1e-10, 1e-11, 1.0],
            "significant": [True] * 5 + [False],
            "direction": ["a", "b", "b", "b", "b", None],
            "test": ["z"] * n,
        }
    )
    labels = pl.DataFrame({"feature": [4, 1], "label": ["refund <b>", "sorry"], "description": ["", ""]})
    md = render_markdown(diff, name_a="A", name_b="B", n_docs_a=100, n_docs_b=100, labels=labels)
    summary = md.split("## ")[0]
    assert "- More frequent in A: feature 0\n" in summary
    assert (
        '- More frequent in B: features 4 "refund &lt;b&gt;", 3, 2 and 1 more in the table below' in summary
    )
    page = render_html(diff, name_a="A", name_b="B", n_docs_a=100, n_docs_b=100, labels=labels)
    head = page.split("<svg")[0]  # before the plot and the tables
    assert "More frequent in A: feature 0</li>" in head
    assert 'More frequent in B: features 4 "refund &lt;b&gt;", 3, 2 and 1 more' in head
