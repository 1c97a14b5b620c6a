"""Which documents share content: the groups the evidence/held-out split draws by.

Two documents share content when their normalized texts are identical, when one (of at least
`MIN_WORDS` words) is contained in the other, or when they share a normalized sentence (of at least
`MIN_WORDS` words) or an 8-word shingle. Each of these is a *key* (a 64-bit hash of a word sequence); a
document links to its keys, and connected components of that graph are the groups. A key held by more
than `boilerplate_limit(n)` documents (a stock phrase, a canned reply) does not link documents, else it
would merge most of a corpus, and is not content a split keeps apart; identical texts always link. When
stock sentences below that limit still chain a templated corpus into a group larger than
`max_group_size(n)`, the limit of that group's keys is halved (down to 2) until no group is.
`ContentIndex.shares` tells which documents share a key with given ones (boilerplate on request).

Words are `\\w+` runs of the normalized text, so "it 's" and "it's" are the same words. Everything is
vectorized over all tokens of a corpus (word hashes from polars, n-gram hashes in numpy): about a second
for SST-2 train's 67k phrases.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

MIN_WORDS = 4  # shorter texts and sentences ("yes.", "the film") are not content worth keeping apart
SHINGLE = 8  # words per shingle
TOKEN_PATTERN = r"\w+|[.!?]+(?:\s|$)"  # a word, or a sentence end (terminal punctuation before a space)
_EDGE_PUNCTUATION = re.compile(r"^[\W_]+|[\W_]+$")
_PRIME = np.uint64(0x100000001B3)
_IDENTITY_SALT = np.uint64(0x5EED1DE57117)


def normalize_text(text: str) -> str:
    """NFKC, casefold, whitespace collapsed to single spaces, punctuation stripped at both ends."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return _EDGE_PUNCTUATION.sub("", text)


def boilerplate_limit(n_docs: int) -> int:
    """A key held by more documents than this is boilerplate: max(20, 1% of the documents)."""
    return max(20, n_docs // 100)


def max_group_size(n_docs: int) -> int:
    """The largest group one document's rephrasings make: max(50, 1% of the documents). A larger one is
    a templated corpus chained by stock sentences; `content_index` lowers the boilerplate limit there."""
    return max(50, n_docs // 100)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _powers(n: int) -> np.ndarray:
    """_PRIME ** i mod 2**64 for i < n."""
    out = np.ones(max(n, 1), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(1, n):
            out[i] = out[i - 1] * _PRIME
    return out


def _key(poly: np.ndarray, length: np.ndarray | int) -> np.ndarray:
    """The key of word sequences from their polynomial hash and length (the same for a whole text, a
    sentence or an n-gram of the same words)."""
    return mix64(poly ^ mix64(np.asarray(length, dtype=np.uint64)))


def _segment_keys(
    words: np.ndarray, starts: np.ndarray, lengths: np.ndarray, powers: np.ndarray
) -> np.ndarray:
    """Keys of contiguous word segments (`starts`/`lengths` index `words`; all lengths >= 1)."""
    if starts.size == 0:
        return np.empty(0, dtype=np.uint64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pos = np.arange(int(lengths.sum())) - np.repeat(offsets, lengths)
    with np.errstate(over="ignore"):
        terms = words[np.repeat(starts, lengths) + pos] * powers[pos]
    return _key(np.add.reduceat(terms, offsets), lengths)


def _ngram_keys(
    words: np.ndarray, doc: np.ndarray, n: int, powers: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`(doc, key)` of every n-gram that lies within one document."""
    m = words.size - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.uint64)
    valid = doc[:m] == doc[n - 1 :]
    poly = words[:m].copy()
    with np.errstate(over="ignore"):
        for j in range(1, n):
            poly += words[j : j + m] * powers[j]
    return doc[:m][valid], _key(poly[valid], n)


@dataclass(frozen=True)
class ContentIndex:
    """Content groups of a corpus (row i = document i) and every document's content keys.

    `group[i]`: the group of document i (documents that share content, transitively). `keys`: a sparse
    documents x keys incidence matrix of every key held by two or more documents, boilerplate included;
    `boilerplate[k]`: key k links no documents (held by more than `boilerplate_limit(n)` documents, or
    by more than a lower limit inside a group that was larger than `max_group_size(n)`).
    """

    group: np.ndarray
    keys: Any  # scipy.sparse.csr_matrix (n_docs x n_keys), 1.0 where a document holds a key
    boilerplate: np.ndarray

    @property
    def n_boilerplate_keys(self) -> int:
        return int(self.boilerplate.sum())

    @property
    def n_docs(self) -> int:
        return int(self.group.size)

    def group_sizes(self) -> np.ndarray:
        """Size of each document's group (row i = document i)."""
        return np.bincount(self.group)[self.group]

    def shares(self, with_rows: Sequence[int] | np.ndarray, *, boilerplate: bool = True) -> np.ndarray:
        """Boolean per document: it holds a key (sentence, shingle, containment or identical text) that
        one of the documents at `with_rows` holds; boilerplate keys count unless `boilerplate=False`."""
        rows = np.asarray(with_rows, dtype=np.int64)
        mark = np.zeros(self.keys.shape[1], dtype=np.float32)
        if rows.size:
            mark[self.keys[rows].indices] = 1.0
        if not boilerplate:
            mark[self.boilerplate] = 0.0
        return np.asarray(self.keys @ mark) > 0


def content_index(texts: Sequence[str] | pl.Series) -> ContentIndex:
    """Group documents that share content (see the module docstring); row i is `texts[i]`."""
    from scipy.sparse import csr_matrix

    normalized = pl.Series("text", [normalize_text(t or "") for t in texts], dtype=pl.String)
    n_docs = normalized.len()
    tokens = (
        pl.DataFrame({"doc": pl.arange(0, n_docs, eager=True, dtype=pl.Int64), "tok": normalized})
        .with_columns(pl.col("tok").str.extract_all(TOKEN_PATTERN))
        .explode("tok")
        .drop_nulls("tok")
        .with_columns(
            ~pl.col("tok").str.contains(r"^\w").alias("end"),
        )
        .with_columns(pl.col("end").cum_sum().over("doc").alias("sentence"))
        .filter(~pl.col("end"))
    )
    doc = tokens["doc"].to_numpy()
    words = mix64(tokens["tok"].hash(seed=0).to_numpy().astype(np.uint64))
    sentence = tokens["sentence"].to_numpy()

    # documents and sentences as (start, length) runs over the word array
    doc_start, doc_len, doc_of_run = _runs(doc, doc)
    powers = _powers(max(SHINGLE, int(doc_len.max(initial=0))))
    pairs_doc: list[np.ndarray] = []
    pairs_key: list[np.ndarray] = []

    # identical normalized text (any length): its own key space, never boilerplate
    full = _segment_keys(words, doc_start, doc_len, powers)
    identity = mix64(full ^ _IDENTITY_SALT)
    # containment of a short text (MIN_WORDS..SHINGLE-1 words): its key among other documents' n-grams
    # (a longer contained text shares all its shingles with the container)
    short = (doc_len >= MIN_WORDS) & (doc_len < SHINGLE)
    short_keys = full[short]
    for n in range(MIN_WORDS, SHINGLE):
        d, k = _ngram_keys(words, doc, n, powers)
        hit = np.isin(k, short_keys)
        pairs_doc.append(d[hit])
        pairs_key.append(k[hit])
    d, k = _ngram_keys(words, doc, SHINGLE, powers)
    pairs_doc.append(d)
    pairs_key.append(k)
    sent_start, sent_len, sent_doc = _runs(doc * (int(sentence.max(initial=0)) + 1) + sentence, doc)
    long_sentences = sent_len >= MIN_WORDS
    pairs_doc.append(sent_doc[long_sentences])
    pairs_key.append(_segment_keys(words, sent_start[long_sentences], sent_len[long_sentences], powers))

    schema = {"doc": pl.Int64, "key": pl.UInt64}
    content = pl.DataFrame(
        {"doc": np.concatenate(pairs_doc), "key": np.concatenate(pairs_key)}, schema=schema
    ).with_columns(identity=pl.lit(False))
    same = pl.DataFrame({"doc": doc_of_run, "key": identity}, schema=schema).with_columns(
        identity=pl.lit(True)
    )
    pairs = pl.concat([content, same]).unique(["doc", "key"])
    pairs = pairs.with_columns(pl.len().over("key").alias("df")).filter(pl.col("df") >= 2)
    pairs = pairs.with_columns(pl.col("key").rank("dense").cast(pl.Int64).sub(1).alias("kid"))
    n_keys = int(pairs["kid"].max()) + 1 if pairs.height else 0
    doc_ids, key_ids = pairs["doc"].to_numpy(), pairs["kid"].to_numpy()
    key_df = np.zeros(n_keys, dtype=np.int64)
    key_df[key_ids] = pairs["df"].to_numpy()
    key_identity = np.zeros(n_keys, dtype=bool)
    key_identity[key_ids] = pairs["identity"].to_numpy()
    key_limit = np.full(n_keys, boilerplate_limit(n_docs), dtype=np.int64)
    while True:
        boilerplate_keys = ~key_identity & (key_df > key_limit)
        group = _components(n_docs, n_keys, doc_ids, key_ids, ~boilerplate_keys[key_ids])
        sizes = np.bincount(group, minlength=1)
        # stock sentences that chain a templated corpus into one big group are boilerplate there too
        big = sizes[group[doc_ids]] > max_group_size(n_docs)
        lower = np.zeros(n_keys, dtype=bool)
        lower[key_ids[big]] = True
        lower &= ~key_identity & ~boilerplate_keys & (key_limit > 2)
        if not lower.any():
            break
        key_limit[lower] = np.maximum(2, key_limit[lower] // 2)

    incidence = csr_matrix(
        (np.ones(pairs.height, dtype=np.float32), (doc_ids, key_ids)), shape=(n_docs, n_keys)
    )
    return ContentIndex(group=group, keys=incidence, boilerplate=boilerplate_keys)


def _components(
    n_docs: int, n_keys: int, doc_ids: np.ndarray, key_ids: np.ndarray, linking: np.ndarray
) -> np.ndarray:
    """Connected components of documents through the `linking` (doc, key) pairs, numbered 0..k-1."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    size = n_docs + n_keys
    edges = (doc_ids[linking], key_ids[linking] + n_docs)
    graph = coo_matrix((np.ones(edges[0].size, dtype=np.int8), edges), shape=(size, size))
    _, labels = connected_components(graph, directed=False)
    return np.unique(labels[:n_docs], return_inverse=True)[1].astype(np.int64)


def _runs(run_id: np.ndarray, doc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(start, length, doc)` of each run of equal consecutive `run_id` values."""
    if run_id.size == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty
    starts = np.flatnonzero(np.concatenate([[True], run_id[1:] != run_id[:-1]]))
    lengths = np.diff(np.concatenate([starts, [run_id.size]]))
    return starts, lengths, doc[starts]
