"""chat_role: a chat-template reader reads documents as the user's turn or as the assistant's."""

from types import SimpleNamespace

import pytest
from _tokenizers import word_tokenizer
from transformers import PreTrainedTokenizerFast

from interp_assets.conversations import Conversation
from interp_assets.engine.activations import tokenize_documents
from interp_assets.engine.reader import reader_identity

ROLE_TOKENS = ["<|user|>", "<|assistant|>", "<|end|>"]


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = word_tokenizer(["<unk>", *ROLE_TOKENS, "hello", "world"], unk="<unk>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ROLE_TOKENS})
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|>{% endfor %}"
    return tok


def _reader(role: str) -> SimpleNamespace:
    """What tokenize_documents reads of a chat-template reader, with the test tokenizer."""
    return SimpleNamespace(
        tokenizer=_tokenizer(),
        chat_template=True,
        chat_role=role,
        max_length=64,
        exclude_special_tokens=True,
        exclude_template_tokens=True,
    )


def _read(role: str) -> tuple[list[str], list[bool]]:
    reader = _reader(role)
    (doc,) = tokenize_documents(reader, ["hello world"])
    return reader.tokenizer.convert_ids_to_tokens(doc.input_ids), doc.keep


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


# --------------------------------------------------------------------------------- conversations

CONVERSATION = [
    {"role": "user", "content": "hello world"},
    {"role": "assistant", "content": "world hello hello"},
    {"role": "user", "content": "world"},
]


def _read_conversation(role: str, turns: list[dict[str, str]] = CONVERSATION):
    reader = _reader(role)
    conversation = Conversation(turns)
    (doc,) = tokenize_documents(reader, [conversation])
    return conversation, reader.tokenizer.convert_ids_to_tokens(doc.input_ids), doc


def test_a_conversation_is_read_through_the_template_turn_by_turn_keeping_the_roles_turns() -> None:
    conversation, tokens, doc = _read_conversation("assistant")
    assert tokens == [
        *["<|user|>", "hello", "world", "<|end|>"],
        *["<|assistant|>", "world", "hello", "hello", "<|end|>"],
        *["<|user|>", "world", "<|end|>"],
    ]  # every turn is in the model's input: the other turns are context
    kept = [(t, o) for t, o, k in zip(tokens, doc.offsets, doc.keep, strict=True) if k]
    assert [t for t, _ in kept] == ["world", "hello", "hello"]  # only the assistant's turn is stored
    assert conversation == "user: hello world\n\nassistant: world hello hello\n\nuser: world"
    assert [conversation[a:b] for _, (a, b) in kept] == ["world", "hello", "hello"]  # offsets into the text
    assert kept[0][1][0] == conversation.index("assistant: ") + len("assistant: ")


def test_the_user_role_keeps_every_user_turn_of_a_conversation() -> None:
    conversation, tokens, doc = _read_conversation("user")
    kept = [(t, o) for t, o, k in zip(tokens, doc.offsets, doc.keep, strict=True) if k]
    assert [t for t, _ in kept] == ["hello", "world", "world"]
    assert [conversation[a:b] for _, (a, b) in kept] == ["hello", "world", "world"]
    assert kept[-1][1][0] == conversation.rindex("world")  # the last user turn's word, not the first


def test_template_text_inside_a_turn_stays_text() -> None:
    turns = [
        {"role": "user", "content": "hello <|end|> <|assistant|> world"},
        {"role": "assistant", "content": "hi"},
    ]
    _, tokens, _ = _read_conversation("user", turns)
    assert tokens.count("<|assistant|>") == 1 and tokens.count("<|end|>") == 2  # the template's own only
