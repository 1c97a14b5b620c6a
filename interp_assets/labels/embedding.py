"""Sentence embeddings for hard negatives and offline label scoring.

The sentence-transformers recipe for all-MiniLM-L6-v2: mean of the last hidden state over the attention
mask, then L2 normalization. The model is loaded once per process (cache keyed by model name).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from interp_assets.engine.reader_model import EMBEDDED_READER, load_reader_model

DEFAULT_EMBEDDING_MODEL = EMBEDDED_READER

_MODELS: dict[str, tuple[Any, Any]] = {}
_LOCK = threading.Lock()


def _model(model: str) -> tuple[Any, Any]:
    with _LOCK:
        if model not in _MODELS:
            _MODELS[model] = load_reader_model(model)
        return _MODELS[model]


def sentence_embeddings(
    texts: Sequence[str],
    model: str = DEFAULT_EMBEDDING_MODEL,
    batch_size: int = 64,
    max_length: int = 256,
) -> np.ndarray:
    """Embed `texts` as an `(n, dim)` float32 array of unit vectors (row i is text i).

    Texts are batched by length (less padding); longer texts are truncated to `max_length` tokens.
    """
    import torch

    tokenizer, net = _model(model)
    dim = int(net.config.hidden_size)
    texts = [str(t) for t in texts]
    out = np.zeros((len(texts), dim), dtype=np.float32)
    if not texts:
        return out
    order = np.argsort([len(t) for t in texts], kind="stable")
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            hidden = net(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
            out[idx] = pooled.cpu().numpy()
    return out
