"""Readable reports of one dataset comparison (Markdown and standalone HTML) and of metadata associations.

Pure functions over the frames of `interp_assets.analysis.diffing` plus feature_labels / feature_scores /
token_activations / raw_documents (README schemas). Document text and labels are untrusted: Markdown
escapes everything that could render as markup, HTML escapes everything with `html.escape`.
Activating tokens are marked with `<< >>` in Markdown (as interp_embed does) and `<mark>` in HTML.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import polars as pl

from interp_assets.analysis.diffing import FrameLike, as_lazy

Span = tuple[int, int]
Example = Mapping[str, Any]

ELLIPSIS = "…"
COLOR_A = "#d95f02"
COLOR_B = "#1b78b4"


# --------------------------------------------------------------------------- text helpers


def merge_spans(spans: Iterable[Sequence[int]], length: int | None = None) -> list[Span]:
    """Sort spans, clip them to [0, length], drop empty ones and merge overlapping or touching ones."""
    cleaned = []
    for s, e in spans:
        s, e = int(s), int(e)
        if length is not None:
            s, e = max(0, min(s, length)), max(0, min(e, length))
        else:
            s = max(0, s)
        if e > s:
            cleaned.append((s, e))
    merged: list[Span] = []
    for s, e in sorted(cleaned):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def highlight_text(
    text: str,
    spans: Iterable[Sequence[int]],
    open_mark: str = "<<",
    close_mark: str = ">>",
    *,
    escape: Callable[[str], str] | None = None,
) -> str:
    """`text` with every (merged) span wrapped in open/close marks; `escape` is applied to the text only."""
    esc = escape or (lambda s: s)
    out, pos = [], 0
    for s, e in merge_spans(spans, len(text)):
        out.append(esc(text[pos:s]))
        out.append(open_mark + esc(text[s:e]) + close_mark)
        pos = e
    out.append(esc(text[pos:]))
    return "".join(out)


def excerpt(text: str, spans: Iterable[Sequence[int]], window: int = 80) -> tuple[str, list[Span]]:
    """Trim `text` to `window` characters around its first span (with "…" where cut); spans re-based.

    Spans outside the excerpt are dropped, spans crossing its edges clipped. Without spans, the first
    2 * window characters are kept.
    """
    merged = merge_spans(spans, len(text))
    if merged:
        start = max(0, merged[0][0] - window)
        end = min(len(text), merged[0][1] + window)
    else:
        start, end = 0, min(len(text), 2 * window)
    prefix = ELLIPSIS if start > 0 else ""
    suffix = ELLIPSIS if end < len(text) else ""
    shift = len(prefix) - start
    kept = [(max(s, start) + shift, min(e, end) + shift) for s, e in merged if s < end and e > start]
    return prefix + text[start:end] + suffix, kept


_MD_SPECIAL = re.compile(r"([\\`*_\[\]{}()#+!|~])")
_WS = re.compile(r"\s+")


def escape_markdown(text: str) -> str:
    """Escape untrusted text so Markdown renders it as plain text on one line (tables, lists).

    `& < >` become entities (so neither HTML nor our `<< >>` marks can be forged), Markdown punctuation
    (`\\ ` * _ [ ] { } ( ) # + ! | ~`) is backslash-escaped, and all whitespace runs become one space.
    """
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = _MD_SPECIAL.sub(r"\\\1", text)
    return _WS.sub(" ", text)


_TAG_START = re.compile(r"<<([A-Za-z/?!])")


def _md_highlight(text: str, spans: Iterable[Sequence[int]]) -> str:
    """Markdown `<< >>` highlighting of escaped text; a mark followed by a letter, `/`, `?` or `!` would
    start a raw HTML tag (`<<b>>` contains `<b>`), so that character is written as a numeric entity."""
    marked = highlight_text(text, spans, "<<", ">>", escape=escape_markdown)
    return _TAG_START.sub(lambda m: f"<<&#{ord(m.group(1))};", marked)


def _escape_html_inline(text: str) -> str:
    return html.escape(_WS.sub(" ", text), quote=True)


# --------------------------------------------------------------------------- examples


def examples_for_features(
    token_activations: FrameLike,
    documents: FrameLike,
    features: Sequence[int],
    n: int = 3,
    *,
    threshold: float = 0.0,
) -> dict[int, list[dict[str, Any]]]:
    """For each feature, the `n` documents with its highest max token activation (ties: lower doc_id).

    Each example: doc_id, max_activation, text (the full document) and spans (char_start, char_end of
    every token where the feature is active, merged). One pass over token_activations for all features
    (the wide shape: joined with tokens for the offsets).
    """
    feats = sorted({int(f) for f in features})
    result: dict[int, list[dict[str, Any]]] = {f: [] for f in feats}
    if not feats:
        return result
    ta = (
        as_lazy(
            token_activations,
            "token_activations",
            ["doc_id", "feature", "char_start", "char_end", "activation"],
        )
        .select(pl.col("doc_id").cast(pl.Int32), "feature", "char_start", "char_end", "activation")
        .filter(pl.col("feature").is_in(feats) & (pl.col("activation") > threshold))
    )
    rows = ta.collect()
    best = (
        rows.group_by("feature", "doc_id")
        .agg(max_activation=pl.col("activation").max().cast(pl.Float64))
        .sort(["feature", "max_activation", "doc_id"], descending=[False, True, False])
        .group_by("feature", maintain_order=True)
        .head(n)
    )
    spans = (
        rows.join(best.select("feature", "doc_id"), on=["feature", "doc_id"], how="semi")
        .group_by("feature", "doc_id")
        .agg(pl.col("char_start"), pl.col("char_end"))
    )
    docs = (
        as_lazy(documents, "documents", ["doc_id", "text"])
        .select(pl.col("doc_id").cast(pl.Int32), "text")
        .join(best.select("doc_id").unique().lazy(), on="doc_id", how="semi")
        .collect()
    )
    table = best.join(spans, on=["feature", "doc_id"], how="left").join(docs, on="doc_id", how="left")
    table = table.sort(["feature", "max_activation", "doc_id"], descending=[False, True, False])
    for r in table.iter_rows(named=True):
        text = r["text"] if r["text"] is not None else ""
        result[int(r["feature"])].append(
            {
                "doc_id": int(r["doc_id"]),
                "max_activation": float(r["max_activation"]),
                "text": text,
                "spans": merge_spans(zip(r["char_start"] or [], r["char_end"] or [], strict=True), len(text)),
            }
        )
    return result


def top_examples(
    token_activations: FrameLike, documents: FrameLike, feature: int, n: int = 3
) -> list[dict[str, Any]]:
    """The `n` documents with the highest max activation of `feature` (see `examples_for_features`)."""
    return examples_for_features(token_activations, documents, [feature], n)[int(feature)]


def top_features(diff: pl.DataFrame, top_n: int = 10) -> dict[str, pl.DataFrame]:
    """Top significant features per direction ("a" / "b"), by q-value then |freq_diff|."""
    sig = diff.filter(pl.col("significant"))
    return {
        d: sig.filter(pl.col("direction") == d)
        .sort(
            [pl.col("q_value"), pl.col("freq_diff").abs(), pl.col("feature")], descending=[False, True, False]
        )
        .head(top_n)
        for d in ("a", "b")
    }


def report_examples(
    diff: pl.DataFrame,
    token_activations_a: FrameLike,
    documents_a: FrameLike,
    token_activations_b: FrameLike,
    documents_b: FrameLike,
    *,
    top_n: int = 10,
    n: int = 3,
) -> dict[int, list[dict[str, Any]]]:
    """Examples for the report's top features: from A for features more frequent in A, else from B."""
    tops = top_features(diff, top_n)
    out = examples_for_features(token_activations_a, documents_a, tops["a"]["feature"].to_list(), n)
    out.update(examples_for_features(token_activations_b, documents_b, tops["b"]["feature"].to_list(), n))
    return out


# --------------------------------------------------------------------------- labels / scores / formatting


def _label_map(labels: pl.DataFrame | None) -> dict[int, dict[str, Any]]:
    if labels is None or labels.height == 0 or "feature" not in labels.columns:
        return {}
    cols = [c for c in ("feature", "label", "description") if c in labels.columns]
    first = labels.select(cols).unique(subset="feature", keep="first", maintain_order=True)
    return {int(r["feature"]): r for r in first.iter_rows(named=True)}


def _score_map(scores: pl.DataFrame | None) -> dict[int, dict[str, Any]]:
    if scores is None or scores.height == 0 or "feature" not in scores.columns:
        return {}
    wanted = (
        "feature",
        "f1",
        "f1_ci_low",
        "f1_ci_high",
        "balanced_accuracy",
        "auc",
        "length_baseline_auc",
        "beats_length_baseline",
        "method",
    )
    cols = [c for c in wanted if c in scores.columns]
    first = scores.select(cols).unique(subset="feature", keep="first", maintain_order=True)
    return {int(r["feature"]): r for r in first.iter_rows(named=True)}


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:+.2f}%" if signed else f"{100 * x:.2f}%"


def _diff_ci(r: Mapping[str, Any]) -> str:
    low, high = _pct(r["freq_diff_ci_low"], True), _pct(r["freq_diff_ci_high"], True)
    return f"{_pct(r['freq_diff'], True)} [{low}, {high}]"


def _q(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.2g}" if x >= 1e-3 else f"{x:.1e}"


def _top_three(rows: pl.DataFrame, lab: Mapping[int, Mapping[str, Any]], esc: Any) -> str:
    """ "none" or the first three features of a direction with their labels, for the report's summary."""
    if rows.height == 0:
        return "none"
    named = []
    for f in rows["feature"].head(3).to_list():
        label = lab.get(int(f), {}).get("label")
        named.append(f'{int(f)} "{esc(str(label))}"' if label else str(int(f)))
    more = f" and {rows.height - 3} more in the table below" if rows.height > 3 else ""
    return ("features " if rows.height > 1 else "feature ") + ", ".join(named) + more


# The metric a score (`labels.scoring`) is read by, per method: the one that separates real labels from
# labels swapped between features (benchmarks/label_scores.py, SST-2 and DBpedia): AUC for the embedding
# scorer, whose similarity ranks the excerpts; F1 at the fitted threshold does not. The LLM scorers
# answer only yes/no, so they are read by balanced accuracy.
HEADLINE_METRIC: dict[str, str] = {
    "embedding": "auc",
    "detection": "balanced_accuracy",
    "fuzz": "balanced_accuracy",
}


def headline_score(row: Mapping[str, Any]) -> tuple[str, float | None]:
    """`(metric, value)` a score row is read by: `HEADLINE_METRIC` of its `method` (AUC when the row has no
    method), balanced accuracy when that metric is missing (a scorer without a continuous score)."""
    metric = HEADLINE_METRIC.get(str(row.get("method") or "embedding"), "auc")
    if row.get(metric) is None:
        metric = "balanced_accuracy"
    return metric, row.get(metric)


def _score_text(s: Mapping[str, Any] | None) -> str:
    """The label's held-out score by `headline_score`, beside what excerpt length alone achieves;
    "unclear" when the label does not beat length alone."""
    if not s:
        return "–"
    metric, value = headline_score(s)
    if value is None:
        return "–"
    text = f"{'AUC' if metric == 'auc' else metric.replace('_', ' ')} {value:.2f}"
    if s.get("length_baseline_auc") is not None:
        text += f" (length alone: {s['length_baseline_auc']:.2f})"
    if s.get("beats_length_baseline") is False:
        text = "unclear: " + text
    return text


def _method_text(diff: pl.DataFrame, n_tests: int, alpha: float) -> str:
    tests = set(diff["test"].unique().to_list()) if "test" in diff.columns and diff.height else set()
    fdr = f"Benjamini-Hochberg FDR {alpha:g} over {n_tests:,} features"
    if "mcnemar_exact" in tests:
        return (
            "paired documents; exact McNemar test per feature; " + fdr + "; 95% Newcombe intervals for "
            "paired differences"
        )
    if "tested" in diff.columns:
        return (
            "document frequency at label-blind firing thresholds (fires at all, or in the top "
            "50/20/10/5/2/1% "
            "of the pooled A+B documents; each feature's best threshold, with an exact min-p adjustment "
            "over its nested thresholds); "
            "two-sided Fisher exact test where an expected cell < 5, else two-proportion z test; "
            + fdr.replace("features", "features that could reach significance (independent filtering)")
            + "; 95% Newcombe hybrid score intervals at the reported threshold"
        )
    return (
        "document frequency (max activation > threshold); two-sided Fisher exact test where an expected "
        "cell < 5, else two-proportion z test; " + fdr + "; 95% Newcombe hybrid score intervals"
    )


def _summary(
    diff: pl.DataFrame, n_docs_a: int, n_docs_b: int, n_features: int | None, alpha: float
) -> dict[str, Any]:
    sig = diff.filter(pl.col("significant")) if diff.height else diff
    if "tested" in diff.columns:
        n_tests = int(diff["tested"].sum())
    else:
        n_tests = n_features if n_features is not None else diff.height
    return {
        "n_docs_a": n_docs_a,
        "n_docs_b": n_docs_b,
        "features_active": diff.height,
        "features_tested": n_tests,
        "significant": sig.height,
        "significant_a": sig.filter(pl.col("direction") == "a").height if sig.height else 0,
        "significant_b": sig.filter(pl.col("direction") == "b").height if sig.height else 0,
        "method": _method_text(diff, n_tests, alpha),
    }


# --------------------------------------------------------------------------- Markdown


def render_markdown(
    diff: pl.DataFrame,
    *,
    name_a: str,
    name_b: str,
    n_docs_a: int,
    n_docs_b: int,
    labels: pl.DataFrame | None = None,
    scores: pl.DataFrame | None = None,
    examples: Mapping[int, Sequence[Example]] | None = None,
    top_n: int = 10,
    n_features: int | None = None,
    alpha: float = 0.05,
    window: int = 80,
    title: str | None = None,
) -> str:
    """Markdown report of one comparison (a `diff_features` / `paired_diff_features` frame).

    Summary, then per direction a table of the top significant features (feature, label, its held-out
    score: AUC, or balanced accuracy for LLM scorers, beside length alone, "unclear" when length alone does
    as well; freq_a,
    freq_b, diff with 95% CI, q-value) and up to 3 excerpts per feature with activating
    tokens marked `<< >>`. All text from documents and labels is escaped (`escape_markdown`).
    """
    esc = escape_markdown
    lab, sc, ex = _label_map(labels), _score_map(scores), examples or {}
    s = _summary(diff, n_docs_a, n_docs_b, n_features, alpha)
    a, b = esc(name_a), esc(name_b)
    lines = [
        f"# {esc(title) if title else f'{a} vs {b}: feature differences'}",
        "",
        f"- Documents: **{a}** {n_docs_a:,} · **{b}** {n_docs_b:,}",
        f"- Features tested: {s['features_tested']:,} ({s['features_active']:,} active in either dataset)",
        f"- Significant at FDR {alpha:g}: **{s['significant']:,}** "
        f"({s['significant_a']:,} more frequent in {a}, {s['significant_b']:,} more frequent in {b})",
        f"- Method: {esc(s['method'])}",
    ]
    tops = top_features(diff, top_n)
    for d, name in (("a", a), ("b", b)):
        lines.append(f"- More frequent in {name}: {_top_three(tops[d], lab, esc)}")
    lines.append("")
    for d, name in (("a", a), ("b", b)):
        rows = tops[d]
        lines.append(f"## More frequent in {name}")
        lines.append("")
        if rows.height == 0:
            lines += [f"No feature is significantly more frequent in {name}.", ""]
            continue
        lines += [
            f"| feature | label | label score (held out) | freq {a} | freq {b} | diff [95% CI] | q-value |",
            "|---:|---|---|---:|---:|---|---:|",
        ]
        for r in rows.iter_rows(named=True):
            f = int(r["feature"])
            label = esc(str(lab[f]["label"])) if f in lab and lab[f].get("label") else "–"
            lines.append(
                f"| {f} | {label} | {_score_text(sc.get(f))} | {_pct(r['freq_a'])} | {_pct(r['freq_b'])} "
                f"| {_diff_ci(r)} | {_q(r['q_value'])} |"
            )
        lines.append("")
        for r in rows.iter_rows(named=True):
            f = int(r["feature"])
            if not ex.get(f):
                continue
            label = f" — {esc(str(lab[f]['label']))}" if f in lab and lab[f].get("label") else ""
            lines += [f"### Feature {f}{label}", ""]
            if f in lab and lab[f].get("description"):
                lines += [f"_{esc(str(lab[f]['description']))}_", ""]
            for e in list(ex[f])[:3]:
                text, spans = excerpt(str(e.get("text") or ""), e.get("spans") or [], window)
                body = _md_highlight(text, spans)
                lines.append(f"- doc {int(e['doc_id'])} (max {float(e['max_activation']):.3g}): {body}")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#222;line-height:1.45;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2rem}h3{font-size:1.05rem;margin-bottom:.3rem}
table{border-collapse:collapse;width:100%;font-size:.9rem;margin:.5rem 0 1rem}
th,td{border-bottom:1px solid #ddd;padding:.3rem .5rem;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f5f5f5}
mark{background:#ffe08a;padding:0 .1em;border-radius:2px}
.ex{font-size:.88rem;margin:.2rem 0 .6rem 1rem}.ex li{margin:.25rem 0}
.meta{color:#666;font-size:.85rem}.dot-a{color:%(a)s}.dot-b{color:%(b)s}
svg text{font-size:11px;fill:#444}
""".replace("%(a)s", COLOR_A).replace("%(b)s", COLOR_B)


def _sqrt_scale(v: float, vmax: float, size: float) -> float:
    return size * math.sqrt(max(v, 0.0) / vmax) if vmax > 0 else 0.0


def scatter_svg(
    diff: pl.DataFrame,
    *,
    name_a: str,
    name_b: str,
    labels: pl.DataFrame | None = None,
    max_points: int = 4000,
    size: int = 420,
) -> str:
    """Inline SVG scatter of freq_a vs freq_b on a square-root scale with the diagonal.

    Significant features are colored by direction (A orange, B blue) and drawn on top; every point has a
    `<title>` tooltip. At most `max_points` points: all significant ones, then the most frequent others.
    """
    lab = _label_map(labels)
    pad_l, pad_b, pad_t, pad_r = 55, 45, 10, 10
    w, h = size + pad_l + pad_r, size + pad_t + pad_b
    if diff.height:
        vmax = max(float(diff["freq_a"].max()), float(diff["freq_b"].max()), 1e-6)
        sig = diff.filter(pl.col("significant"))
        rest = (
            diff.filter(~pl.col("significant"))
            .sort(pl.col("freq_a") + pl.col("freq_b"), descending=True)
            .head(max(0, max_points - sig.height))
        )
        pts = pl.concat([rest, sig.head(max_points)])
    else:
        vmax, pts = 1.0, diff
    ticks: list[float] = []
    for t in (0, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0):  # kept only with room for their labels
        if t <= vmax * 1.0001 and (
            not ticks or _sqrt_scale(t, vmax, size) - _sqrt_scale(ticks[-1], vmax, size) >= 30
        ):
            ticks.append(t)

    def x(v: float) -> float:
        return pad_l + _sqrt_scale(v, vmax, size)

    def y(v: float) -> float:
        return pad_t + size - _sqrt_scale(v, vmax, size)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
        f'role="img" aria-label="freq in A vs freq in B">',
        f'<rect x="{pad_l}" y="{pad_t}" width="{size}" height="{size}" fill="#fafafa" stroke="#ccc"/>',
    ]
    for t in ticks:
        parts.append(
            f'<line x1="{x(t):.1f}" y1="{pad_t + size}" x2="{x(t):.1f}" y2="{pad_t + size + 4}" '
            'stroke="#888"/>'
            f'<text x="{x(t):.1f}" y="{pad_t + size + 16}" text-anchor="middle">{t:g}</text>'
            f'<line x1="{pad_l - 4}" y1="{y(t):.1f}" x2="{pad_l}" y2="{y(t):.1f}" stroke="#888"/>'
            f'<text x="{pad_l - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{t:g}</text>'
        )
    parts.append(
        f'<line x1="{x(0):.1f}" y1="{y(0):.1f}" x2="{x(vmax):.1f}" y2="{y(vmax):.1f}" '
        'stroke="#999" stroke-dasharray="4 3"/>'
    )
    parts.append(
        f'<text x="{pad_l + size / 2}" y="{h - 6}" text-anchor="middle">'
        f"document frequency in {html.escape(name_a)} (sqrt scale)</text>"
        f'<text transform="translate(14 {pad_t + size / 2}) rotate(-90)" text-anchor="middle">'
        f"document frequency in {html.escape(name_b)} (sqrt scale)</text>"
    )
    for r in pts.iter_rows(named=True):
        f = int(r["feature"])
        if r["significant"]:
            color, rad, op = (COLOR_A if r["direction"] == "a" else COLOR_B), 3.5, 0.9
        else:
            color, rad, op = "#9a9a9a", 2.0, 0.45
        label = f": {lab[f]['label']}" if f in lab and lab[f].get("label") else ""
        tip = (
            f"feature {f}{label}\n{name_a}: {_pct(r['freq_a'])} · {name_b}: {_pct(r['freq_b'])}\n"
            f"diff {_diff_ci(r)} · q {_q(r['q_value'])}"
        )
        parts.append(
            f'<circle cx="{x(r["freq_a"]):.1f}" cy="{y(r["freq_b"]):.1f}" r="{rad}" fill="{color}" '
            f'fill-opacity="{op}"><title>{html.escape(tip)}</title></circle>'
        )
    parts.append("</svg>")
    return "".join(parts)


def render_html(
    diff: pl.DataFrame,
    *,
    name_a: str,
    name_b: str,
    n_docs_a: int,
    n_docs_b: int,
    labels: pl.DataFrame | None = None,
    scores: pl.DataFrame | None = None,
    examples: Mapping[int, Sequence[Example]] | None = None,
    top_n: int = 10,
    n_features: int | None = None,
    alpha: float = 0.05,
    window: int = 80,
    title: str | None = None,
    max_points: int = 4000,
) -> str:
    """Standalone HTML report (inline CSS and SVG, no scripts or external resources) of one comparison.

    Same content as `render_markdown` plus a scatter plot of freq_a vs freq_b; activating tokens are
    `<mark>`ed and everything from documents, labels and names goes through `html.escape`.
    """
    esc = _escape_html_inline
    lab, sc, ex = _label_map(labels), _score_map(scores), examples or {}
    s = _summary(diff, n_docs_a, n_docs_b, n_features, alpha)
    a, b = esc(name_a), esc(name_b)
    heading = esc(title) if title else f"{a} vs {b}: feature differences"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{heading}</title><style>{_CSS}</style></head><body>",
        f"<h1>{heading}</h1>",
        "<ul>",
        f"<li>Documents: <b>{a}</b> {n_docs_a:,} · <b>{b}</b> {n_docs_b:,}</li>",
        f"<li>Features tested: {s['features_tested']:,} "
        f"({s['features_active']:,} active in either dataset)</li>",
        f"<li>Significant at FDR {alpha:g}: <b>{s['significant']:,}</b> "
        f'(<span class="dot-a">●</span> {s["significant_a"]:,} more frequent in {a}, '
        f'<span class="dot-b">●</span> {s["significant_b"]:,} more frequent in {b})</li>',
        f"<li>Method: {esc(s['method'])}</li>",
    ]
    tops = top_features(diff, top_n)
    for d, name in (("a", a), ("b", b)):  # both directions up front, whichever holds the difference
        top = _top_three(tops[d], lab, esc)
        out.append(f'<li><span class="dot-{d}">●</span> More frequent in {name}: {top}</li>')
    out += ["</ul>", scatter_svg(diff, name_a=name_a, name_b=name_b, labels=labels, max_points=max_points)]
    for d, name in (("a", a), ("b", b)):
        rows = tops[d]
        out.append(f'<h2><span class="dot-{d}">●</span> More frequent in {name}</h2>')
        if rows.height == 0:
            out.append(f"<p>No feature is significantly more frequent in {name}.</p>")
            continue
        out.append(
            "<table><thead><tr><th>feature</th><th>label</th><th>label score (held out)</th>"
            f"<th>freq {a}</th><th>freq {b}</th><th>diff [95% CI]</th><th>q-value</th></tr></thead><tbody>"
        )
        for r in rows.iter_rows(named=True):
            f = int(r["feature"])
            label = esc(str(lab[f]["label"])) if f in lab and lab[f].get("label") else "–"
            out.append(
                f'<tr><td class="n"><a href="#f{f}">{f}</a></td><td>{label}</td>'
                f"<td>{esc(_score_text(sc.get(f)))}</td>"
                f'<td class="n">{_pct(r["freq_a"])}</td><td class="n">{_pct(r["freq_b"])}</td>'
                f'<td>{esc(_diff_ci(r))}</td><td class="n">{_q(r["q_value"])}</td></tr>'
            )
        out.append("</tbody></table>")
        for r in rows.iter_rows(named=True):
            f = int(r["feature"])
            if not ex.get(f):
                continue
            label = f" — {esc(str(lab[f]['label']))}" if f in lab and lab[f].get("label") else ""
            out.append(f'<h3 id="f{f}">Feature {f}{label}</h3>')
            if f in lab and lab[f].get("description"):
                out.append(f'<p class="meta">{esc(str(lab[f]["description"]))}</p>')
            out.append('<ul class="ex">')
            for e in list(ex[f])[:3]:
                text, spans = excerpt(str(e.get("text") or ""), e.get("spans") or [], window)
                body = highlight_text(text, spans, "<mark>", "</mark>", escape=esc)
                out.append(
                    f'<li><span class="meta">doc {int(e["doc_id"])} · max {float(e["max_activation"]):.3g}'
                    f"</span><br>{body}</li>"
                )
            out.append("</ul>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def combine_html(first: str, *sections: str) -> str:
    """One HTML page: the body of each of `sections` (pages from `render_html`) appended to `first`'s."""
    end = "</body></html>"
    bodies = [s.split("<body>", 1)[1].rsplit(end, 1)[0] for s in sections]
    return first.rsplit(end, 1)[0] + "\n<hr>\n".join(["", *bodies]) + end + "\n"


# --------------------------------------------------------------------------- causal evidence

CAUSAL_START = "<!-- causal-evidence:start -->"
CAUSAL_END = "<!-- causal-evidence:end -->"
SCORE_NAMES = {
    "feature_signature": "the document embedding projected on the feature's signature (mean embedding of "
    "documents where it fires minus where it does not)",
    "comparison_direction": "the document embedding projected on the comparison (mean embedding of the "
    "feature's side minus the other's)",
    "next_token_logprob": "mean log-probability of the observed next tokens (causal LMs)",
    "document_feature_shift": "L1 change of the comparison's document-SAE feature activations (the "
    "document embedding after the edit, encoded by the document SAE; with a document SAE)",
    "document_features_flipped": "number of the comparison's document-SAE features that start or stop "
    "firing (with a document SAE)",
}


def _causal_rows(summary: pl.DataFrame, labels: dict[int, str], name_a: str, name_b: str) -> list[list[str]]:
    rows = []
    for r in summary.iter_rows(named=True):
        side = name_a if r["direction"] == "a" else name_b
        below = r["controls_beyond"]
        rows.append(
            [
                str(r["feature"]),
                labels.get(r["feature"], ""),
                side,
                r["score_name"],
                str(r["documents"]),
                f"{r['effect']:+.4f} [{r['effect_ci_low']:+.4f}, {r['effect_ci_high']:+.4f}]",
                "" if r["control_effect_median"] is None else f"{r['control_effect_median']:+.4f}",
                "" if below != below else f"{below:.0%} of {r['controls']}",
                "yes" if r["evidence"] else "no",
            ]
        )
    return rows


CAUSAL_HEADER = [
    "feature",
    "label",
    "more in",
    "score",
    "documents",
    "effect of ablation [95% CI]",
    "median of matched controls",
    "controls that moved it further",
    "causal evidence",
]


def _causal_intro(n_controls: int, summary: pl.DataFrame) -> str:
    measured = set(summary["score_name"].to_list())
    shown = {name: meaning for name, meaning in SCORE_NAMES.items() if name in measured} or SCORE_NAMES
    scores = "; ".join(f"`{name}`: {meaning}" for name, meaning in shown.items())
    return (
        "Each top feature is ablated (its decoder contribution removed where it fires) on documents where "
        f"it fires; the effect is the mean change of a score, beside {n_controls} random features with the "
        f"closest firing rate and a placebo. Scores: {scores}. Directions come from the documents' "
        "unedited embeddings. Causal evidence: the interval is below 0 (above 0 for the document-feature "
        "shifts, which only grow) and no control moved the score further."
    )


def render_causal_markdown(
    summary: pl.DataFrame,
    *,
    name_a: str,
    name_b: str,
    labels: dict[int, str] | None = None,
    n_controls: int = 0,
) -> str:
    """The report's "Causal evidence" section (Markdown) from `effects.effect_summary`, between markers."""
    esc = escape_markdown
    out = [CAUSAL_START, "## Causal evidence", "", esc(_causal_intro(n_controls, summary)), ""]
    if summary.is_empty():
        out.append("No feature was measured (no significant token-level feature, or none fires).")
    else:
        out.append("| " + " | ".join(CAUSAL_HEADER) + " |")
        out.append("|" + "---|" * len(CAUSAL_HEADER))
        for row in _causal_rows(summary, labels or {}, name_a, name_b):
            out.append("| " + " | ".join(esc(c) for c in row) + " |")
    out.append(CAUSAL_END)
    return "\n".join(out) + "\n"


def render_causal_html(
    summary: pl.DataFrame,
    *,
    name_a: str,
    name_b: str,
    labels: dict[int, str] | None = None,
    n_controls: int = 0,
) -> str:
    """The same section as HTML (a `<section>` between the same markers)."""
    out = [CAUSAL_START, '<section id="causal-evidence"><h2>Causal evidence</h2>']
    out.append(f"<p>{html.escape(_causal_intro(n_controls, summary))}</p>")
    if summary.is_empty():
        out.append("<p>No feature was measured (no significant token-level feature, or none fires).</p>")
    else:
        out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in CAUSAL_HEADER) + "</tr>")
        for row in _causal_rows(summary, labels or {}, name_a, name_b):
            out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
        out.append("</table>")
    out.append("</section>")
    out.append(CAUSAL_END)
    return "\n".join(out) + "\n"


def with_causal_section(page: str, section: str, *, html_page: bool) -> str:
    """`page` with its causal-evidence section replaced by `section` (added at the end when absent: before
    `</body>` in an HTML page)."""
    start, end = page.find(CAUSAL_START), page.find(CAUSAL_END)
    if start != -1 and end > start:
        return page[:start] + section.rstrip("\n") + page[end + len(CAUSAL_END) :]
    if html_page and "</body>" in page:
        head, tail = page.rsplit("</body>", 1)
        return head + section + "</body>" + tail
    return page.rstrip("\n") + "\n\n" + section


# --------------------------------------------------------------------------- associations


def render_associations_markdown(
    assoc: pl.DataFrame,
    *,
    column: str,
    dataset: str,
    labels: pl.DataFrame | None = None,
    top_n: int = 20,
    alpha: float = 0.05,
) -> str:
    """Markdown report of one column's `associations.feature_associations` table: summary and top features."""
    esc = escape_markdown
    lab = _label_map(labels)
    statistic = str(assoc["statistic"][0]) if assoc.height else "auc"
    n_docs = int(assoc["n_docs"][0]) if assoc.height else 0
    sig = assoc.filter(pl.col("significant")).sort("q_value").head(top_n)
    n_sig = int(assoc["significant"].sum()) if assoc.height else 0
    method = {
        "auc": "AUC of the feature's pooled value between the two classes (Mann-Whitney U, DeLong interval)",
        "spearman": "Spearman rho of the feature's pooled value with the column (Fisher-z interval)",
        "pearson": "Pearson r of the feature's pooled value with the column (Fisher-z interval)",
    }[statistic]
    lines = [
        f"# Features associated with `{esc(column)}` in {esc(dataset)}",
        "",
        f"- Documents with a value: {n_docs:,}",
        f"- Features tested: {assoc.height:,}",
        f"- Significant at FDR {alpha:g} (Benjamini-Hochberg): **{n_sig:,}**",
        f"- Method: {esc(method)}",
        "",
    ]
    if sig.height == 0:
        lines.append(f"No feature is significantly associated with `{esc(column)}`.")
        return "\n".join(lines) + "\n"
    binary = statistic == "auc"
    extra = "freq in positive | freq in negative" if binary else "docs active"
    lines += [
        f"| feature | label | {statistic} | 95% CI | {extra} | q-value |",
        "|---:|---|---:|---|---:|" + ("---:|" if binary else "") + "---:|",
    ]
    for r in sig.iter_rows(named=True):
        f = int(r["feature"])
        label = esc(str(lab[f]["label"])) if f in lab and lab[f].get("label") else "–"
        ci = "–" if r["ci_low"] is None else f"{r['ci_low']:.3f} – {r['ci_high']:.3f}"
        cells = f"{_pct(r['freq_pos'])} | {_pct(r['freq_neg'])}" if binary else f"{int(r['n_active']):,}"
        lines.append(f"| {f} | {label} | {r['effect']:.3f} | {ci} | {cells} | {_q(r['q_value'])} |")
    return "\n".join(lines) + "\n"
