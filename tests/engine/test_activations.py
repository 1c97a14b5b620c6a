"""The activation engine against SAELens's own encode, on tiny random models and random TopK SAEs.

GPT-2 runs the generic hooked forward; BERT runs the fused BERT forward
(interp_assets/engine/bert_forward.py),
with an SAE that rescales by decoder norms (the shipped default does), folded into its encoder weights.
"""

import numpy as np
import pyarrow as pa
import pytest
import torch
from _tokenizers import word_tokenizer
from sae_lens import TopKSAE, TopKSAEConfig
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, PreTrainedTokenizerFast

from interp_assets.engine.activations import _row_order, _used_ids, encode_texts, sparse_encode
from interp_assets.engine.reader import SAEReader, parse_hook_name

TEXTS = ["the cat sat on the mat", "a dog", "the cat and the dog sat on a mat together today", "mat cat"]


def _tokenizer() -> PreTrainedTokenizerFast:
    words = ["<pad>", "the", "cat", "sat", "on", "mat", "a", "dog", "and", "together", "today"]
    return word_tokenizer(words, unk="<pad>", pad_token="<pad>")


@pytest.fixture(scope="module", params=["gpt2", "bert"])
def parts(request):
    torch.manual_seed(0)
    if request.param == "gpt2":
        model = GPT2Model(GPT2Config(vocab_size=11, n_embd=32, n_layer=3, n_head=2, n_positions=64)).eval()
    else:
        config = BertConfig(
            vocab_size=11, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64
        )
        model = BertModel(config, add_pooling_layer=False).eval()
    rescale = request.param == "bert"
    sae = TopKSAE(
        TopKSAEConfig(
            d_in=32, d_sae=96, k=6, dtype="float32", device="cpu", rescale_acts_by_decoder_norm=rescale
        )
    )
    with torch.no_grad():
        sae.b_enc.normal_()
    return _tokenizer(), model, sae


def _reader(parts, hook: str, budget: int, activation_dtype: str = "float32") -> SAEReader:
    tok, model, sae = parts
    return SAEReader(
        tok,
        model,
        sae,
        parse_hook_name(hook),
        device="cpu",
        dtype="float32",
        max_length=32,
        token_budget=budget,
        exclude_special_tokens=True,
        chat_template=False,
        exclude_template_tokens=True,
        identity={},
        activation_dtype=activation_dtype,
    )


def _dense(encoded, doc: int, n_tokens: int, d_sae: int) -> np.ndarray:
    t = encoded.activations.to_pydict()
    out = np.zeros((n_tokens, d_sae), np.float32)
    for d, ti, f, v in zip(t["doc_index"], t["token_index"], t["feature"], t["activation"], strict=True):
        if d == doc:
            out[ti, f] = v
    return out


@pytest.mark.parametrize(
    ("hook", "hidden_index"), [("blocks.1.hook_resid_post", 2), ("blocks.1.hook_resid_pre", 1)]
)
@pytest.mark.parametrize("budget", [12, 1000])
def test_stored_activations_equal_saelens_encode(parts, hook, hidden_index, budget):
    tok, model, sae = parts
    encoded = encode_texts(_reader(parts, hook, budget), TEXTS)
    assert not encoded.errors
    for i, text in enumerate(TEXTS):
        ids = tok(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**ids, output_hidden_states=True).hidden_states[hidden_index][0]
            reference = sae.encode(hidden).numpy()
        ours = _dense(encoded, i, hidden.shape[0], 96)
        np.testing.assert_allclose(ours, reference, atol=1e-5)
        assert encoded.n_tokens[i] == hidden.shape[0]


def test_float16_storage_is_saelens_encode_rounded_to_half_precision(parts):
    tok, model, sae = parts
    encoded = encode_texts(_reader(parts, "blocks.1.hook_resid_post", 1000, "float16"), TEXTS)
    assert encoded.activations.schema.field("activation").type == pa.float16()
    for i, text in enumerate(TEXTS):
        ids = tok(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**ids, output_hidden_states=True).hidden_states[2][0]
            reference = sae.encode(hidden).numpy()
        ours = _dense(encoded, i, hidden.shape[0], 96)
        # the same nonzeros, each value the nearest float16 (relative error <= 2**-11)
        assert np.array_equal(ours != 0, reference != 0)
        np.testing.assert_allclose(ours, reference, rtol=2**-11, atol=0)


def test_float16_overflow_is_rejected_with_its_reason_never_stored_as_inf(parts):
    tok, model, sae = parts
    loud = TopKSAE(TopKSAEConfig(d_in=32, d_sae=96, k=6, dtype="float32", device="cpu"))
    with torch.no_grad():
        loud.load_state_dict(sae.state_dict())
        loud.W_enc[:, 7] = 0.0
        loud.b_enc[7] = 1e6  # feature 7 fires at 1e6 on every token: beyond float16
    reader = _reader((tok, model, loud), "blocks.1.hook_resid_post", 1000, "float16")
    encoded = encode_texts(reader, TEXTS)
    assert set(encoded.errors) == set(range(len(TEXTS)))
    assert "float16 storage range" in encoded.errors[0] and "activation_dtype='float32'" in encoded.errors[0]
    assert encoded.activations.num_rows == 0
    exact = encode_texts(_reader((tok, model, loud), "blocks.1.hook_resid_post", 1000, "float32"), TEXTS)
    assert not exact.errors


def test_batch_order_and_padding_change_nothing(parts):
    hook = "blocks.2.hook_resid_post"
    a = encode_texts(_reader(parts, hook, 8), TEXTS).activations.to_pydict()
    b = encode_texts(_reader(parts, hook, 10_000), list(reversed(TEXTS))).activations.to_pydict()
    n = len(TEXTS)
    rows_a = sorted(zip(a["doc_index"], a["token_index"], a["feature"], a["activation"], strict=True))
    rows_b = sorted(
        zip([n - 1 - d for d in b["doc_index"]], b["token_index"], b["feature"], b["activation"], strict=True)
    )
    # the same nonzeros; values agree to float16 storage (batch shapes change float32 rounding in the
    # last bits, which can move a value to the neighbouring float16)
    assert [r[:3] for r in rows_a] == [r[:3] for r in rows_b]
    np.testing.assert_allclose([r[3] for r in rows_a], [r[3] for r in rows_b], rtol=2**-10, atol=0)


def _plan_cost(lengths: list[int], batches: list[list[int]], batch_cost: int) -> int:
    return sum(batch_cost + max(lengths[i] for i in b) * len(b) for b in batches)


def test_plan_batches_respect_budget_cover_every_document_and_keep_padding_low():
    from interp_assets.engine.activations import plan_batches

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 120, 500).tolist()
    batches = plan_batches(lengths, token_budget=2048, batch_cost_tokens=256)
    assert sorted(i for b in batches for i in b) == list(range(500))
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert padded <= 1.1 * sum(lengths)
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 2048
    # the same documents alone or inside a larger set: about the same padding per real token
    small = [lengths[i] for i in range(50)]
    alone = plan_batches(small, token_budget=16384)
    assert sum(max(small[i] for i in b) * len(b) for b in alone) <= 1.25 * sum(small)
    # a document longer than the budget gets a batch of its own
    assert plan_batches([5, 5, 100_000], token_budget=16384) == [[0, 1], [2]]


def test_plan_batches_is_optimal_against_brute_force():
    from interp_assets.engine.activations import plan_batches

    rng = np.random.default_rng(1)
    for _ in range(30):
        lengths = sorted(rng.integers(1, 40, int(rng.integers(1, 9))).tolist())
        budget, cost = int(rng.integers(40, 160)), int(rng.integers(0, 60))
        n = len(lengths)
        best = None
        for mask in range(1 << (n - 1)):  # every split of the sorted documents into consecutive batches
            batches, current = [], [0]
            for i in range(1, n):
                if mask >> (i - 1) & 1:
                    batches.append(current)
                    current = []
                current.append(i)
            batches.append(current)
            if all(len(b) == 1 or lengths[b[-1]] * len(b) <= budget for b in batches):
                value = _plan_cost(lengths, batches, cost)
                best = value if best is None else min(best, value)
        planned = plan_batches(lengths, token_budget=budget, batch_cost_tokens=cost)
        assert _plan_cost(lengths, planned, cost) == best


def test_row_order_and_used_ids_equal_their_numpy_definitions():
    rng = np.random.default_rng(0)
    for n_docs, n_feat in [(50, 96), (2**40, 2**20)]:  # the second overflows one int64 key: lexsort
        doc = rng.integers(0, n_docs, 5000).astype(np.int64)
        tok = rng.integers(0, 40, 5000).astype(np.int32)
        feat = rng.integers(0, n_feat, 5000).astype(np.int32)
        triples = np.unique(np.stack([doc, tok, feat]), axis=1)  # unique keys, as the engine's rows are
        doc, tok, feat = triples[0], triples[1].astype(np.int32), triples[2].astype(np.int32)
        shuffled = rng.permutation(len(doc))
        doc, tok, feat = doc[shuffled], tok[shuffled], feat[shuffled]
        np.testing.assert_array_equal(_row_order(doc, tok, feat), np.lexsort((feat, tok, doc)))
    assert len(_row_order(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32))) == 0
    ids = rng.integers(0, 300, 2000)
    for vocab_size in (300, 100):  # 100: ids beyond the vocabulary fall back to np.unique
        uniq, inverse = _used_ids(ids, vocab_size)
        expected_uniq, expected_inverse = np.unique(ids, return_inverse=True)
        np.testing.assert_array_equal(uniq, expected_uniq)
        np.testing.assert_array_equal(inverse, expected_inverse)


def test_sparse_encode_works_with_grad_on_and_sees_weights_edited_between_calls(parts):
    _, _, sae = parts
    x = torch.randn(20, 32)
    with torch.no_grad():
        dense = sae.encode(x)
    rows, feats, vals = sparse_encode(sae, x)  # grad mode on: SAE weights require grad
    rebuilt = torch.zeros_like(dense)
    rebuilt[rows, feats] = vals.detach()
    torch.testing.assert_close(rebuilt, dense)
    saved = {name: p.detach().clone() for name, p in sae.named_parameters()}
    with torch.no_grad():
        sae.W_dec.data.mul_(2.0)  # through .data: no version bump; a cached fold would go stale
        sae.b_enc.data.add_(0.5)
        edited = sae.encode(x)
        rows, feats, vals = sparse_encode(sae, x)
        sae.load_state_dict(saved, strict=False)  # the module-scoped fixture serves later tests
    rebuilt = torch.zeros_like(edited)
    rebuilt[rows, feats] = vals
    torch.testing.assert_close(rebuilt, edited)
