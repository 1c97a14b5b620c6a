"""The document SAE ensemble: seeded members, one feature numbering, saved and loaded as trained."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from interp_assets.engine.documents import (
    DocumentSAEConfig,
    encode_documents,
    load_document_sae,
    save_document_sae,
    train_document_sae,
    train_document_saes,
)


def _clustered_embeddings(n: int = 240, dim: int = 16, seed: int = 0) -> np.ndarray:
    """Unit vectors around 6 centres: structure an SAE can learn in a few steps."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, dim))
    x = centres[rng.integers(0, 6, size=n)] + 0.3 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


CONFIG = DocumentSAEConfig(d_sae=16, k=2, steps=60, batch_size=32, members=3, seed=5)


def test_an_interrupt_stops_every_member_within_a_step() -> None:
    """Ctrl-C (or a stopped run) half a second into training three members of 20,000 steps each (over a
    minute in all): the call raises within a step, leaves no thread behind, and torch keeps its thread
    count."""
    import torch

    threads = torch.get_num_threads()
    long = DocumentSAEConfig(d_sae=16, k=2, steps=20_000, max_epochs=100_000, batch_size=32, members=3)
    ctrl_c = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    started = time.monotonic()
    ctrl_c.start()
    with pytest.raises(KeyboardInterrupt):
        train_document_saes(_clustered_embeddings(), long)
    assert time.monotonic() - started < 10.0
    assert not [t for t in threading.enumerate() if t.name.startswith("document-sae")]
    assert torch.get_num_threads() == threads


def test_members_are_the_seeded_single_saes_and_share_one_numbering(tmp_path: Path) -> None:
    x = _clustered_embeddings()
    saes, report = train_document_saes(x, CONFIG)
    assert len(saes) == 3 and report["members"] == 3 and report["n_features"] == 48
    assert [r["seed"] for r in report["member_reports"]] == [5, 6, 7]
    assert report["fraction_variance_explained"] == pytest.approx(
        np.mean([r["fraction_variance_explained"] for r in report["member_reports"]])
    )
    # members train stacked, each as its seed trains alone (to float rounding)
    for i, member in enumerate(saes):
        single, _ = train_document_sae(
            x, DocumentSAEConfig(d_sae=16, k=2, steps=60, batch_size=32, seed=5 + i)
        )
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            np.testing.assert_allclose(
                getattr(member, name).detach(), getattr(single, name).detach(), rtol=1e-6
            )
    # member 1 is exactly the SAE that seed 6 trains alone
    alone, _ = train_document_sae(x, DocumentSAEConfig(d_sae=16, k=2, steps=60, batch_size=32, seed=6))
    rows, feature, value = encode_documents(saes, x)
    r1, f1, v1 = encode_documents(alone, x)
    in_member_1 = (feature >= 16) & (feature < 32)
    assert np.array_equal(rows[in_member_1], r1) and np.array_equal(feature[in_member_1] - 16, f1)
    np.testing.assert_allclose(value[in_member_1], v1, rtol=1e-6)
    # k per document in each member, rows in document order
    per = np.zeros((x.shape[0], 3), dtype=int)
    np.add.at(per, (rows, feature // 16), 1)
    assert per.max() <= 2 and np.all(np.diff(rows) >= 0)

    save_document_sae(saes, str(tmp_path / "sae"), report)
    loaded = load_document_sae(str(tmp_path / "sae"))
    assert isinstance(loaded, list) and len(loaded) == 3
    again = encode_documents(loaded, x)
    assert all(np.array_equal(a, b) for a, b in zip(again[:2], (rows, feature), strict=True))
    np.testing.assert_allclose(again[2], value, rtol=1e-6)


def test_a_single_saved_sae_still_loads_as_one(tmp_path: Path) -> None:
    x = _clustered_embeddings()
    sae, report = train_document_sae(x, CONFIG)
    save_document_sae(sae, str(tmp_path / "one"), report)
    loaded = load_document_sae(str(tmp_path / "one"))
    assert not isinstance(loaded, list)
    assert np.array_equal(encode_documents(loaded, x)[1], encode_documents(sae, x)[1])


def test_an_ensemble_needs_a_member() -> None:
    with pytest.raises(ValueError, match="members >= 1"):
        train_document_saes(_clustered_embeddings(), DocumentSAEConfig(d_sae=16, k=2, steps=10, members=0))


def test_a_small_corpus_trains_for_max_epochs_not_all_steps() -> None:
    x = _clustered_embeddings()  # 240 documents: 7 batches of 32 per pass
    capped = DocumentSAEConfig(d_sae=16, k=2, steps=60, batch_size=32, max_epochs=2, members=1)
    _, report = train_document_saes(x, capped)
    assert report["samples_seen"] <= 2 * 240
    _, full = train_document_saes(x, DocumentSAEConfig(d_sae=16, k=2, steps=60, batch_size=32, members=1))
    assert full["samples_seen"] == 60 * 32  # 60 steps are under 200 passes: the step budget binds
