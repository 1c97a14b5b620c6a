"""document_embeddings: the fused BERT forward gives the Hugging Face forward's mean-pooled states."""

import numpy as np
import pytest
import torch

from interp_assets.engine import documents
from interp_assets.engine.documents import document_embeddings
from interp_assets.engine.reader_model import EMBEDDED_READER, shared_reader_model

TEXTS = [
    "A village in the administrative district of Gmina Wola.",
    "ok",
    "The album was released in 1999 by the band, and it reached the top ten in three countries within "
    "a month of its release, which surprised everyone including the band itself.",
    "",
]


def _reference(texts: list[str], layer: int | None, normalize: bool) -> np.ndarray:
    """The plain Hugging Face forward: hidden states of `layer`, mean over the attention mask."""
    tokenizer, net = shared_reader_model(EMBEDDED_READER)
    with torch.inference_mode():
        enc = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = net(**enc, output_hidden_states=True).hidden_states[-1 if layer is None else layer]
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=1)
    return pooled.numpy()


@pytest.mark.parametrize(
    ("layer", "normalize"), [(None, True), (-1, True), (3, False), (0, True), (-3, True)]
)
def test_fused_forward_equals_the_hugging_face_forward(layer: int | None, normalize: bool) -> None:
    got = document_embeddings(TEXTS, layer=layer, normalize=normalize, batch_size=2)
    np.testing.assert_allclose(got, _reference(TEXTS, layer, normalize), atol=2e-5, rtol=1e-4)


def test_fused_forward_is_used_for_the_embedded_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    _, net = shared_reader_model(EMBEDDED_READER)
    assert documents._fused_forward(net, 6, 6) is not None
    calls = []
    original = documents._fused_forward
    monkeypatch.setattr(documents, "_fused_forward", lambda *a: calls.append(a) or original(*a))
    document_embeddings(TEXTS[:1])
    assert calls and calls[0][1:] == (6, 6)


def test_layer_out_of_range_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="outside the model's hidden states"):
        document_embeddings(TEXTS, layer=7)


def test_the_reader_and_document_embeddings_share_one_model_and_other_precisions_run() -> None:
    from interp_assets.engine.reader import load_reader

    reader = load_reader(device="cpu")
    assert (
        reader.model
        is shared_reader_model(EMBEDDED_READER)[1]
        is shared_reader_model(EMBEDDED_READER, "cpu")[1]
    )
    half = document_embeddings(TEXTS, dtype="bfloat16")
    assert shared_reader_model(EMBEDDED_READER, "cpu", "bfloat16")[1] is not reader.model
    assert (
        next(shared_reader_model(EMBEDDED_READER, "cpu", "bfloat16")[1].parameters()).dtype == torch.bfloat16
    )
    full = document_embeddings(TEXTS)
    cosine = (half * full).sum(axis=1)  # both unit length
    assert half.dtype == np.float32 and np.all(cosine > 0.98) and not np.array_equal(half, full)


def test_passes_on_a_shared_model_wait_for_each_other() -> None:
    """The reader's hooks and the causal edits' stand-in blocks live on the model that document embeddings
    also run: a pass from another thread waits until the holder of the model's lock is done."""
    import threading

    from interp_assets.engine.reader import load_reader
    from interp_assets.engine.reader_model import model_lock

    reader = load_reader(device="cpu")
    assert reader.forward_lock is model_lock(shared_reader_model(EMBEDDED_READER)[1])
    done = threading.Event()
    worker = threading.Thread(target=lambda: (document_embeddings(TEXTS[:1]), done.set()))
    with reader.forward_lock, reader.forward_lock:  # re-entrant: a step may run passes of its own
        worker.start()
        assert not done.wait(0.5)  # document_embeddings waits for the lock
    worker.join(timeout=60)
    assert done.is_set()


def test_the_token_pass_embeds_documents_as_document_embeddings_does() -> None:
    """encode_texts asked for document embeddings gives the same activations, bit for bit, and each text's
    document embeddings at the SAE's hook and at the last layer as document_embeddings' own pass does (to
    rounding); a text longer than the embedding's max_length is left to that pass."""
    from types import SimpleNamespace

    from transformers import GPT2Config, GPT2Model

    from interp_assets.engine.activations import embeds_documents, encode_texts
    from interp_assets.engine.reader import load_reader

    reader = load_reader()
    texts = [*TEXTS, "word " * 300]
    plain = encode_texts(reader, texts)
    both = encode_texts(reader, texts, document_embedding_max_length=256)
    assert both.activations.equals(plain.activations)
    assert not plain.document_embeddings and set(both.document_embeddings) == {4, None}  # blocks.3 post
    for layer, made in both.document_embeddings.items():
        assert sorted(made) == list(range(len(TEXTS)))
        got = np.stack([made[i] for i in range(len(TEXTS))])
        np.testing.assert_allclose(got, document_embeddings(TEXTS, layer=layer), atol=1e-6)
    assert embeds_documents(reader)
    # a pass that reads a text otherwise than the document embedding does (a chat template, an added BOS,
    # a model without the fused forward) gives none
    net = reader.model
    assert not embeds_documents(SimpleNamespace(model=net, chat_template=True, prepend_bos=False))
    assert not embeds_documents(SimpleNamespace(model=net, chat_template=False, prepend_bos=True))
    gpt2 = GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    assert not embeds_documents(SimpleNamespace(model=gpt2, chat_template=False, prepend_bos=False))
