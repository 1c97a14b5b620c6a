"""SST-2 positive vs negative reviews: are the top features of each direction about sentiment?

Real SAE features, the asset functions end to end:
1. a seeded sample of `--n-per-side` positive and negative SST-2 train sentences (>= 6 words) is encoded
   by the embedded reader + SAE (`resources.sae_reader.load_reader()`, `interp_assets.engine.activations.
   encode_texts` in chunks) and pooled per document (`interp_assets.engine.pooling.pool_token_activations`);
2. `interp_assets.analysis.diffing.diff_features` compares them (A = positive, B = negative; unpaired;
   Benjamini-Hochberg over all `d_sae` features) and `interp_assets.analysis.reports.top_features` takes
   the top
   `--top` significant features of each direction, as the diff_reports asset does;
3. each is labeled by the offline labeler (`interp_assets.labels.labeling.label_features`) on the documents of
   the side where it is more frequent (what feature_labels does for a "distinctive" feature).

Checks that do not depend on our labels:
- held-out replication: SST-2 dev.tsv sentences of each class are encoded the same way; per top feature
  its dev document frequency on each side, whether the difference has the train direction, a two-sided
  test (`diffing.two_by_two_pvalue`) and the AUC of its max activation for "positive review" (0.5 =
  none; > 0.5 = more in positive reviews). dev.tsv is a phrase-level split of the same reviews as
  train.tsv (most of its phrases are substrings of train phrases), so dev sentences that overlap the
  train sample (substring either way, or a shared 6-word window) are dropped first;
- the words each feature fires on (word pieces merged into words; ranked by activation mass over the
  train sample) are printed;
- a JUDGE, not used for any selection: the share of each feature's activation mass on words of a small
  generic sentiment word list written for this benchmark (`POSITIVE_WORDS`, `NEGATIVE_WORDS`; negators
  such as "not" are counted separately), and whether their polarity matches the feature's direction,
  against frequency-matched control features that do not differ between the classes.

    python benchmarks/sst2_sentiment.py          # -> benchmarks/results/sst2_sentiment.json
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import polars as pl

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks._common import write_results  # noqa: E402
from interp_assets.analysis.diffing import REPORT_FIRING, diff_features, two_by_two_pvalue  # noqa: E402
from interp_assets.analysis.reports import top_features  # noqa: E402
from interp_assets.labels.labeling import label_features  # noqa: E402
from interp_assets.labels.scoring import auc_score  # noqa: E402


def _label_scores_module() -> ModuleType:
    """benchmarks/label_scores.py (the shared SST-2 loader and encoding helpers), loaded by path so that
    the benchmarks folder never goes on sys.path."""
    if "label_scores" not in sys.modules:
        spec = importlib.util.spec_from_file_location("label_scores", HERE / "label_scores.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["label_scores"] = module
        spec.loader.exec_module(module)
    return sys.modules["label_scores"]


_ls = _label_scores_module()
load_default_reader = _ls.load_default_reader
load_sst2 = _ls.load_sst2
pooled_from_activations = _ls.pooled_from_activations
sae_token_activations = _ls.sae_token_activations

SST2_DIR = HERE.parents[1] / "shared" / "data" / "sst2"
SST2_TRAIN = SST2_DIR / "train.tsv"
SST2_DEV = SST2_DIR / "dev.tsv"
RESULTS = HERE / "results" / "sst2_sentiment.json"

# ---------------------------------------------------------------------------------------------------
# The judge: a small generic English sentiment word list, written for this benchmark (common evaluative
# words, not derived from SST-2 or from any feature). Used only to measure, never to select.

POSITIVE_WORDS = frozenset(
    """
    good great best better excellent fine nice wonderful amazing awesome brilliant superb outstanding
    fantastic terrific marvelous magnificent splendid perfect perfectly beautiful beautifully lovely
    gorgeous stunning delightful delight delightfully charming charm enjoy enjoyed enjoyable enjoying
    fun funny hilarious entertaining engaging engrossing compelling captivating fascinating intriguing
    interesting impressive remarkable memorable masterpiece masterful classic love loved lovable likable
    like liked likes appealing pleasant pleasure pleasing satisfying rewarding refreshing fresh original
    clever smart witty intelligent thoughtful insightful moving touching heartfelt warm tender sweet
    powerful strong solid rich vivid inspired inspiring uplifting joy joyous happy glad exciting thrilling
    gripping riveting effective successful success triumph winning wins well worth worthy recommend
    admire admirable respect honest sincere genuine authentic graceful elegant superior favorite
    best-known treat gem wonder wonderfully sharp smooth lively vibrant spirited energetic enthusiastic
    affecting poignant profound sensitive subtle nuanced accomplished skillful skilled talented gifted
    fine-tuned polished crisp tight assured confident ambitious bold daring inventive imaginative
    creative unique distinctive special extraordinary exceptional incredible astonishing breathtaking
    dazzling spectacular glorious rare pure beauty amusing cool wise mature deft sublime
    """.split()
)
NEGATIVE_WORDS = frozenset(
    """
    bad worse worst awful terrible horrible dreadful poor poorly weak lame dull boring bored bores tedious
    tiresome tired monotonous repetitive predictable formulaic cliched clichéd cliche stale flat bland
    mediocre forgettable pointless meaningless senseless silly stupid dumb idiotic inane ridiculous
    absurd laughable pathetic pitiful painful pain mess messy sloppy clumsy awkward incoherent confusing
    confused muddled shallow hollow empty thin superficial pretentious overwrought overlong long-winded
    slow sluggish plodding lifeless listless uninspired unfunny uninteresting unwatchable unbearable
    annoying irritating grating obnoxious offensive ugly disgusting nasty hate hated hateful dislike
    disappoint disappointing disappointed disappointment fail fails failed failure flop waste wasted
    wasting worthless useless unpleasant miserable depressing sad wrong problem problems flawed flaw
    flaws mistake cheap cheesy trite banal derivative contrived forced labored strained heavy-handed
    manipulative sentimental mawkish saccharine sappy gimmicky generic bore drag drags dragged sour
    bitter cold cruel harsh crude crass vulgar tasteless lazy careless incompetent inept amateurish
    unconvincing implausible unbelievable stilted wooden dead deadly dud junk garbage trash rubbish
    nonsense disaster disastrous abysmal atrocious horrid lousy crap crappy sucks suck mindless
    numbing tedium exhausting exhausted sorry regret unfortunately unfortunate neither worst-case
    """.split()
)
NEGATORS = frozenset(
    "not n't no never nothing none nobody nowhere neither nor without hardly barely cannot".split()
)
WORD_RE = re.compile(r"[\w'-]+")


def lexicon_class(word: str) -> str | None:
    """'positive', 'negative', 'negator' or None for a lowercased word."""
    w = word.lower()
    if w in NEGATORS:
        return "negator"
    if w in POSITIVE_WORDS:
        return "positive"
    if w in NEGATIVE_WORDS:
        return "negative"
    return None


# ---------------------------------------------------------------------------------------------------
# Data


def _ngrams(text: str, n: int) -> set[str]:
    words = text.lower().split()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def overlap_filter(train_texts: Sequence[str], n: int = 6):
    """`exclude(text)`: True when `text` overlaps the train sample: it is a substring of a train text or
    shares an `n`-word window with one (which covers a train text of >= n words inside it)."""
    grams: set[str] = set()
    for t in train_texts:
        grams |= _ngrams(t, n)
    joined = "\n".join(t.lower() for t in train_texts)

    def exclude(text: str) -> bool:
        # a train text of >= n words inside `text` shares its first n words with it
        return bool(_ngrams(text, n) & grams) or text.lower() in joined

    return exclude


def load_sides(
    path: Path, n_per_side: int | None, seed: int, *, exclude=None, prefix: str = "sst2"
) -> dict[str, pl.DataFrame]:
    """raw_documents frames of positive (label 1) and negative (label 0) sentences."""
    return {
        side: load_sst2(path, n_per_side, dataset=f"{prefix}_{side}", label=label, seed=seed, exclude=exclude)
        for side, label in (("positive", 1), ("negative", 0))
    }


def encode_sides(docs: dict[str, pl.DataFrame], reader: Any) -> dict[str, dict[str, Any]]:
    """Per side: token_activations, status, pooled_embeddings and the number of encoded documents."""
    out = {}
    for side, frame in docs.items():
        acts, status = sae_token_activations(frame, reader)
        pooled, n = pooled_from_activations(acts, status)
        out[side] = {"docs": frame, "acts": acts, "status": status, "pooled": pooled, "n": n}
    return out


# ---------------------------------------------------------------------------------------------------
# Measures


def dev_replication(
    features: Sequence[int],
    direction: dict[int, str],
    dev: dict[str, dict[str, Any]],
    thresholds: dict[int, float] | None = None,
) -> pl.DataFrame:
    """Per feature on the dev sides: document frequencies, same direction as train, two-sided p-value,
    AUC of max activation for 'positive review' (documents where it does not fire count as 0). A document
    fires when its max activation is at least the feature's train threshold (`thresholds`, from an
    adaptive diff), else when it is above 0."""
    n_pos, n_neg = dev["positive"]["n"], dev["negative"]["n"]
    rows = []
    for f in features:
        vals = {}
        for side in ("positive", "negative"):
            pooled = dev[side]["pooled"].filter(pl.col("feature") == f)
            v = np.zeros(dev[side]["n"])
            ids = dev[side]["status"].filter(pl.col("status") == "encoded")["doc_id"].to_numpy()
            pos = np.searchsorted(ids, pooled["doc_id"].to_numpy())
            v[pos] = pooled["max_activation"].to_numpy()
            vals[side] = v
        cut = (thresholds or {}).get(f)
        fires = {k: (v >= cut) & (v > 0) if cut is not None else v > 0 for k, v in vals.items()}
        docs_pos, docs_neg = int(fires["positive"].sum()), int(fires["negative"].sum())
        p, test = two_by_two_pvalue(np.array([docs_pos]), n_pos, np.array([docs_neg]), n_neg)
        y = np.r_[np.ones(n_pos, dtype=int), np.zeros(n_neg, dtype=int)]
        auc = auc_score(y, np.r_[vals["positive"], vals["negative"]])
        freq_pos, freq_neg = docs_pos / n_pos, docs_neg / n_neg
        want = 1 if direction[f] == "a" else -1
        rows.append(
            {
                "feature": f,
                "dev_freq_pos": freq_pos,
                "dev_freq_neg": freq_neg,
                "dev_p_value": float(p[0]),
                "dev_auc_positive": auc,
                "dev_same_direction": bool(np.sign(freq_pos - freq_neg) == want),
                "dev_replicated": bool(np.sign(freq_pos - freq_neg) == want and p[0] < 0.05),
            }
        )
    return pl.DataFrame(rows)


def _word_at(text: str, start: int, end: int) -> tuple[int, int]:
    """Widen [start, end) to the whole word around it (letters, digits, apostrophes, hyphens)."""
    while start > 0 and (text[start - 1].isalnum() or text[start - 1] in "'-"):
        start -= 1
    while end < len(text) and (text[end].isalnum() or text[end] in "'-"):
        end += 1
    return start, end


def feature_words(sides: dict[str, dict[str, Any]], features: Sequence[int]) -> pl.DataFrame:
    """Words each feature fires on over both sides: feature, word, occurrences, activation mass (sum of
    the max activation per word occurrence), mean activation, occurrences on each side."""
    rows: dict[str, list] = {k: [] for k in ("feature", "side", "doc_id", "start", "word", "activation")}
    wanted = pl.Series(list(features), dtype=pl.Int32).implode()
    for side, d in sides.items():
        texts = dict(zip(d["docs"]["doc_id"].to_list(), d["docs"]["text"].to_list(), strict=True))
        acts = d["acts"].filter(pl.col("feature").is_in(wanted))
        for f, doc, s, e, a in acts.select(
            "feature", "doc_id", "char_start", "char_end", "activation"
        ).iter_rows():
            text = texts[doc]
            ws, we = _word_at(text, s, e)
            word = text[ws:we].lower() if we > ws else text[s:e].lower()
            if not word.strip():
                continue
            rows["feature"].append(f)
            rows["side"].append(side)
            rows["doc_id"].append(doc)
            rows["start"].append(ws)
            rows["word"].append(word)
            rows["activation"].append(a)
    occ = (
        pl.DataFrame(rows, schema_overrides={"activation": pl.Float64})
        .group_by("feature", "side", "doc_id", "start", "word")
        .agg(pl.col("activation").max())
    )
    return (
        occ.group_by("feature", "word")
        .agg(
            pl.len().alias("occurrences"),
            pl.col("activation").sum().alias("mass"),
            pl.col("activation").mean().alias("mean_activation"),
            (pl.col("side") == "positive").sum().alias("in_positive"),
            (pl.col("side") == "negative").sum().alias("in_negative"),
        )
        .sort(["feature", "mass"], descending=[False, True])
    )


def judge(words: pl.DataFrame, direction: dict[int, str], top_k: int = 10) -> pl.DataFrame:
    """The sentiment-word-list judge per feature: share of activation mass on sentiment words, on negators,
    share of the top-k words that are sentiment words, and the share of sentiment mass whose polarity
    matches the feature's direction (positive words for features more frequent in positive reviews)."""
    w = words.with_columns(pl.col("word").map_elements(lexicon_class, return_dtype=pl.String).alias("lex"))
    rows = []
    for f in direction:
        fw = w.filter(pl.col("feature") == f)
        total = float(fw["mass"].sum()) or 1.0
        mass = {
            c: float(fw.filter(pl.col("lex") == c)["mass"].sum()) for c in ("positive", "negative", "negator")
        }
        senti = mass["positive"] + mass["negative"]
        top = fw.head(top_k)
        want = "positive" if direction[f] == "a" else "negative"
        rows.append(
            {
                "feature": f,
                "top_words": top["word"].to_list(),
                "sentiment_mass_share": senti / total,
                "negator_mass_share": mass["negator"] / total,
                "sentiment_top_words_share": float(
                    top["lex"].is_in(["positive", "negative"]).fill_null(False).mean()
                )
                if top.height
                else 0.0,
                "polarity_match": mass[want] / senti if senti > 0 else None,
            }
        )
    return pl.DataFrame(rows)


def label_sentiment_share(label: str) -> float:
    """Share of a label's terms (comma-separated words or bigrams) holding a sentiment word."""
    terms = [t.strip() for t in label.removeprefix("near ").split(",") if t.strip()]
    if not terms:
        return 0.0
    hit = [any(lexicon_class(w) in ("positive", "negative") for w in WORD_RE.findall(t)) for t in terms]
    return float(np.mean(hit))


def matched_controls(diff: pl.DataFrame, features: Sequence[int], exclude: set[int]) -> dict[int, int]:
    """For each feature, the feature with the closest total document count among those whose q-value is
    >= 0.5 (no difference between the classes): a frequency-matched control."""
    pool = diff.filter((pl.col("q_value") >= 0.5) & ~pl.col("feature").is_in(list(exclude)))
    counts = pool.select("feature", (pl.col("docs_a") + pl.col("docs_b")).alias("docs"))
    used: set[int] = set()
    out = {}
    by_f = dict(zip(diff["feature"].to_list(), (diff["docs_a"] + diff["docs_b"]).to_list(), strict=True))
    for f in features:
        cand = counts.filter(~pl.col("feature").is_in(list(used))).with_columns(
            (pl.col("docs") - by_f[f]).abs().alias("gap")
        )
        if cand.height == 0:
            continue
        c = int(cand.sort(["gap", "feature"])["feature"][0])
        used.add(c)
        out[f] = c
    return out


# ---------------------------------------------------------------------------------------------------
# The run


def run(
    *,
    n_per_side: int = 3000,
    n_dev_per_side: int | None = 1500,
    top_n: int = 10,
    seed: int = 0,
    reader: Any | None = None,
    train_path: Path = SST2_TRAIN,
    dev_path: Path = SST2_DEV,
    n_evidence: int = 20,
    n_holdout: int = 40,
    alpha: float = 0.05,
    firing: str = REPORT_FIRING,
) -> dict[str, Any]:
    """Everything the benchmark measures, as frames and numbers (the test calls this on a small sample)."""
    times: dict[str, float] = {}
    t = time.perf_counter()
    reader = reader or load_default_reader()
    times["load_reader"] = time.perf_counter() - t

    t = time.perf_counter()
    train_docs = load_sides(train_path, n_per_side, seed)
    exclude = overlap_filter([x for d in train_docs.values() for x in d["text"].to_list()])
    dev_docs = load_sides(dev_path, n_dev_per_side, seed, exclude=exclude, prefix="sst2_dev")
    all_dev = sum(
        load_sst2(dev_path, None, label=label).height for label in (0, 1)
    )  # eligible before the overlap filter
    times["load_data"] = time.perf_counter() - t

    t = time.perf_counter()
    train = encode_sides(train_docs, reader)
    times["encode_train"] = time.perf_counter() - t
    t = time.perf_counter()
    dev = encode_sides(dev_docs, reader)
    times["encode_dev"] = time.perf_counter() - t

    t = time.perf_counter()
    pos, neg = train["positive"], train["negative"]
    diff = diff_features(
        pos["pooled"], pos["n"], neg["pooled"], neg["n"], alpha=alpha, n_features=reader.d_sae, firing=firing
    )
    tops = top_features(diff, top_n)
    times["diff"] = time.perf_counter() - t

    t = time.perf_counter()
    labels = []
    for d, side in (("a", "positive"), ("b", "negative")):
        feats = tops[d]["feature"].to_list()
        if not feats:
            continue
        other = "sst2_negative" if side == "positive" else "sst2_positive"
        labels.append(
            label_features(
                train[side]["acts"].filter(pl.col("feature").is_in(feats)),
                train[side]["docs"],
                feats,
                dataset=f"sst2_{side}",
                sae_id=reader.fingerprint,
                selected_because={f: f"distinctive:{other}" for f in feats},
                n_evidence=n_evidence,
                n_holdout=n_holdout,
                seed=seed,
            ).select("feature", "label", "description", "source")
        )
    label_frame = (
        pl.concat(labels) if labels else pl.DataFrame(schema={"feature": pl.Int32, "label": pl.String})
    )
    times["label"] = time.perf_counter() - t

    t = time.perf_counter()
    top = pl.concat([tops["a"], tops["b"]]).with_columns(
        pl.when(pl.col("direction") == "a")
        .then(pl.lit("positive"))
        .otherwise(pl.lit("negative"))
        .alias("more_in"),
        pl.int_range(pl.len()).over("direction").add(1).alias("rank"),
    )
    feats = top["feature"].to_list()
    direction = dict(zip(feats, top["direction"].to_list(), strict=True))
    cuts = dict(zip(feats, top["threshold"].to_list(), strict=True)) if "threshold" in top.columns else None
    replication = dev_replication(feats, direction, dev, cuts) if feats else pl.DataFrame()
    controls = matched_controls(diff, feats, set(diff.filter("significant")["feature"].to_list()))
    control_dir = {c: direction[f] for f, c in controls.items()}  # polarity compared with its partner's
    words = feature_words(train, feats + list(controls.values()))
    judged = judge(words, direction) if feats else pl.DataFrame()
    judged_controls = judge(words, control_dir) if controls else pl.DataFrame()
    times["checks"] = time.perf_counter() - t

    table = top.select(
        "more_in",
        "rank",
        "feature",
        "freq_a",
        "freq_b",
        "log2_ratio",
        "q_value",
    ).rename({"freq_a": "train_freq_pos", "freq_b": "train_freq_neg"})
    if feats:
        table = (
            table.join(replication, on="feature", how="left")
            .join(label_frame.select("feature", "label"), on="feature", how="left")
            .join(judged, on="feature", how="left")
            .with_columns(
                pl.col("label")
                .map_elements(label_sentiment_share, return_dtype=pl.Float64)
                .alias("label_sentiment_share"),
                pl.col("feature")
                .replace_strict(controls, default=None, return_dtype=pl.Int32)
                .alias("control"),
            )
        )
    words_per_doc = {
        f"{part}_{side}_mean_words": float(d[side]["docs"]["text"].str.count_matches(r"\S+").mean())
        for part, d in (("train", train), ("dev", dev))
        for side in ("positive", "negative")
    }
    return {
        "diff": diff,
        "table": table,
        "train": train,
        "dev": dev,
        "controls": judged_controls,
        "words": words,
        "labels": label_frame,
        "n": {
            "train_positive": pos["n"],
            "train_negative": neg["n"],
            "dev_positive": dev["positive"]["n"],
            "dev_negative": dev["negative"]["n"],
            "dev_eligible_before_overlap_filter": all_dev,
            "significant_positive": int(
                diff.filter(pl.col("significant") & (pl.col("direction") == "a")).height
            ),
            "significant_negative": int(
                diff.filter(pl.col("significant") & (pl.col("direction") == "b")).height
            ),
            "features_tested": reader.d_sae,
            **words_per_doc,
        },
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "reader_fingerprint": reader.fingerprint,
    }


def summarize(result: dict[str, Any]) -> pl.DataFrame:
    """Per direction: how many top features replicate on dev, mean dev AUC toward the direction, and the
    judge's numbers for top features vs their frequency-matched controls."""
    table, controls = result["table"], result["controls"]
    rows = []
    for more_in in ("positive", "negative"):
        t = table.filter(pl.col("more_in") == more_in)
        if t.height == 0:
            rows.append({"more_in": more_in, "top_features": 0})
            continue
        auc_dir = t["dev_auc_positive"] if more_in == "positive" else 1 - t["dev_auc_positive"]
        ctl = controls.filter(pl.col("feature").is_in(t["control"].drop_nulls().to_list()))
        rows.append(
            {
                "more_in": more_in,
                "top_features": t.height,
                "dev_same_direction": int(t["dev_same_direction"].sum()),
                "dev_replicated_p05": int(t["dev_replicated"].sum()),
                "dev_auc_toward_direction_mean": float(auc_dir.mean()),
                "dev_auc_toward_direction_min": float(auc_dir.min()),
                "sentiment_mass_share": float(t["sentiment_mass_share"].mean()),
                "negator_mass_share": float(t["negator_mass_share"].mean()),
                "sentiment_top_words_share": float(t["sentiment_top_words_share"].mean()),
                "polarity_match": float(t["polarity_match"].drop_nulls().mean() or 0.0)
                if t["polarity_match"].drop_nulls().len()
                else None,
                "label_sentiment_share": float(t["label_sentiment_share"].mean()),
                "control_sentiment_mass_share": float(ctl["sentiment_mass_share"].mean())
                if ctl.height
                else None,
                "control_negator_mass_share": float(ctl["negator_mass_share"].mean()) if ctl.height else None,
                "control_sentiment_top_words_share": float(ctl["sentiment_top_words_share"].mean())
                if ctl.height
                else None,
            }
        )
    return pl.DataFrame(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-per-side", type=int, default=3000)
    parser.add_argument("--n-dev-per-side", type=int, default=1500)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--firing", default=REPORT_FIRING, help="diff firing rule (default: the report's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    result = run(
        n_per_side=args.n_per_side,
        n_dev_per_side=args.n_dev_per_side,
        top_n=args.top,
        seed=args.seed,
        reader=load_default_reader(args.device),
        firing=args.firing,
    )
    total = time.perf_counter() - t0
    table, summary = result["table"], summarize(result)
    n = result["n"]
    print(
        f"train: {n['train_positive']} positive vs {n['train_negative']} negative sentences; "
        f"{n['significant_positive']} features significantly more frequent in positive, "
        f"{n['significant_negative']} in negative (BH q < 0.05 over {n['features_tested']} features)"
    )
    print(
        f"dev: {n['dev_positive']} positive / {n['dev_negative']} negative sentences after dropping"
        f" those that overlap the train sample ({n['dev_eligible_before_overlap_filter']} eligible before)"
    )
    with pl.Config(tbl_rows=100, tbl_cols=30, fmt_str_lengths=40, tbl_width_chars=250, float_precision=3):
        print("\n== top features per direction: train diff, dev replication, offline label ==")
        print(
            table.select(
                "more_in",
                "rank",
                "feature",
                "train_freq_pos",
                "train_freq_neg",
                pl.col("q_value").map_elements(lambda v: f"{v:.2g}", return_dtype=pl.String),
                "dev_freq_pos",
                "dev_freq_neg",
                "dev_auc_positive",
                pl.col("dev_p_value").map_elements(lambda v: f"{v:.2g}", return_dtype=pl.String),
                "dev_replicated",
                "label",
            )
        )
        print("\n== words each feature fires on (by activation mass) and the sentiment-word-list JUDGE ==")
        print(
            table.select(
                "more_in",
                "feature",
                pl.col("top_words").list.head(8).list.join(" | ").alias("top words (train sample)"),
                "sentiment_mass_share",
                "negator_mass_share",
                "polarity_match",
                "label_sentiment_share",
            )
        )
        print("\n== frequency-matched control features (q >= 0.5), same judge ==")
        print(
            result["controls"].select(
                "feature",
                pl.col("top_words").list.head(8).list.join(" | ").alias("top words"),
                "sentiment_mass_share",
                "negator_mass_share",
            )
        )
        print("\n== summary ==")
        print(summary.transpose(include_header=True, column_names="more_in"))
    print(f"seconds: {result['seconds']} total {total:.1f}")
    write_results(
        {
            "params": vars(args),
            "reader_fingerprint": result["reader_fingerprint"],
            "counts": n,
            "summary": summary.to_dicts(),
            "top_features": table.to_dicts(),
            "controls": result["controls"].to_dicts(),
            "feature_words": result["words"]
            .filter(pl.col("feature").is_in(table["feature"].to_list()))
            .group_by("feature", maintain_order=True)
            .head(15)
            .to_dicts(),
            "judge_word_lists": {
                "positive": sorted(POSITIVE_WORDS),
                "negative": sorted(NEGATIVE_WORDS),
                "negators": sorted(NEGATORS),
            },
            "seconds": result["seconds"] | {"total": round(total, 2)},
        },
        args.out,
    )


if __name__ == "__main__":
    main()
