"""The content-hash embeddings cache shared by document_embeddings, hard negatives and feature_scores."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl

from interp_assets.defs.shared import cached_document_embeddings, cached_text_embeddings
from interp_assets.ingest import doc_hash
from interp_assets.labels.embedding import DEFAULT_EMBEDDING_MODEL, sentence_embeddings
from resources.storage import StorageResource


def test_texts_embedded_once_and_shared_with_documents(tmp_path: Path) -> None:
    storage = StorageResource(data_dir=str(tmp_path))
    docs_text = ["The river flows north into the lake.", "A public school founded in 1901."]
    docs = pl.DataFrame({"doc_id": [0, 1], "doc_hash": [doc_hash(t) for t in docs_text], "text": docs_text})
    vectors, computed = cached_document_embeddings(storage, docs, DEFAULT_EMBEDDING_MODEL)
    assert computed == 2
    np.testing.assert_allclose(vectors, sentence_embeddings(docs_text), atol=1e-6)

    # an excerpt equal to a document comes from the cache; a new text is embedded once, then cached too
    texts = [docs_text[1], "An album released by the band in 1999.", docs_text[1]]
    first, computed = cached_text_embeddings(storage, texts, DEFAULT_EMBEDDING_MODEL)
    assert computed == 1
    np.testing.assert_allclose(first, sentence_embeddings(texts), atol=1e-5)
    again, computed = cached_text_embeddings(storage, texts, DEFAULT_EMBEDDING_MODEL)
    assert computed == 0
    np.testing.assert_array_equal(again, first)
    # another model or layer is another cache entry, never a wrong hit
    _, computed = cached_text_embeddings(storage, texts[:1], DEFAULT_EMBEDDING_MODEL, layer=3)
    assert computed == 1


def _vectors(hashes: list[str], value: float) -> pl.DataFrame:
    return pl.DataFrame(
        {"doc_hash": hashes, "embedding": [[value] * 4 for _ in hashes]},
        schema={"doc_hash": pl.String, "embedding": pl.List(pl.Float32)},
    )


def test_concurrent_writers_keep_each_others_embeddings(tmp_path: Path) -> None:
    """Two steps that read the cache at once and then both add what they computed (two workers on the
    celery executor): each write is a part of its own, so neither loses the other's entries (a single
    file rewritten by both lost the first writer's, and its documents were embedded again, in another
    batch, with other last bits). Many parts are merged into one, first part winning."""
    from interp_assets.defs import shared

    folder = tmp_path / "embeddings" / "key"
    known_a, parts_a = shared._read_embedding_cache(folder)
    known_b, parts_b = shared._read_embedding_cache(folder)
    shared._append_embedding_cache(folder, _vectors(["a1", "a2"], 1.0), known_a, parts_a)
    shared._append_embedding_cache(folder, _vectors(["b1", "a2"], 2.0), known_b, parts_b)
    known, parts = shared._read_embedding_cache(folder)
    assert len(parts) == 2 and sorted(known["doc_hash"]) == ["a1", "a2", "b1"]
    assert known.filter(pl.col("doc_hash") == "a2")["embedding"].to_list() == [[1.0] * 4]  # first wins

    for i in range(shared.EMBEDDING_PARTS_MERGED_AT):
        known, parts = shared._read_embedding_cache(folder)
        shared._append_embedding_cache(folder, _vectors([f"n{i}"], 3.0), known, parts)
    merged, parts = shared._read_embedding_cache(folder)
    assert len(parts) == 2  # the merged part and the write that triggered the merge
    assert merged.height == 3 + shared.EMBEDDING_PARTS_MERGED_AT
    assert merged.filter(pl.col("doc_hash") == "a2")["embedding"].to_list() == [[1.0] * 4]


def test_single_file_cache_of_earlier_versions_is_read(tmp_path: Path) -> None:
    from interp_assets.defs import shared

    folder = tmp_path / "embeddings" / "key"
    folder.parent.mkdir(parents=True)
    _vectors(["old"], 5.0).write_parquet(folder.with_suffix(".parquet"))
    known, parts = shared._read_embedding_cache(folder)
    assert parts == [] and known["doc_hash"].to_list() == ["old"]


def test_token_pass_makes_the_document_embeddings_document_embeddings_reads(tmp_path: Path) -> None:
    """On the embedded BERT reader, token_activations' forward pass leaves the document embeddings at the
    SAE's hook (document_embeddings' default layer) and at the last layer (the label scorer's) in the
    cache: document_embeddings then embeds only the document longer than its 256 tokens, and its table
    equals a pass of its own at that layer (to rounding). A second token pass (another SAE, the same
    documents) makes none again."""
    from dagster import DagsterInstance, materialize

    from interp_assets.defs.assets import ALL_ASSETS
    from interp_assets.defs.shared import embedded_document_hashes
    from interp_assets.engine.documents import document_embeddings
    from interp_assets.engine.reader_model import EMBEDDED_READER
    from interp_assets.storage.parquet import read_table
    from resources.local import local_resources

    data = tmp_path / "data"
    (data / "landing").mkdir(parents=True)
    texts = [f"Row {i}: the order arrived late and the box was damaged." for i in range(6)]
    texts.append("A very long complaint about the delivery " * 60)  # over 256 tokens
    pl.DataFrame({"text": texts}).write_csv(data / "landing" / "tickets.csv")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("datasets", ["tickets"])
    resources = local_resources(data)
    by_name = {k.to_user_string(): a for a in ALL_ASSETS for k in a.keys}
    steps = [by_name[n] for n in ("raw_documents", "token_activations", "document_embeddings")]
    result = materialize(steps, partition_key="tickets", instance=instance, resources=resources)
    assert result.success

    starts = [e.step_key for e in result.all_events if e.event_type_value == "STEP_START"]
    assert starts.index("token_activations") < starts.index("document_embeddings")
    metadata = result.asset_materializations_for_node("document_embeddings")[0].metadata
    assert metadata["layer"].value == 4  # the default SAE reads blocks.3.hook_resid_post
    assert metadata["embedded_now"].value == 1  # the long one; the token pass made the other six
    table = read_table(str(data / "parquet"), "document_embeddings", "tickets").collect().sort("doc_id")
    stored_texts = read_table(str(data / "parquet"), "raw_documents", "tickets").collect().sort("doc_id")
    got = np.asarray(table["embedding"].to_list(), dtype=np.float32)
    np.testing.assert_allclose(got, document_embeddings(stored_texts["text"].to_list(), layer=4), atol=1e-6)

    # the last layer's, for the scorer: the six the token pass read whole
    storage = resources["storage"]
    assert len(embedded_document_hashes(storage, EMBEDDED_READER, "float32", None)) == 6
    assert len(embedded_document_hashes(storage, EMBEDDED_READER, "float32", 4)) == 7
    # once the long one has its last-layer embedding too (the scorer would embed it), the same documents
    # read again (another SAE: a new activation cache) embed nothing more
    cached_document_embeddings(storage, stored_texts.select("doc_hash", "text"), EMBEDDED_READER)
    parts = sorted((storage.cache_dir / "embeddings").rglob("*.parquet"))
    shutil.rmtree(storage.activation_cache_root)
    assert materialize(steps[:2], partition_key="tickets", instance=instance, resources=resources).success
    assert sorted((storage.cache_dir / "embeddings").rglob("*.parquet")) == parts
