"""Documents that are conversations: a list of turns `{"role", "content"}` instead of one text.

A drop's text column may hold a conversation (a JSON array in JSONL / JSON, a list of structs in Parquet).
raw_documents then stores its transcript as `text` (each turn as `<role>: <content>`, turns separated by a
blank line) and the turns themselves, normalized, as JSON in the `messages` column. A chat-template reader
reads the whole conversation through its template and stores the tokens of the `chat_role` turns
(offsets into the transcript); the other turns are context, read but never stored or pooled. Other
readers read the transcript as text.

Pure functions; `Conversation` is a `str` (the transcript) that carries its turns, so every path that
takes document texts takes conversations unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
MESSAGES = "messages"  # the raw_documents column holding a conversation's turns
TURN_SEPARATOR = "\n\n"


def conversation_problem(value: Any) -> str | None:
    """Why `value` is not a conversation (a non-empty list of `{"role", "content"}` objects with a known
    role and string content, some content not blank), or None when it is one."""
    if not isinstance(value, list) or not value:
        return "a conversation must be a non-empty list of {'role', 'content'} objects"
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            return f"turn {i} is not an object with 'role' and 'content'"
        extra = sorted(set(turn) - {"role", "content"})
        if extra:
            return f"turn {i} has fields other than 'role' and 'content': {extra}"
        if turn["role"] not in ROLES:
            return f"turn {i} has role {turn['role']!r}; use one of {list(ROLES)}"
        if not isinstance(turn["content"], str):
            return f"turn {i} has content that is not a string"
    if not any(turn["content"].strip() for turn in value):
        return "every turn of the conversation is empty"
    return None


def render_transcript(messages: Sequence[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The transcript of `messages` (`<role>: <content>` per turn, blank lines between) and each turn's
    content span `(start, end)` in it."""
    parts, spans, at = [], [], 0
    for i, turn in enumerate(messages):
        if i:
            parts.append(TURN_SEPARATOR)
            at += len(TURN_SEPARATOR)
        head = f"{turn['role']}: "
        parts.append(head + turn["content"])
        spans.append((at + len(head), at + len(head) + len(turn["content"])))
        at += len(head) + len(turn["content"])
    return "".join(parts), spans


class Conversation(str):
    """A conversation document: the string is its transcript; `messages` its turns, `spans` where each
    turn's content lies in the transcript."""

    messages: tuple[dict[str, str], ...]
    spans: tuple[tuple[int, int], ...]

    def __new__(cls, messages: Sequence[dict[str, str]]) -> Conversation:
        problem = conversation_problem(list(messages))
        if problem:
            raise ValueError(f"not a conversation: {problem}")
        turns = tuple({"role": m["role"], "content": m["content"]} for m in messages)
        text, spans = render_transcript(turns)
        obj = super().__new__(cls, text)
        obj.messages, obj.spans = turns, tuple(spans)
        return obj

    @classmethod
    def from_json(cls, payload: str) -> Conversation:
        """The conversation stored as `messages_json`."""
        return cls(json.loads(payload))

    def messages_json(self) -> str:
        """The turns as canonical JSON (the `raw_documents.messages` value)."""
        return json.dumps(list(self.messages), ensure_ascii=False, separators=(",", ":"))

    def content_hash(self) -> str:
        """The document's content identity: a hash of its turns (two conversations with one transcript,
        such as a user turn that quotes "assistant: ...", stay distinct)."""
        payload = ("conversation:" + self.messages_json()).encode("utf-8")
        return hashlib.blake2b(payload, digest_size=16).hexdigest()


def reader_columns(columns: Sequence[str]) -> list[str]:
    """The raw_documents columns a reader needs, of those in `columns`: doc_hash, text, and `MESSAGES`
    when the dataset holds conversations."""
    return ["doc_hash", "text", *([MESSAGES] if MESSAGES in columns else [])]


def document_inputs(documents: Any) -> list[str]:
    """What the reader reads for each row of `documents` (a frame with `reader_columns`): its text, or its
    `Conversation` where the `MESSAGES` column holds one."""
    texts = documents["text"].to_list()
    if MESSAGES not in documents.columns:
        return texts
    messages = documents[MESSAGES].to_list()
    return [Conversation.from_json(m) if m else t for t, m in zip(texts, messages, strict=True)]
