"""The allocator helpers: nested mmap-threshold blocks and the reusable workspace."""

import torch

from interp_assets.engine import allocator
from interp_assets.engine.allocator import MMAP_THRESHOLD_BYTES, TRANSIENT_THRESHOLD_BYTES, Workspace


def test_nested_blocks_restore_the_enclosing_threshold():
    if allocator._glibc() is None:  # not glibc: the blocks are no-ops
        return
    assert allocator.current_threshold() == MMAP_THRESHOLD_BYTES
    with allocator.transient_heap():
        assert allocator.current_threshold() == TRANSIENT_THRESHOLD_BYTES
        with allocator.own_mappings():
            assert allocator.current_threshold() == 0
        assert allocator.current_threshold() == TRANSIENT_THRESHOLD_BYTES  # not the process default
    assert allocator.current_threshold() == MMAP_THRESHOLD_BYTES


def test_blocks_of_two_threads_that_overlap_without_nesting_leave_the_default():
    """Thread A enters, B enters, A leaves, B leaves (and the same with own_mappings inside A)."""
    if allocator._glibc() is None:
        return
    for outer_a in (allocator.transient_heap, allocator.own_mappings):
        a, b = outer_a(), allocator.transient_heap()
        a.__enter__()
        b.__enter__()
        a.__exit__(None, None, None)
        assert allocator.current_threshold() == TRANSIENT_THRESHOLD_BYTES  # B is still open
        b.__exit__(None, None, None)
        assert allocator.current_threshold() == MMAP_THRESHOLD_BYTES


def test_workspace_reuses_a_buffer_grows_it_with_headroom_and_follows_dtype():
    ws, like = Workspace(), torch.zeros(1)
    first = ws.get("a", 10, 8, like)
    assert first.shape == (10, 8)
    smaller = ws.get("a", 4, 8, like)
    assert smaller.data_ptr() == first.data_ptr()  # the same memory, no new allocation
    grown = ws.get("a", 11, 8, like)
    assert grown.shape == (11, 8)
    assert ws.get("a", 20, 8, like).data_ptr() == grown.data_ptr()  # doubled: 160 >= 160
    assert ws.get("b", 2, 2, like).data_ptr() != grown.data_ptr()  # names are separate buffers
    half = ws.get("a", 4, 8, torch.zeros(1, dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16 and half.shape == (4, 8)
    assert ws.get("a", 0, 8, like).shape == (0, 8)


def test_workspace_derives_a_value_once_per_key():
    ws, calls = Workspace(), []
    assert ws.derived("w", lambda: calls.append(1) or 41) == 41
    assert ws.derived("w", lambda: calls.append(1) or 42) == 41
    assert ws.derived(("w", 2), lambda: 7) == 7 and calls == [1]
    assert Workspace().derived("w", lambda: 42) == 42  # a new run derives again
