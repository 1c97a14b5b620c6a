"""Interventions through nnsight on a tiny GPT-2 whose SAE has a planted feature: its decoder direction is
the unembedding of one target token, so removing it must lower that token's log-probability."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sae_lens import TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata
from transformers import GPT2Config, GPT2LMHeadModel

from interp_assets.causal.interventions import (
    Intervention,
    budget_batches,
    edit_site,
    edited_hidden,
    intervention_records,
    matched_controls,
    module_name,
    next_token_logprob,
    run_with_intervention,
    token_logprob,
)
from interp_assets.engine.reader import find_layer_module

TARGET, PLANTED, D_IN, D_SAE = 7, 5, 16, 64


@pytest.fixture(scope="module")
def setup() -> dict:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=12, n_embd=D_IN, n_layer=2, n_head=2, n_positions=32)
    config.bos_token_id = config.eos_token_id = 0
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(1, 12, (24, 10))
    mask = torch.ones_like(ids)
    mask[::3, 7:] = 0  # some padding
    layer = module_name(model, find_layer_module(model, 0))  # blocks.0.hook_resid_post
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
    sae = TopKSAE(
        TopKSAEConfig(
            d_in=D_IN,
            d_sae=D_SAE,
            k=8,
            dtype="float32",
            device="cpu",
            metadata=SAEMetadata(hook_name="blocks.0.hook_resid_post"),
        )
    )
    with torch.no_grad():
        target = model.lm_head.weight[TARGET].clone()
        sae.W_dec[PLANTED] = 3.0 * target / target.norm()
        mean = hidden[mask.bool()].mean(0)
        sae.W_enc[:, PLANTED] = 4.0 * mean / mean.norm()  # fires on most tokens
    return {"model": model, "sae": sae, "ids": ids, "mask": mask, "layer": layer}


def _logits(setup: dict, intervention: Intervention | None) -> torch.Tensor:
    return run_with_intervention(
        setup["model"], setup["layer"], setup["sae"], intervention, setup["ids"], setup["mask"], _read_logits
    )


def _read_logits(output):
    return output.logits


def _target_score(setup: dict, intervention: Intervention | None) -> float:
    return float(token_logprob(TARGET)(_logits(setup, intervention), setup["ids"], setup["mask"]).mean())


def test_the_placebo_moves_nothing_and_no_intervention_is_the_plain_forward(setup: dict) -> None:
    with torch.no_grad():
        plain = setup["model"](input_ids=setup["ids"], attention_mask=setup["mask"]).logits
    for intervention in (None, *(Intervention(PLANTED, kind, 0.0) for kind in ("ablate", "clamp", "steer"))):
        torch.testing.assert_close(_logits(setup, intervention), plain)


def test_ablating_the_planted_feature_beats_every_matched_random_feature(setup: dict) -> None:
    records = intervention_records(
        setup["model"],
        setup["layer"],
        setup["sae"],
        setup["ids"],
        setup["mask"],
        PLANTED,
        kind="ablate",
        score=token_logprob(TARGET),
        n_controls=20,
    )
    target = records.filter(records["control_type"] == "target").row(0, named=True)
    controls = records.filter(records["control_type"] == "random_matched")
    placebo = records.filter(records["control_type"] == "placebo").row(0, named=True)
    assert controls.height == 20
    assert target["effect"] < 0 and target["effect_ci_high"] < 0
    assert target["effect"] < controls["effect"].min()  # lower than every one of the 20 controls
    assert placebo["effect"] == 0.0
    assert set(records.columns) >= {
        "feature",
        "intervention",
        "strength",
        "baseline_score",
        "intervention_score",
        "side_effect_score",
        "control_type",
    }


def test_steering_raises_the_target_monotonically_with_strength(setup: dict) -> None:
    scores = [_target_score(setup, Intervention(PLANTED, "steer", s)) for s in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(b > a for a, b in zip(scores, scores[1:], strict=False)), scores


def test_clamping_to_zero_equals_ablating(setup: dict) -> None:
    assert _target_score(setup, Intervention(PLANTED, "clamp", 1e-12)) == pytest.approx(
        _target_score(setup, Intervention(PLANTED, "ablate", 1.0)), abs=1e-5
    )


def test_next_token_scores_and_controls_and_errors(setup: dict) -> None:
    logits = _logits(setup, None)
    per_doc = next_token_logprob(logits, setup["ids"], setup["mask"])
    assert per_doc.shape == (24,) and np.all(per_doc < 0)
    rates = np.array([0.0, 0.1, 0.5, 0.12, 0.3])
    assert matched_controls(rates, 1, 2) == [3, 4]  # closest rates; never-firing feature 0 excluded
    with pytest.raises(ValueError, match="Unknown intervention"):
        Intervention(1, "erase")
    with pytest.raises(ValueError, match="outside the SAE"):
        _target_score(setup, Intervention(D_SAE + 1, "ablate", 1.0))


def test_on_the_embedded_encoder_an_ablation_moves_only_the_documents_where_the_feature_fires() -> None:
    from interp_assets.causal.interventions import document_embedding_shift
    from interp_assets.engine.reader import load_reader

    reader = load_reader(device="cpu")
    texts = ["I want a refund for my order", "The weather is lovely today", "Sorry, my refund is late"]
    enc = reader.tokenizer(texts, return_tensors="pt", padding=True)
    layer = edit_site(reader)
    with torch.no_grad():
        hidden = reader.model(**enc, output_hidden_states=True).hidden_states[reader.hook.layer + 1]
        acts = reader.sae.encode(hidden) * enc["attention_mask"][..., None]
    fires = (acts > 0).any(dim=1)  # [docs, d_sae]
    # a feature active in some documents but not all
    feature = int(torch.nonzero(fires.sum(0) == 1)[0, 0])
    shift = document_embedding_shift(
        reader.model,
        layer,
        reader.sae,
        Intervention(feature, "ablate", 1.0),
        enc["input_ids"],
        enc["attention_mask"],
    )
    on = fires[:, feature].numpy()
    assert np.all(shift[on] > 1e-6) and np.allclose(shift[~on], 0.0, atol=1e-6)
    placebo = document_embedding_shift(
        reader.model,
        layer,
        reader.sae,
        Intervention(feature, "steer", 0.0),
        enc["input_ids"],
        enc["attention_mask"],
    )
    assert np.allclose(placebo, 0.0, atol=1e-6)


def test_input_optimization_beats_the_best_dataset_example(setup: dict) -> None:
    from interp_assets.causal.input_optimization import feature_activation, optimize_inputs

    model, sae = setup["model"], setup["sae"]
    best_example = max(
        feature_activation(model, sae, 0, "post", PLANTED, row[m.bool()])
        for row, m in zip(setup["ids"], setup["mask"], strict=True)
    )
    found = optimize_inputs(model, sae, 0, "post", PLANTED, length=10, restarts=2, steps=30)
    assert found.height == 2 and found["activation"].is_sorted(descending=True)
    assert found["activation"][0] >= best_example
    ids = torch.tensor(found["token_ids"][0].to_list())
    assert found["activation"][0] == pytest.approx(feature_activation(model, sae, 0, "post", PLANTED, ids))
    with pytest.raises(ValueError, match="outside the SAE"):
        optimize_inputs(model, sae, 0, "post", D_SAE)


def test_token_budget_batches_give_the_same_records_as_one_pass(setup: dict) -> None:
    from interp_assets.engine.activations import plan_batches

    # the batches intervention_records runs at a budget of 50 tokens: the engine's own plan
    lengths = setup["mask"].sum(dim=1).tolist()
    batches = plan_batches(lengths, 50)
    assert len(batches) > 1 and sorted(i for b in batches for i in b) == list(range(setup["ids"].shape[0]))
    for docs in batches:
        assert max(lengths[i] for i in docs) * len(docs) <= 50 or len(docs) == 1
    common = dict(score=token_logprob(TARGET), read=_read_logits, n_controls=5, n_boot=200)
    args = (setup["model"], setup["layer"], setup["sae"], setup["ids"], setup["mask"], PLANTED)
    whole = intervention_records(*args, **common)
    split = intervention_records(*args, **common, token_budget=50)
    assert whole["feature"].to_list() == split["feature"].to_list()
    for column in ("baseline_score", "intervention_score", "effect", "side_effect_score"):
        np.testing.assert_allclose(
            whole[column].to_numpy().astype(float), split[column].to_numpy().astype(float), atol=1e-5
        )
    with pytest.raises(ValueError, match="token_budget"):
        intervention_records(*args, **common, token_budget=0)


def test_a_set_of_features_is_edited_at_once_from_the_unedited_activations(setup: dict) -> None:
    sae = setup["sae"]
    h = torch.randn(3, 5, D_IN)
    real = torch.ones(3, 5, dtype=torch.bool)
    real[0, 3:] = False
    with torch.no_grad():
        codes = sae.encode(h)
        pair = (PLANTED, int(codes[1, 1].argmax()) if int(codes[1, 1].argmax()) != PLANTED else 0)
        expected = h - sum((codes[..., f] * real)[..., None] * sae.W_dec[f] for f in pair)
        steered = h + 2.0 * real[..., None] * (sae.W_dec[pair[0]] + sae.W_dec[pair[1]])
    assert torch.allclose(edited_hidden(h, sae, Intervention(pair), real), expected, atol=1e-5)
    assert torch.allclose(edited_hidden(h, sae, Intervention(pair, "steer", 2.0), real), steered, atol=1e-5)
    single = edited_hidden(h, sae, Intervention(PLANTED), real)
    assert torch.equal(edited_hidden(h, sae, Intervention((PLANTED,)), real), single)
    with pytest.raises(ValueError, match="without repeats"):
        Intervention((PLANTED, PLANTED))


def test_edited_passes_replay_the_blocks_before_the_edit_and_give_the_same_records(setup: dict) -> None:
    model, sae = setup["model"], setup["sae"]
    calls = {"block 0": 0, "encode": 0}
    handle = model.transformer.h[0].register_forward_hook(
        lambda *_: calls.__setitem__("block 0", calls["block 0"] + 1)
    )
    encode = sae.encode

    def counted_encode(x):
        calls["encode"] += 1
        return encode(x)

    common = dict(score=token_logprob(TARGET), read=_read_logits, n_controls=5, n_boot=200, token_budget=120)
    args = (model, setup["layer"], sae, setup["ids"], setup["mask"], PLANTED)
    sae.encode = counted_encode
    try:
        full = intervention_records(*args, **common, replay=False)
        full_calls = dict(calls)
        calls.update({"block 0": 0, "encode": 0})
        replayed = intervention_records(*args, **common)
    finally:
        handle.remove()
        del sae.encode
    n_batches = len(budget_batches(setup["mask"], 120))
    # without replay every pass computes the block before the edit: unedited, target, controls, placebo
    assert n_batches > 1 and full_calls["block 0"] == n_batches * (1 + 1 + 5 + 1)
    assert calls["block 0"] == n_batches  # only the unedited pass computes the block before the edit
    # the SAE encodes each batch's site twice (which features fire; the edited features' activations), not
    # once more per edited pass (the placebo edits nothing)
    assert full_calls["encode"] == n_batches * (1 + 1 + 5) and calls["encode"] == 2 * n_batches
    assert replayed["feature"].to_list() == full["feature"].to_list()
    for column in ("baseline_score", "intervention_score", "effect", "side_effect_score"):
        np.testing.assert_allclose(replayed[column].to_numpy(), full[column].to_numpy(), atol=1e-6)
    assert isinstance(model.transformer.h[0], type(model.transformer.h[1]))  # the real block is back


def test_a_resid_pre_sae_is_edited_at_its_block_input(setup: dict) -> None:
    """A `hook_resid_pre` SAE reads the input of its block: the edit goes there, not at its output."""
    model, sae, ids, mask = setup["model"], setup["sae"], setup["ids"], setup["mask"]
    block = model.transformer.h[1]
    reader = type("Reader", (), {"model": model, "layer_module": block})()
    reader.hook = type("Hook", (), {"position": "pre"})()
    site = edit_site(reader)
    assert site == "transformer.h.1:input"
    reader.hook.position = "post"
    assert edit_site(reader) == "transformer.h.1"
    intervention = Intervention(PLANTED, "ablate", 1.0)

    def edit_input(_module, args, kwargs):
        return (edited_hidden(args[0], sae, intervention, mask.bool()), *args[1:]), kwargs

    handle = block.register_forward_pre_hook(edit_input, with_kwargs=True)
    try:
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()
    got = run_with_intervention(model, site, sae, intervention, ids, mask, _read_logits)
    torch.testing.assert_close(got, expected)
    at_output = run_with_intervention(model, "transformer.h.1", sae, intervention, ids, mask, _read_logits)
    assert not torch.allclose(at_output, expected)
    common = dict(score=token_logprob(TARGET), read=_read_logits, n_controls=3, n_boot=100)
    replayed = intervention_records(model, site, sae, ids, mask, PLANTED, **common)
    full = intervention_records(model, site, sae, ids, mask, PLANTED, **common, replay=False)
    np.testing.assert_allclose(replayed["effect"].to_numpy(), full["effect"].to_numpy(), atol=1e-6)
