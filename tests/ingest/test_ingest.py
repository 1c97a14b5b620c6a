"""Tests for landing-folder ingestion: real files written to tmp_path, plus the shared SST-2 data."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from interp_assets.ingest import (
    REJECTS_SCHEMA,
    Drop,
    DropError,
    DropReadResult,
    clash_error,
    dataset_name_from_path,
    doc_hash,
    drop_fingerprint,
    list_drops,
    read_drop,
    scan_drops,
)
from interp_assets.storage.paths import check_storage_key

SHARED_DATA = Path(__file__).parents[3] / "shared" / "data"
BASE_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()),
        ("doc_id", pa.int32()),
        ("doc_hash", pa.string()),
        ("text", pa.string()),
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
    ]
)


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_bytes(content.encode("utf-8"))
    else:
        path.write_bytes(content)
    return path


def rejects_of(result: DropReadResult) -> list[tuple[str, int, str]]:
    table = result.rejects
    return list(
        zip(
            table["source_file"].to_pylist(),
            table["source_row"].to_pylist(),
            table["problem"].to_pylist(),
            strict=True,
        )
    )


def assert_base_schema(result: DropReadResult, dataset: str) -> None:
    docs = result.documents
    assert docs.schema.names[:6] == BASE_SCHEMA.names
    for name in BASE_SCHEMA.names:
        assert docs.schema.field(name).type == BASE_SCHEMA.field(name).type, name
    assert docs["doc_id"].to_pylist() == list(range(docs.num_rows))
    assert set(docs["dataset"].to_pylist()) <= {dataset}
    for text, digest in zip(docs["text"].to_pylist(), docs["doc_hash"].to_pylist(), strict=True):
        assert digest == hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()
    assert result.rejects.schema == REJECTS_SCHEMA


# ---- dataset names ------------------------------------------------------------------------------

HOSTILE = [
    "../../etc/passwd.csv",
    "a'b;drop table x.csv",
    "my reviews 2024.csv",
    "My_Reviews_2024.csv",
    "données été.jsonl",
    "donnees ete.jsonl",
    "x" * 500 + ".csv",
    "x" * 499 + "y.csv",
    "数据.csv",
    "データ.csv",
    "...csv",
    "a..b.csv",
    "-leading-dash-.csv",
    ".csv",
    "ＡＢＣ.csv",
    "tab\there.tsv",
    "null\x00byte.csv",
    "$(rm -rf ~).json",
]


def test_dataset_names_are_safe_and_distinct() -> None:
    names = [dataset_name_from_path(n) for n in HOSTILE]
    for raw, name in zip(HOSTILE, names, strict=True):
        assert check_storage_key(name) == name, raw
        assert len(name) <= 60 and ".." not in name and "/" not in name, (raw, name)
    assert len(set(names)) == len(names), names


def test_dataset_names_readable_when_possible() -> None:
    assert dataset_name_from_path("reviews.csv") == "reviews"
    assert dataset_name_from_path("/landing/support_tickets.v2.parquet") == "support_tickets.v2"
    assert dataset_name_from_path("../../etc/passwd.csv") == "passwd"  # only the base name counts
    accented = dataset_name_from_path("données été.jsonl")
    assert accented.startswith("donnees_ete-") and len(accented) == len("donnees_ete-") + 8
    assert dataset_name_from_path("Reviews.csv").startswith("reviews-")  # changed -> hashed
    assert dataset_name_from_path("数据.csv").startswith("dataset-")
    assert dataset_name_from_path("reviews.CSV") == "reviews"
    assert dataset_name_from_path("notes.txt") == "notes.txt"  # not a supported extension: a folder name


def test_dataset_name_of_folder(tmp_path: Path) -> None:
    folder = tmp_path / "chats.json"
    folder.mkdir()
    assert dataset_name_from_path(folder) == "chats.json"


# ---- formats round-trip ---------------------------------------------------------------------------


def test_csv_round_trip_with_typed_metadata(tmp_path: Path) -> None:
    path = write(
        tmp_path / "tickets.csv",
        "ticket,text,csat,escalated,score,zip,note,doc_id\n"
        'T1,"Printer on fire,\nplease help",5,true,0.5,02139,,7\n'
        'T2,"She said ""hi"" to me",3,False,1e3,10001,urgent,8\n'
        "T3,plain text,,TRUE,2,00501,x,9\n",
    )
    result = read_drop(path, "tickets")
    assert_base_schema(result, "tickets")
    docs = result.documents
    assert docs["text"].to_pylist() == ["Printer on fire,\nplease help", 'She said "hi" to me', "plain text"]
    assert docs["source_file"].to_pylist() == ["tickets.csv"] * 3
    assert docs["source_row"].to_pylist() == [1, 2, 3]
    assert docs.schema.field("ticket").type == pa.string()
    assert docs.schema.field("csat").type == pa.int64()
    assert docs["csat"].to_pylist() == [5, 3, None]
    assert docs.schema.field("escalated").type == pa.bool_()
    assert docs["escalated"].to_pylist() == [True, False, True]
    assert docs.schema.field("score").type == pa.float64()
    assert docs["zip"].to_pylist() == ["02139", "10001", "00501"]  # zero-padded codes stay strings
    assert docs["note"].to_pylist() == [None, "urgent", "x"]
    assert "doc_id" not in docs.schema.names[6:]
    assert docs["meta_doc_id"].to_pylist() == [7, 8, 9]
    assert result.summary["renamed_columns"] == {"doc_id": "meta_doc_id"}
    assert result.rejects.num_rows == 0
    assert doc_hash(docs["text"][0].as_py()) == docs["doc_hash"][0].as_py()


def test_tsv_with_text_column_option(tmp_path: Path) -> None:
    path = write(tmp_path / "s.tsv", 'sentence\tlabel\tcomment\na good film\t1\tsays "great"\nbad\t0\t\n')
    result = read_drop(path, "s", text_column="sentence")
    assert_base_schema(result, "s")
    assert result.documents["text"].to_pylist() == ["a good film", "bad"]
    assert result.documents["label"].to_pylist() == [1, 0]
    assert result.documents["comment"].to_pylist() == ['says "great"', None]


def test_tsv_with_literal_quotes_keeps_them(tmp_path: Path) -> None:
    # TSV often has no quoting: a field that opens with a quote is literal text, not a quoted field.
    path = write(tmp_path / "q.tsv", 'text\tlabel\n"Wow" is what I said\t1\nfine\t0\n')
    result = read_drop(path, "q")
    assert result.documents["text"].to_pylist() == ['"Wow" is what I said', "fine"]
    assert result.rejects.num_rows == 0


def test_csv_with_bom_and_crlf(tmp_path: Path) -> None:
    path = write(tmp_path / "w.csv", b"\xef\xbb\xbftext,n\r\nhello,1\r\nworld,2\r\n")
    result = read_drop(path, "w")
    assert result.documents["text"].to_pylist() == ["hello", "world"]
    assert result.documents["n"].to_pylist() == [1, 2]


def test_jsonl_round_trip_keeps_json_types(tmp_path: Path) -> None:
    lines = [
        {"text": "first", "n": 1, "x": 1.5, "ok": True, "tags": ["a", "b"], "mixed": 1, "user": {"id": 1}},
        {"text": "second", "n": 2, "x": 2, "ok": False, "tags": [], "mixed": "one", "user": {"id": 2}},
        {"text": "third", "extra": "only here", "mixed": True},
    ]
    path = write(tmp_path / "chat.jsonl", "\n".join(json.dumps(obj) for obj in lines) + "\n")
    result = read_drop(path, "chat")
    assert_base_schema(result, "chat")
    docs = result.documents
    assert docs["source_row"].to_pylist() == [1, 2, 3]
    assert docs.schema.field("n").type == pa.int64() and docs["n"].to_pylist() == [1, 2, None]
    assert docs.schema.field("x").type == pa.float64() and docs["x"].to_pylist() == [1.5, 2.0, None]
    assert docs.schema.field("ok").type == pa.bool_()
    assert docs["tags"].to_pylist() == [["a", "b"], [], None]
    assert docs["user"].to_pylist() == [{"id": 1}, {"id": 2}, None]
    assert docs.schema.field("mixed").type == pa.string()
    assert docs["mixed"].to_pylist() == ["1", "one", "true"]
    assert docs["extra"].to_pylist() == [None, None, "only here"]


@pytest.mark.parametrize("name", ["a.ndjson", "a.json"])
def test_json_lines_under_other_extensions(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, '{"text": "one", "k": 1}\n\n{"text": "two", "k": 2}\n')
    result = read_drop(path, "a")
    assert result.documents["text"].to_pylist() == ["one", "two"]
    assert result.documents["source_row"].to_pylist() == [1, 3]  # line numbers, blank line skipped


def test_json_array(tmp_path: Path) -> None:
    data = [{"text": "one", "k": 1}, {"text": "two", "k": 2}, "not an object", {"text": None}]
    path = write(tmp_path / "arr.json", json.dumps(data, indent=2))
    result = read_drop(path, "arr")
    assert result.documents["text"].to_pylist() == ["one", "two"]
    assert result.documents["k"].to_pylist() == [1, 2]
    assert rejects_of(result) == [
        ("arr.json", 3, "element 3: expected a JSON object, found a string"),
        ("arr.json", 4, "element 4: text column 'text' is null"),
    ]


def test_parquet_round_trip(tmp_path: Path) -> None:
    table = pa.table(
        {
            "body": ["alpha", "beta", None, "gamma"],
            "stars": pa.array([1, 2, 3, 4], pa.int16()),
            "when": pa.array([1, 2, 3, 4], pa.timestamp("ms")),
            "text": ["x", "y", "z", "w"],
        }
    )
    path = tmp_path / "reviews.parquet"
    pq.write_table(table, path)
    result = read_drop(path, "reviews", text_column="body")
    assert_base_schema(result, "reviews")
    docs = result.documents
    assert docs["text"].to_pylist() == ["alpha", "beta", "gamma"]
    assert docs["source_row"].to_pylist() == [1, 2, 4]
    assert docs.schema.field("stars").type == pa.int16()
    assert docs.schema.field("when").type == pa.timestamp("ms")
    assert docs["meta_text"].to_pylist() == ["x", "y", "w"]  # collides with the reserved `text`
    assert rejects_of(result) == [("reviews.parquet", 3, "row 3: text column 'body' is null")]


def test_parquet_dictionary_text_column(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": pa.array(["a", "b", "a"]).dictionary_encode()}), path)
    result = read_drop(path, "d")
    assert result.documents.schema.field("text").type == pa.string()
    assert result.documents["text"].to_pylist() == ["a", "b", "a"]


def test_json_edge_cases(tmp_path: Path) -> None:
    crlf = write(
        tmp_path / "crlf.jsonl",
        b'{"text": "one", "big": 1}\r\n{"text": "two", "big": 99999999999999999999}\r\n',
    )
    result = read_drop(crlf, "crlf")
    assert result.documents["text"].to_pylist() == ["one", "two"]
    assert result.documents["big"].to_pylist() == ["1", "99999999999999999999"]  # beyond int64: exact strings
    pretty = write(tmp_path / "one.json", json.dumps({"text": "single", "k": [1, 2]}, indent=2))
    single = read_drop(pretty, "one")
    assert single.documents["text"].to_pylist() == ["single"]
    assert single.documents["k"].to_pylist() == [[1, 2]]
    latin = write(tmp_path / "latin.json", b'[{"text": "ok"}, {"text": "caf\xe9"}]')
    mixed = read_drop(latin, "latin")
    assert mixed.documents["text"].to_pylist() == ["ok"]
    assert rejects_of(mixed) == [("latin.json", 2, "element 2: not valid UTF-8 (byte 0xe9)")]


def test_read_drop_accepts_a_list_of_paths(tmp_path: Path) -> None:
    a = write(tmp_path / "x" / "a.csv", "text\none\n")
    b = write(tmp_path / "y" / "b.jsonl", '{"text": "two"}\n')
    result = read_drop([a, b], "pair")
    assert result.documents["source_file"].to_pylist() == ["a.csv", "b.jsonl"]
    same_name = write(tmp_path / "z" / "a.csv", "text\nthree\n")
    with pytest.raises(ValueError, match="distinct names"):
        read_drop([a, same_name], "pair")


# ---- bad rows -----------------------------------------------------------------------------------


def test_jsonl_bad_rows_are_rejected_and_good_rows_kept(tmp_path: Path) -> None:
    raw = b"\n".join(
        [
            b'{"text": "good one", "k": 1}',
            b'{"text": "broken" "k": 2}',
            b"[1, 2]",
            b'{"text": "caf\xe9 latin-1"}',
            b'{"text": null}',
            b'{"text": "   "}',
            b'{"text": ""}',
            b'{"text": 42}',
            b'{"k": 3}',
            b'{"text": "lone \\ud800 surrogate"}',
            b'{"text": "good two \xf0\x9f\x98\x80 \\ud83d\\ude00", "k": 5}',
        ]
    )
    path = write(tmp_path / "bad.jsonl", raw)
    result = read_drop(path, "bad")
    assert result.documents["text"].to_pylist() == ["good one", "good two 😀 😀"]
    assert result.documents["source_row"].to_pylist() == [1, 11]
    problems = {row: problem for _, row, problem in rejects_of(result)}
    assert problems[2] == "line 2: invalid JSON (Expecting ',' delimiter at column 19)"
    assert problems[3] == "line 3: expected a JSON object, found an array"
    assert problems[4] == "line 4: not valid UTF-8 (byte 0xe9 at byte 14)"
    assert problems[5] == "line 5: text column 'text' is null"
    assert problems[6] == "line 6: text column 'text' is whitespace-only"
    assert problems[7] == "line 7: text column 'text' is empty"
    assert problems[8] == "line 8: text column 'text' is a number, expected a string"
    assert problems[9] == "line 9: no 'text' field"
    assert problems[10].startswith("line 10: contains a lone surrogate escape")
    assert sorted(problems) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert set(result.rejects["source_file"].to_pylist()) == {"bad.jsonl"}
    assert set(result.rejects["dataset"].to_pylist()) == {"bad"}
    assert result.summary["documents"] == 2 and result.summary["rejected"] == 9


def test_csv_bad_rows_are_rejected_and_good_rows_kept(tmp_path: Path) -> None:
    raw = (
        b"id,text,label\n"
        b"1,good one,a\n"
        b"2,too,many,fields\n"
        b"3,caf\xe9 in latin-1,b\n"
        b"4,,c\n"
        b'5,"  ",d\n'
        b'6,"quoted" then junk,e\n'
        b"\n"
        b"7,good two,f\n"
    )
    path = write(tmp_path / "bad.csv", raw)
    result = read_drop(path, "bad")
    assert result.documents["text"].to_pylist() == ["good one", "good two"]
    assert result.documents["source_row"].to_pylist() == [1, 7]
    assert result.documents["id"].to_pylist() == [1, 7]
    assert rejects_of(result) == [
        ("bad.csv", 2, "row 2 (line 3): 4 fields, expected 3 as in the header; check quoting"),
        (
            "bad.csv",
            3,
            "row 3 (line 4): column 'text' is not valid UTF-8 (byte 0xe9); save the file as UTF-8",
        ),
        ("bad.csv", 4, "row 4 (line 5): text column 'text' is empty"),
        ("bad.csv", 5, "row 5 (line 6): text column 'text' is whitespace-only"),
        ("bad.csv", 6, "row 6 (line 7): malformed quoting (',' expected after '\"')"),
    ]


def test_csv_unterminated_quote_does_not_swallow_the_rest(tmp_path: Path) -> None:
    path = write(tmp_path / "q.csv", 'text,n\nfirst,1\n"never closed,2\nthird,3\nfourth,4\n')
    result = read_drop(path, "q")
    assert result.documents["text"].to_pylist() == ["first", "third", "fourth"]
    assert result.documents["source_row"].to_pylist() == [1, 3, 4]
    assert rejects_of(result) == [
        ("q.csv", 2, "row 2 (line 3): unterminated quoted field (its quote is never closed)")
    ]


def test_id_column_rejects_missing_and_duplicate_ids(tmp_path: Path) -> None:
    path = write(tmp_path / "ids.csv", "tid,text\nA,one\nB,two\nA,three\n,four\n")
    result = read_drop(path, "ids", id_column="tid")
    assert result.documents["text"].to_pylist() == ["one", "two"]
    assert result.documents["tid"].to_pylist() == ["A", "B"]
    assert rejects_of(result) == [
        ("ids.csv", 3, "row 3: duplicate id 'A' (first seen at ids.csv row 1)"),
        ("ids.csv", 4, "row 4: id column 'tid' is empty"),
    ]
    with pytest.raises(DropError, match="id column 'ticket' not found"):
        read_drop(path, "ids", id_column="ticket")


# ---- file-level errors ---------------------------------------------------------------------------


def test_empty_files(tmp_path: Path) -> None:
    for name in ["e.csv", "e.jsonl", "e.parquet"]:
        path = write(tmp_path / name, b"")
        with pytest.raises(DropError, match=r"empty \(0 bytes\)") as info:
            read_drop(path, "e")
        assert name in str(info.value)
    header_only = write(tmp_path / "h.csv", "text,label\n")
    with pytest.raises(DropError, match="no data rows") as info:
        read_drop(header_only, "h")
    assert "h.csv" in str(info.value)
    blank = write(tmp_path / "b.jsonl", "\n\n  \n")
    with pytest.raises(DropError, match="no data rows"):
        read_drop(blank, "b")


def test_missing_text_column_lists_columns_and_says_how_to_configure(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", "Text,stars\ngreat,5\n")
    with pytest.raises(DropError) as info:
        read_drop(path, "m")
    message = str(info.value)
    assert "m.csv" in message and "text column 'text' not found" in message
    assert "'Text', 'stars'" in message
    assert "text_column='Text'" in message
    jsonl = write(tmp_path / "m.jsonl", '{"body": "x"}\n')
    with pytest.raises(DropError, match=r"columns found: 'body'.*text_column"):
        read_drop(jsonl, "m")
    parquet = tmp_path / "m.parquet"
    pq.write_table(pa.table({"body": ["x"]}), parquet)
    with pytest.raises(DropError, match=r"m\.parquet: text column 'text' not found"):
        read_drop(parquet, "m")


def test_semicolon_csv_gets_a_separator_hint(tmp_path: Path) -> None:
    path = write(tmp_path / "eu.csv", "text;label\nbonjour;1\n")
    with pytest.raises(DropError, match="';'-separated"):
        read_drop(path, "eu")


def test_unsupported_extension(tmp_path: Path) -> None:
    path = write(tmp_path / "notes.txt", "hello\n")
    with pytest.raises(DropError, match=r"notes\.txt: unsupported file type '\.txt'.*\.jsonl"):
        read_drop(path, "notes")


def test_unreadable_parquet(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.parquet", b"PAR1 this is not really parquet")
    with pytest.raises(DropError, match=r"broken\.parquet: unreadable Parquet .*re-export"):
        read_drop(path, "broken")


def test_parquet_text_column_must_be_string(tmp_path: Path) -> None:
    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), path)
    with pytest.raises(DropError, match=r"n\.parquet: text column 'text' has type int64, expected a string"):
        read_drop(path, "n")


def test_every_row_rejected_names_first_reasons(tmp_path: Path) -> None:
    path = write(tmp_path / "all.jsonl", '{"text": 1}\n{"text": ""}\nnot json\n')
    with pytest.raises(DropError) as info:
        read_drop(path, "all")
    message = str(info.value)
    assert "all.jsonl" in message and "every row was rejected (3 rows)" in message
    assert "line 1: text column 'text' is a number" in message
    assert "line 3: invalid JSON" in message


def test_utf16_and_invalid_json_array(tmp_path: Path) -> None:
    utf16 = write(tmp_path / "u.csv", "text\nhello\n".encode("utf-16"))
    with pytest.raises(DropError, match=r"u\.csv: file is UTF-16 encoded\. save it as UTF-8"):
        read_drop(utf16, "u")
    array = write(tmp_path / "a.json", '[{"text": "x"},\n {"text": }]')
    with pytest.raises(DropError, match=r"a\.json: invalid JSON \(Expecting value at line 2 column 11\)"):
        read_drop(array, "a")


def test_drop_error_attributes(tmp_path: Path) -> None:
    path = write(tmp_path / "x.xlsx", b"PK")
    with pytest.raises(DropError) as info:
        read_drop(path, "x")
    assert info.value.path == str(path)
    assert "unsupported" in info.value.problem and info.value.hint


def test_unsafe_dataset_argument_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "ok.csv", "text\nhi\n")
    with pytest.raises(ValueError, match="Unsafe"):
        read_drop(path, "../escape")


# ---- folder datasets -----------------------------------------------------------------------------


def test_folder_dataset_unions_metadata(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    write(folder / "a.csv", "text,score,source\none,1,web\ntwo,2,web\n")
    write(folder / "b.jsonl", '{"text": "three", "score": 2.5, "lang": "en"}\n{"text": "four", "score": 3}\n')
    write(folder / "c.csv", "text,score,source\nfive,n/a,mail\n")
    result = read_drop(folder, "mixed")
    assert_base_schema(result, "mixed")
    docs = result.documents
    assert docs["text"].to_pylist() == ["one", "two", "three", "four", "five"]
    assert docs["source_file"].to_pylist() == ["a.csv", "a.csv", "b.jsonl", "b.jsonl", "c.csv"]
    assert docs["source_row"].to_pylist() == [1, 2, 1, 2, 1]
    assert docs["source"].to_pylist() == ["web", "web", None, None, "mail"]
    assert docs["lang"].to_pylist() == [None, None, "en", None, None]
    assert docs.schema.field("score").type == pa.string()  # "n/a" makes the column strings
    assert docs["score"].to_pylist() == ["1", "2", "2.5", "3.0", "n/a"]
    assert result.summary["files"] == ["a.csv", "b.jsonl", "c.csv"]


def test_folder_numeric_columns_widen(tmp_path: Path) -> None:
    folder = tmp_path / "nums"
    write(folder / "a.csv", "text,v\none,1\n")
    write(folder / "b.csv", "text,v\ntwo,2.5\n")
    write(folder / "c.jsonl", '{"text": "three", "v": 4}\n')
    result = read_drop(folder, "nums")
    assert result.documents.schema.field("v").type == pa.float64()
    assert result.documents["v"].to_pylist() == [1.0, 2.5, 4.0]


# ---- discovery and fingerprints ------------------------------------------------------------------


def make_landing(root: Path) -> Path:
    write(root / "reviews.csv", "text,stars\ngood,5\n")
    write(root / "chats.jsonl", '{"text": "hi"}\n')
    write(root / "tickets" / "2024.csv", "text\nold\n")
    write(root / "tickets" / "2025.jsonl", '{"text": "new"}\n')
    write(root / "tickets" / "README.md", "ignored\n")
    write(root / ".hidden.csv", "text\nx\n")
    write(root / "partial.csv.part", "text\nx\n")
    write(root / "download.jsonl.crdownload", "x")
    write(root / "scratch.tmp", "x")
    write(root / "backup.csv~", "text\nx\n")
    write(root / "notes.txt", "not a dataset\n")
    (root / "empty_folder").mkdir()
    return root


def test_list_drops_files_and_folders(tmp_path: Path) -> None:
    landing = make_landing(tmp_path / "landing")
    drops = list_drops(landing)
    assert [d.dataset for d in drops] == ["chats", "reviews", "tickets"]
    tickets = drops[2]
    assert isinstance(tickets, Drop)
    assert [os.path.basename(p) for p in tickets.paths] == ["2024.csv", "2025.jsonl"]
    assert all(len(d.fingerprint) == 64 for d in drops)
    result = read_drop(tickets, tickets.dataset)
    assert result.documents["text"].to_pylist() == ["old", "new"]
    with pytest.raises(FileNotFoundError):
        list_drops(tmp_path / "nope")


def test_list_drops_skips_files_still_being_written(tmp_path: Path) -> None:
    landing = make_landing(tmp_path / "landing")
    old = time.time() - 3600
    for path in landing.rglob("*"):
        os.utime(path, (old, old))
    os.utime(landing / "tickets", (old, old))
    assert [d.dataset for d in list_drops(landing, min_age_s=60)] == ["chats", "reviews", "tickets"]
    os.utime(landing / "reviews.csv")  # just modified
    os.utime(landing / "tickets" / "2025.jsonl")
    assert [d.dataset for d in list_drops(landing, min_age_s=60)] == ["chats"]
    assert [d.dataset for d in list_drops(landing)] == ["chats", "reviews", "tickets"]


def test_list_drops_ignores_symlinks_by_default(tmp_path: Path) -> None:
    outside = write(tmp_path / "secret.csv", "text\nsecret\n")
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "link.csv").symlink_to(outside)
    assert list_drops(landing) == []
    assert [d.dataset for d in list_drops(landing, follow_symlinks=True)] == ["link"]


def test_name_collision_lists_both_paths(tmp_path: Path) -> None:
    landing = tmp_path / "landing"
    write(landing / "reviews.csv", "text\na\n")
    write(landing / "reviews.jsonl", '{"text": "b"}\n')
    write(landing / "reviews" / "part.csv", "text\nc\n")
    drops, clashes = scan_drops(landing)
    assert drops == [] and list(clashes) == ["reviews"]
    message = str(clash_error("reviews", clashes["reviews"]))
    assert "'reviews'" in message
    for name in ["reviews.csv", "reviews.jsonl", str(landing / "reviews")]:
        assert name in message


def test_hostile_file_names_in_landing_folder(tmp_path: Path) -> None:
    landing = tmp_path / "landing"
    for name in ["a'b;drop table x.csv", "my data.csv", "données été.jsonl", "x" * 200 + ".csv"]:
        write(landing / name, '{"text": "t"}\n' if name.endswith("jsonl") else "text\nt\n")
    drops = list_drops(landing)
    assert len({d.dataset for d in drops}) == 4
    for drop in drops:
        check_storage_key(drop.dataset)
        assert read_drop(drop, drop.dataset).documents.num_rows == 1


def test_fingerprints_stable_across_redrop_and_sensitive_to_changes(tmp_path: Path) -> None:
    first = make_landing(tmp_path / "first")
    second = tmp_path / "second"
    shutil.copytree(first, second)
    os.utime(second / "reviews.csv", (1, 1))  # timestamps do not matter
    before = {d.dataset: d.fingerprint for d in list_drops(first)}
    assert {d.dataset: d.fingerprint for d in list_drops(second)} == before
    data = bytearray((second / "reviews.csv").read_bytes())
    data[-2] = ord("4")  # one byte: stars 5 -> 4
    (second / "reviews.csv").write_bytes(bytes(data))
    write(second / "tickets" / "2026.csv", "text\nnewer\n")
    after = {d.dataset: d.fingerprint for d in list_drops(second)}
    assert after["chats"] == before["chats"]
    assert after["reviews"] != before["reviews"]
    assert after["tickets"] != before["tickets"]


def test_fingerprint_includes_names(tmp_path: Path) -> None:
    a = write(tmp_path / "a.csv", "text\nx\n")
    b = write(tmp_path / "b.csv", "text\nx\n")
    assert drop_fingerprint([a]) != drop_fingerprint([b])
    assert drop_fingerprint([a]) == drop_fingerprint([str(a)])


# ---- real data -----------------------------------------------------------------------------------


@pytest.mark.skipif(
    not (SHARED_DATA / "sst2" / "train.tsv").is_file(),
    reason=f"shared SST-2 data not found at {SHARED_DATA / 'sst2'} (expected beside the repository clone)",
)
def test_sst2_train_reads_fast() -> None:
    start = time.perf_counter()
    result = read_drop(SHARED_DATA / "sst2" / "train.tsv", "sst2", text_column="sentence")
    elapsed = time.perf_counter() - start
    docs = result.documents
    assert docs.num_rows == 60_614
    assert result.rejects.num_rows == 0
    assert docs.schema.names == [*BASE_SCHEMA.names, "label"]
    assert docs.schema.field("label").type == pa.int64()
    assert set(docs["label"].to_pylist()) == {0, 1}
    assert docs["doc_id"][-1].as_py() == 60_613
    assert docs["source_row"][0].as_py() == 1 and docs["source_row"][-1].as_py() == 60_614
    assert docs["text"][0].as_py() == "when are bears bears and "
    assert elapsed < 5, f"reading 60k rows took {elapsed:.1f}s"
