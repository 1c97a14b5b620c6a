"""The fused BERT forward against the Hugging Face forward it replaces
(interp_assets/engine/bert_forward.py)."""

from types import SimpleNamespace

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

from interp_assets.engine.activations import _batch_arrays, _bert_forward, _capture_hidden, tokenize_documents
from interp_assets.engine.allocator import Workspace
from interp_assets.engine.bert_forward import BertForward, supports_bert_forward
from interp_assets.engine.reader import HookPoint, find_layer_module
from interp_assets.engine.reader_model import EMBEDDED_READER, load_reader_model

SHORT = ["a fine, quiet film.", "bad", "the plot holds together until the last act, then it falls apart."]
# over 32 tokens: attention runs through scaled_dot_product_attention instead of the batched matmuls
LONG = [" ".join(["an unexpectedly moving portrait of a family that keeps its secrets"] * 4)]


def _hooked(model, hook: HookPoint, ids, mask):
    """The hooked hidden states of the Hugging Face forward, as the generic engine path captures them."""
    reader = SimpleNamespace(model=model, hook=hook, layer_module=find_layer_module(model, hook.layer))
    return _capture_hidden(reader, ids, mask)


def _batch(tokenizer, texts, exclude_special: bool = True):
    reader = SimpleNamespace(
        tokenizer=tokenizer, max_length=128, chat_template=False, exclude_special_tokens=exclude_special
    )
    ids, mask, keep = _batch_arrays(tokenize_documents(reader, texts), tokenizer.pad_token_id)
    return torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(keep)


@pytest.fixture(scope="module")
def minilm():
    return load_reader_model(EMBEDDED_READER)


@pytest.mark.parametrize("texts", [SHORT, SHORT + LONG], ids=["short", "long"])
@pytest.mark.parametrize(
    "hook", [HookPoint(0, "pre"), HookPoint(3, "pre"), HookPoint(3, "post"), HookPoint(5, "post")], ids=str
)
def test_equals_the_hooked_hugging_face_forward_on_the_embedded_reader(minilm, hook, texts):
    tokenizer, model = minilm
    ids, mask, keep = _batch(tokenizer, texts)
    expected = _hooked(model, hook, ids, mask)[keep]
    ours = BertForward(model, hook.layer, hook.position)(ids, mask, keep, Workspace())
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-5)


def test_special_tokens_kept_and_workspace_reused_across_batch_shapes(minilm):
    tokenizer, model = minilm
    forward, workspace = BertForward(model, 2, "post"), Workspace()
    for texts in (SHORT + LONG, SHORT[:1], LONG + SHORT):  # buffers grow, then are reused smaller
        ids, mask, keep = _batch(tokenizer, texts, exclude_special=False)
        assert bool((keep == mask.bool()).all())
        expected = _hooked(model, HookPoint(2, "post"), ids, mask)[keep]
        torch.testing.assert_close(forward(ids, mask, keep, workspace), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_random_bert_with_either_activation(activation):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        hidden_act=activation,
    )
    model = BertModel(config).eval()
    ids = torch.randint(1, 50, (3, 40))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 33:] = 0
    ids[mask == 0] = 0
    keep = mask.bool().clone()
    keep[:, 0] = False
    for length in (40, 20):  # SDPA and batched-matmul attention
        i, m, k = ids[:, :length], mask[:, :length], keep[:, :length]
        expected = _hooked(model, HookPoint(1, "post"), i, m)[k]
        ours = BertForward(model, 1, "post")(i, m, k, Workspace())
        torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-5)


def test_only_plain_bert_encoders_take_the_fused_path():
    assert not supports_bert_forward(GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2)))
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    assert supports_bert_forward(BertModel(BertConfig(**small)).eval())
    assert not supports_bert_forward(BertModel(BertConfig(**small)).train())  # HF applies dropout
    assert not supports_bert_forward(BertModel(BertConfig(**small, hidden_act="gelu_new")).eval())
    assert not supports_bert_forward(BertModel(BertConfig(**small, is_decoder=True)).eval())
    with pytest.raises(ValueError, match="not a plain BertModel"):
        BertForward(GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2)), 0, "post")
    with pytest.raises(ValueError, match="Layer 4 does not exist"):
        BertForward(BertModel(BertConfig(**small)).eval(), 4, "post")


def test_the_engine_uses_it_for_the_embedded_reader(minilm):
    tokenizer, model = minilm
    reader = SimpleNamespace(model=model, hook=HookPoint(3, "post"))
    assert isinstance(_bert_forward(reader, Workspace()), BertForward)
    reader = SimpleNamespace(
        model=GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2)), hook=HookPoint(0, "post")
    )
    assert _bert_forward(reader, Workspace()) is None


def test_each_run_sees_the_weights_and_hook_as_they_are_then():
    torch.manual_seed(0)
    small = {"vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    model, other = BertModel(BertConfig(**small)).eval(), BertModel(BertConfig(**small)).eval()
    reader = SimpleNamespace(model=model, hook=HookPoint(1, "post"))
    ids, mask = torch.randint(1, 50, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    keep = mask.bool()
    first = _bert_forward(reader, Workspace())(ids, mask, keep, Workspace())
    model.load_state_dict(other.state_dict())  # in place: the parameters keep their storage
    reader.hook = HookPoint(0, "post")
    second = _bert_forward(reader, Workspace())(ids, mask, keep, Workspace())
    expected = _hooked(model, HookPoint(0, "post"), ids, mask)[keep]
    torch.testing.assert_close(second, expected, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_is_as_accurate_as_the_hooked_forward(minilm, dtype):
    """In half precision the two forwards round in different places, and how far apart that leaves them
    depends on the CPU's kernels (bfloat16 on one host: 6% of values beyond torch's default tolerance,
    on another none). What must hold everywhere: ours is as close to the float32 forward as the Hugging
    Face forward in the same dtype is (root-mean-square error relative to the float32 values' scale;
    measured: bfloat16 0.0084 against 0.0085, float16 0.0011 both; a forward one layer off is at 0.49)."""
    tokenizer, model = load_reader_model(EMBEDDED_READER, dtype=dtype)
    ids, mask, keep = _batch(tokenizer, SHORT + LONG)
    hook = HookPoint(3, "post")
    reference = _hooked(minilm[1], hook, ids, mask)[keep]
    expected = _hooked(model, hook, ids, mask)[keep]
    ours = BertForward(model, hook.layer, hook.position)(ids, mask, keep, Workspace())
    assert ours.dtype == expected.dtype == getattr(torch, dtype)
    assert ours.shape == reference.shape

    def error(values: torch.Tensor) -> float:
        return float((values.float() - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt())

    assert error(expected) < 0.02  # the dtype's own rounding, far below a wrong layer's 0.49
    assert error(ours) <= 1.25 * error(expected) + 1e-4


@pytest.mark.parametrize("hook", [HookPoint(0, "pre"), HookPoint(3, "post"), HookPoint(5, "post")], ids=str)
def test_document_embeddings_from_the_same_pass(minilm, hook):
    """The pass gives each document's mean hidden state at the hook and, carried on through the last block,
    at the last layer (the Hugging Face forward's, to rounding), and leaves the hooked hidden states exactly
    as they were."""
    tokenizer, model = minilm
    ids, mask, keep = _batch(tokenizer, SHORT + LONG)
    alone = BertForward(model, hook.layer, hook.position)(ids, mask, keep, Workspace())
    both = BertForward(model, hook.layer, hook.position, through_last=True)
    hooked, at_hook, last = both.with_document_embeddings(ids, mask, keep, Workspace())
    assert torch.equal(hooked, alone)
    with torch.inference_mode():
        states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    weights = mask.unsqueeze(-1).float()
    index = hook.layer + (1 if hook.position == "post" else 0)
    for pooled, hidden in ((at_hook, states[index]), (last, states[-1])):
        assert pooled.shape == (len(SHORT) + 1, model.config.hidden_size)
        torch.testing.assert_close(pooled, (hidden * weights).sum(1) / weights.sum(1), atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="through_last"):
        BertForward(model, 3, "post").with_document_embeddings(ids, mask, keep, Workspace())
