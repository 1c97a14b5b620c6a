"""SAEs trained with a BOS token first (SAELens `prepend_bos`) read documents that start with it: our stored
activations equal SAELens's own path (HookedSAETransformer with the SAE attached) token for token, and the
BOS position is read but never stored or pooled."""

import numpy as np
import pytest
import torch
from _tokenizers import word_tokenizer
from sae_lens import HookedSAETransformer, TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata
from transformer_lens import HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from interp_assets.engine.activations import encode_texts
from interp_assets.engine.reader import SAEReader, parse_hook_name

HOOK = "blocks.1.hook_resid_pre"
WORDS = ["<pad>", "the", "cat", "sat", "on", "mat", "a", "dog", "and", "ran", "far", "<|endoftext|>"]
TEXTS = ["the cat sat on the mat", "a dog ran far", "the dog and the cat", "mat"]


def _tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(WORDS, unk="<pad>", pad_token="<pad>", bos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def models_and_sae():
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(WORDS), n_embd=16, n_layer=2, n_head=2, n_positions=32)
    ).eval()
    tl_cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, n_ctx=32, d_head=8, n_heads=2, d_mlp=64, d_vocab=len(WORDS), act_fn="gelu_new"
    )
    lens = HookedSAETransformer(tl_cfg)
    lens.load_and_process_state_dict(
        convert_gpt2_weights(hf, tl_cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    return hf, lens


def _sae(prepend_bos: bool) -> TopKSAE:
    torch.manual_seed(1)
    metadata = SAEMetadata(hook_name=HOOK, prepend_bos=prepend_bos)
    sae = TopKSAE(TopKSAEConfig(d_in=16, d_sae=48, k=4, dtype="float32", device="cpu", metadata=metadata))
    with torch.no_grad():
        sae.b_enc.normal_()
    return sae


def _ours(hf, sae) -> dict[tuple[int, int], dict[int, float]]:
    reader = SAEReader(
        _tokenizer(),
        hf.transformer,
        sae,
        parse_hook_name(HOOK),
        device="cpu",
        dtype="float32",
        max_length=32,
        token_budget=64,
        exclude_special_tokens=True,
        chat_template=False,
        exclude_template_tokens=True,
        identity={},
        activation_dtype="float32",
    )
    t = encode_texts(reader, TEXTS).activations.to_pydict()
    out: dict[tuple[int, int], dict[int, float]] = {}
    for d, i, f, v in zip(t["doc_index"], t["token_index"], t["feature"], t["activation"], strict=True):
        out.setdefault((d, i), {})[f] = v
    return out


def _saelens(lens, sae, with_bos: bool) -> dict[tuple[int, int], dict[int, float]]:
    tok = _tokenizer()
    out: dict[tuple[int, int], dict[int, float]] = {}
    for d, text in enumerate(TEXTS):
        ids = tok(text)["input_ids"]
        first = 1 if with_bos else 0
        tokens = torch.tensor([[tok.bos_token_id, *ids] if with_bos else ids])
        with torch.no_grad():
            _, cache = lens.run_with_cache_with_saes(tokens, saes=[sae])
        acts = cache[f"{HOOK}.hook_sae_acts_post"][0]
        for pos in range(first, tokens.shape[1]):  # the BOS position is never stored
            nz = torch.nonzero(acts[pos]).flatten().tolist()
            if nz:
                out[(d, pos)] = {f: float(acts[pos, f]) for f in nz}
    return out


def _assert_equal(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for key, feats in theirs.items():
        assert ours[key].keys() == feats.keys(), key
        np.testing.assert_allclose([ours[key][f] for f in feats], list(feats.values()), rtol=1e-4, atol=1e-5)


def test_prepend_bos_sae_matches_saelens_token_for_token(models_and_sae) -> None:
    hf, lens = models_and_sae
    sae = _sae(prepend_bos=True)
    ours = _ours(hf, sae)
    _assert_equal(ours, _saelens(lens, sae, with_bos=True))
    assert all(pos >= 1 for _, pos in ours)  # position 0 is the BOS: read, not stored
    # without the BOS the same tokens get other activations (positions aligned: ours are one later)
    shifted = {(d, pos + 1): feats for (d, pos), feats in _saelens(lens, sae, with_bos=False).items()}
    with pytest.raises(AssertionError):
        _assert_equal(ours, shifted)


def test_an_sae_trained_without_bos_reads_documents_without_it(models_and_sae) -> None:
    hf, lens = models_and_sae
    sae = _sae(prepend_bos=False)
    _assert_equal(_ours(hf, sae), _saelens(lens, sae, with_bos=False))
