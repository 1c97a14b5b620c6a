"""Causal evidence for a comparison's features: directions, scores, controls and the report section."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("nnsight")

from interp_assets.analysis import reports  # noqa: E402
from interp_assets.causal import effects  # noqa: E402
from interp_assets.causal.interventions import Intervention, edit_site, run_with_intervention  # noqa: E402


def test_auc_matches_the_mann_whitney_statistic() -> None:
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=60), 1)  # ties on purpose
    labels = (rng.random(60) < 0.4).astype(int)
    u = mannwhitneyu(scores[labels == 1], scores[labels == 0]).statistic
    assert effects.auc(scores, labels) == pytest.approx(u / ((labels == 1).sum() * (labels == 0).sum()))
    assert np.isnan(effects.auc(scores, np.ones(60)))


def test_mean_difference_direction_separates_only_what_differs() -> None:
    rng = np.random.default_rng(1)
    shift = np.zeros(16)
    shift[3] = 2.5  # best possible AUC: Phi(2.5 / sqrt 2) = 0.96
    apart = effects.mean_difference_direction(rng.normal(size=(80, 16)) + shift, rng.normal(size=(80, 16)))
    assert apart.held_out_auc > 0.9
    assert abs(apart.vector[3]) > 0.8 and np.linalg.norm(apart.vector) == pytest.approx(1.0)
    same = effects.mean_difference_direction(rng.normal(size=(80, 16)), rng.normal(size=(80, 16)))
    assert 0.3 < same.held_out_auc < 0.7
    with pytest.raises(ValueError, match="at least 2 documents"):
        effects.mean_difference_direction(rng.normal(size=(1, 16)), rng.normal(size=(5, 16)))


def _records(target: float, ci: tuple[float, float], controls: list[float]) -> pl.DataFrame:
    rows = [
        {"control_type": "target", "effect": target, "effect_ci_low": ci[0], "effect_ci_high": ci[1]},
        *(
            {"control_type": "random_matched", "effect": c, "effect_ci_low": c, "effect_ci_high": c}
            for c in controls
        ),
        {"control_type": "placebo", "effect": 0.0, "effect_ci_low": 0.0, "effect_ci_high": 0.0},
    ]
    return pl.DataFrame(rows).with_columns(
        pl.lit(7).alias("target_feature"),
        pl.lit("b").alias("direction"),
        pl.lit("feature_signature").alias("score_name"),
        pl.lit(12).alias("documents"),
        pl.lit(0.0).alias("side_effect_score"),
    )


def test_evidence_needs_an_interval_below_zero_and_every_control_above() -> None:
    clear = effects.effect_summary(_records(-0.5, (-0.7, -0.3), [-0.1, 0.0, 0.05]))
    assert clear["evidence"].to_list() == [True]
    assert clear["controls_beyond"][0] == 0.0 and clear["control_effect_median"][0] == pytest.approx(0.0)
    beaten = effects.effect_summary(_records(-0.5, (-0.7, -0.3), [-0.6, 0.0, 0.05]))
    assert beaten["evidence"].to_list() == [False]
    assert beaten["controls_beyond"][0] == pytest.approx(1 / 3)
    unsure = effects.effect_summary(_records(-0.5, (-0.9, 0.1), [0.0, 0.0]))
    assert unsure["evidence"].to_list() == [False]


@pytest.fixture(scope="module")
def reader():
    from interp_assets.engine.reader import load_reader

    return load_reader(device="cpu")


VILLAGE = [
    "Dolna is a village in the administrative district of Gmina Lesna, in south-western Poland.",
    "Kamionka is a village in the district of Gmina Nowa, within Lublin Voivodeship, in eastern Poland.",
    "Wola Gora is a small village in the rural commune of Gmina Biala, in central Poland.",
    "Brzezie is a village in the administrative district of Gmina Sieraków, in west-central Poland.",
    "Lipowa is a village in the district of Gmina Wilkowice, in southern Poland near the border.",
    "Olszyny is a village in the administrative district of Gmina Rzepiennik, in southern Poland.",
]
FILMS = [
    "The film follows a detective who returns to his home town to solve an old murder.",
    "A quiet drama about two sisters running a bakery after their father's death.",
    "The movie was praised for its score and its long tracking shots of the desert.",
    "An animated comedy about a penguin who wants to learn to fly.",
    "The thriller stars a young lawyer caught up in a corporate conspiracy.",
    "A documentary about the last season of a small-town football club.",
]


def test_ablation_effects_with_controls_on_the_embedded_reader(reader) -> None:
    texts = VILLAGE + FILMS
    ids, mask, keep = effects.document_batch(reader, texts)
    with torch.no_grad():
        hidden = reader.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[4]
        acts = reader.sae.encode(hidden)
    fires = ((acts > 0) & keep.bool()[..., None]).any(dim=1)  # [doc, feature]
    village_only = fires[: len(VILLAGE)].all(0) & ~fires[len(VILLAGE) :].any(0)
    assert village_only.any(), "some SAE feature fires on every village description and no film"
    feature = int(torch.nonzero(village_only)[0])

    emb = effects.document_embeddings(reader, texts)
    assert emb.shape == (len(texts), 384)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # rows follow the input order, whatever order the length-planned forward passes ran in
    np.testing.assert_allclose(effects.document_embeddings(reader, texts[::-1])[::-1], emb, atol=1e-5)
    signature = effects.mean_difference_direction(emb[: len(VILLAGE)], emb[len(VILLAGE) :])
    target = effects.EffectTarget(feature, "b", VILLAGE[:4] + FILMS[:3], signature, signature)
    records = effects.feature_effects(reader, [target], n_controls=4, n_boot=200)

    assert set(records["score_name"].to_list()) == {"feature_signature", "comparison_direction"}
    per_score = records.filter(pl.col("score_name") == "feature_signature")
    assert per_score["control_type"].to_list().count("random_matched") == 4
    tgt = per_score.filter(pl.col("control_type") == "target").row(0, named=True)
    assert tgt["documents"] == 4  # it fires in the 4 village texts, in none of the 3 film texts
    # Ablation edits only where the feature fires: documents where it does not are exactly unchanged.
    assert tgt["side_effect_score"] == 0.0
    placebo = per_score.filter(pl.col("control_type") == "placebo").row(0, named=True)
    assert placebo["effect"] == 0.0
    assert tgt["effect"] != 0.0 and tgt["effect_ci_low"] <= tgt["effect"] <= tgt["effect_ci_high"]
    summary = effects.effect_summary(records)
    assert summary.height == 2 and set(summary["feature"]) == {feature}


def test_the_report_section_is_replaced_not_repeated() -> None:
    summary = effects.effect_summary(_records(-0.5, (-0.7, -0.3), [-0.1, 0.0]))
    common = dict(name_a="A", name_b="B", labels={7: "villages | towns"}, n_controls=2)
    md = reports.render_causal_markdown(summary, **common)
    assert "villages \\| towns" in md and "yes" in md
    page = reports.with_causal_section("# Report\n\nbody\n", md, html_page=False)
    again = reports.with_causal_section(page, md.replace("yes", "no"), html_page=False)
    assert again.count(reports.CAUSAL_START) == 1 and "| no |" in again and "| yes |" not in again
    html_page = "<html><body><h1>r</h1></body></html>\n"
    section = reports.render_causal_html(summary, **common | {"labels": {7: "<b>villages</b>"}})
    out = reports.with_causal_section(html_page, section, html_page=True)
    assert out.index(reports.CAUSAL_START) < out.index("</body>")
    assert "&lt;b&gt;villages" in out and "<b>villages" not in out
    empty = reports.render_causal_markdown(summary.clear(), **common)
    assert "No feature was measured" in empty


@pytest.fixture(scope="module")
def family(reader) -> effects.DocumentFamily:
    """A small document SAE ensemble (2 members) trained on the test texts' sentence embeddings, as the
    document family trains one on a comparison's documents."""
    from interp_assets.engine.documents import DocumentSAEConfig, document_embeddings, train_document_saes

    embeddings = document_embeddings(VILLAGE + FILMS)  # the last layer, L2-normalized: the family's default
    config = DocumentSAEConfig(d_sae=16, k=3, steps=200, batch_size=12, members=2)
    saes, _ = train_document_saes(embeddings, config)
    return effects.DocumentFamily(saes)


def _village_feature(reader) -> int:
    """A token-SAE feature that fires on every village description and on no film description."""
    ids, mask, keep = effects.document_batch(reader, VILLAGE + FILMS)
    with torch.no_grad():
        hidden = reader.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[4]
        fires = ((reader.sae.encode(hidden) > 0) & keep.bool()[..., None]).any(dim=1)
    village_only = fires[: len(VILLAGE)].all(0) & ~fires[len(VILLAGE) :].any(0)
    assert village_only.any()
    return int(torch.nonzero(village_only)[0])


@pytest.mark.parametrize("layer", [None, 5])
def test_the_downstream_read_gives_the_document_familys_own_features(reader, family, layer) -> None:
    """Unedited, the features read from the intervention's forward pass are the ones the document family
    stores: the embedding at the family's layer, pooled as document_embeddings pools it, then encoded."""
    from interp_assets.engine.documents import document_embeddings, encode_documents

    texts = VILLAGE + FILMS
    at_layer = effects.DocumentFamily(family.saes, layer=layer)
    ids, mask, keep = effects.document_batch(reader, texts)
    layer_name = edit_site(reader)
    read = run_with_intervention(
        reader.model,
        layer_name,
        reader.sae,
        None,
        ids,
        mask,
        effects.reads(family=at_layer),
        edit_mask=keep,
        forward_kwargs=effects.FORWARD_KWARGS,
    )
    dense = at_layer.features(read, ids, mask)
    stored = document_embeddings(texts, layer=layer)
    rows, cols, vals = encode_documents(list(family.saes), stored)
    expected = np.zeros_like(dense)
    expected[rows, cols] = vals
    assert dense.shape == (len(texts), 2 * 16)
    np.testing.assert_allclose(dense, expected, atol=1e-4)


def test_downstream_feature_shift_is_zero_for_the_placebo_and_moves_under_ablation(reader, family) -> None:
    feature = _village_feature(reader)
    texts = VILLAGE + FILMS
    ids, mask, keep = effects.document_batch(reader, texts)
    layer_name = edit_site(reader)

    def shift(strength: float) -> dict[str, np.ndarray]:
        intervention = Intervention(feature, "ablate", strength)
        args = (reader.model, layer_name, reader.sae, intervention, ids, mask, family)
        return effects.downstream_feature_shift(*args, edit_mask=keep)

    placebo, ablated = shift(0.0), shift(1.0)
    assert set(placebo) == set(ablated) == {"document_feature_shift", "document_features_flipped"}
    for name in placebo:
        assert placebo[name].shape == (len(texts),) and np.all(placebo[name] == 0.0), name
        # film texts, where the feature never fires, are not edited: their document features stay put
        assert np.all(ablated[name][len(VILLAGE) :] == 0.0), name
    moved = ablated["document_feature_shift"][: len(VILLAGE)]
    assert np.all(moved > 0.0) and moved.mean() > placebo["document_feature_shift"].mean()
    flipped = ablated["document_features_flipped"]
    assert np.all(flipped == np.round(flipped)) and flipped.max() <= 2 * 16


def test_feature_effects_measure_the_downstream_features_beside_controls(reader, family) -> None:
    feature = _village_feature(reader)
    emb = effects.document_embeddings(reader, VILLAGE + FILMS)
    signature = effects.mean_difference_direction(emb[: len(VILLAGE)], emb[len(VILLAGE) :])
    target = effects.EffectTarget(feature, "b", VILLAGE[:4] + FILMS[:3], signature, signature)
    records = effects.feature_effects(reader, [target], n_controls=3, n_boot=200, document_family=family)

    names = set(records["score_name"].to_list())
    assert names == {"feature_signature", "comparison_direction", *effects.DOWNSTREAM_SCORES}
    shifted = records.filter(pl.col("score_name") == "document_feature_shift")
    assert shifted["control_type"].to_list().count("random_matched") == 3
    tgt = shifted.filter(pl.col("control_type") == "target").row(0, named=True)
    placebo = shifted.filter(pl.col("control_type") == "placebo").row(0, named=True)
    assert tgt["documents"] == 4 and tgt["baseline_score"] == 0.0
    assert placebo["effect"] == 0.0 and placebo["intervention_score"] == 0.0
    assert tgt["effect"] > 0.0 and tgt["effect_ci_low"] <= tgt["effect"] <= tgt["effect_ci_high"]
    assert tgt["side_effect_score"] == 0.0  # the film texts are not edited
    summary = effects.effect_summary(records)
    assert set(summary["score_name"]) == names


def test_evidence_for_a_downstream_shift_needs_an_interval_above_zero_and_every_control_below() -> None:
    def shift_records(target: float, ci: tuple[float, float], controls: list[float]) -> pl.DataFrame:
        frame = _records(target, ci, controls)
        return frame.with_columns(pl.lit("document_feature_shift").alias("score_name"))

    clear = effects.effect_summary(shift_records(2.0, (1.5, 2.5), [0.5, 0.0, 1.0]))
    assert clear["evidence"].to_list() == [True] and clear["controls_beyond"][0] == 0.0
    beaten = effects.effect_summary(shift_records(2.0, (1.5, 2.5), [3.0, 0.0, 1.0]))
    assert beaten["evidence"].to_list() == [False] and beaten["controls_beyond"][0] == pytest.approx(1 / 3)
    unsure = effects.effect_summary(shift_records(2.0, (0.0, 2.5), [0.0, 0.0]))
    assert unsure["evidence"].to_list() == [False]
