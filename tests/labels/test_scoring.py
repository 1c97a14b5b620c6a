"""Tests of interp_assets.labels.scoring and interp_assets.labels.embedding: metrics by hand, the offline
embedding scorer,
LLM prompt plumbing (the HTTP path is in test_llm.py), and the real-vs-swapped label benchmark on SST-2."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from interp_assets.engine.reader_model import shared_reader_model
from interp_assets.labels import embedding
from interp_assets.labels.embedding import sentence_embeddings
from interp_assets.labels.evidence import Excerpt, split_evidence, text_hash
from interp_assets.labels.labeling import LabelCache, LabelResponseError, label_features
from interp_assets.labels.scoring import (
    FEATURE_SCORES_SCHEMA,
    ScoreCache,
    auc_score,
    binary_metrics,
    embedding_score,
    f1_bootstrap_ci,
    fuzz_highlights,
    parse_binary_answers,
    score_features,
    score_prompts,
    youden_threshold,
)

ROOT = Path(__file__).resolve().parents[2]
SST2 = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("label_scores", ROOT / "benchmarks" / "label_scores.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------ metrics


def test_binary_metrics_by_hand() -> None:
    # tp=2 fp=2 fn=0 tn=1
    m = binary_metrics([1, 1, 0, 0, 0], [1, 1, 1, 1, 0])
    assert m["precision"] == pytest.approx(0.5)  # TP / (TP + FP), not 1 - FPR (= 1/3 here)
    assert m["recall"] == pytest.approx(1.0)
    assert m["f1"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((1.0 + 1 / 3) / 2)
    assert m["auc"] is None
    assert (m["n_examples"], m["n_positive"], m["n_negative"]) == (5, 2, 3)
    m = binary_metrics([1, 1, 1, 0, 0, 0, 0, 1], [1, 0, 1, 1, 0, 0, 0, 1])  # tp=3 fn=1 fp=1 tn=3
    assert (m["precision"], m["recall"], m["f1"], m["balanced_accuracy"]) == pytest.approx((0.75,) * 4)


def test_binary_metrics_undefined_ratios_are_none() -> None:
    m = binary_metrics([1, 0, 0], [0, 0, 0])
    assert m["precision"] is None and m["recall"] == 0.0 and m["f1"] == 0.0
    m = binary_metrics([0, 0], [0, 1], [0.2, 0.9])
    assert m["recall"] is None and m["f1"] == 0.0 and m["balanced_accuracy"] is None and m["auc"] is None
    with pytest.raises(ValueError, match="only 0 and 1"):
        binary_metrics([2, 0], [1, 0])
    with pytest.raises(ValueError, match="same length"):
        binary_metrics([1, 0], [1])


def test_auc_by_hand_with_ties() -> None:
    y, s = [1, 1, 0, 0, 0], [0.9, 0.8, 0.4, 0.8, 0.1]
    # positive 0.9 beats 3 negatives; 0.8 beats 2 and ties 1 -> (3 + 2.5) / 6
    assert auc_score(np.array(y), np.array(s)) == pytest.approx(5.5 / 6)
    assert binary_metrics(y, [1, 1, 0, 1, 0], s)["auc"] == pytest.approx(roc_auc_score(y, s))


def test_f1_bootstrap_matches_a_plain_loop() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 60)
    p = np.where(rng.random(60) < 0.8, y, 1 - y)
    low, high = f1_bootstrap_ci(y, p, n_boot=500, seed=11)
    draw = np.random.default_rng(11)
    f1s = []
    for _ in range(500):
        idx = draw.integers(0, 60, size=60)
        tp = int((y[idx] & p[idx]).sum())
        f1s.append(
            2 * tp / (2 * tp + int(((1 - y[idx]) & p[idx]).sum()) + int((y[idx] & (1 - p[idx])).sum()))
        )
    assert (low, high) == pytest.approx(tuple(np.percentile(f1s, [2.5, 97.5])))
    point = binary_metrics(y, p)["f1"]
    assert low < point < high
    assert f1_bootstrap_ci(y, p, n_boot=500, seed=11) == (low, high)
    assert f1_bootstrap_ci(y, p, n_boot=500, seed=12) != (low, high)


def test_youden_threshold() -> None:
    t = youden_threshold(np.array([1, 1, 0, 0]), np.array([0.9, 0.7, 0.3, 0.1]))
    assert 0.3 < t <= 0.7
    t = youden_threshold(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.6, 0.1]))
    assert (np.array([0.9, 0.8, 0.6, 0.1]) >= t).tolist() in (
        [True, True, True, False],
        [True, False, False, False],
    )


# ---------------------------------------------------------------------------------------- embedding


def test_sentence_embeddings_unit_norm_batch_invariant_and_cached() -> None:
    texts = [
        "I am so sorry for the delay.",
        "We apologize for the trouble.",
        "The weather is sunny today.",
        "",
    ]
    a = sentence_embeddings(texts, batch_size=1)
    b = sentence_embeddings(texts, batch_size=64)
    assert a.shape == (4, 384) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=2e-5)
    assert a[0] @ a[1] > a[0] @ a[2] + 0.2  # apologies are closer to each other than to the weather
    assert shared_reader_model(embedding.DEFAULT_EMBEDDING_MODEL) is shared_reader_model(
        embedding.DEFAULT_EMBEDDING_MODEL
    )
    assert sentence_embeddings([]).shape == (0, 384)


def _ex(doc_id: int, text: str, positive: bool) -> Excerpt:
    return Excerpt(
        doc_id,
        text,
        ((0, 1),) if positive else (),
        1.0 if positive else 0.0,
        "positive" if positive else "random_negative",
    )


def test_embedding_score_with_the_real_model() -> None:
    pos = ["I am so sorry about this.", "We apologize for the delay.", "Sorry, my mistake.", "My apologies."]
    neg = ["The train leaves at noon.", "Cats sleep a lot.", "The soup was hot.", "Prices rose in May."]
    heldout = [_ex(i, t, True) for i, t in enumerate(pos)] + [
        _ex(10 + i, t, False) for i, t in enumerate(neg)
    ]
    evidence = [
        _ex(20, "Sorry for the noise.", True),
        _ex(21, "I apologize.", True),
        _ex(22, "The bus is late.", False),
        _ex(23, "Rain again today.", False),
    ]
    good = embedding_score("apologies", "", heldout, evidence, n_boot=200)
    bad = embedding_score("cooking recipes", "", heldout, evidence, n_boot=200)
    assert good["auc"] == 1.0 and good["f1"] > 0.8
    assert bad["auc"] < good["auc"]
    assert good["n_positive"] == 4 and good["n_negative"] == 4


def test_embedding_threshold_is_fitted_on_evidence_not_heldout() -> None:
    # hand-made unit vectors: score = first coordinate
    score = {"q": 1.0, "e+": 0.9, "e-": 0.1, "h+": 0.4, "h-": 0.2}

    def embed(texts: list[str]) -> np.ndarray:
        return np.array([[score[t.split("#")[0]], np.sqrt(1 - score[t.split("#")[0]] ** 2)] for t in texts])

    evidence = [_ex(1, "e+#1", True), _ex(2, "e-#2", False)]
    heldout = [_ex(3, "h+#3", True), _ex(4, "h+#4", True), _ex(5, "h-#5", False), _ex(6, "h-#6", False)]
    m = embedding_score("q", "", heldout, evidence, embed=embed, n_boot=50)
    assert m["auc"] == 1.0  # the held-out ranking is perfect ...
    assert m["recall"] == 0.0  # ... but the evidence threshold is above the held-out positives' 0.4
    assert m["threshold"] == pytest.approx(0.5)  # midway between the evidence scores 0.1 and 0.9


# ------------------------------------------------------------------------------------ LLM plumbing


def test_score_prompts_cover_each_excerpt_once_and_mix_classes() -> None:
    ex = [_ex(i, f"text {i}", i < 7) for i in range(23)]
    prompts = score_prompts("detection", "apologies", "Words of apology.", ex, batch_size=10, seed=0)
    assert [len(idx) for _, idx in prompts] == [10, 10, 3]
    assert sorted(i for _, idx in prompts for i in idx) == list(range(23))
    assert prompts[0][1] != list(range(10))  # shuffled
    user = prompts[0][0][1]["content"]
    assert user.startswith("Explanation: apologies. Words of apology.") and "exactly 10 integers" in user
    assert "<<" not in user  # detection shows plain text
    fuzz = score_prompts("fuzz", "apologies", "", ex, batch_size=30, seed=0)
    assert fuzz[0][0][1]["content"].count("<<") == 23  # every excerpt has one highlight
    with pytest.raises(ValueError, match="method must be"):
        score_prompts("guess", "a", "", ex)


def test_fuzz_highlights_positives_on_active_tokens_negatives_on_random_words() -> None:
    pos = Excerpt(1, "we are so sorry", ((10, 15),), 2.0, "positive")
    neg = Excerpt(2, "the train leaves at noon today", (), 0.0, "random_negative")
    out = fuzz_highlights([pos, neg], seed=3)
    assert out[0] == pos
    assert len(out[1].spans) == 1 and out[1].text == neg.text
    s, e = out[1].spans[0]
    assert neg.text[s:e] in neg.text.split()
    assert fuzz_highlights([pos, neg], seed=3) == out


@pytest.mark.parametrize(
    ("text", "n", "expected"),
    [
        ("[1, 0, 1]", 3, [1, 0, 1]),
        ("```json\n[0, 1]\n```", 2, [0, 1]),
        ('{"answers": ["1", 0]}', 2, [1, 0]),
        ("Here: [true, false] done", 2, [1, 0]),
    ],
)
def test_parse_binary_answers(text: str, n: int, expected: list[int]) -> None:
    assert parse_binary_answers(text, n) == expected


def test_parse_binary_answers_errors() -> None:
    with pytest.raises(LabelResponseError, match="expected 3 answers, got 2"):
        parse_binary_answers("[1, 0]", 3)
    with pytest.raises(LabelResponseError, match="not 0 or 1"):
        parse_binary_answers("[1, 2]", 2)
    with pytest.raises(LabelResponseError, match="no JSON"):
        parse_binary_answers("yes", 1)


# ----------------------------------------------------------------------------------- orchestration


def _apology_corpus() -> tuple[pl.DataFrame, pl.DataFrame]:
    topics = ["the parcel", "my invoice", "the train", "this form", "the update", "our meeting"]
    texts = []
    for i in range(240):
        topic = topics[i % 6]
        texts.append(
            f"We are so sorry about {topic}, number {i}."
            if i % 3 == 0
            else f"Details on {topic}, number {i}."
        )
    docs = pl.DataFrame(
        {
            "doc_id": pl.Series(range(240), dtype=pl.Int32),
            "doc_hash": [text_hash(t) for t in texts],
            "text": texts,
        }
    )
    rows = [(i, t.index("sorry")) for i, t in enumerate(texts) if "sorry" in t]
    acts = pl.DataFrame(
        {
            "doc_id": pl.Series([r[0] for r in rows], dtype=pl.Int32),
            "token_index": pl.Series([4] * len(rows), dtype=pl.Int32),
            "token": ["sorry"] * len(rows),
            "char_start": pl.Series([r[1] for r in rows], dtype=pl.Int32),
            "char_end": pl.Series([r[1] + 5 for r in rows], dtype=pl.Int32),
            "feature": pl.Series([4] * len(rows), dtype=pl.Int32),
            "activation": pl.Series([1.0 + r[0] / 240 for r in rows], dtype=pl.Float32),
        }
    )
    return docs, acts


def test_score_features_offline_schema_and_guards() -> None:
    docs, acts = _apology_corpus()
    labels = label_features(acts, docs, [4, 99], dataset="d", sae_id="s", n_evidence=10, n_holdout=20)
    errors: list[str] = []
    scores = score_features(labels, acts, docs, n_evidence=10, n_holdout=20, n_boot=100, errors=errors)
    assert scores.schema == pl.Schema(FEATURE_SCORES_SCHEMA)
    row = scores.row(0, named=True)
    assert (
        scores.height == 1
        and row["feature"] == 4
        and row["method"] == "embedding"
        and row["label"] == "sorry"
    )
    assert (row["n_positive"], row["n_negative"]) == (20, 20) and row["auc"] > 0.9
    assert row["f1_ci_low"] <= row["f1"] <= row["f1_ci_high"]
    assert any("feature 99: not scored" in e for e in errors)
    with pytest.raises(ValueError, match="labeled from different evidence"):
        score_features(labels, acts, docs, n_evidence=10, n_holdout=20, seed=1)
    heldout_doc = split_evidence(acts, docs, 4, n_evidence=10, n_holdout=20).heldout_positive[0]
    leaky = labels.with_columns(
        pl.col("evidence_doc_ids").list.concat(pl.lit([heldout_doc], pl.List(pl.Int32)))
    )
    with pytest.raises(ValueError, match="grade the label on its own evidence"):
        score_features(leaky, acts, docs, n_evidence=10, n_holdout=20)
    with pytest.raises(ValueError, match="need an enabled LLM client"):
        score_features(labels, acts, docs, methods=["detection"], n_evidence=10, n_holdout=20)
    with pytest.raises(ValueError, match="unknown scoring method"):
        score_features(labels, acts, docs, methods=["vibes"])


@pytest.mark.skipif(not SST2.is_file(), reason="needs ../shared/data/sst2/train.tsv")
def test_real_labels_score_clearly_above_swapped_labels_on_sst2(bench: ModuleType) -> None:
    docs = bench.load_sst2(SST2, 2000)
    acts = bench.rule_based_activations(docs)
    result = bench.run_benchmark(acts, docs, sorted(bench.WORD_FAMILIES), n_boot=200)
    assert result.height == 10 and set(result["method"]) == {"embedding"}
    assert (result["auc"] > result["auc_swapped"]).all()
    assert result["auc"].mean() > 0.85 and result["auc_swapped"].mean() < 0.65
    assert result["f1"].mean() - result["f1_swapped"].mean() > 0.2
    summary = bench.summarize(result).row(0, named=True)
    assert summary["real_auc_wins"] == 1.0


def test_score_cache_serves_an_unchanged_score_and_recomputes_a_changed_one(tmp_path: Path) -> None:
    docs, acts = _apology_corpus()
    labels = label_features(acts, docs, [4], dataset="d", sae_id="s", n_evidence=10, n_holdout=20)
    cache = ScoreCache(tmp_path / "scores.parquet")
    embedded: list[int] = []

    def embed(texts: list[str]) -> np.ndarray:
        embedded.append(len(texts))
        return sentence_embeddings(texts)

    params = {"n_evidence": 10, "n_holdout": 20, "n_boot": 100, "embed": embed}
    counts: dict[str, int] = {}
    first = score_features(labels, acts, docs, cache=cache, counts=counts, **params)
    assert counts == {"from_cache": 0, "computed": 1} and len(embedded) == 1
    # a new process reads the same file: nothing embedded, nothing computed, the same table
    again = score_features(labels, acts, docs, cache=ScoreCache(cache.path), counts=counts, **params)
    assert counts == {"from_cache": 1, "computed": 0} and len(embedded) == 1
    assert again.equals(first)
    # another label for the same feature is a new computation
    relabeled = labels.with_columns(pl.lit("apology").alias("label"))
    other = score_features(relabeled, acts, docs, cache=cache, counts=counts, **params)
    assert counts == {"from_cache": 0, "computed": 1} and other["label"].to_list() == ["apology"]
    # other bootstrap settings too
    score_features(labels, acts, docs, cache=cache, counts=counts, **(params | {"n_boot": 50}))
    assert counts["computed"] == 1


def test_unreadable_score_cache_is_quarantined_and_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / "scores.parquet"
    path.write_bytes(b"not parquet")
    warnings: list[str] = []
    assert len(ScoreCache(path, on_warning=warnings.append)) == 0 and not path.exists()
    assert len(warnings) == 1 and "score cache" in warnings[0] and str(path) in warnings[0]
    assert [p.name.split(".parquet")[0] for p in (tmp_path / "quarantine").iterdir()] == ["scores"]


def _edit_first_background_document(docs: pl.DataFrame, acts: pl.DataFrame) -> pl.DataFrame:
    """The corpus with the first background document of feature 4's split rewritten (hash updated)."""
    target = split_evidence(acts, docs, 4, n_evidence=10, n_holdout=20).background[0]
    edited = docs.with_columns(
        pl.when(pl.col("doc_id") == target)
        .then(pl.lit("an entirely new text"))
        .otherwise("text")
        .alias("text")
    )
    return edited.with_columns(
        pl.col("text").map_elements(text_hash, return_dtype=pl.String).alias("doc_hash")
    )


def test_the_background_edit_leaves_the_evidence_unchanged() -> None:
    """Guards the next test: the edit must change the background only, or that test proves nothing."""
    docs, acts = _apology_corpus()
    split = split_evidence(acts, docs, 4, n_evidence=10, n_holdout=20)
    again = split_evidence(acts, _edit_first_background_document(docs, acts), 4, n_evidence=10, n_holdout=20)
    assert again.evidence_hash == split.evidence_hash and again.background_hash != split.background_hash


def test_offline_labels_come_from_the_cache_when_evidence_and_background_are_unchanged(
    tmp_path: Path,
) -> None:
    docs, acts = _apology_corpus()
    cache = LabelCache(tmp_path / "labels.parquet")
    counts: dict[str, int] = {}
    params = {"dataset": "d", "sae_id": "s", "n_evidence": 10, "n_holdout": 20, "cache": cache}
    first = label_features(acts, docs, [4], counts=counts, **params)
    assert counts["computed"] == 1 and counts["from_cache"] == 0
    again = label_features(acts, docs, [4], counts=counts, **params)
    assert counts["computed"] == 0 and counts["from_cache"] == 1 and again.equals(first)
    # a changed background document (not evidence, not held out) changes what the labeler reads
    label_features(acts, _edit_first_background_document(docs, acts), [4], counts=counts, **params)
    assert counts["computed"] == 1


def test_length_baseline_takes_its_direction_from_the_evidence() -> None:
    from interp_assets.labels.scoring import headline_score, length_baseline, with_length_baseline

    def ex(text: str, positive: bool) -> Excerpt:
        return Excerpt(0, text, (), 1.0 if positive else 0.0, "positive" if positive else "random_negative")

    longer = [ex("a long positive excerpt", True)] * 3 + [ex("short", False)] * 3
    shorter = [ex("pos", True)] * 3 + [ex("a much longer negative", False)] * 3
    assert length_baseline(longer) == 1.0 and length_baseline(longer, longer) == 1.0
    assert length_baseline(shorter) == 0.0  # without evidence: longer counts as positive
    assert length_baseline(shorter, shorter) == 1.0  # evidence says shorter: as telling, the other way
    assert length_baseline(longer, shorter) == 0.0  # a direction fitted on evidence can be wrong held out
    mixed = [ex("abc", True), ex("abcdef", True), ex("abc", False), ex("abcdef", False)]
    assert length_baseline(mixed, longer) == 0.5
    assert with_length_baseline({"auc": 0.9}, longer, longer)["beats_length_baseline"] is False
    assert with_length_baseline({"auc": 0.7}, mixed)["beats_length_baseline"] is True
    assert (
        with_length_baseline({"auc": None, "balanced_accuracy": 0.4}, mixed)["beats_length_baseline"] is False
    )
    assert headline_score({"method": "embedding", "auc": 0.7, "balanced_accuracy": 0.6}) == ("auc", 0.7)
    assert headline_score({"method": "detection", "auc": None, "balanced_accuracy": 0.6}) == (
        "balanced_accuracy",
        0.6,
    )
    assert headline_score({"auc": None, "balanced_accuracy": 0.55}) == ("balanced_accuracy", 0.55)


def test_the_report_reads_each_method_by_its_headline_metric() -> None:
    from interp_assets.analysis.reports import _score_text
    from interp_assets.labels.scoring import HEADLINE_METRIC, headline_score

    for method, metric in HEADLINE_METRIC.items():
        row = {
            "method": method,
            "auc": 0.71 if metric == "auc" else None,  # the LLM scorers give no continuous score
            "balanced_accuracy": 0.64,
            "f1": 0.33,
            "length_baseline_auc": 0.52,
            "beats_length_baseline": True,
        }
        name, value = headline_score(row)
        assert name == metric and value is not None
        text = _score_text(row)
        assert f"{value:.2f}" in text and "length alone: 0.52" in text and "0.33" not in text
