"""Sentence embeddings for hard negatives and offline label scoring.

The sentence-transformers recipe for all-MiniLM-L6-v2: mean of the last hidden state over the attention
mask, then L2 normalization (`interp_assets.engine.documents.document_embeddings` with its defaults). The
model is loaded once per process.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from interp_assets.engine.documents import document_embeddings
from interp_assets.engine.reader_model import EMBEDDED_READER

DEFAULT_EMBEDDING_MODEL = EMBEDDED_READER


def sentence_embeddings(
    texts: Sequence[str],
    model: str = DEFAULT_EMBEDDING_MODEL,
    batch_size: int = 64,
    max_length: int = 256,
) -> np.ndarray:
    """Embed `texts` as an `(n, dim)` float32 array of unit vectors (row i is text i).

    Texts are batched by length (less padding); longer texts are truncated to `max_length` tokens.
    """
    return document_embeddings(
        texts, model, layer=None, normalize=True, batch_size=batch_size, max_length=max_length
    )
