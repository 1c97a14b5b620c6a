"""The shipped default SAE loads with SAELens and reconstructs the embedded reader's layer-3 activations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
sae_lens = pytest.importorskip("sae_lens")

from interp_assets.engine.reader_model import EMBEDDED_READER, load_reader_model  # noqa: E402

SAE_DIR = Path(__file__).resolve().parents[2] / "resources" / "default_sae"

# Minimum fraction of variance explained on the sentences below. The shipped SAE scores 0.836 on the
# held-out SST-2 dev set and 0.828 on DBpedia's held-out split (see training_report.json); leave headroom.
MIN_FVE = 0.72

SENTENCES = [
    "The film is a quiet triumph of acting and restraint.",
    "I hated every minute of this dull, bloated mess.",
    "A warm, funny and surprisingly moving story.",
    "The plot makes no sense at all.",
    "Her performance is the best thing in the movie.",
    "It drags on for far too long.",
    "Beautiful photography, but the script is thin.",
    "The kids in the audience laughed all the way through.",
    "An ambitious failure that still deserves to be seen.",
    "Nothing new here, just the same old clichés.",
    "The soundtrack is loud and annoying.",
    "What a delightful surprise!",
    "The director knows exactly what he is doing.",
    "Two hours of my life I will never get back.",
    "Smart, sharp and often very funny.",
    "The ending left me cold.",
    "It is a charming little comedy about growing up.",
    "The special effects look cheap.",
    "A masterpiece of suspense.",
    "Boring characters, predictable twists.",
]


@pytest.fixture(scope="module")
def sae() -> object:
    return sae_lens.SAE.load_from_disk(str(SAE_DIR), device="cpu")


@pytest.fixture(scope="module")
def layer3_acts() -> torch.Tensor:
    """Layer-3 outputs of every real token of SENTENCES ([CLS], [SEP] and padding excluded)."""
    tokenizer, model = load_reader_model(EMBEDDED_READER)
    captured: list[torch.Tensor] = []

    def hook(_module: object, _inputs: object, output: object) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)  # type: ignore[index]

    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt", return_special_tokens_mask=True)
    handle = model.encoder.layer[3].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        handle.remove()
    keep = enc["attention_mask"].bool() & ~enc["special_tokens_mask"].bool()
    return captured[0][keep].float()


def test_shipped_sae_config(sae: object) -> None:
    report = json.loads((SAE_DIR / "training_report.json").read_text())
    assert isinstance(sae, sae_lens.TopKSAE)
    assert sae.cfg.d_in == 384
    assert sae.cfg.d_sae == report["d_sae"] == 4096
    assert sae.cfg.k == report["k"]
    assert sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert sae.cfg.metadata.model_name == EMBEDDED_READER
    assert sae.cfg.normalize_activations == "none"  # the scaling factor is folded into the weights
    assert (SAE_DIR / "sae_weights.safetensors").stat().st_size < 16_000_000  # float32, 4,096 x 384, twice


def test_reconstructs_reader_activations(sae: object, layer3_acts: torch.Tensor) -> None:
    x = layer3_acts
    assert x.shape[0] > 150 and x.shape[1] == 384
    with torch.inference_mode():
        feats = sae.encode(x)
        recon = sae.decode(feats)
    assert feats.shape == (x.shape[0], sae.cfg.d_sae)
    assert (feats >= 0).all()
    active = (feats > 0).sum(dim=-1)
    assert int(active.max()) <= sae.cfg.k
    assert float(active.float().mean()) > sae.cfg.k / 2  # TopK fires (nearly) k features per token
    fve = 1.0 - (recon - x).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum()
    assert float(fve) > MIN_FVE
    # Different tokens use different features: the SAE is not collapsed onto a few latents.
    assert int((feats > 0).any(dim=0).sum()) > 200
