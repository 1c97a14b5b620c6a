"""Tests of interp_assets.labels.labeling: evidence splits, excerpts, the offline labeler, prompts, published
labels, the cache and the orchestration (offline path; the LLM path is in test_llm.py)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import polars as pl
import pytest

from interp_assets.engine.reader_model import EMBEDDED_READER, load_tokenizer
from interp_assets.labels.evidence import (
    Excerpt,
    make_excerpt,
    mark_spans,
    merge_word_spans,
    split_evidence,
    split_excerpts,
    split_features,
    text_hash,
)
from interp_assets.labels.labeling import (
    FEATURE_LABELS_SCHEMA,
    OFFLINE_SOURCE,
    Label,
    LabelCache,
    LabelResponseError,
    build_label_prompt,
    is_stopword_label,
    label_features,
    load_published_labels,
    log_odds_z,
    offline_label,
    parse_label_response,
)

ROOT = Path(__file__).resolve().parents[2]
SST2 = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"


def load_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("label_scores", ROOT / "benchmarks" / "label_scores.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark()


def documents(texts: list[str], **meta: list) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "dataset": ["t"] * len(texts),
            "doc_id": pl.Series(range(len(texts)), dtype=pl.Int32),
            "doc_hash": [text_hash(t) for t in texts],
            "text": texts,
            "source_file": ["t.jsonl"] * len(texts),
            "source_row": pl.Series(range(1, len(texts) + 1), dtype=pl.Int64),
            **meta,
        }
    )


def activations(rows: list[tuple[int, int, int, float]], texts: list[str]) -> pl.DataFrame:
    """token_activations from (doc_id, char_start, char_end, activation) rows for feature 0."""
    return pl.DataFrame(
        {
            "dataset": ["t"] * len(rows),
            "doc_id": pl.Series([r[0] for r in rows], dtype=pl.Int32),
            "token_index": pl.Series(range(len(rows)), dtype=pl.Int32),
            "token": [texts[r[0]][r[1] : r[2]] for r in rows],
            "char_start": pl.Series([r[1] for r in rows], dtype=pl.Int32),
            "char_end": pl.Series([r[2] for r in rows], dtype=pl.Int32),
            "feature": pl.Series([0] * len(rows), dtype=pl.Int32),
            "activation": pl.Series([r[3] for r in rows], dtype=pl.Float32),
        }
    )


def graded_corpus(n: int = 600, n_pos: int = 300) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Docs 0..n_pos-1 fire on their first word with activation 1 + doc_id / n_pos; the rest never."""
    texts = [f"alpha{i} sentence number {i} of the corpus" for i in range(n)]
    rows = [(i, 0, len(f"alpha{i}"), 1.0 + i / n_pos) for i in range(n_pos)]
    return documents(texts), activations(rows, texts)


# ------------------------------------------------------------------------------------------ split


def test_split_is_deterministic_disjoint_and_sized() -> None:
    docs, acts = graded_corpus()
    a = split_evidence(acts, docs, 0, n_evidence=20, n_holdout=40, seed=0)
    b = split_evidence(acts, docs, 0, n_evidence=20, n_holdout=40, seed=0)
    assert a == b
    assert len(a.evidence_positive) == 20 and len(a.heldout_positive) == 40
    assert len(a.evidence_random_negative) == 20 and len(a.heldout_random_negative) == 40
    assert not a.evidence_hard_negative and not a.heldout_hard_negative  # no embeddings given
    assert not set(a.evidence_doc_ids) & set(a.heldout_doc_ids)
    assert not set(a.background) & (set(a.heldout_doc_ids) | set(a.evidence_doc_ids))
    assert all(d < 300 for d in a.evidence_positive + a.heldout_positive)
    assert all(d >= 300 for d in a.heldout_random_negative + a.evidence_random_negative + a.background)
    assert a.n_positive_docs == 300
    assert split_evidence(acts, docs, 0, seed=1).evidence_hash != a.evidence_hash


def test_evidence_is_top_of_its_pool_and_heldout_spans_quantiles() -> None:
    docs, acts = graded_corpus()
    split = split_evidence(acts, docs, 0, n_evidence=20, n_holdout=40, seed=3)
    # the pools themselves: same evidence ratio (1/3), large enough counts to take every document
    everything = split_evidence(acts, docs, 0, n_evidence=1000, n_holdout=2000, seed=3)
    evidence_pool = set(everything.evidence_positive)
    heldout_pool = set(everything.heldout_positive)
    assert evidence_pool | heldout_pool == set(range(300)) and not evidence_pool & heldout_pool
    assert 60 < len(evidence_pool) < 140  # ~1/3 of 300
    # evidence: the strongest documents of the evidence pool (activation grows with doc_id)
    assert list(split.evidence_positive) == sorted(evidence_pool, reverse=True)[:20]
    # held-out: every activation decile of the held-out pool is represented
    ranked = sorted(heldout_pool)
    deciles = {ranked.index(d) * 10 // len(ranked) for d in split.heldout_positive}
    assert deciles == set(range(10))
    assert set(split.heldout_positive) <= heldout_pool


def test_a_dense_feature_is_read_by_strength_and_a_sparse_one_by_firing() -> None:
    """Fires in 540 of 600 documents (90%): positives come from its strongest half, negatives from its
    weakest quarter, which holds the 60 documents without it and its weakest 90; strength is activation
    per character, so a long document does not outrank a short one by length alone. At 300 of 600 (50%)
    the feature is still where it fires against where it does not."""
    texts = [f"alpha{i:03d} sentence of the corpus" for i in range(600)]
    rows = [(i, 0, 8, 1.0 + i / 540) for i in range(540)]
    # doc 539 (the strongest per token) made 20 times longer: its max is the highest, its rate the lowest
    texts[539] = texts[539] + " and more words" * 60
    docs, dense = documents(texts), activations(rows, texts)
    split = split_evidence(dense, docs, 0, n_evidence=20, n_holdout=40, seed=0)
    positives = split.evidence_positive + split.heldout_positive
    negatives = split.evidence_random_negative + split.heldout_random_negative + split.background
    assert len(positives) == 60 and len(negatives) > 60
    assert all(240 <= d < 539 for d in positives)  # activation grows with doc_id: the top half
    assert all(d < 89 or d >= 539 for d in negatives)  # none, the weakest 89, and the long one
    assert 539 in negatives and {d for d in negatives if d < 89} and {d for d in negatives if d >= 540}
    assert split.n_positive_docs == 300
    docs, sparse = graded_corpus(600, 300)
    split = split_evidence(sparse, docs, 0, n_evidence=20, n_holdout=40, seed=0)
    assert split.n_positive_docs == 300
    assert all(d >= 300 for d in split.evidence_random_negative + split.heldout_random_negative)


def test_pool_membership_is_stable_when_the_dataset_grows() -> None:
    docs, acts = graded_corpus(600)
    big_docs, big_acts = graded_corpus(1200)
    small = split_evidence(acts, docs, 0, n_evidence=1000, n_holdout=2000)
    big = split_evidence(big_acts, big_docs, 0, n_evidence=1000, n_holdout=2000)
    assert set(small.evidence_positive) <= set(big.evidence_positive)
    assert set(small.heldout_positive) <= set(big.heldout_positive)


def test_hard_negatives_are_the_most_similar_non_activating_documents() -> None:
    docs, acts = graded_corpus(600, 300)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(600, 8))
    emb[:300, 0] += 5.0  # positives point along axis 0
    emb[300:, 0] = np.linspace(-3, 3, 300)  # negatives: similarity to the positives grows with doc_id
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    split = split_evidence(
        acts, docs, 0, n_evidence=20, n_holdout=40, embeddings=emb, hard_negative_fraction=0.5
    )
    assert len(split.evidence_hard_negative) == 10 and len(split.heldout_hard_negative) == 20
    assert len(split.evidence_random_negative) == 10 and len(split.heldout_random_negative) == 20
    assert np.mean(split.heldout_hard_negative) > 520 and np.mean(split.evidence_hard_negative) > 520
    assert not set(split.evidence_hard_negative) & set(split.heldout_hard_negative)
    pool = split_evidence(acts, docs, 0, n_evidence=1000, n_holdout=2000)
    assert set(split.evidence_hard_negative) <= set(pool.evidence_random_negative)
    assert set(split.heldout_hard_negative) <= set(pool.heldout_random_negative)


def test_heldout_random_negatives_match_the_positives_in_length() -> None:
    """Positives are long, most non-firing texts short: held-out negatives are drawn to the positives'
    lengths, so excerpt length alone cannot tell them apart (the length-only baseline stays near 0.5)."""
    from interp_assets.labels.scoring import length_baseline

    texts, rows = [], []
    for i in range(900):
        if i % 3 == 0:  # fires; long
            texts.append(f"sorry {i} " + "the delivery was late again " * (2 + i % 5))
            rows.append((i, 0, 5, 1.0 + i / 900))
        else:  # silent; mostly short, a few long
            texts.append(f"note {i} " + ("all fine here " * (8 if i % 10 == 1 else 1)))
    docs, acts = documents(texts), activations(rows, texts)
    split = split_evidence(acts, docs, 0, n_evidence=20, n_holdout=40)
    length = {d: len(t) for d, t in enumerate(texts)}
    pos = [length[d] for d in split.heldout_positive]
    neg = [length[d] for d in split.heldout_random_negative]
    assert len(neg) == 40 and abs(np.median(neg) - np.median(pos)) < 0.15 * np.median(pos)
    assert np.mean([length[d] for d in split.evidence_random_negative]) < 0.5 * np.mean(pos)  # unmatched
    ho_pos, ho_neg = split_excerpts(split, acts, docs, "heldout")
    assert abs(length_baseline(ho_pos + ho_neg) - 0.5) < 0.15


def test_split_errors_are_clear() -> None:
    docs, acts = graded_corpus(50, 20)
    with pytest.raises(ValueError, match="embeddings has 3 rows but documents has 50"):
        split_evidence(acts, docs, 0, embeddings=np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['text'\]"):
        split_evidence(acts, docs.drop("text"), 0)
    with pytest.raises(ValueError, match="token_activations frame is missing"):
        split_evidence(acts.drop("char_start"), docs, 0)


def test_split_features_matches_split_evidence_and_handles_silent_features() -> None:
    docs, acts = graded_corpus()
    splits = split_features(acts, docs, [0, 5])
    assert splits[0] == split_evidence(acts, docs, 0)
    assert splits[5].n_positive_docs == 0 and not splits[5].evidence_positive
    assert len(splits[5].heldout_random_negative) == 40


# --------------------------------------------------------------------------------------- excerpts


def test_merge_and_mark_spans() -> None:
    text = "I am so sorry for the delay"
    assert merge_word_spans(text, [(14, 17), (8, 13), (18, 21)]) == [(8, 21)]
    assert mark_spans(text, [(8, 13), (14, 17)]) == "I am so <<sorry for>> the delay"
    assert mark_spans(text, [(8, 10), (10, 13)]) == "I am so <<sorry>> for the delay"  # word pieces
    assert mark_spans(text, [(0, 1), (8, 13)]) == "<<I>> am so <<sorry>> for the delay"


def test_excerpt_is_trimmed_around_the_strongest_activation() -> None:
    text = ("word " * 100) + "sorry for that " + ("more " * 100)
    s = text.index("sorry")
    spans = [(2, 4, 0.5), (s, s + 5, 3.0), (s + 6, s + 9, 1.0)]
    ex = make_excerpt(7, text, spans, "positive", context_chars=30)
    assert ex.text.startswith("… ") and ex.text.endswith(" …")
    assert "<<sorry for>>" in ex.marked
    assert ex.marked.count("<<") == 1  # the weak span at the start is outside the window
    assert len(ex.text) < 100 and ex.activation == 3.0 and ex.is_positive
    inner = ex.text[2:-2]
    assert inner == inner.strip() and text.find(inner) >= 0  # snapped to word boundaries
    neg = make_excerpt(8, text, [], "random_negative", context_chars=30)
    assert neg.spans == () and neg.activation == 0.0 and len(neg.text) <= 2 * 30 + 20 + 4
    assert neg == make_excerpt(8, text, [], "random_negative", context_chars=30)


def test_windows_of_long_texts_have_one_size_wherever_the_activation_is() -> None:
    """An activation near either end of a long text shifts its window inward instead of shrinking it, so
    positive and negative excerpts of long texts are as long (length is no cue for the scorer)."""
    text = "sorry for the delay " + ("and then more words follow here " * 30) + "goodbye"
    size = 2 * 30 + 20
    first = make_excerpt(1, text, [(0, 5, 2.0)], "positive", context_chars=30)
    last = make_excerpt(2, text, [(len(text) - 7, len(text), 2.0)], "positive", context_chars=30)
    middle = make_excerpt(3, text, [(300, 303, 2.0)], "positive", context_chars=30)
    negative = make_excerpt(4, text, [], "random_negative", context_chars=30)
    assert first.marked.startswith("<<sorry>>") and last.marked.endswith("<<goodbye>>")
    lengths = [len(e.text.strip("… ")) for e in (first, last, middle, negative)]
    assert all(size - 12 <= n <= size for n in lengths), lengths


def test_a_document_no_longer_than_a_window_is_kept_whole_positive_or_negative() -> None:
    text = "The parcel arrived broken and I am so sorry for that, truly, it will not happen again." * 2
    s = text.index("sorry")
    size = 2 * 30 + 20
    short, long = text[:size], text + " " + text
    pos = make_excerpt(1, short, [(s, s + 5, 2.0)], "positive", context_chars=30)
    neg = make_excerpt(2, short, [], "random_negative", context_chars=30)
    assert pos.text == short and neg.text == short and pos.marked.count("<<sorry>>") == 1
    trimmed = make_excerpt(3, long, [(s, s + 5, 2.0)], "positive", context_chars=30)
    assert trimmed.text.endswith(" …") and len(trimmed.text) < len(long)


def test_split_excerpts_use_token_offsets() -> None:
    texts = ["we are sorry for this", "nothing here", "so sorry", "plain text again", "sorry!"] * 4
    rows = [(i, t.index("sorry"), t.index("sorry") + 5, 1.0 + i) for i, t in enumerate(texts) if "sorry" in t]
    docs, acts = documents(texts), activations(rows, texts)
    split = split_evidence(acts, docs, 0, n_evidence=4, n_holdout=4)
    pos, neg = split_excerpts(split, acts, docs, "evidence")
    assert [e.doc_id for e in pos] == list(split.evidence_positive)
    assert all("<<sorry>>" in e.marked for e in pos) and all("<<" not in e.marked for e in neg)
    ho_pos, ho_neg = split_excerpts(split, acts, docs, "heldout")
    assert {e.doc_id for e in ho_pos + ho_neg} == set(split.heldout_doc_ids)
    with pytest.raises(ValueError, match="part must be"):
        split_excerpts(split, acts, docs, "test")


# ----------------------------------------------------------------------------------- offline label


def test_log_odds_matches_hand_computation() -> None:
    y_fg, y_bg, alpha = np.array([10.0, 2.0]), np.array([1.0, 20.0]), np.array([1.0, 3.0])
    # word 0: delta = log(11 / (12 + 4 - 11)) - log(2 / (21 + 4 - 2)); var = 1/11 + 1/2
    d0 = np.log(11 / 5) - np.log(2 / 23)
    z0 = d0 / np.sqrt(1 / 11 + 1 / 2)
    d1 = np.log(5 / 11) - np.log(23 / 2)
    z1 = d1 / np.sqrt(1 / 5 + 1 / 23)
    np.testing.assert_allclose(log_odds_z(y_fg, y_bg, alpha), [z0, z1])


def test_offline_label_merges_word_pieces_and_is_contrastive() -> None:
    tok = load_tokenizer(EMBEDDED_READER)
    fillers = ["the plot moves along", "a quiet evening at home", "the cast is large", "music plays"]
    texts, rows = [], []
    for i in range(120):
        if i % 3 == 0:
            word = ["overwrought", "overwrought", "melodramatic"][i % 9 // 3]
            text = f"frankly the ending is {word} and {fillers[i % 4]}"
            enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
            start = text.index(word)
            pieces = [(s, e) for s, e in enc["offset_mapping"] if start <= s and e <= start + len(word)]
            # the feature fires on the word pieces after the first one only
            for s, e in pieces[1:] or pieces:
                rows.append((i, s, e, 2.0))
        else:
            text = f"the ending is fine and {fillers[i % 4]} frankly"
        texts.append(text)
    docs, acts = documents(texts, label=[int(i % 3 == 0) for i in range(120)]), activations(rows, texts)
    assert len(tok.tokenize("overwrought")) > 2
    split = split_evidence(acts, docs, 0, n_evidence=20, n_holdout=10)
    lab = offline_label(acts, docs, split)
    assert lab.source == OFFLINE_SOURCE
    assert lab.label.split(", ")[0] == "overwrought"  # pieces ##wr ##ough ##t merged into the word
    assert "melodramatic" in lab.label
    assert "ending" not in lab.label and "frankly" not in lab.label  # as common in non-activating docs
    assert lab.description.startswith('Fires on "overwrought"')
    assert "mostly in documents with label = 1" in lab.description
    assert offline_label(acts, docs, split) == lab  # deterministic


def test_offline_label_of_a_silent_feature() -> None:
    docs, acts = graded_corpus(50, 20)
    split = split_evidence(acts, docs, 9)
    assert offline_label(acts, docs, split).label == "(inactive)"


@pytest.mark.skipif(not SST2.is_file(), reason="needs ../shared/data/sst2/train.tsv")
def test_offline_labels_name_the_rule_based_features_on_sst2(bench: ModuleType) -> None:
    docs = bench.load_sst2(SST2, 2000)
    acts = bench.rule_based_activations(docs)
    labels = label_features(acts, docs, sorted(bench.WORD_FAMILIES), dataset="sst2", sae_id="rules")
    for row in labels.iter_rows(named=True):
        family = set(bench.WORD_FAMILIES[row["feature"]])
        fires = row["label"].split("; ")[0].split(", ")  # what it fires on, before any "topic: ..."
        words = [t for t in fires if not t.startswith('"')]
        assert words and set(words) <= family, (row["feature"], row["label"])
        assert all(set(t.strip('"').split()) & family for t in fires if t.startswith('"'))
        assert not is_stopword_label(row["label"])


# ---------------------------------------------------------------------------------- LLM prompt/parse


def test_build_label_prompt_shows_marks_and_contrast() -> None:
    pos = [Excerpt(1, "I am sorry for that", ((5, 10),), 2.0, "positive")]
    neg = [Excerpt(2, "I am happy about that", (), 0.0, "hard_negative")]
    messages = build_label_prompt(pos, neg)
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert "1. I am <<sorry>> for that" in user
    assert "does NOT fire" in user and "I am happy about that" in user
    assert '"label"' in messages[0]["content"] and '"description"' in messages[0]["content"]
    with pytest.raises(ValueError, match="at least one excerpt"):
        build_label_prompt([], neg)


@pytest.mark.parametrize(
    "answer",
    [
        '{"label": "apologies", "description": "Words of apology."}',
        'Sure! Here it is:\n```json\n{"label": "apologies", "description": "Words of apology."}\n```\nBye.',
        'The feature is about {"label": "apologies", "description": "Words of apology."} I think.',
        '[{"Label": "  apologies ", "Explanation": "Words of   apology."}]',
    ],
)
def test_parse_label_response_tolerates_fences_and_prose(answer: str) -> None:
    assert parse_label_response(answer) == ("apologies", "Words of apology.")


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ("I cannot determine what this feature does.", "no JSON object"),
        ('{"description": "no label here"}', "no non-empty 'label'"),
        ('{"label": ""}', "no non-empty 'label'"),
        ("[1, 2, 3]", "not an object"),
        ('{"label": "' + "x" * 200 + '"}', "not a short name"),
    ],
)
def test_parse_label_response_errors(answer: str, message: str) -> None:
    with pytest.raises(LabelResponseError, match=message):
        parse_label_response(answer)


# --------------------------------------------------------------------------------- published labels


def test_load_published_labels_formats(tmp_path: Path) -> None:
    neuronpedia = [
        {"modelId": "gpt2-small", "layer": "8-res-jb", "index": "12", "description": " apologies and regret"},
        {"modelId": "gpt2-small", "layer": "8-res-jb", "index": 7, "explanation": "numbers"},
        {"modelId": "gpt2-small", "layer": "8-res-jb", "index": "12", "description": "a second explanation"},
    ]
    (tmp_path / "np.json").write_text(json.dumps(neuronpedia))
    got = load_published_labels(tmp_path / "np.json")
    assert got.schema == pl.Schema(
        {"feature": pl.Int32, "label": pl.String, "description": pl.String, "source": pl.String}
    )
    assert got.rows() == [
        (12, "apologies and regret", "apologies and regret", "published:np.json"),
        (7, "numbers", "numbers", "published:np.json"),
    ]
    (tmp_path / "l.jsonl").write_text('{"feature": 3, "label": "cats", "description": "Cats."}\n\n')
    assert load_published_labels(tmp_path / "l.jsonl").rows() == [(3, "cats", "Cats.", "published:l.jsonl")]
    pl.DataFrame({"feature": [1, 2], "label": ["a", "b"]}).write_csv(tmp_path / "l.csv")
    assert load_published_labels(tmp_path / "l.csv")["label"].to_list() == ["a", "b"]
    pl.DataFrame({"feature": [5], "label": ["x"], "description": ["X."]}).write_parquet(
        tmp_path / "l.parquet"
    )
    assert load_published_labels(tmp_path / "l.parquet").rows() == [(5, "x", "X.", "published:l.parquet")]


def test_load_published_labels_errors_name_file_and_field(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text(json.dumps([{"index": 1, "description": "ok"}, {"description": "x"}]))
    with pytest.raises(ValueError, match=r"bad\.json: item 1 has no 'feature' or 'index' field"):
        load_published_labels(tmp_path / "bad.json")
    (tmp_path / "bad.jsonl").write_text('{"feature": 1, "label": "a"}\n{"feature": "one", "label": "b"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2 has feature index 'one', not an integer"):
        load_published_labels(tmp_path / "bad.jsonl")
    (tmp_path / "nolabel.jsonl").write_text('{"feature": 1}\n')
    with pytest.raises(ValueError, match=r"line 1 \(feature 1\) has no 'label'"):
        load_published_labels(tmp_path / "nolabel.jsonl")
    pl.DataFrame({"id": [1], "label": ["a"]}).write_csv(tmp_path / "cols.csv")
    with pytest.raises(ValueError, match=r"cols\.csv: needs columns 'feature' and 'label'"):
        load_published_labels(tmp_path / "cols.csv")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match="unsupported published-labels format"):
        load_published_labels(tmp_path / "x.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_published_labels(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------------- cache


@pytest.mark.parametrize("name", ["labels.parquet", "labels.json"])
def test_label_cache_round_trip_and_atomic_writes(tmp_path: Path, name: str) -> None:
    path = tmp_path / "cache" / name
    cache = LabelCache(path)
    assert len(cache) == 0 and cache.get("sae", 1, "h", "llm:m") is None
    lab = Label("apologies", "Words of apology.", "llm:m")
    cache.put("sae", 1, "h", "llm:m", lab)
    cache.put_many([("sae", 2, "h2", "llm:m", Label("b", "B.", "llm:m"))])
    # no temporary files left behind: the cache and its content record
    assert sorted(p.name for p in path.parent.iterdir()) == [name, f"{name}.sums.json"]
    again = LabelCache(path)
    assert again.get("sae", 1, "h", "llm:m") == lab and len(again) == 2
    assert again.get("sae", 1, "other-hash", "llm:m") is None
    assert again.get("sae", 1, "h", "llm:other") is None
    assert again.get("other-sae", 1, "h", "llm:m") is None


def test_label_cache_that_cannot_be_read_is_quarantined_and_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / "c.parquet"
    path.write_bytes(b"not parquet")
    warnings: list[str] = []
    cache = LabelCache(path, on_warning=warnings.append)
    assert len(cache) == 0 and not path.exists()
    (moved,) = (tmp_path / "quarantine").iterdir()
    assert moved.read_bytes() == b"not parquet"
    assert len(warnings) == 1 and str(path) in warnings[0] and str(moved) in warnings[0]


# ----------------------------------------------------------------------------------- orchestration


def test_label_features_offline_and_published(tmp_path: Path) -> None:
    texts = [f"we are sorry about item {i}" if i % 4 == 0 else f"item {i} shipped today" for i in range(80)]
    rows = [(i, t.index("sorry"), t.index("sorry") + 5, 1.0) for i, t in enumerate(texts) if "sorry" in t]
    docs, acts = documents(texts), activations(rows, texts)
    published = pl.DataFrame(
        {"feature": [3], "label": ["pub"], "description": ["Published."], "source": ["published:p.json"]},
        schema={"feature": pl.Int32, "label": pl.String, "description": pl.String, "source": pl.String},
    )
    out = label_features(
        acts,
        docs,
        [0, 3],
        dataset="t",
        sae_id="sae-1",
        published=published,
        selected_because={0: "frequent"},
        n_evidence=5,
        n_holdout=10,
    )
    assert out.schema == pl.Schema(FEATURE_LABELS_SCHEMA)
    first, second = out.to_dicts()
    assert first["label"] == "sorry" and first["source"] == OFFLINE_SOURCE
    assert first["selected_because"] == "frequent" and first["sae_id"] == "sae-1"
    split = split_evidence(acts, docs, 0, n_evidence=5, n_holdout=10)
    assert (
        first["evidence_doc_ids"] == split.evidence_doc_ids and first["evidence_hash"] == split.evidence_hash
    )
    assert second["label"] == "pub" and second["source"] == "published:p.json"
    assert second["selected_because"] == "requested"


def test_a_feature_on_function_words_is_labeled_as_such() -> None:
    texts, rows = [], []
    for i in range(120):
        content = ["refund", "screen", "ticket", "delivery"][i % 4]
        text = f"my {content} {i} is late and the {content} is broken"
        if i % 3 == 0:  # fires on "the" and "and" only, whatever the topic
            for word in ("and", "the"):
                start = text.index(f" {word} ") + 1
                rows.append((i, start, start + len(word), 2.0))
        else:
            text = f"my {content} {i} is late, {content} broken"
        texts.append(text)
    docs, acts = documents(texts), activations(rows, texts)
    split = split_evidence(acts, docs, 0, n_evidence=20, n_holdout=10)
    lab = offline_label(acts, docs, split)
    assert lab.label.startswith("syntax: function words ("), lab
    named = lab.label.removeprefix("syntax: function words (").split(")")[0].split(", ")
    assert set(named) <= {"the", "and"}
    assert "grammatical rather than topical" in lab.description
    assert not is_stopword_label(lab.label)


def test_a_function_word_in_a_fixed_phrase_is_labeled_by_the_phrase() -> None:
    """A feature on "for" right after "sorry" is the phrase "sorry for", not the stopword "for"."""
    texts, rows = [], []
    for i in range(150):
        item = ["refund", "screen", "ticket", "delivery", "parcel"][i % 5]
        if i % 3 == 0:
            text = f"we are sorry for the {item} and will call you"
            start = text.index(" for ") + 1
            rows.append((i, start, start + 3, 2.0))
        else:
            text = f"thanks for the {item} and we will call you"
        texts.append(text)
    docs, acts = documents(texts), activations(rows, texts)
    lab = offline_label(acts, docs, split_evidence(acts, docs, 0, n_evidence=20, n_holdout=10))
    assert lab.label.startswith('"') and "sorry for" in lab.label, lab
    assert not is_stopword_label(lab.label)


def test_documents_that_share_a_theme_get_a_topic() -> None:
    """Fires on "the" but only in football texts: the label names the theme, not the stopword."""
    sport = ["the striker scored for the club", "the club won the league match", "the goalkeeper saved it"]
    other = ["the recipe needs the flour", "the train left the station", "the bank raised the rate"]
    texts, rows = [], []
    for i in range(240):
        text = f"{sport[i % 3]} in season {i}" if i % 2 == 0 else f"{other[i % 3]} on day {i}"
        if i % 2 == 0:  # every "the" of a football text
            rows += [(i, m.start(), m.end(), 1.0 + i / 240) for m in re.finditer(r"\bthe\b", text)]
        texts.append(text)
    docs, acts = documents(texts), activations(rows, texts)
    lab = offline_label(acts, docs, split_evidence(acts, docs, 0, n_evidence=20, n_holdout=10))
    assert "topic: " in lab.label, lab
    topic = lab.label.split("topic: ")[1].split(", ")
    football = {"club", "striker", "scored", "league", "match", "won", "goalkeeper", "saved", "season"}
    assert set(topic) <= football
    assert "share a theme" in lab.description
    assert not is_stopword_label(lab.label)


def test_a_feature_on_the_first_word_is_a_position_feature() -> None:
    words = ["apples", "rivers", "engines", "letters", "gardens", "clouds", "markets", "songs"]
    texts = [f"{words[i % 8]} are described in note {i} of the list" for i in range(100)]
    rows = [(i, 0, len(words[i % 8]), 1.0 + i / 100) for i in range(0, 100, 2)]
    docs, acts = documents(texts), activations(rows, texts)
    lab = offline_label(acts, docs, split_evidence(acts, docs, 0, n_evidence=20, n_holdout=10))
    assert lab.label == "position: first token", lab
    assert "first word of the text" in lab.description


@pytest.mark.parametrize(
    ("label", "stopwords"),
    [
        ("i, the, and", True),
        ("-, to, after", True),
        ("of the, in", True),
        ("syntax: function words (the, of)", False),
        ("position: first token", False),
        ("sorry, apologize", False),
        ('"sorry for"; topic: refund', False),
        ("(no distinctive words)", False),
        ("", False),
    ],
)
def test_is_stopword_label(label: str, stopwords: bool) -> None:
    assert is_stopword_label(label) is stopwords


def test_offline_label_terms_tie_break_alphabetically():
    """Ties among the most frequent terms go in alphabetical order, not in the order a set yielded them
    (which changes with each process's string-hash salt, so two workers labeled one feature differently)."""
    from collections import Counter

    from interp_assets.labels.labeling import _most_common

    assert _most_common(Counter({"with": 1, "can": 1, "in": 1, "the": 2}), 3) == ["the", "can", "in"]
