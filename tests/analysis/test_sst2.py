"""Real SAE features on SST-2 (small, fast versions of benchmarks/sst2_sentiment.py and label_scores.py).

One module-scoped run encodes a few hundred positive and negative SST-2 train sentences and a held-out
dev sample with the embedded reader + SAE; the tests then check the claims of issues #4 and #5 on it:
- the positive-vs-negative diff (the diff_reports statistics) finds significant features both ways;
- the top features of each direction differ in the same direction on dev sentences that do not overlap
  the train sample;
- on real SAE features, a feature's own offline label scores above labels swapped in from other
  features (held-out embedding scores).
Nothing is hard-coded: every number is computed from the data here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import polars as pl
import pytest

ROOT = Path(__file__).resolve().parents[2]
SST2 = ROOT.parent / "shared" / "data" / "sst2"

pytestmark = pytest.mark.skipif(
    not (SST2 / "train.tsv").is_file() or not (SST2 / "dev.tsv").is_file(),
    reason="needs ../shared/data/sst2/train.tsv and dev.tsv",
)

TOP = 5
N_TRAIN, N_DEV = 300, 250


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def label_bench() -> ModuleType:
    return _load("label_scores")


@pytest.fixture(scope="module")
def sentiment(label_bench: ModuleType) -> ModuleType:
    return _load("sst2_sentiment")


@pytest.fixture(scope="module")
def small_run(sentiment: ModuleType) -> dict[str, Any]:
    return sentiment.run(
        n_per_side=N_TRAIN,
        n_dev_per_side=N_DEV,
        top_n=TOP,
        seed=0,
        train_path=SST2 / "train.tsv",
        dev_path=SST2 / "dev.tsv",
        n_evidence=10,
        n_holdout=20,
    )


def test_diff_finds_significant_features_in_both_directions(small_run: dict[str, Any]) -> None:
    n = small_run["n"]
    assert (n["train_positive"], n["train_negative"]) == (N_TRAIN, N_TRAIN)
    assert n["significant_positive"] >= TOP and n["significant_negative"] >= TOP, n
    table = small_run["table"]
    for more_in, sign in (("positive", 1), ("negative", -1)):
        side = table.filter(pl.col("more_in") == more_in)
        assert side.height == TOP
        assert (side["q_value"] < 0.05).all()
        assert (np.sign(side["train_freq_pos"] - side["train_freq_neg"]) == sign).all()
    # the diff's q-values are BH over the whole SAE: the significant count matches the table
    diff = small_run["diff"]
    assert diff.filter("significant").height == n["significant_positive"] + n["significant_negative"]


def test_top_features_replicate_direction_on_heldout_dev(
    small_run: dict[str, Any], sentiment: ModuleType
) -> None:
    n = small_run["n"]
    assert n["dev_positive"] == N_DEV and n["dev_negative"] == N_DEV
    # held out: no dev sentence overlaps a train-sample sentence
    train_texts = [t for s in ("positive", "negative") for t in small_run["train"][s]["docs"]["text"]]
    overlaps = sentiment.overlap_filter(train_texts)
    dev_texts = [t for s in ("positive", "negative") for t in small_run["dev"][s]["docs"]["text"]]
    assert not any(overlaps(t) for t in dev_texts)
    assert not set(dev_texts) & set(train_texts)

    table = small_run["table"]
    for more_in in ("positive", "negative"):
        side = table.filter(pl.col("more_in") == more_in)
        auc_toward = side["dev_auc_positive"] if more_in == "positive" else 1 - side["dev_auc_positive"]
        # at most one of the top features may fail to show its train direction on dev
        assert side["dev_same_direction"].sum() >= TOP - 1, side.select(
            "feature", "dev_freq_pos", "dev_freq_neg"
        )
        assert auc_toward.mean() > 0.55, auc_toward.to_list()
    # and as a whole clearly beyond chance: a coin would give all 10 directions right with p = 0.001
    assert table["dev_same_direction"].sum() >= 2 * TOP - 1
    assert table["dev_replicated"].sum() >= TOP


def test_top_features_fire_on_sentiment_words_more_than_controls(small_run: dict[str, Any]) -> None:
    """The judge (a generic sentiment word list, not used for selection): top features put more of their
    activation on sentiment words or negators than frequency-matched features that do not differ."""
    table, controls = small_run["table"], small_run["controls"]
    top_share = (table["sentiment_mass_share"] + table["negator_mass_share"]).mean()
    control_share = (controls["sentiment_mass_share"] + controls["negator_mass_share"]).mean()
    assert top_share > 1.5 * control_share and top_share > control_share + 0.05, (top_share, control_share)


def _combined_corpus(train: dict[str, dict[str, Any]]) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Positive + negative train samples as one dataset (doc_ids of the negative side shifted)."""
    offset = train["positive"]["docs"].height
    docs, acts, status = [], [], []
    for side, shift in (("positive", 0), ("negative", offset)):
        d = train[side]
        docs.append(d["docs"].with_columns(pl.lit("sst2").alias("dataset"), pl.col("doc_id") + shift))
        acts.append(d["acts"].with_columns(pl.lit("sst2").alias("dataset"), pl.col("doc_id") + shift))
        status.append(d["status"].with_columns(pl.col("doc_id") + shift))
    return pl.concat(docs), pl.concat(acts), pl.concat(status)


def test_real_labels_score_above_swapped_labels_on_real_sae_features(
    small_run: dict[str, Any], label_bench: ModuleType
) -> None:
    docs, acts, status = _combined_corpus(small_run["train"])
    pooled, n_docs = label_bench.pooled_from_activations(acts, status)
    features = label_bench.choose_features(pooled, n_docs, 16, "spread", min_docs=45)
    assert len(features) == 16
    result = label_bench.run_benchmark(
        acts, docs, features, n_evidence=10, n_holdout=40, swaps=3, swap_seed=0, n_boot=100
    )
    assert result.height == 16 and (result["n_swaps"] == 3).all()
    assert (result["label"] != result["swapped_label"]).any()
    summary = label_bench.summarize(result).row(0, named=True)
    assert summary["auc_real"] > summary["auc_swapped"] + 0.03, summary
    assert summary["real_auc_wins"] >= 0.6, summary
    assert summary["bacc_real"] > summary["bacc_swapped"], summary
