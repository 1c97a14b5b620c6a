"""The content-hash embeddings cache shared by document_embeddings, hard negatives and feature_scores."""

from __future__ import annotations

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
