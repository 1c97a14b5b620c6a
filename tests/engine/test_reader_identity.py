"""The reader's fingerprint is known from its configuration files, without loading weights, and equals
the loaded reader's: an unchanged run finds its activations cached and never loads the model."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tokenizers import word_tokenizer
from sae_lens import TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata
from transformers import GPT2Config, GPT2Model

from interp_assets.engine.reader import load_reader, reader_identity
from resources.sae_reader import SAEReaderResource

ROOT = Path(__file__).resolve().parents[2]


def _tiny_gpt2(folder: Path) -> Path:
    words = ["<pad>", "the", "cat", "sat", "on", "mat"]
    word_tokenizer(words, unk="<pad>", pad_token="<pad>").save_pretrained(folder)
    torch.manual_seed(0)
    GPT2Model(GPT2Config(vocab_size=6, n_embd=16, n_layer=2, n_head=2, n_positions=32)).save_pretrained(
        folder
    )
    return folder


def _tiny_sae(folder: Path, hook: str = "blocks.1.hook_resid_pre") -> Path:
    torch.manual_seed(1)
    cfg = TopKSAEConfig(
        d_in=16, d_sae=40, k=4, dtype="float32", device="cpu", metadata=SAEMetadata(hook_name=hook)
    )
    TopKSAE(cfg).save_model(folder)
    return folder


def test_embedded_default_identity_equals_the_loaded_reader() -> None:
    light = reader_identity()
    loaded = load_reader()
    assert light is not None
    assert light.identity == loaded.identity
    assert light.fingerprint == loaded.fingerprint
    assert light.d_sae == loaded.d_sae


@pytest.mark.parametrize("settings", [{}, {"max_length": 16, "activation_dtype": "float32"}])
def test_local_model_and_sae_identity_equals_the_loaded_reader(tmp_path: Path, settings: dict) -> None:
    model = str(_tiny_gpt2(tmp_path / "model"))
    sae = str(_tiny_sae(tmp_path / "sae"))
    light = reader_identity(model=model, sae_path=sae, **settings)
    loaded = load_reader(model=model, sae_path=sae, **settings)
    assert light is not None and light.fingerprint == loaded.fingerprint and light.d_sae == 40


def test_identity_changes_with_the_sae_weights_and_the_hook(tmp_path: Path) -> None:
    model = str(_tiny_gpt2(tmp_path / "model"))
    base = reader_identity(model=model, sae_path=str(_tiny_sae(tmp_path / "sae"))).fingerprint
    other_hook = reader_identity(
        model=model, sae_path=str(_tiny_sae(tmp_path / "hook", "blocks.0.hook_resid_post"))
    )
    assert other_hook.fingerprint != base
    retrained = tmp_path / "retrained"
    shutil.copytree(tmp_path / "sae", retrained)
    weights = retrained / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one flipped bit in the weights
    weights.write_bytes(bytes(data))
    assert reader_identity(model=model, sae_path=str(retrained)).fingerprint != base
    # a changed model configuration (read from config.json, nothing loaded) is another reader
    config = json.loads((Path(model) / "config.json").read_text())
    config["layer_norm_epsilon"] = 1e-3
    (Path(model) / "config.json").write_text(json.dumps(config))
    assert reader_identity(model=model, sae_path=str(_tiny_sae(tmp_path / "sae2"))).fingerprint != base


def test_the_light_identity_imports_neither_torch_nor_transformers_nor_sae_lens() -> None:
    # an unchanged run asks for the identity only: torch alone takes seconds to import
    code = (
        "import sys; from interp_assets.engine.reader import reader_identity; "
        "i = reader_identity(device='auto'); i.fingerprint; "
        "print(sorted(m for m in ('torch', 'transformers', 'sae_lens') if m in sys.modules)); "
        "print(i.device_setting, i.device)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == "[]" and lines[-1] == "auto cpu", out.stdout + out.stderr  # resolved on demand
    with pytest.raises(ValueError, match="device must be"):
        reader_identity(device="gpu")


def test_a_release_sae_has_no_light_identity_and_a_missing_sae_is_a_clear_error(tmp_path: Path) -> None:
    assert reader_identity(release="gpt2-small-res-jb", sae_id="blocks.8.hook_resid_pre") is None
    with pytest.raises(FileNotFoundError, match="No SAE found"):
        reader_identity(sae_path=str(tmp_path))


def test_resource_identity_does_not_load_the_model(tmp_path: Path) -> None:
    model = str(_tiny_gpt2(tmp_path / "model"))
    resource = SAEReaderResource(model=model, sae_path=str(_tiny_sae(tmp_path / "sae")), device="cpu")
    identity = resource.get_identity()
    assert not resource.loaded
    assert identity.fingerprint == resource.get_reader().fingerprint
    assert resource.loaded
    assert json.loads(json.dumps(identity.identity)) == identity.identity  # plain JSON: a stable key


def test_the_layer_count_comes_from_the_configuration_alone(tmp_path: Path) -> None:
    """feature_effects resolves a document-embedding layer given from the end (e.g. -3) against this, so
    that embeddings at or before the edit are never taken for downstream ones."""
    from interp_assets.engine.reader import model_layer_count
    from interp_assets.engine.reader_model import EMBEDDED_READER

    assert model_layer_count(EMBEDDED_READER) == 6  # all-MiniLM-L6-v2
    gpt2 = _tiny_gpt2(tmp_path / "gpt2")
    assert model_layer_count(str(gpt2)) == 2  # GPT-2 names it n_layer
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"hidden_size": 16}))
    with pytest.raises(ValueError, match="names no layer count"):
        model_layer_count(str(tmp_path / "odd"))
