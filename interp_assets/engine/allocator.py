"""glibc allocator settings that keep long CPU runs both fast and flat in memory (no-ops elsewhere).

Two opposite needs meet in the activation engine:
- the model's transient tensors (MBs to tens of MBs per batch, freed at once) are fastest on the heap: a
  fresh `mmap` per tensor costs a zeroed page per 4 KiB (1,000 SST-2 documents: about 2.2 s with heap
  transients, 3.0-3.5 s with every buffer of 1 MiB and more mmapped);
- the heap fragments when transients of ever-different sizes share it with buffers that outlive them:
  peak memory then grew chunk after chunk (30,720 documents, every transient on the heap: the peak went
  946 -> 1,427 MB over 15 chunks).
So buffers of 1 MiB and more are mmapped by default (returned to the OS when freed); `transient_heap()`
serves the forward pass's tensors under 2 MiB from the heap, `own_mappings()` keeps a batch's results off
it, and a `Workspace` holds the biggest transients in buffers reused by every batch of a chunk. History:
with the hooked forward, a 4 MiB limit took 10,240 documents from 5.6M to 2.5M page faults with flat
per-chunk peaks (857, 938, 979, 986, 986 MB); with the fused BERT forward (whose biggest tensors live in
the Workspace) the same limit let the heap settle 70-100 MB higher (20,000 documents: RSS after each chunk
plateaued at 1,070-1,120 MB, against 1,000-1,020 MB at 2 MiB), at the same page-fault count.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20  # outside forward passes: 1 MiB and more gets its own mapping
TRANSIENT_THRESHOLD_BYTES = 2 << 20  # inside a forward pass: tensors under 2 MiB from the heap

_libc: ctypes.CDLL | None | bool = None
_open_blocks: list[tuple[object, int]] = []  # (block, threshold) of the open blocks, oldest first
_open_blocks_lock = threading.Lock()


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL("libc.so.6")
            lib.mallopt  # noqa: B018 - AttributeError on a libc without mallopt (musl)
            lib.malloc_trim  # noqa: B018
            lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
            _libc = lib
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


@contextmanager
def _mmap_threshold(nbytes: int) -> Iterator[None]:
    """Set glibc's mmap threshold to `nbytes` inside the block; after it, to the innermost block still open.

    Process-wide: blocks of several threads share one setting (the one entered last wins while it is
    open; that changes speed and memory, never results), and leaving any block restores the setting of
    the latest block still open, or MMAP_THRESHOLD_BYTES once none is.
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    token = object()
    with _open_blocks_lock:
        _open_blocks.append((token, nbytes))
        libc.mallopt(_M_MMAP_THRESHOLD, nbytes)
    try:
        yield
    finally:
        with _open_blocks_lock:
            _open_blocks[:] = [block for block in _open_blocks if block[0] is not token]
            libc.mallopt(_M_MMAP_THRESHOLD, current_threshold())


def current_threshold() -> int:
    """The mmap threshold in force: the latest open block's, else MMAP_THRESHOLD_BYTES."""
    return _open_blocks[-1][1] if _open_blocks else MMAP_THRESHOLD_BYTES


def transient_heap() -> AbstractContextManager[None]:
    """Serve allocations from the heap inside the block: for tensors that are all freed by its end."""
    return _mmap_threshold(TRANSIENT_THRESHOLD_BYTES)


def own_mappings() -> AbstractContextManager[None]:
    """Map buffers allocated inside the block on their own when the heap has no free room for them: for
    results that outlive a batch (best effort: glibc still serves a request from free heap space first).

    Kept off the heap, a batch's results cannot pin the heap above the hole its transients leave.
    """
    return _mmap_threshold(0)


def release_freed_memory() -> None:
    """Hand memory freed so far back to the OS (`malloc_trim`); called after each cache chunk."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class Workspace:
    """Reusable buffers for the big transients of a run of batches (one `encode_texts` call).

    A freshly allocated tensor of MBs costs a zeroed page per 4 KiB on first touch, a real share of the
    matmul that fills it (on this project's 2-core VM, 1,000 SST-2 documents took about 150k page faults
    per run without these buffers, 30k with them). Each named buffer grows (doubling, so rarely) to
    the largest size asked for, in its own mapping (it outlives the batches, so it stays off the heap
    their transients share; a mapping's pages take memory only once touched, so the headroom is free),
    and lives as long as the Workspace; a caller must be done with a buffer before asking for it again.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Any] = {}
        self._derived: dict[Any, Any] = {}

    def derived(self, key: Any, compute: Callable[[], Any]) -> Any:
        """`compute()`, computed once per Workspace for `key`: for values derived from weights (fused or
        rescaled matrices), which a run of batches may take as fixed but a later run must derive again."""
        if key not in self._derived:
            with own_mappings():  # lives across batches, like the buffers
                self._derived[key] = compute()
        return self._derived[key]

    def get(self, name: str, rows: int, cols: int, like: Any) -> Any:
        """A [rows, cols] tensor (uninitialized) with the dtype and device of tensor `like`."""
        size = max(rows * cols, 1)
        buffer = self._buffers.get(name)
        if (
            buffer is None
            or buffer.numel() < size
            or buffer.dtype != like.dtype
            or buffer.device != like.device
        ):
            grown = size if buffer is None else max(size, buffer.numel() * 2)  # few regrowths
            self._buffers.pop(name, None)  # free the old one before the larger one is allocated
            buffer = _mapped_empty(grown, like) if like.device.type == "cpu" else like.new_empty(grown)
            self._buffers[name] = buffer
        return buffer[: rows * cols].view(rows, cols)


def _mapped_empty(numel: int, like: Any) -> Any:
    """An uninitialized 1-D CPU tensor (dtype of `like`) of `numel` elements in an anonymous mapping.

    Such a buffer outlives the batches whose transients share the heap, so it must not sit in the heap:
    glibc may place even a request above its mmap threshold in a free heap chunk, where it pins the heap
    and leaves a hole when freed. The mapping is returned to the OS when the tensor is freed.
    """
    import torch

    mapping = mmap.mmap(-1, max(numel * like.element_size(), 1))
    return torch.frombuffer(mapping, dtype=like.dtype, count=numel)
