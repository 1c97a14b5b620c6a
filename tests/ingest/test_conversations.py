"""Conversations as documents: a text column holding a list of turns is stored as its transcript plus the
normalized turns (`messages`), bad conversations are rejected row by row, and the turns reach the reader
through the activation cache and the token_activations asset."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance, materialize

from interp_assets.conversations import Conversation, render_transcript
from interp_assets.defs.assets import ALL_ASSETS
from interp_assets.engine.activation_cache import ActivationCache
from interp_assets.ingest import read_drop
from interp_assets.storage.parquet import read_table
from resources.local import local_resources

CHAT = [
    {"role": "user", "content": "Where is my order?"},
    {"role": "assistant", "content": "It ships today."},
]
# one user turn whose text quotes an assistant turn: the same transcript as CHAT, another conversation
QUOTING = [{"role": "user", "content": "Where is my order?\n\nassistant: It ships today."}]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_conversation_is_stored_as_its_transcript_and_its_turns(tmp_path: Path) -> None:
    rows = [
        {"text": CHAT, "ticket": 7},
        {"text": "a plain document", "ticket": 8},
        {"text": [{"role": "robot", "content": "beep"}], "ticket": 9},
        {"text": [{"role": "user", "content": "   "}], "ticket": 10},
        {"text": [{"role": "user", "content": 5}], "ticket": 11},
        {"text": QUOTING, "ticket": 12},
    ]
    result = read_drop(_jsonl(tmp_path / "chats.jsonl", rows), "chats")
    docs = pl.from_arrow(result.documents)
    assert docs["ticket"].to_list() == [7, 8, 12]  # the bad conversations never drop the good rows
    assert docs["text"][0] == "user: Where is my order?\n\nassistant: It ships today." == docs["text"][2]
    assert json.loads(docs["messages"][0]) == CHAT and docs["messages"][1] is None
    assert docs["doc_hash"][0] != docs["doc_hash"][2]  # one transcript, two conversations
    problems = pl.from_arrow(result.rejects)["problem"].to_list()
    assert "line 3: text column 'text' is not a conversation: turn 0 has role 'robot'" in problems[0]
    assert "every turn of the conversation is empty" in problems[1]
    assert "turn 0 has content that is not a string" in problems[2]


def test_parquet_conversations_and_a_metadata_column_named_messages(tmp_path: Path) -> None:
    turn = pa.struct([("role", pa.string()), ("content", pa.string())])
    table = pa.table(
        {"chat": pa.array([CHAT, CHAT[:1]], pa.list_(turn)), "messages": pa.array([3, 4], pa.int64())}
    )
    pq.write_table(table, tmp_path / "chats.parquet")
    docs = pl.from_arrow(read_drop(tmp_path / "chats.parquet", "chats", text_column="chat").documents)
    assert [json.loads(m) for m in docs["messages"]] == [CHAT, CHAT[:1]]
    assert docs["meta_messages"].to_list() == [3, 4]  # the user's own column keeps its values, renamed


def test_render_transcript_spans_are_each_turns_content() -> None:
    text, spans = render_transcript(CHAT)
    assert [text[a:b] for a, b in spans] == [t["content"] for t in CHAT]
    assert Conversation.from_json(Conversation(CHAT).messages_json()) == Conversation(CHAT)


def test_the_activation_cache_hands_the_reader_conversations(tmp_path: Path) -> None:
    docs = pl.DataFrame(
        {
            "doc_hash": ["a", "b"],
            "text": [str(Conversation(CHAT)), "plain"],
            "messages": [Conversation(CHAT).messages_json(), None],
        }
    )
    seen = []

    class Captured(Exception):
        pass

    def encode(texts):
        seen.extend(texts)
        raise Captured  # what the reader would get is all this test needs

    with pytest.raises(Captured):
        ActivationCache(tmp_path, "fingerprint").encode_missing(encode, docs)
    assert isinstance(seen[0], Conversation) and seen[0].messages == tuple(CHAT)
    assert seen[1] == "plain" and not isinstance(seen[1], Conversation)


def test_conversations_through_the_assets_on_the_embedded_reader(tmp_path: Path) -> None:
    (tmp_path / "landing").mkdir()
    rows = [{"text": CHAT}, {"text": QUOTING}, {"text": "Where is my order? It ships today."}]
    _jsonl(tmp_path / "landing" / "chats.jsonl", rows)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("datasets", ["chats"])
    by_name = {k.to_user_string(): a for a in ALL_ASSETS for k in a.keys}
    assets = [by_name[n] for n in ("raw_documents", "token_activations", "pooled_embeddings")]
    resources = local_resources(tmp_path)
    assert materialize(assets, partition_key="chats", instance=instance, resources=resources).success
    base = str(tmp_path / "parquet")
    texts = read_table(base, "raw_documents", "chats").collect()["text"].to_list()
    tokens = read_table(base, "tokens", "chats").collect()
    status = read_table(base, "activation_status", "chats").collect()
    assert (status["status"] == "encoded").all() and status.height == 3
    # a reader without a chat template reads the transcript as text: offsets index the stored text
    spans = tokens.select("doc_id", "char_start", "char_end", "token").unique()
    for doc_id, start, end, token in spans.iter_rows():
        assert texts[doc_id][start:end].lower().replace(" ", "") == token.removeprefix("##")
