"""Tests of interp_assets.notebook over small Parquet tables written in the README schemas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from scipy import sparse

from interp_assets.notebook import FEATURE_LABELS_SCHEMA, Dataset

# token -> {feature: activation}; every other token activates nothing
TOKEN_FEATURES = {
    "cat": {2: 1.5, 5: 0.5},
    "dog": {2: 0.5},
    "sat": {3: 2.0},
    "ran": {3: 1.0, 5: 0.25},
    "mat": {2: 1.0},
    "<x>": {6: 3.0},
}
TEXTS = {  # doc_id -> text; written to Parquet in a shuffled order
    0: "the cat sat",
    1: "a dog ran far",
    2: "nothing here at all",
    3: "cat cat mat sat",
    4: "dog sat <x> ran",
}
SCORES = {0: 1.0, 1: 3.0, 2: None, 3: 2.0, 4: 5.0}
RESOLVED = {0: True, 1: False, 2: True, 3: True, 4: False}


def tokens(text: str) -> list[tuple[str, int, int]]:
    out, pos = [], 0
    for word in text.split(" "):
        out.append((word, pos, pos + len(word)))
        pos += len(word) + 1
    return out


def dense_reference(aggregation: str, d_sae: int) -> np.ndarray:
    """Hand computation with plain loops: (n_docs, d_sae) in doc_id order."""
    ref = np.zeros((len(TEXTS), d_sae))
    for d, text in TEXTS.items():
        toks = tokens(text)
        for f in range(d_sae):
            acts = [TOKEN_FEATURES.get(w, {}).get(f) for w, _, _ in toks]
            acts = [a for a in acts if a is not None]
            if not acts:
                continue
            ref[d, f] = {
                "max": max(acts),
                "sum": sum(acts),
                "mean": sum(acts) / len(toks),
                "count": len(acts),
                "binarize": 1.0,
            }[aggregation]
    return ref


def write_dataset(base: Path, name: str, d_sae_meta: int | None = None, with_tokens: bool = True) -> None:
    order = [3, 0, 4, 2, 1]
    docs = pl.DataFrame(
        {
            "dataset": [name] * 5,
            "doc_id": pl.Series(order, dtype=pl.Int32),
            "doc_hash": [f"h{d}" for d in order],
            "text": [TEXTS[d] for d in order],
            "source_file": ["drop.jsonl"] * 5,
            "source_row": pl.Series([d + 1 for d in order], dtype=pl.Int64),
            "score": [SCORES[d] for d in order],
            "resolved": [RESOLVED[d] for d in order],
            "ticket": [100 + d for d in order],
        }
    )
    rows = []
    for d in order:
        for i, (w, s, e) in enumerate(tokens(TEXTS[d])):
            for f, a in TOKEN_FEATURES.get(w, {}).items():
                rows.append((name, d, i, w, s, e, f, a))
    ta = pl.DataFrame(
        rows,
        schema={
            "dataset": pl.String,
            "doc_id": pl.Int32,
            "token_index": pl.Int32,
            "token": pl.String,
            "char_start": pl.Int32,
            "char_end": pl.Int32,
            "feature": pl.Int32,
            "activation": pl.Float32,
        },
        orient="row",
    )
    n_tok = pl.DataFrame(
        {"doc_id": pl.Series(order, dtype=pl.Int32), "doc_tokens": [len(tokens(TEXTS[d])) for d in order]}
    )
    pooled = (
        ta.group_by("dataset", "doc_id", "feature")
        .agg(
            max_activation=pl.col("activation").max(),
            sum_activation=pl.col("activation").sum(),
            active_tokens=pl.len().cast(pl.Int32),
        )
        .join(n_tok.with_columns(pl.col("doc_tokens").cast(pl.Int32)), on="doc_id")
        .sort("feature", "doc_id", descending=True)  # deliberately not doc-ordered
    )
    for table, frame in (("raw_documents", docs), ("pooled_embeddings", pooled), ("token_activations", ta)):
        if table == "token_activations" and not with_tokens:
            continue
        (base / table).mkdir(parents=True, exist_ok=True)
        path = base / table / f"{name}.parquet"
        arrow = frame.to_arrow()
        if table == "pooled_embeddings" and d_sae_meta is not None:
            arrow = arrow.replace_schema_metadata({b"d_sae": str(d_sae_meta).encode()})
        pq.write_table(arrow, path)


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    write_dataset(tmp_path / "parquet", "tickets")
    return tmp_path


@pytest.fixture()
def ds(data_dir: Path) -> Dataset:
    return Dataset.load("tickets", data_dir=str(data_dir))


# --------------------------------------------------------------------------- latents


@pytest.mark.parametrize("aggregation", ["max", "mean", "sum", "binarize", "count"])
def test_latents_every_aggregation_matches_hand_reference(ds: Dataset, aggregation: str) -> None:
    m = ds.latents(aggregation)
    assert isinstance(m, sparse.csr_matrix) and m.dtype == np.float32
    assert m.shape == (5, 7)  # no stored width: max feature (6) + 1
    ref = dense_reference(aggregation, 7)
    np.testing.assert_allclose(m.toarray(), ref, rtol=1e-6)
    dense = ds.latents(aggregation, compress=False)
    assert isinstance(dense, np.ndarray) and dense.shape == (5, 7)
    np.testing.assert_allclose(dense, ref, rtol=1e-6)


def test_latents_hand_values(ds: Dataset) -> None:
    # doc 3 "cat cat mat sat": feature 2 on cat (1.5), cat (1.5), mat (1.0): max 1.5, sum 4, count 3, mean 4/4
    for agg, value in (("max", 1.5), ("sum", 4.0), ("count", 3.0), ("mean", 1.0), ("binarize", 1.0)):
        assert ds.latents(agg)[3, 2] == pytest.approx(value)
    assert ds.latents("max")[2].nnz == 0  # "nothing here at all" has no active feature


def test_d_sae_stored_explicit_and_too_small(tmp_path: Path) -> None:
    write_dataset(tmp_path / "parquet", "w", d_sae_meta=32)
    assert Dataset.load("w", data_dir=str(tmp_path)).latents().shape == (5, 32)
    assert Dataset.load("w", data_dir=str(tmp_path), d_sae=10).latents().shape == (5, 10)
    with pytest.raises(ValueError, match="feature 6 but d_sae=4"):
        Dataset.load("w", data_dir=str(tmp_path), d_sae=4).latents()


# --------------------------------------------------------------------------- views


def test_documents_rows_and_indexing(ds: Dataset) -> None:
    assert len(ds) == 5
    assert ds.documents["doc_id"].to_list() == [0, 1, 2, 3, 4]  # doc_id order, not file order
    row = ds[1]
    assert row["text"] == "a dog ran far" and row["doc_id"] == 1 and row["score"] == 3.0
    assert ds[-1]["doc_id"] == 4
    with pytest.raises(IndexError):
        ds[5]
    assert ds.metadata.columns == ["doc_id", "score", "resolved", "ticket"]
    sub = ds[[4, 0, 3]]
    assert isinstance(sub, Dataset) and sub.doc_ids.tolist() == [4, 0, 3]
    assert ds[1:3].doc_ids.tolist() == [1, 2]
    assert ds[np.array([True, False, False, False, True])].doc_ids.tolist() == [0, 4]
    with pytest.raises(TypeError):
        ds["text"]


def test_subset_latents_follow_subset_order(ds: Dataset) -> None:
    full = dense_reference("max", 7)
    sub = ds[[4, 0, 3]]
    np.testing.assert_allclose(sub.latents().toarray(), full[[4, 0, 3]], rtol=1e-6)
    # a view of a view: positions are relative to the view
    subsub = sub[[2, 0]]
    assert subsub.doc_ids.tolist() == [3, 4]
    np.testing.assert_allclose(
        subsub.latents("sum", compress=False), dense_reference("sum", 7)[[3, 4]], rtol=1e-6
    )
    assert subsub.documents["text"].to_list() == [TEXTS[3], TEXTS[4]]


def test_filter_by_expression_and_mask(ds: Dataset) -> None:
    high = ds.filter(pl.col("score") > 1.5)  # doc 2 has a null score: dropped
    assert high.doc_ids.tolist() == [1, 3, 4]
    np.testing.assert_allclose(high.latents("count").toarray(), dense_reference("count", 7)[[1, 3, 4]])
    assert high.filter(np.array([False, True, True])).doc_ids.tolist() == [3, 4]
    with pytest.raises(ValueError, match="shape"):
        ds.filter(np.array([True, False]))
    with pytest.raises(TypeError, match="booleans"):
        ds.filter(pl.col("score") * 2)


def test_sort_by_features(ds: Dataset) -> None:
    # feature 2 max: doc0 1.5, doc1 0.5, doc3 1.5, doc4 0.5, doc2 0 -> ties keep doc order
    s = ds.sort_by_features(2)
    assert s.doc_ids.tolist() == [0, 3, 1, 4, 2]
    np.testing.assert_allclose(s.latents().toarray(), dense_reference("max", 7)[[0, 3, 1, 4, 2]], rtol=1e-6)
    assert s.documents["doc_id"].to_list() == [0, 3, 1, 4, 2]
    # sum over features 2 and 3 (sum aggregation): doc0 1.5+2, doc1 .5+1, doc3 4+2, doc4 .5+3, doc2 0
    assert ds.sort_by_features([2, 3], aggregation="sum").doc_ids.tolist() == [3, 0, 4, 1, 2]
    assert ds.sort_by_features([2, 3], aggregation="sum", descending=False).doc_ids.tolist() == [
        2,
        1,
        0,
        4,
        3,
    ]
    # sorting a view only reorders the view
    assert ds[[1, 2, 3]].sort_by_features(2).doc_ids.tolist() == [3, 1, 2]


def test_top_documents_for_feature(ds: Dataset) -> None:
    top = ds.top_documents_for_feature(2, k=3)
    assert top.columns == ["doc_id", "value", "text"]
    assert top["doc_id"].to_list() == [0, 3, 1]
    assert top["value"].to_list() == pytest.approx([1.5, 1.5, 0.5])
    assert top["text"][1] == TEXTS[3]
    by_sum = ds.top_documents_for_feature(2, k=1, aggregation="sum")
    assert by_sum.row(0) == (3, pytest.approx(4.0), TEXTS[3])
    assert ds[[1, 2, 4]].top_documents_for_feature(2)["doc_id"].to_list() == [1, 4]


# --------------------------------------------------------------------------- highlight, labels, errors


def test_highlight(ds: Dataset) -> None:
    assert ds.highlight(0, 2) == "the <<cat>> sat"
    # the two adjacent "cat" tokens and "mat" are separate tokens separated by spaces
    assert ds.highlight(3, 2) == "<<cat>> <<cat>> <<mat>> sat"
    assert ds.highlight(4, 6, "[", "]") == "dog sat [<x>] ran"
    assert ds.highlight(2, 2) == TEXTS[2]
    assert ds.highlight(doc_id=3, feature=2) == ds.highlight(3, 2)
    with pytest.raises(KeyError, match="doc_id 99"):
        ds.highlight(doc_id=99, feature=2)
    with pytest.raises(IndexError, match="row 99 is out of range"):
        ds.highlight(99, 2)


def test_highlight_is_by_row_of_the_view_and_batches(ds: Dataset) -> None:
    top = ds.sort_by_features(2, aggregation="sum")  # doc 3 (two cats and a mat) first
    assert top[0]["doc_id"] == 3 and top.highlight(0, 2) == "<<cat>> <<cat>> <<mat>> sat"
    assert top.highlight(-1, 2) == ds.highlight(doc_id=int(top.doc_ids[-1]), feature=2)
    assert ds.highlight_many([3, 0, 2], 2) == [ds.highlight(3, 2), ds.highlight(0, 2), TEXTS[2]]


@pytest.mark.parametrize("feature", [99999, -1, 7])
def test_a_feature_outside_the_sae_is_a_clear_error(ds: Dataset, feature: int) -> None:
    for call in (
        lambda: ds.highlight(0, feature),
        lambda: ds.top_documents_for_feature(feature),
        lambda: ds.sort_by_features([2, feature]),
    ):
        with pytest.raises(ValueError, match=f"feature {feature} is outside this SAE's features 0..6"):
            call()


def test_highlight_without_token_activations(tmp_path: Path) -> None:
    write_dataset(tmp_path / "parquet", "nt", with_tokens=False)
    d = Dataset.load("nt", data_dir=str(tmp_path))
    assert d.latents().shape == (5, 7)
    with pytest.raises(
        FileNotFoundError, match="materialize the asset `token_activations` for partition 'nt'"
    ):
        d.highlight(0, 2)


def test_load_errors_name_the_asset(tmp_path: Path) -> None:
    write_dataset(tmp_path / "parquet", "tickets")
    with pytest.raises(FileNotFoundError, match=r"`raw_documents` for partition 'other'.*\['tickets'\]"):
        Dataset.load("other", data_dir=str(tmp_path))
    (tmp_path / "parquet" / "pooled_embeddings" / "tickets.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="`pooled_embeddings` for partition 'tickets'"):
        Dataset.load("tickets", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="Unsafe partition key"):
        Dataset.load("../etc", data_dir=str(tmp_path))


def test_default_data_dir_from_environment(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERP_DATA_DIR", str(data_dir))
    assert len(Dataset.load("tickets")) == 5


def test_feature_labels(ds: Dataset, data_dir: Path) -> None:
    empty = ds.feature_labels()
    assert empty.height == 0 and empty.schema == pl.Schema(FEATURE_LABELS_SCHEMA)
    labels = pl.DataFrame(
        {
            "dataset": ["tickets"],
            "feature": pl.Series([2], dtype=pl.Int32),
            "label": ["animals"],
            "description": ["Mentions of animals."],
            "source": ["offline:log-odds"],
            "selected_because": ["frequent"],
            "evidence_doc_ids": pl.Series([[0, 3]], dtype=pl.List(pl.Int32)),
            "evidence_hash": ["e"],
            "sae_id": ["s"],
        }
    )
    (data_dir / "parquet" / "feature_labels").mkdir()
    labels.write_parquet(data_dir / "parquet" / "feature_labels" / "tickets.parquet")
    got = Dataset.load("tickets", data_dir=str(data_dir)).feature_labels()
    assert got["label"].to_list() == ["animals"]


# --------------------------------------------------------------------------- diff and associations


def test_diff_and_paired_diff(ds: Dataset, data_dir: Path) -> None:
    other = ds[[0, 2]]  # docs 0 ("the cat sat") and 2 (nothing)
    d = ds.diff(other)
    f2 = d.filter(pl.col("feature") == 2).row(0, named=True)
    assert (f2["docs_a"], f2["docs_b"], f2["freq_a"], f2["freq_b"]) == (4, 1, 0.8, 0.5)
    assert d["q_value"].is_sorted()
    # paired on the `ticket` key: the dataset against itself -> no discordant pair anywhere
    p = ds.diff(ds, key="ticket")
    assert p["n_pairs"].unique().to_list() == [5]
    assert (p["docs_a_only"] + p["docs_b_only"]).sum() == 0
    assert p["p_value"].to_list() == [1.0] * p.height


def test_associations(ds: Dataset) -> None:
    a = ds.associations("resolved", min_docs=1)
    assert a["n_docs"][0] == 5 and a["statistic"][0] == "auc" and a["dataset"][0] == ds.name
    # feature 3 (sat/ran) fires in docs 0, 1, 3, 4; resolved docs 0, 2, 3
    f3 = a.filter(pl.col("feature") == 3).row(0, named=True)
    assert f3["freq_pos"] == pytest.approx(2 / 3) and f3["freq_neg"] == pytest.approx(1.0)
    num = ds.associations("score", min_docs=1)
    assert num["n_docs"][0] == 4 and num["statistic"][0] == "spearman"  # the null score is dropped
    with pytest.raises(ValueError, match="'text'"):
        ds.associations("text")


def test_associations_over_a_multi_level_text_column_test_each_level() -> None:
    topics = ["refund", "shipping", "login"] * 10
    docs = pl.DataFrame(
        {
            "doc_id": pl.Series(range(30), dtype=pl.Int32),
            "text": [f"ticket {i}" for i in range(30)],
            "topic": topics,
        }
    )
    rows = [(d, 1, 2.0) for d in range(30) if topics[d] == "refund"]  # feature 1: refund tickets only
    rows += [(d, 2, 1.0) for d in range(30) if d % 2 == 0]  # feature 2: every other ticket
    pooled = pl.DataFrame(rows, schema=["doc_id", "feature", "max_activation"], orient="row").with_columns(
        pl.col("doc_id").cast(pl.Int32),
        pl.col("feature").cast(pl.Int32),
        pl.col("max_activation").cast(pl.Float32),
        pl.col("max_activation").alias("sum_activation"),
        pl.lit(1, dtype=pl.Int32).alias("active_tokens"),
        pl.lit(2, dtype=pl.Int32).alias("doc_tokens"),
    )
    ds = Dataset.from_frames("tickets3", docs, pooled, d_sae=4)
    table = ds.associations("topic")
    assert set(table["criterion"]) == {"topic=refund", "topic=shipping", "topic=login"}
    significant = table.filter(pl.col("significant")).select("criterion", "feature").rows()
    assert ("topic=refund", 1) in significant
    assert all(f != 2 for _, f in significant)  # feature 2 goes with no topic
    with pytest.raises(ValueError, match="min_docs"):
        ds.associations("topic", min_docs=3)


def test_from_frames_in_memory(ds: Dataset) -> None:
    mem = Dataset.from_frames("mem", ds.documents, ds._store.pooled.collect(), d_sae=9)
    assert mem.latents("binarize").shape == (5, 9)
    np.testing.assert_allclose(mem.latents("binarize").toarray()[:, :7], dense_reference("binarize", 7))
    mem2 = Dataset.from_frames("mem2", ds.documents.to_arrow(), ds._store.pooled.collect().to_arrow())
    assert mem2.latents().shape == (5, 7)


def test_tokens_lists_each_active_token_with_its_features(ds: Dataset) -> None:
    toks = ds.tokens(doc_id=3)  # "cat cat mat sat"
    assert toks["token"].to_list() == ["cat", "cat", "mat", "sat"]
    assert toks["features"].to_list()[0] == [2, 5]  # strongest first: cat -> {2: 1.5, 5: 0.5}
    assert toks["activations"].to_list()[0] == pytest.approx([1.5, 0.5])
    assert toks.select("char_start", "char_end").row(2) == (8, 11)
    top = ds.sort_by_features(2, aggregation="sum")
    assert top.tokens(0).equals(toks)  # by row of the view
    assert ds.tokens(doc_id=2).height == 0  # "nothing here at all": no active token
    with pytest.raises(KeyError):
        ds.tokens(doc_id=99)


def test_feature_stats_follow_the_hand_reference_and_the_view(ds: Dataset) -> None:
    stats = ds.feature_stats()
    assert stats.height == ds.d_sae  # every feature, never-active ones as zeros
    count = dense_reference("count", ds.d_sae)
    total = dense_reference("sum", ds.d_sae)
    # tokens of the documents with an active feature (what pooled_embeddings records)
    n_tokens = sum(len(tokens(TEXTS[d])) for d in TEXTS if count[d].sum() > 0)
    for f in range(ds.d_sae):
        row = stats.row(f, named=True)
        assert row["documents"] == int((count[:, f] > 0).sum())
        assert row["active_tokens"] == int(count[:, f].sum())
        assert row["token_frequency"] == pytest.approx(count[:, f].sum() / n_tokens)
        mass = total[:, f][total[:, f] > 0]
        expected = float(-(mass / mass.sum() * np.log(mass / mass.sum())).sum()) if mass.size else 0.0
        assert row["doc_entropy"] == pytest.approx(expected, abs=1e-6)
        assert row["token_entropy"] is not None
    # a view's statistics are over its own documents only
    sub = ds[[0, 1]]
    sub_count = count[np.sort(sub.doc_ids)]
    expected_docs = [int((sub_count[:, f] > 0).sum()) for f in range(ds.d_sae)]
    assert sub.feature_stats()["documents"].to_list() == expected_docs


def test_match_features_of_a_dataset_with_itself_is_the_identity(ds: Dataset) -> None:
    matches = ds.match_features(ds)
    alive = matches.filter(matches["match_correlation"].is_not_null())
    assert alive.height > 0
    assert alive["match_b"].to_list() == alive["feature_a"].to_list()
    assert alive["match_correlation"].to_numpy() == pytest.approx(1.0)
