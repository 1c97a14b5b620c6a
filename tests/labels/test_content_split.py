"""Content groups (interp_assets.labels.content_split) and the content-disjoint evidence/held-out split,
on constructed cases and on real SST-2 rows read from /work/shared/data."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from interp_assets.labels.content_split import (
    MIN_WORDS,
    ContentIndex,
    boilerplate_limit,
    content_index,
    max_group_size,
    normalize_text,
)
from interp_assets.labels.evidence import split_features, text_hash

SST2_TRAIN = Path("/work/shared/data/sst2/train.tsv")


def same_group(index: ContentIndex, a: int, b: int) -> bool:
    return bool(index.group[a] == index.group[b])


def test_normalize_text() -> None:
    assert normalize_text("  The  ﬁlm\tIS\nGreat!! ") == "the film is great"
    assert normalize_text("«Straße»") == "strasse"  # casefold, quotes stripped at the edges
    assert normalize_text("ＡＢＣ １２３") == "abc 123"  # NFKC: full-width forms
    assert normalize_text("it's a so-so film.") == "it's a so-so film"  # inner punctuation kept
    assert normalize_text("...") == ""


def test_identical_normalized_texts_are_one_group() -> None:
    texts = ["A quiet, lovely film.", "a quiet , lovely film", "A QUIET, LOVELY FILM!", "a loud film", "ok"]
    index = content_index(texts)
    assert same_group(index, 0, 1) and same_group(index, 0, 2)
    assert not same_group(index, 0, 3)
    assert content_index(["ok", "OK.", "fine"]).group.tolist()[:2] == [0, 0]  # short texts too


def test_containment_of_four_words_or_more_groups_documents() -> None:
    texts = [
        "it 's a charming and often affecting journey .",
        "charming and often affecting",  # 4 words inside document 0
        "a charming and often affecting journey that never tires",  # shares 6 words with 0, no shingle
        "often affecting",  # 2 words: too short to count as contained
        "a dull and often affecting sermon",  # shares 3 words only
        "The plot is thin but the cast is charming and it moves along at a brisk and cheerful pace",
        "the cast is charming and it moves along at a brisk",  # 11 words: contained, shares shingles
    ]
    index = content_index(texts)
    assert same_group(index, 0, 1) and same_group(index, 1, 2)  # 2 holds 1 as well
    assert not same_group(index, 0, 3) and not same_group(index, 0, 4)
    assert same_group(index, 5, 6) and not same_group(index, 0, 5)


def test_shared_sentence_or_shingle_groups_documents_and_is_transitive() -> None:
    texts = [
        "Paris is the capital of France. It has many museums.",
        "Lyon is a large city. Paris is the capital of France.",  # shares a sentence with 0
        "We went to a city with many museums and old streets near the river bank last year.",
        "My aunt lives in a city with many museums and old streets near the sea.",  # shares a shingle
        "I saw a town with many museums and old streets.",  # 6 words in common with 2: not enough
        "Lyon is a large city. Trains leave hourly.",  # shares "lyon is a large city" with 1
    ]
    index = content_index(texts)
    assert same_group(index, 0, 1) and same_group(index, 1, 5) and same_group(index, 0, 5)
    assert same_group(index, 2, 3)
    assert not same_group(index, 2, 4) and not same_group(index, 0, 2)
    assert index.group_sizes().tolist() == [3, 3, 2, 2, 1, 3]


def test_boilerplate_does_not_group_but_is_seen_by_shares() -> None:
    stock = "This article is a stub and you can help by expanding it."
    n = 200
    texts = [f"Topic {i} is about subject number {i}." + (f" {stock}" if i < 30 else "") for i in range(n)]
    assert boilerplate_limit(n) == 20
    index = content_index(texts)
    assert index.n_boilerplate_keys > 0
    assert len(set(index.group[:30].tolist())) == 30  # 30 > 20 documents hold the stub: no merging
    shared = index.shares([0])
    assert shared[:30].all() and not shared[30:].any()
    below = content_index(texts[:15] + texts[30:])  # 15 documents hold it: they are one group
    assert len(set(below.group[:15].tolist())) == 1 and len(set(below.group.tolist())) == n - 30 + 1


def test_stock_sentences_that_chain_a_templated_corpus_become_boilerplate() -> None:
    stock = [f"Our agent number {k} has looked into your request today." for k in range(30)]
    texts = [f"{stock[i % 30]} {stock[(i % 30 + 1 + i // 30) % 30]}" for i in range(300)]  # each in 20 docs
    texts += ["The zebra painted a blue fence. Ticket one.", "The zebra painted a blue fence. Ticket two."]
    index = content_index(texts)
    assert np.bincount(index.group).max() <= max_group_size(len(texts)) == 50
    assert index.n_boilerplate_keys >= 30
    assert same_group(index, 300, 301)  # a sentence shared by two documents still groups them


def test_empty_and_punctuation_only_documents_stand_alone() -> None:
    index = content_index(["", "...", "a real sentence with words", ""])
    assert len(set(index.group.tolist())) == 4
    assert not index.shares([0]).any()
    assert content_index([]).n_docs == 0


# ----------------------------------------------------------------------------------- real SST-2 rows


@pytest.fixture(scope="module")
def sst2() -> list[str]:
    if not SST2_TRAIN.exists():
        pytest.skip(f"{SST2_TRAIN} is not available")
    frame = pl.read_csv(SST2_TRAIN, separator="\t", quote_char=None)
    return frame["sentence"].to_list()


def words_of(text: str) -> list[str]:
    return re.findall(r"\w+", normalize_text(text))


def sentences_of(text: str) -> set[tuple[str, ...]]:
    """Independent of the index: normalized sentences of at least MIN_WORDS words."""
    parts = re.split(r"[.!?]+(?:\s|$)", normalize_text(text))
    return {tuple(w) for p in parts if len(w := re.findall(r"\w+", p)) >= MIN_WORDS}


def shingles_of(text: str, n: int = 8) -> set[tuple[str, ...]]:
    w = words_of(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def contains(a: str, b: str) -> bool:
    """Normalized word sequence b (>= MIN_WORDS words) lies inside a."""
    wa, wb = words_of(a), words_of(b)
    return len(wb) >= MIN_WORDS and f" {' '.join(wb)} " in f" {' '.join(wa)} "


def test_every_sst2_containment_is_within_a_group(sst2: list[str]) -> None:
    texts = sst2[:1500]
    index = content_index(texts)
    padded = [f" {' '.join(words_of(t))} " for t in texts]
    pairs = 0
    for j, inner in enumerate(padded):
        if len(inner.split()) < MIN_WORDS:
            continue
        for i, outer in enumerate(padded):
            if i != j and inner in outer:
                pairs += 1
                assert same_group(index, i, j), (texts[i], texts[j])
    assert pairs > 50  # SST-2 train is full of phrases of one another


def test_content_index_of_all_sst2_train_is_fast(sst2: list[str]) -> None:
    start = time.perf_counter()
    index = content_index(sst2)
    elapsed = time.perf_counter() - start
    sizes = np.bincount(index.group)
    assert index.n_docs == len(sst2)
    assert sizes.max() < 0.05 * len(sst2), sizes.max()  # groups, not one giant component
    assert elapsed < 10, elapsed  # about 1-2 s on a free core


def word_activations(texts: list[str], rules: dict[int, str]) -> pl.DataFrame:
    """Feature f fires (activation 1 + position) on each match of its regex."""
    rows = []
    for doc_id, text in enumerate(texts):
        for feature, pattern in rules.items():
            for k, m in enumerate(re.finditer(pattern, text)):
                rows.append((doc_id, feature, 1.0 + (doc_id * 7 + k) % 5, m.start(), m.end()))
    return pl.DataFrame(
        rows,
        schema={
            "doc_id": pl.Int32,
            "feature": pl.Int32,
            "activation": pl.Float32,
            "char_start": pl.Int32,
            "char_end": pl.Int32,
        },
        orient="row",
    )


def test_no_heldout_document_shares_a_sentence_or_shingle_with_its_evidence(sst2: list[str]) -> None:
    """Issue 19's done-when, checked by plain set arithmetic independent of the index."""
    texts = sst2[:4000]
    docs = pl.DataFrame(
        {"doc_id": pl.Series(range(len(texts)), dtype=pl.Int32), "doc_hash": [text_hash(t) for t in texts]}
    ).with_columns(pl.Series("text", texts))
    rules = {0: r"\bfilm\b", 1: r"\bfunny\b", 2: r"\bnot\b", 3: r"\bbest\b", 4: r"\blove", 5: r"\bstory\b"}
    acts = word_activations(texts, rules)
    splits = split_features(acts, docs, list(rules), n_evidence=20, n_holdout=40)
    empty = content_index([""] * len(texts))
    doc_level = ContentIndex(  # every document its own group: the split before content groups
        group=np.arange(len(texts)), keys=empty.keys, boilerplate=empty.boilerplate
    )
    before = split_features(acts, docs, list(rules), n_evidence=20, n_holdout=40, content=doc_level)

    def overlaps(split) -> int:
        ev = [texts[d] for d in split.evidence_doc_ids]
        ev_keys = set().union(*(sentences_of(t) | shingles_of(t) for t in ev))
        bad = 0
        for d in split.heldout_doc_ids:
            t = texts[d]
            if (sentences_of(t) | shingles_of(t)) & ev_keys or any(
                contains(t, e) or contains(e, t) for e in ev
            ):
                bad += 1
        return bad

    for feature, split in splits.items():
        assert len(split.heldout_positive) >= 20 and len(split.heldout_doc_ids) >= 60, feature
        assert overlaps(split) == 0, feature
    assert sum(overlaps(s) for s in before.values()) > 10  # the document-level split did leak
    assert all(s.heldout_dropped == 0 for s in before.values())
    # groups that are too coarse (one per document) but the real keys: the drop still removes every overlap
    index = content_index(texts)
    guarded = split_features(
        acts, docs, list(rules), content=ContentIndex(np.arange(len(texts)), index.keys, index.boilerplate)
    )
    assert all(overlaps(s) == 0 for s in guarded.values())
    assert sum(s.heldout_dropped for s in guarded.values()) > 10


def test_positives_in_several_groups_reach_both_sides() -> None:
    """A feature firing in 3 groups of identical documents: without moving a group, a third of the
    features would have all their positives on one side."""
    texts = [f"Shared text of group {g} with some words." for g in range(3) for _ in range(4)]
    texts += [f"Unrelated filler document number {i} here." for i in range(120)]
    docs = pl.DataFrame({"doc_id": pl.Series(range(len(texts)), dtype=pl.Int32), "text": texts}).with_columns(
        pl.col("text").map_elements(text_hash, return_dtype=pl.String).alias("doc_hash")
    )
    rules = {f: r"\bShared\b" for f in range(30)}
    splits = split_features(word_activations(texts, rules), docs, list(rules), n_evidence=4, n_holdout=8)
    for split in splits.values():
        assert split.evidence_positive and split.heldout_positive
        groups = {texts[d] for d in split.evidence_positive} & {texts[d] for d in split.heldout_positive}
        assert not groups  # still whole groups on each side


def test_a_feature_split_again_on_the_same_inputs_is_served_from_memory() -> None:
    """Labeling then scoring split the same features: the second call reuses each split, and any change in
    what a split reads (the feature's activations, a setting, the content groups) splits it again."""
    texts = [
        f"Document {i} about {'rivers' if i % 3 == 0 else 'mountains'} and more words." for i in range(90)
    ]
    docs = pl.DataFrame({"doc_id": pl.Series(range(len(texts)), dtype=pl.Int32), "text": texts}).with_columns(
        pl.col("text").map_elements(text_hash, return_dtype=pl.String).alias("doc_hash")
    )
    rules = {0: r"\brivers\b", 1: r"\bmountains\b"}
    acts = word_activations(texts, rules)
    first = split_features(acts, docs, list(rules), n_evidence=4, n_holdout=8)
    again = split_features(acts.reverse(), docs, list(rules), n_evidence=4, n_holdout=8)  # row order: a set
    assert all(again[f] is first[f] for f in rules)
    changed = acts.with_columns(
        pl.when(pl.col("feature") == 1)
        .then(pl.col("activation") * 2)
        .otherwise("activation")
        .alias("activation")
    )
    moved = split_features(changed, docs, list(rules), n_evidence=4, n_holdout=8)
    assert moved[0] is first[0] and moved[1] is not first[1]
    assert split_features(acts, docs, [0], n_evidence=5, n_holdout=8)[0] is not first[0]
    paired_groups = ContentIndex(
        np.arange(len(texts)) // 2, content_index(texts).keys, content_index(texts).boilerplate
    )
    assert (
        split_features(acts, docs, [0], n_evidence=4, n_holdout=8, content=paired_groups)[0] is not first[0]
    )
