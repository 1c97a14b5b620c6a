"""Causal check on SST-2: does ablating the diff's top sentiment features move a held-out sentiment probe
more than ablating frequency-matched random features does?

1. Diff: SST-2 train positive vs negative sentences through the embedded reader and default SAE (the
   report's adaptive firing); the top `--top` features per direction.
2. Probe: a sentiment direction from held-out dev sentences never edited (mean document embedding of the
   positive ones minus the negative ones, the reader's last hidden state mean-pooled; its cross-fitted AUC
   is reported).
3. For each top feature: ablate it (`interp_assets.causal.interventions.intervention_records`, through
   nnsight) on up to `--docs` train sentences of its side where it fires, and on the same sentences ablate
   each of `--controls` random features with the closest firing rate. The score is the probe's projection
   toward the feature's side; a feature passes when its drop exceeds the 95th percentile of the controls'
   drops.
4. Each direction's top features ablated together on sentences of its side where any fires, beside sets of
   as many matched random features: the probe's drop, and the shift of the downstream document features
   (a document SAE ensemble trained label-blind on the train sentences' embeddings, as the document_sae
   asset trains one per comparison; `effects.downstream_feature_shift`'s L1 change of each sentence's
   document-feature activations, and how many of them start or stop firing).

Prints a table and writes `benchmarks/results/sst2_causal.json`.

    python benchmarks/sst2_causal.py                  # 5 features per direction, 20 controls
    python benchmarks/sst2_causal.py --top 2 --controls 5 --n-per-side 300    # quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from benchmarks._common import git_state, load_average, print_table, write_results  # noqa: E402
from benchmarks.sst2_sentiment import SST2_DEV, SST2_TRAIN, encode_sides, load_sides, overlap_filter  # noqa: E402
from interp_assets.analysis.diffing import REPORT_FIRING, diff_features  # noqa: E402
from interp_assets.analysis.reports import top_features  # noqa: E402
from interp_assets.causal import effects  # noqa: E402
from interp_assets.causal.interventions import (  # noqa: E402
    Intervention,
    bootstrap_interval,
    budget_batches,
    edit_site,
    intervention_records,
    matched_controls,
    run_with_intervention,
)
from interp_assets.engine.activations import document_batch  # noqa: E402
from interp_assets.engine.documents import (  # noqa: E402
    DocumentSAEConfig,
    document_embeddings,
    train_document_saes,
)

RESULTS = Path(__file__).resolve().parent / "results" / "sst2_causal.json"
SIDES = {"a": "positive", "b": "negative"}


def set_scores(
    reader, layer: str, batch: tuple, score, family: effects.DocumentFamily, intervention: Intervention | None
) -> tuple[np.ndarray, np.ndarray]:
    """`score` of each document of `batch` (ids, mask, keep) after `intervention` (None: unedited), and its
    document-feature activations under `family`, in forward passes of at most the reader's token budget."""
    ids, mask, keep = batch
    out, features = np.zeros(int(ids.shape[0])), None
    for docs, rows, width in budget_batches(mask, reader.token_budget):
        part_ids, part_mask = ids[rows, :width], mask[rows, :width]
        read = run_with_intervention(
            reader.model,
            layer,
            reader.sae,
            intervention,
            part_ids,
            part_mask,
            effects.reads(family=family),
            edit_mask=keep[rows, :width],
            forward_kwargs=effects.FORWARD_KWARGS,
        )
        out[docs] = score(read, part_ids, part_mask)
        part = family.features(read, part_ids, part_mask)
        if features is None:
            features = np.zeros((int(ids.shape[0]), part.shape[1]), dtype=part.dtype)
        features[docs] = part
    return out, features


def set_effects(
    reader, layer: str, batch: tuple, score, family: effects.DocumentFamily, unedited: tuple, features: tuple
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per document, ablating `features` together: the drop of `score` from its `unedited` value, the L1
    shift of the document-feature activations and how many document features flip."""
    base, base_features = unedited
    after, after_features = set_scores(reader, layer, batch, score, family, Intervention(features))
    return (
        base - after,
        effects.document_feature_l1(base_features, after_features),
        effects.document_features_flipped(base_features, after_features),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-per-side", type=int, default=1500, help="train sentences per side for the diff")
    ap.add_argument("--n-dev-per-side", type=int, default=400, help="held-out sentences per side (probe)")
    ap.add_argument("--top", type=int, default=5, help="top features per direction")
    ap.add_argument("--docs", type=int, default=24, help="edited sentences where the feature fires")
    ap.add_argument("--controls", type=int, default=20)
    ap.add_argument(
        "--set-docs", type=int, default=48, help="edited sentences for each direction's feature set"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    started = time.perf_counter()
    from interp_assets.engine.reader import load_reader

    reader = load_reader(device="cpu")
    train_docs = load_sides(SST2_TRAIN, args.n_per_side, args.seed)
    exclude = overlap_filter([t for d in train_docs.values() for t in d["text"].to_list()])
    dev_docs = load_sides(SST2_DEV, args.n_dev_per_side, args.seed, exclude=exclude, prefix="sst2_dev")
    train = encode_sides(train_docs, reader)
    pos, neg = train["positive"], train["negative"]
    diff = diff_features(
        pos["pooled"], pos["n"], neg["pooled"], neg["n"], n_features=reader.d_sae, firing=REPORT_FIRING
    )
    tops = top_features(diff, args.top)
    # The document family downstream of the token SAE: trained label-blind on every train sentence's
    # embedding (the reader's last layer, after the edited one, mean-pooled, L2-normalized:
    # document_embeddings with layer -1).
    train_texts = [t for side in SIDES.values() for t in train_docs[side]["text"].to_list()]
    saes, doc_report = train_document_saes(
        document_embeddings(train_texts), DocumentSAEConfig(seed=args.seed)
    )
    family = effects.DocumentFamily(saes)

    emb = {
        side: effects.document_embeddings(reader, dev_docs[side]["text"].to_list()) for side in SIDES.values()
    }
    probe = effects.mean_difference_direction(emb["positive"], emb["negative"], seed=args.seed)
    toward = {
        "positive": effects.Direction(probe.vector, probe.held_out_auc, probe.n_positive, probe.n_negative),
        "negative": effects.Direction(-probe.vector, probe.held_out_auc, probe.n_negative, probe.n_positive),
    }

    layer = edit_site(reader)
    rng = np.random.default_rng(args.seed)
    rows = []
    for direction, side in SIDES.items():
        docs = train[side]["docs"]
        for feature in tops[direction]["feature"].to_list():
            fires = set(train[side]["pooled"].filter(pl.col("feature") == feature)["doc_id"].to_list())
            on = [d for d in docs["doc_id"].to_list() if d in fires]
            chosen = sorted(rng.choice(on, size=min(args.docs, len(on)), replace=False).tolist())
            text_of = dict(zip(docs["doc_id"].to_list(), docs["text"].to_list(), strict=True))
            ids, mask, keep = document_batch(reader, [text_of[d] for d in chosen])
            records = intervention_records(
                reader.model,
                layer,
                reader.sae,
                ids,
                mask,
                int(feature),
                score={"sentiment_probe": effects.projection_score(toward[side])},
                read=effects.read_hidden,
                n_controls=args.controls,
                seed=args.seed,
                edit_mask=keep,
                forward_kwargs=effects.FORWARD_KWARGS,
                token_budget=reader.token_budget,
            )
            target = records.filter(pl.col("control_type") == "target").row(0, named=True)
            drops = (
                -records.filter(pl.col("control_type") == "random_matched")["effect"].drop_nulls().to_numpy()
            )
            p95 = float(np.percentile(drops, 95)) if drops.size else float("nan")
            rows.append(
                {
                    "feature": int(feature),
                    "more_in": side,
                    "documents": target["documents"],
                    "drop": -target["effect"],
                    "drop_ci_low": -target["effect_ci_high"],
                    "drop_ci_high": -target["effect_ci_low"],
                    "controls": int(drops.size),
                    "control_drop_median": float(np.median(drops)) if drops.size else None,
                    "control_drop_p95": p95,
                    "passes": bool(-target["effect"] > p95),
                }
            )
    print_table(
        rows,
        [
            ("feature", "feature", "d"),
            ("more in", "more_in", "s"),
            ("docs", "documents", "d"),
            ("probe drop", "drop", ".5f"),
            ("CI low", "drop_ci_low", ".5f"),
            ("CI high", "drop_ci_high", ".5f"),
            ("controls p95", "control_drop_p95", ".5f"),
            ("passes", "passes", ""),
        ],
        title=f"\nAblating SST-2's top sentiment features vs {args.controls} matched random features "
        f"(held-out probe AUC {probe.held_out_auc:.3f})",
    )
    passed = sum(r["passes"] for r in rows)
    print(f"{passed}/{len(rows)} features move the held-out probe more than the controls' 95th percentile")

    # The diff's top features of a direction together (its sentiment features): ablated at once on sentences
    # of their side where any of them fires, against sets of as many frequency-matched random features.
    pooled_all = pl.concat([train[side]["pooled"] for side in SIDES.values()])
    doc_freq = np.bincount(pooled_all["feature"].to_numpy(), minlength=reader.d_sae).astype(float)
    set_rows = []
    for direction, side in SIDES.items():
        members = tuple(int(f) for f in tops[direction]["feature"].to_list())
        docs, pooled = train[side]["docs"], train[side]["pooled"]
        fires = set(pooled.filter(pl.col("feature").is_in(list(members)))["doc_id"].to_list())
        on = [d for d in docs["doc_id"].to_list() if d in fires]
        chosen = sorted(rng.choice(on, size=min(args.set_docs, len(on)), replace=False).tolist())
        text_of = dict(zip(docs["doc_id"].to_list(), docs["text"].to_list(), strict=True))
        batch = document_batch(reader, [text_of[d] for d in chosen])
        score = effects.projection_score(toward[side])
        unedited = set_scores(reader, layer, batch, score, family, None)
        drop, shift, flips = set_effects(reader, layer, batch, score, family, unedited, members)
        matched = {
            f: [c for c in matched_controls(doc_freq, f, 3 * args.controls, args.seed) if c not in members]
            for f in members
        }
        control_drops, control_shifts, control_flips = [], [], []
        for c in range(args.controls):
            control = tuple(dict.fromkeys(matched[f][c] for f in members))
            c_drop, c_shift, c_flips = set_effects(reader, layer, batch, score, family, unedited, control)
            control_drops.append(float(c_drop.mean()))
            control_shifts.append(float(c_shift.mean()))
            control_flips.append(float(c_flips.mean()))
        low, high = bootstrap_interval(drop, seed=args.seed)
        shift_low, shift_high = bootstrap_interval(shift, seed=args.seed)
        p95 = float(np.percentile(control_drops, 95))
        shift_p95 = float(np.percentile(control_shifts, 95))
        set_rows.append(
            {
                "more_in": side,
                "features": list(members),
                "documents": len(chosen),
                "drop": float(drop.mean()),
                "drop_ci_low": float(low),
                "drop_ci_high": float(high),
                "control_sets": len(control_drops),
                "control_drop_median": float(np.median(control_drops)),
                "control_drop_p95": p95,
                "passes": bool(drop.mean() > p95),
                "document_feature_shift": float(shift.mean()),
                "document_feature_shift_ci_low": shift_low,
                "document_feature_shift_ci_high": shift_high,
                "control_shift_median": float(np.median(control_shifts)),
                "control_shift_p95": shift_p95,
                "document_features_flipped": float(flips.mean()),
                "control_flipped_median": float(np.median(control_flips)),
                "control_flipped_p95": float(np.percentile(control_flips, 95)),
                "shift_passes": bool(shift.mean() > shift_p95),
            }
        )
    print_table(
        set_rows,
        [
            ("more in", "more_in", "s"),
            ("docs", "documents", "d"),
            ("probe drop", "drop", ".5f"),
            ("CI low", "drop_ci_low", ".5f"),
            ("CI high", "drop_ci_high", ".5f"),
            ("controls median", "control_drop_median", ".5f"),
            ("controls p95", "control_drop_p95", ".5f"),
            ("passes", "passes", ""),
        ],
        title=f"\nEach direction's top {args.top} features ablated together vs {args.controls} sets of "
        "frequency-matched random features",
    )
    print_table(
        set_rows,
        [
            ("more in", "more_in", "s"),
            ("doc-feature L1 shift", "document_feature_shift", ".4f"),
            ("CI low", "document_feature_shift_ci_low", ".4f"),
            ("CI high", "document_feature_shift_ci_high", ".4f"),
            ("controls median", "control_shift_median", ".4f"),
            ("controls p95", "control_shift_p95", ".4f"),
            ("flipped", "document_features_flipped", ".2f"),
            ("controls flipped p95", "control_flipped_p95", ".2f"),
            ("passes", "shift_passes", ""),
        ],
        title=f"\nThe same edits: shift of the downstream document features ({len(saes)} document SAEs x "
        f"{doc_report['d_sae']}, k={doc_report['k']}, trained on the {len(train_texts)} train sentences)",
    )
    write_results(
        {
            "params": {k: v for k, v in vars(args).items() if k != "out"},
            "probe": {
                "held_out_auc": probe.held_out_auc,
                "n_positive": probe.n_positive,
                "n_negative": probe.n_negative,
            },
            "features": rows,
            "feature_sets": set_rows,
            "document_sae": {
                k: doc_report[k] for k in ("members", "d_sae", "k", "fraction_variance_explained")
            },
            "summary": {
                "features": len(rows),
                "pass": passed,
                "sets": len(set_rows),
                "sets_pass": sum(r["passes"] for r in set_rows),
                "sets_shift_pass": sum(r["shift_passes"] for r in set_rows),
            },
            "seconds": round(time.perf_counter() - started, 1),
            "load_avg": load_average(),
            "cpus": os.cpu_count(),
            "git": git_state(),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
