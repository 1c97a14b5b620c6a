"""chat_role: a chat-template reader reads documents as the user's turn or as the assistant's."""

from types import SimpleNamespace

import pytest
from _tokenizers import word_tokenizer
from transformers import PreTrainedTokenizerFast

from interp_assets.engine.activations import tokenize_documents
from interp_assets.engine.reader import reader_identity

ROLE_TOKENS = ["<|user|>", "<|assistant|>", "<|end|>"]


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = word_tokenizer(["<unk>", *ROLE_TOKENS, "hello", "world"], unk="<unk>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ROLE_TOKENS})
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|>{% endfor %}"
    return tok


def _read(role: str) -> tuple[list[str], list[bool]]:
    tok = _tokenizer()
    reader = SimpleNamespace(
        tokenizer=tok,
        chat_template=True,
        chat_role=role,
        max_length=64,
        exclude_special_tokens=True,
        exclude_template_tokens=True,
    )
    (doc,) = tokenize_documents(reader, ["hello world"])
    return tok.convert_ids_to_tokens(doc.input_ids), doc.keep


def test_user_role_reads_the_document_as_the_user_turn() -> None:
    tokens, keep = _read("user")
    assert tokens == ["<|user|>", "hello", "world", "<|end|>"]
    assert [t for t, k in zip(tokens, keep, strict=True) if k] == ["hello", "world"]


def test_assistant_role_reads_the_document_as_the_answer_to_a_blank_user_turn() -> None:
    tokens, keep = _read("assistant")
    assert tokens == ["<|user|>", "<|end|>", "<|assistant|>", "hello", "world", "<|end|>"]
    assert [t for t, k in zip(tokens, keep, strict=True) if k] == ["hello", "world"]  # template never pooled


def test_chat_role_is_part_of_the_fingerprint_and_checked() -> None:
    assert reader_identity(chat_role="user").fingerprint != reader_identity(chat_role="assistant").fingerprint
    with pytest.raises(ValueError, match="chat_role must be one of"):
        reader_identity(chat_role="system")
    with pytest.raises(ValueError, match="activation_dtype must be"):  # checked before any file is read
        reader_identity(activation_dtype="int8")
