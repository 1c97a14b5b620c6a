"""Landing-folder ingestion: find dropped datasets and read them into the `raw_documents` table.

Pure functions, no Dagster. A drop is one supported file directly in the landing folder, or one
sub-folder whose supported files together form one dataset. `read_drop` turns a drop into the
`raw_documents` schema (see README) plus a table of rejected rows; a bad row never drops good ones,
while problems with a whole file raise `DropError` with what went wrong and what to do.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import os
import re
import shutil
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from interp_assets.conversations import MESSAGES, Conversation, conversation_problem
from interp_assets.storage.paths import check_storage_key

SUPPORTED_EXTENSIONS: frozenset[str] = frozenset({".csv", ".tsv", ".jsonl", ".ndjson", ".json", ".parquet"})
TEMP_SUFFIXES: tuple[str, ...] = (".tmp", "~", ".part", ".crdownload")
RESERVED_COLUMNS: tuple[str, ...] = (
    "dataset",
    "doc_id",
    "doc_hash",
    "text",
    "source_file",
    "source_row",
    MESSAGES,
)
MAX_NAME_LENGTH = 60

REJECTS_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()),
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("problem", pa.string()),
    ]
)

_CHUNK = 1 << 20
_UNSAFE_RUN = re.compile(r"[^a-z0-9_.\-]+")
_DOTS = re.compile(r"\.{2,}")
_SURROGATE = re.compile("[\udc80-\udcff]")
_LINE_END = re.compile(r"\r\n|\r|\n")
_INT = re.compile(r"[+-]?(0|[1-9][0-9]*)")
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_ZERO_PADDED = re.compile(r"[+-]?0[0-9]")
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_MAX_REASONS_IN_ERROR = 5


class DropError(ValueError):
    """A whole file of a drop cannot be ingested; the message names the file, the problem and the fix."""

    def __init__(self, path: str | os.PathLike[str], problem: str, hint: str = "") -> None:
        self.path = str(path)
        self.problem = problem
        self.hint = hint
        message = f"{self.path}: {problem}"
        super().__init__(f"{message}. {hint}" if hint else message)


@dataclass(frozen=True)
class Drop:
    """One dataset waiting in the landing folder: its name, its files (sorted) and a content fingerprint."""

    dataset: str
    paths: tuple[str, ...]
    fingerprint: str


@dataclass(frozen=True)
class DropReadResult:
    """`documents` follows the `raw_documents` schema; `rejects` has one row per unreadable row."""

    documents: pa.Table
    rejects: pa.Table
    summary: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Names, discovery, fingerprints
# ----------------------------------------------------------------------------------------------


def _stem(path: str | os.PathLike[str]) -> str:
    p = Path(path)
    if p.suffix.lower() in SUPPORTED_EXTENSIONS and not os.path.isdir(p):
        return p.name[: -len(p.suffix)]
    return p.name


def dataset_name_from_path(path: str | os.PathLike[str]) -> str:
    """Safe dataset name from a drop's file stem or folder name (passes `check_storage_key`).

    NFKC-normalized, accents dropped, lower-cased, runs of other characters replaced by `_`, no `..`,
    at most 60 characters; when anything changed (or nothing is left) a `-` plus 8 hex characters of
    a SHA-256 of the original name is appended so distinct hostile names stay distinct.
    """
    original = _stem(path)
    name = unicodedata.normalize("NFKC", original)
    name = "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c))
    name = _UNSAFE_RUN.sub("_", name.lower())
    name = _DOTS.sub(".", name).strip("_.-")
    if name == original and 0 < len(name) <= MAX_NAME_LENGTH:
        return check_storage_key(name, "dataset name")
    digest = hashlib.sha256(original.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    base = name[: MAX_NAME_LENGTH - len(digest) - 1].strip("_.-") or "dataset"
    return check_storage_key(f"{base}-{digest}", "dataset name")


def _is_hidden_or_temp(name: str) -> bool:
    return name.startswith((".", "~$")) or name.lower().endswith(TEMP_SUFFIXES)


def _is_supported(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in SUPPORTED_EXTENSIONS


def drop_fingerprint(paths: Sequence[str | os.PathLike[str]]) -> str:
    """SHA-256 over each file's base name, size and bytes (streamed), in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        name = os.path.basename(os.fspath(path)).encode("utf-8", "surrogateescape")
        digest.update(len(name).to_bytes(8, "big") + name)
        digest.update(os.path.getsize(path).to_bytes(8, "big"))
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def printable_path(path: str | os.PathLike[str]) -> str:
    """`path` safe to print and log: bytes that are not valid UTF-8 (which `os.fsdecode` keeps as lone
    surrogates, unencodable anywhere else) shown as `\\xNN`."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def undecodable_name_error(path: str | os.PathLike[str]) -> DropError | None:
    """The error for a drop file or folder whose name is not valid UTF-8, or None when it is."""
    if not _SURROGATE.search(os.path.basename(os.fspath(path))):
        return None
    return DropError(
        printable_path(path),
        "its name is not valid UTF-8 (the bytes that are not are shown as \\xNN)",
        "rename it to a UTF-8 name, e.g. mv it in a shell; other drops are not affected",
    )


def scan_drops(
    landing_dir: str | os.PathLike[str],
    min_age_s: float = 0.0,
    follow_symlinks: bool = False,
    bad_names: dict[str, DropError] | None = None,
) -> tuple[list[Drop], dict[str, list[str]]]:
    """`(drops, clashes)`: one `Drop` per supported file directly in `landing_dir` and one per sub-folder of
    supported files, and the dataset names that several of them map to (name -> their paths).

    A clash blocks only its own dataset: its drops are left out of `drops` (`clash_error` describes it),
    every other dataset goes on. So does a drop whose name, or the name of a file in its folder, is not
    valid UTF-8: it is left out and, when `bad_names` is given, put there (dataset name -> the error naming
    the file, escaped, and the fix). Hidden entries, temp files (`.tmp`, `~`, `.part`, `.crdownload`),
    unsupported files and (unless `follow_symlinks`) symbolic links are ignored. A file modified less than
    `min_age_s` seconds ago is skipped as still being written; a sub-folder is skipped while it or any
    entry in it is that young.
    """
    root = Path(landing_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"Landing folder {str(root)!r} does not exist or is not a folder.")
    cutoff = time.time() - min_age_s
    located: list[tuple[str, Drop]] = []
    with os.scandir(root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if _is_hidden_or_temp(entry.name) or (entry.is_symlink() and not follow_symlinks):
                continue
            if entry.is_file(follow_symlinks=follow_symlinks):
                if not _is_supported(entry.name) or (min_age_s > 0 and entry.stat().st_mtime > cutoff):
                    continue
                paths: tuple[str, ...] = (entry.path,)
            elif entry.is_dir(follow_symlinks=follow_symlinks):
                found = _folder_files(entry.path, cutoff if min_age_s > 0 else None, follow_symlinks)
                if not found:
                    continue
                paths = found
            else:
                continue
            name = dataset_name_from_path(entry.path)
            error = next((e for p in (entry.path, *paths) if (e := undecodable_name_error(p))), None)
            if error is not None:
                if bad_names is not None:
                    bad_names.setdefault(name, error)
                continue
            located.append((entry.path, Drop(name, paths, drop_fingerprint(paths))))
    by_name: dict[str, list[str]] = {}
    for location, drop in located:
        by_name.setdefault(drop.dataset, []).append(location)
    clashes = {name: where for name, where in by_name.items() if len(where) > 1}
    return [drop for _, drop in located if drop.dataset not in clashes], clashes


def list_drops(
    landing_dir: str | os.PathLike[str], min_age_s: float = 0.0, follow_symlinks: bool = False
) -> list[Drop]:
    """The drops of `scan_drops` (datasets whose name several drops share are left out)."""
    return scan_drops(landing_dir, min_age_s, follow_symlinks)[0]


def copy_drop_files(source: str | os.PathLike[str], landing_dir: str | os.PathLike[str]) -> list[str]:
    """Copy the regular files directly in `source` into `landing_dir`; returns the entries skipped.

    Symbolic links are never followed (a link could pull any file on the machine into the data folder);
    sub-folders and other entries are skipped too.
    """
    skipped = []
    target = Path(landing_dir)
    target.mkdir(parents=True, exist_ok=True)
    for src in sorted(Path(source).iterdir()):
        if src.is_symlink() or not src.is_file():
            skipped.append(str(src))
            continue
        shutil.copyfile(src, target / src.name)
    return skipped


def clash_error(name: str, paths: list[str]) -> DropError:
    """The error for a dataset name that several drops map to, naming all of them."""
    return DropError(
        paths[0],
        f"dataset {name!r} comes from several drops: " + ", ".join(map(repr, paths)),
        "rename or remove all but one of them so the dataset name comes from exactly one file or folder "
        "(other datasets are not affected)",
    )


def _folder_files(folder: str, cutoff: float | None, follow_symlinks: bool) -> tuple[str, ...]:
    """Supported files directly in `folder`, sorted; empty while any entry is younger than `cutoff`."""
    if cutoff is not None and os.stat(folder).st_mtime > cutoff:
        return ()
    files: list[str] = []
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if _is_hidden_or_temp(entry.name) or (entry.is_symlink() and not follow_symlinks):
                continue
            if cutoff is not None and entry.stat(follow_symlinks=follow_symlinks).st_mtime > cutoff:
                return ()
            if entry.is_file(follow_symlinks=follow_symlinks) and _is_supported(entry.name):
                files.append(entry.path)
    return tuple(files)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def doc_hash(text: str) -> str:
    """Hex BLAKE2b-128 of the UTF-8 text: the `raw_documents.doc_hash` content identity."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def document_hash(document: str) -> str:
    """`raw_documents.doc_hash`: `doc_hash` of a text, `Conversation.content_hash` of a conversation."""
    return document.content_hash() if isinstance(document, Conversation) else doc_hash(document)


def _document(value: str | list) -> str:
    """A validated text column value as a document: the text, or the `Conversation` of a list of turns."""
    return Conversation(value) if isinstance(value, list) else value


@dataclass
class _FileRows:
    """What one file contributed: kept rows, their metadata columns and the rejects."""

    name: str
    unit: str
    texts: list[str]
    rows: list[int]
    meta: dict[str, tuple[Any, bool]]  # column -> (pa.Array, or list[str|None] still to type-infer)
    rejects: list[tuple[int, str]]
    columns_found: list[str]


def read_drop(
    drop_or_paths: Drop | str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    dataset: str,
    text_column: str = "text",
    id_column: str | None = None,
) -> DropReadResult:
    """Read a drop (a `Drop`, one path, a folder or a list of files) into `raw_documents` rows.

    `text_column` names the column holding the document text. `id_column`, when given, names a column
    of user ids that must be present in every file, non-empty and unique: rows missing it or repeating
    an earlier id are rejected. Every other column is kept as metadata (reserved names become
    `meta_<name>`; CSV values are typed int/float/bool when every non-empty value parses, empty
    CSV values are null; JSON keeps its types and mixed-type columns become strings; columns that
    differ across the files of a folder are unioned by name, missing values null).
    """
    check_storage_key(dataset, "dataset name")
    if id_column is not None and id_column == text_column:
        raise ValueError(f"id_column and text_column must differ (both {text_column!r}).")
    paths = _expand_paths(drop_or_paths)
    files = [_read_file(path, text_column) for path in paths]
    if id_column is not None:
        _apply_id_column(files, paths, id_column)
    return _assemble(files, dataset, text_column, id_column)


def _expand_paths(
    drop_or_paths: Drop | str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
) -> list[str]:
    if isinstance(drop_or_paths, Drop):
        raw: list[str] = list(drop_or_paths.paths)
    elif isinstance(drop_or_paths, str | os.PathLike):
        raw = [os.fspath(drop_or_paths)]
    else:
        raw = [os.fspath(p) for p in drop_or_paths]
    paths: list[str] = []
    for path in raw:
        if os.path.isdir(path):
            found = sorted(
                e.path
                for e in os.scandir(path)
                if e.is_file() and _is_supported(e.name) and not _is_hidden_or_temp(e.name)
            )
            if not found:
                raise DropError(path, "folder has no supported files", _supported_hint())
            paths.extend(found)
        else:
            paths.append(path)
    if not paths:
        raise ValueError("read_drop needs at least one file.")
    for path in paths:
        if (error := undecodable_name_error(path)) is not None:
            raise error
    names = [os.path.basename(p) for p in paths]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"Files of one drop must have distinct names (source_file); repeated: {dupes}")
    return paths


def _supported_hint() -> str:
    return "use one of " + ", ".join(sorted(SUPPORTED_EXTENSIONS))


def _read_file(path: str, text_column: str) -> _FileRows:
    ext = os.path.splitext(path)[1].lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise DropError(path, f"unsupported file type {ext or '(no extension)'!r}", _supported_hint())
    if not os.path.isfile(path):
        raise DropError(path, "file not found", "check the path; the file may have been moved or deleted")
    if ext == ".parquet":
        result = _read_parquet(path, text_column)
    else:
        with open(path, "rb") as handle:
            data = handle.read()
        if not data:
            raise DropError(
                path, "file is empty (0 bytes)", "drop the file again once it has been fully written"
            )
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise DropError(path, "file is UTF-16 encoded", "save it as UTF-8 and drop it again")
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        if ext in (".csv", ".tsv"):
            result = _read_delimited(path, data, "\t" if ext == ".tsv" else ",", text_column)
        elif ext == ".json" and data.lstrip()[:1] == b"[":
            result = _read_json_array(path, data, text_column)
        else:
            result = _read_json_lines(path, data, text_column, whole_json=ext == ".json")
    if not result.texts:
        reasons = "; ".join(problem for _, problem in result.rejects[:_MAX_REASONS_IN_ERROR])
        raise DropError(
            path,
            f"every row was rejected ({len(result.rejects)} rows): {reasons}",
            "fix these rows (or the encoding / delimiter / text_column if every row fails the same way)",
        )
    return result


def _missing_column(path: str, what: str, column: str, found: Sequence[str], param: str) -> DropError:
    shown = ", ".join(repr(c) for c in list(found)[:30]) + (" ..." if len(found) > 30 else "")
    close = difflib.get_close_matches(column, list(found), n=1, cutoff=0.6)
    near = [c for c in found if c.lower() == column.lower()] or close
    hint = (
        f"set {param} to the column that holds the {what} "
        f"(read_drop(..., {param}=...) or the dataset's config)"
    )
    if near:
        hint += f", e.g. {param}={near[0]!r}"
    return DropError(path, f"{what} column {column!r} not found; columns found: {shown or '(none)'}", hint)


def _no_data(path: str, detail: str) -> DropError:
    return DropError(
        path,
        f"no data rows ({detail})",
        "add rows to the file (or check it was fully written) and drop it again",
    )


def _text_problem(value: Any, column: str) -> str | None:
    """Why `value` cannot be a document text (or conversation, a list of turns), or None when it can."""
    if isinstance(value, list):
        problem = conversation_problem(value)
        return None if problem is None else f"text column {column!r} is not a conversation: {problem}"
    if value is None:
        return f"text column {column!r} is null"
    if not isinstance(value, str):
        return f"text column {column!r} is {_json_kind(value)}, expected a string"
    if not value:
        return f"text column {column!r} is empty"
    if not value.strip():
        return f"text column {column!r} is whitespace-only"
    return None


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# ---- CSV / TSV -------------------------------------------------------------------------------


def _csv_records(text: str, dialect: dict[str, Any]) -> list[tuple[int, list[str] | None, str | None]]:
    """Parse into (start line, fields or None, error or None); an unterminated quote is rejected and
    parsing resumes on the line after it, so the rest of the file survives."""
    out: list[tuple[int, list[str] | None, str | None]] = []
    offset = 0
    segment = text
    while True:
        reader = csv.reader(io.StringIO(segment, newline=""), strict=True, **dialect)
        previous = 0
        restart_after: int | None = None
        while restart_after is None:
            try:
                for record in reader:
                    out.append((offset + previous + 1, record, None))
                    previous = reader.line_num
                return out
            except csv.Error as error:
                start = previous + 1
                if "unexpected end of data" in str(error):
                    out.append(
                        (offset + start, None, "unterminated quoted field (its quote is never closed)")
                    )
                    restart_after = start
                else:
                    out.append((offset + start, None, f"malformed quoting ({error})"))
                    previous = reader.line_num
        ends = _LINE_END.finditer(segment)
        cut = None
        for _ in range(restart_after):
            cut = next(ends, None)
        if cut is None:
            return out
        segment = segment[cut.end() :]
        offset += restart_after


def _read_delimited(path: str, data: bytes, delimiter: str, text_column: str) -> _FileRows:
    try:
        text, clean = data.decode("utf-8"), True
    except UnicodeDecodeError:
        text, clean = data.decode("utf-8", "surrogateescape"), False
    if csv.field_size_limit() < 2**31 - 1:
        csv.field_size_limit(2**31 - 1)
    dialect: dict[str, Any] = {"delimiter": delimiter}
    records = _csv_records(text, dialect)
    if delimiter == "\t" and any(err for _, _, err in records):
        # TSV usually has no quoting: when quote-aware parsing fails anywhere, quotes are literal text.
        records = _csv_records(text, {"delimiter": delimiter, "quoting": csv.QUOTE_NONE})
    name = os.path.basename(path)
    if not records or records[0][1] is None or not any(f.strip() for f in records[0][1]):
        raise DropError(path, "no header row", "put the column names on the first line")
    header_fields = records[0][1]
    if not clean and any(_SURROGATE.search(f) for f in header_fields):
        raise DropError(path, "header is not valid UTF-8", "save the file as UTF-8 and drop it again")
    header = _clean_header(header_fields)
    if text_column not in header:
        error = _missing_column(path, "text", text_column, header, "text_column")
        other = ";" if delimiter == "," else ","
        if len(header) == 1 and other in header[0]:
            error = DropError(
                path,
                error.problem,
                f"the header looks {other!r}-separated; save the file with {delimiter!r} as separator "
                f"(or as {'.csv' if delimiter == chr(9) else '.tsv'} if tab-separated), or {error.hint}",
            )
        raise error
    text_index = header.index(text_column)
    width = len(header)
    meta_index = [i for i in range(width) if i != text_index]
    kept: list[list[str]] = []
    rows: list[int] = []
    rejects: list[tuple[int, str]] = []
    row = 0
    for line, fields, error in records[1:]:
        if clean and fields is not None and len(fields) == width:  # fast path: a well-formed row
            value = fields[text_index]
            if value and not value.isspace():
                row += 1
                kept.append(fields)
                rows.append(row)
                continue
        if fields is not None and (not fields or (len(fields) == 1 and width > 1 and not fields[0].strip())):
            continue  # blank line
        row += 1
        where = f"row {row} (line {line})"
        if fields is None:
            rejects.append((row, f"{where}: {error}"))
            continue
        if len(fields) != width:
            rejects.append(
                (row, f"{where}: {len(fields)} fields, expected {width} as in the header; check quoting")
            )
            continue
        bad = next((i for i, f in enumerate(fields) if _SURROGATE.search(f)), None)
        if bad is not None:
            byte = ord(_SURROGATE.search(fields[bad]).group()) - 0xDC00  # type: ignore[union-attr]
            rejects.append(
                (
                    row,
                    f"{where}: column {header[bad]!r} is not valid UTF-8 (byte 0x{byte:02x}); "
                    "save the file as UTF-8",
                )
            )
            continue
        problem = _text_problem(fields[text_index], text_column)
        if problem:
            rejects.append((row, f"{where}: {problem}"))
            continue
        kept.append(fields)
        rows.append(row)
    if row == 0:
        raise _no_data(path, "the file has a header only")
    texts = [fields[text_index] for fields in kept]
    meta = {header[i]: ([fields[i] or None for fields in kept], True) for i in meta_index}
    return _FileRows(name, "row", texts, rows, meta, rejects, header)


def _clean_header(fields: list[str]) -> list[str]:
    names: list[str] = []
    for i, raw in enumerate(fields, 1):
        base = raw.strip() or f"column_{i}"
        name, n = base, 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


def _infer_strings(values: list[str | None]) -> pa.Array:
    """Type a CSV column: bool, int64 or float64 when every non-empty value parses, else string."""
    present = [v.strip() for v in values if v is not None]
    if present:
        lowered = {v.lower() for v in present}
        if lowered <= {"true", "false"}:
            return pa.array([None if v is None else v.strip().lower() == "true" for v in values], pa.bool_())
        if all(_INT.fullmatch(v) for v in present):
            ints = [None if v is None else int(v) for v in values]
            if all(_INT64_MIN <= i <= _INT64_MAX for i in ints if i is not None):
                return pa.array(ints, pa.int64())
        elif all(_FLOAT.fullmatch(v) and not _ZERO_PADDED.match(v) for v in present):
            return pa.array([None if v is None else float(v) for v in values], pa.float64())
    return pa.array(values, pa.string())


# ---- JSON ------------------------------------------------------------------------------------


def _read_json_lines(path: str, data: bytes, text_column: str, whole_json: bool) -> _FileRows:
    if whole_json and data.lstrip()[:1] == b"{" and data.count(b"\n") > 1:
        try:
            single = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            single = None
        if isinstance(single, dict):  # one pretty-printed object
            return _collect_objects(path, "line", [(1, single, True)], [], text_column)
    objects: list[tuple[int, dict[str, Any], bool]] = []
    rejects: list[tuple[int, str]] = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            rejects.append(
                (
                    number,
                    f"line {number}: not valid UTF-8 "
                    f"(byte 0x{raw[error.start]:02x} at byte {error.start + 1})",
                )
            )
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            rejects.append((number, f"line {number}: invalid JSON ({error.msg} at column {error.colno})"))
            continue
        if not isinstance(obj, dict):
            rejects.append((number, f"line {number}: expected a JSON object, found {_json_kind(obj)}"))
            continue
        objects.append((number, obj, _ESCAPED_SURROGATE.search(line) is not None))
    if not objects and not rejects:
        raise _no_data(path, "the file holds only blank lines")
    return _collect_objects(path, "line", objects, rejects, text_column)


def _read_json_array(path: str, data: bytes, text_column: str) -> _FileRows:
    text = data.decode("utf-8", "surrogateescape")
    check = _SURROGATE.search(text) is not None or _ESCAPED_SURROGATE.search(text) is not None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as error:
        raise DropError(
            path,
            f"invalid JSON ({error.msg} at line {error.lineno} column {error.colno})",
            "fix the syntax, or write one object per line as .jsonl so one bad record cannot block the file",
        ) from None
    if not isinstance(items, list):
        raise DropError(
            path, f"expected a JSON array of objects, found {_json_kind(items)}", "write [{...}, {...}]"
        )
    if not items:
        raise _no_data(path, "the JSON array is empty")
    objects: list[tuple[int, dict[str, Any], bool]] = []
    rejects: list[tuple[int, str]] = []
    for number, obj in enumerate(items, 1):
        if not isinstance(obj, dict):
            rejects.append((number, f"element {number}: expected a JSON object, found {_json_kind(obj)}"))
        else:
            objects.append((number, obj, check))
    return _collect_objects(path, "element", objects, rejects, text_column)


def _utf8_problem(obj: dict[str, Any]) -> str | None:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as error:
        bad = error.object[error.start]
        if 0xDC80 <= ord(bad) <= 0xDCFF:
            return f"not valid UTF-8 (byte 0x{ord(bad) - 0xDC00:02x})"
        return f"contains a lone surrogate escape (\\u{ord(bad):04x}), which is not valid Unicode"
    return None


def _collect_objects(
    path: str,
    unit: str,
    objects: list[tuple[int, dict[str, Any], bool]],
    rejects: list[tuple[int, str]],
    text_column: str,
) -> _FileRows:
    """Validate parsed JSON objects (`check` marks those that may hold invalid Unicode) into rows."""
    keys: dict[str, None] = {}
    for _, obj, _ in objects:
        keys.update(dict.fromkeys(obj))
    if objects and text_column not in keys:
        raise _missing_column(path, "text", text_column, list(keys), "text_column")
    texts: list[str] = []
    rows: list[int] = []
    kept: list[dict[str, Any]] = []
    for number, obj, check in objects:
        where = f"{unit} {number}"
        if text_column not in obj:
            rejects.append((number, f"{where}: no {text_column!r} field"))
            continue
        problem = _text_problem(obj[text_column], text_column)
        if problem is None and check:
            problem = _utf8_problem(obj)
        if problem:
            rejects.append((number, f"{where}: {problem}"))
            continue
        texts.append(_document(obj[text_column]))
        rows.append(number)
        kept.append(obj)
    rejects.sort()
    meta = {key: (_json_column([obj.get(key) for obj in kept]), False) for key in keys if key != text_column}
    return _FileRows(os.path.basename(path), unit, texts, rows, meta, rejects, list(keys))


def _json_column(values: list[Any]) -> pa.Array:
    """Keep JSON types: bool, int64, float64, string, lists/objects as Arrow nested types; mixed -> string."""
    kinds = {type(v) for v in values if v is not None}
    if not kinds:
        return pa.nulls(len(values), pa.string())
    if kinds == {bool}:
        return pa.array(values, pa.bool_())
    if kinds == {int}:
        if all(_INT64_MIN <= v <= _INT64_MAX for v in values if v is not None):
            return pa.array(values, pa.int64())
        return _as_strings(values)
    if kinds <= {int, float}:
        return pa.array([None if v is None else float(v) for v in values], pa.float64())
    if kinds == {str}:
        return pa.array(values, pa.string())
    if kinds == {list} or kinds == {dict}:
        try:
            array = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            return _as_strings(values)
        if not _has_empty_struct(array.type):
            return array
    return _as_strings(values)


def _has_empty_struct(dtype: pa.DataType) -> bool:
    if pa.types.is_struct(dtype):
        return dtype.num_fields == 0 or any(
            _has_empty_struct(dtype.field(i).type) for i in range(dtype.num_fields)
        )
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return _has_empty_struct(dtype.value_type)
    return False


def _as_strings(values: list[Any]) -> pa.Array:
    out: list[str | None] = []
    for v in values:
        if v is None or isinstance(v, str):
            out.append(v)
        else:
            try:
                out.append(json.dumps(v, ensure_ascii=False, default=str))
            except (TypeError, ValueError):
                out.append(str(v))
    return pa.array(out, pa.string())


# ---- Parquet ---------------------------------------------------------------------------------


def _read_parquet(path: str, text_column: str) -> _FileRows:
    if os.path.getsize(path) == 0:
        raise DropError(path, "file is empty (0 bytes)", "drop the file again once it has been fully written")
    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for corrupt files
        raise DropError(
            path,
            f"unreadable Parquet ({type(error).__name__}: {error})",
            "re-export the file as Parquet (it may be truncated, still being copied, or another format)",
        ) from None
    if len(set(table.column_names)) < table.num_columns:
        table = table.rename_columns(_clean_header(list(table.column_names)))
    if table.num_rows == 0:
        raise _no_data(path, "the Parquet file has 0 rows")
    if text_column not in table.column_names:
        raise _missing_column(path, "text", text_column, table.column_names, "text_column")
    column = table[text_column]
    dtype = column.type
    value_type = dtype.value_type if pa.types.is_dictionary(dtype) else dtype
    if pa.types.is_list(value_type) or pa.types.is_large_list(value_type):  # conversations
        values = column.to_pylist()
    elif (
        pa.types.is_string(value_type)
        or pa.types.is_large_string(value_type)
        or pa.types.is_string_view(value_type)
    ):
        values = column.cast(pa.string()).to_pylist()
    else:
        raise DropError(
            path,
            f"text column {text_column!r} has type {dtype}, expected a string column (or a list of "
            "{role, content} structs for conversations)",
            "set text_column to a string column, or convert this column to strings before dropping the file",
        )
    texts: list[str] = []
    rows: list[int] = []
    rejects: list[tuple[int, str]] = []
    keep = np.zeros(len(values), dtype=bool)
    for index, value in enumerate(values):
        problem = _text_problem(value, text_column)
        if problem:
            rejects.append((index + 1, f"row {index + 1}: {problem}"))
            continue
        keep[index] = True
        texts.append(_document(value))
        rows.append(index + 1)
    rest = table.drop_columns([text_column]).filter(pa.array(keep))
    meta = {name: (rest[name].combine_chunks(), False) for name in rest.column_names}
    return _FileRows(os.path.basename(path), "row", texts, rows, meta, rejects, list(table.column_names))


# ---- Assembly --------------------------------------------------------------------------------


def _apply_id_column(files: list[_FileRows], paths: list[str], id_column: str) -> None:
    """Reject rows whose id is missing or repeats an earlier one (across the whole drop)."""
    seen: dict[Any, str] = {}
    for result, path in zip(files, paths, strict=True):
        if id_column not in result.meta:
            raise _missing_column(path, "id", id_column, result.columns_found, "id_column")
        column, raw = result.meta[id_column]
        ids = column if raw else column.to_pylist()
        keep: list[bool] = []
        for value, row in zip(ids, result.rows, strict=True):
            where = f"{result.unit} {row}"
            key = value.strip() if isinstance(value, str) else value
            if key is None or key == "":
                result.rejects.append((row, f"{where}: id column {id_column!r} is empty"))
                keep.append(False)
            elif _hashable(key) in seen:
                result.rejects.append(
                    (row, f"{where}: duplicate id {key!r} (first seen at {seen[_hashable(key)]})")
                )
                keep.append(False)
            else:
                seen[_hashable(key)] = f"{result.name} {where}"
                keep.append(True)
        if all(keep):
            continue
        result.rejects.sort()
        result.texts = [t for t, k in zip(result.texts, keep, strict=True) if k]
        result.rows = [r for r, k in zip(result.rows, keep, strict=True) if k]
        mask = pa.array(keep)
        result.meta = {
            name: ([v for v, k in zip(col, keep, strict=True) if k], True)
            if raw_
            else (col.filter(mask), False)
            for name, (col, raw_) in result.meta.items()
        }


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True, default=str) if isinstance(value, list | dict) else value


def _unify(parts: list[tuple[Any, bool] | None], lengths: list[int]) -> pa.Array:
    """One metadata column over all files: CSV strings typed together, numeric mixes as float64,
    other type conflicts as strings, missing files as nulls."""
    present = [p for p in parts if p is not None]
    if all(raw for _, raw in present):
        values: list[str | None] = []
        for part, n in zip(parts, lengths, strict=True):
            values.extend(part[0] if part is not None else [None] * n)
        return _infer_strings(values)
    arrays: list[pa.Array | None] = [
        None if p is None else (_infer_strings(p[0]) if p[1] else p[0]) for p in parts
    ]
    types = {a.type for a in arrays if a is not None and a.type != pa.null()}
    if not types:
        target: pa.DataType = pa.string()
    elif len(types) == 1:
        target = types.pop()
    elif all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in types):
        target = pa.float64()
    else:
        strings: list[Any] = []
        for array, n in zip(arrays, lengths, strict=True):
            strings.extend(array.to_pylist() if array is not None else [None] * n)
        return _as_strings(strings)
    return pa.concat_arrays(
        [
            pa.nulls(n, target) if a is None else (a if a.type == target else a.cast(target))
            for a, n in zip(arrays, lengths, strict=True)
        ]
    )


def _meta_name(name: str, used: set[str]) -> str:
    new = name if name else "unnamed"
    if new in RESERVED_COLUMNS or not name:
        new = f"meta_{new}"
    while new in used or new in RESERVED_COLUMNS:
        new = f"meta_{new}"
    return new


def _assemble(
    files: list[_FileRows], dataset: str, text_column: str, id_column: str | None
) -> DropReadResult:
    lengths = [len(f.texts) for f in files]
    n = sum(lengths)
    texts = [t for f in files for t in f.texts]
    columns: dict[str, pa.Array] = {
        "dataset": pa.array([dataset] * n, pa.string()),
        "doc_id": pa.array(np.arange(n, dtype=np.int32)),
        "doc_hash": pa.array([document_hash(t) for t in texts], pa.string()),
        "text": pa.array([str(t) for t in texts], pa.string()),
        "source_file": pa.array([f.name for f in files for _ in f.texts], pa.string()),
        "source_row": pa.array([r for f in files for r in f.rows], pa.int64()),
    }
    if any(isinstance(t, Conversation) for t in texts):
        columns[MESSAGES] = pa.array(
            [t.messages_json() if isinstance(t, Conversation) else None for t in texts], pa.string()
        )
    meta_names: dict[str, None] = {}
    for f in files:
        meta_names.update(dict.fromkeys(f.meta))
    renamed: dict[str, str] = {}
    used = set(RESERVED_COLUMNS)
    for name in meta_names:
        new = _meta_name(name, used)
        used.add(new)
        if new != name:
            renamed[name] = new
        columns[new] = _unify([f.meta.get(name) for f in files], lengths)
    documents = pa.table(columns)
    reject_rows = [(f.name, row, problem) for f in files for row, problem in f.rejects]
    rejects = pa.table(
        {
            "dataset": pa.array([dataset] * len(reject_rows), pa.string()),
            "source_file": pa.array([r[0] for r in reject_rows], pa.string()),
            "source_row": pa.array([r[1] for r in reject_rows], pa.int64()),
            "problem": pa.array([r[2] for r in reject_rows], pa.string()),
        },
        schema=REJECTS_SCHEMA,
    )
    summary: dict[str, Any] = {
        "dataset": dataset,
        "files": [f.name for f in files],
        "documents": n,
        "rejected": len(reject_rows),
        "text_column": text_column,
        "id_column": id_column,
        "metadata_columns": {
            name: str(documents.schema.field(name).type) for name in documents.column_names[6:]
        },
        "renamed_columns": renamed,
        "per_file": [{"file": f.name, "documents": len(f.texts), "rejected": len(f.rejects)} for f in files],
        "first_rejects": [r[2] for r in reject_rows[:_MAX_REASONS_IN_ERROR]],
    }
    return DropReadResult(documents, rejects, summary)
