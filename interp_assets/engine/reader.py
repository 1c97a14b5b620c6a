"""The SAE reader: a language model plus a sparse autoencoder attached at one layer.

`SAEReader` is the loaded object that `interp_assets.engine.activations` drives; `load_reader` builds it
(the Dagster resource `resources.sae_reader.SAEReaderResource` is its configuration). torch,
transformers and sae_lens are imported inside functions so that loading the Dagster definitions stays fast.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from interp_assets.engine.reader_model import (
    EMBEDDED_READER,
    model_lock,
    resolve_model_path,
    shared_reader_model,
)

# The embedded SAE ships beside the resources (`resources/default_sae/`, SAELens on-disk format).
DEFAULT_SAE_DIR = str(Path(__file__).resolve().parents[2] / "resources" / "default_sae")
EMBEDDED_SAE = "embedded:minilm-l3-topk"

# Bumped whenever a change in our code changes stored activations: part of every cache key.
ENGINE_VERSION = "4"  # 4: text is always tokenized as text (split_special_tokens)

_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")
_LAYER_LISTS = (
    "encoder.layer",
    "transformer.h",
    "model.layers",
    "gpt_neox.layers",
    "layers",
    "h",
    "model.decoder.layers",
)


@dataclass(frozen=True)
class HookPoint:
    """Where the SAE reads the residual stream: the input (`pre`) or output (`post`) of layer `layer`."""

    layer: int
    position: Literal["pre", "post"]


def parse_hook_name(hook_name: str) -> HookPoint:
    """Map a SAELens hook name (`blocks.8.hook_resid_pre`, `blocks.19.hook_resid_post`) to a HookPoint."""
    match = _HOOK_RE.match(hook_name or "")
    if not match:
        raise ValueError(
            f"Unsupported SAE hook {hook_name!r}: only residual-stream hooks `blocks.<L>.hook_resid_pre` and "
            "`blocks.<L>.hook_resid_post` are supported. Set `hook_name` on the resource to override."
        )
    return HookPoint(layer=int(match.group(1)), position=match.group(2))  # type: ignore[arg-type]


def find_layer_module(model: Any, layer: int) -> Any:
    """Return the `layer`-th transformer block of a Hugging Face model (BERT, GPT-2, Llama, NeoX...)."""
    for path in _LAYER_LISTS:
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if hasattr(obj, "__len__") and hasattr(obj, "__getitem__"):
            if not 0 <= layer < len(obj):
                raise ValueError(
                    f"Layer {layer} does not exist: the model has {len(obj)} layers at `{path}`."
                )
            return obj[layer]
    raise ValueError(
        f"Could not find the list of transformer blocks in {type(model).__name__}; looked for {_LAYER_LISTS}."
    )


class SAEReader:
    """A loaded reader model + SAE with everything the activation engine needs."""

    def __init__(
        self,
        tokenizer: Any,
        model: Any,
        sae: Any,
        hook: HookPoint,
        *,
        device: str,
        dtype: str,
        max_length: int,
        token_budget: int,
        exclude_special_tokens: bool,
        chat_template: bool,
        exclude_template_tokens: bool,
        identity: dict[str, Any],
        activation_dtype: str = "float16",
        chat_role: str = "user",
    ) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.sae = sae
        self.hook = hook
        self.device = device
        self.dtype = dtype
        self.max_length = max_length
        self.token_budget = token_budget
        self.exclude_special_tokens = exclude_special_tokens
        self.chat_template = chat_template
        self.exclude_template_tokens = exclude_template_tokens
        self.identity = identity
        self.activation_dtype = activation_dtype
        self.chat_role = chat_role
        # one forward pass at a time on the model: the layer hook lives on it, and readers, document
        # embeddings and causal edits share one copy of it (threads share readers)
        self.forward_lock = model_lock(model)
        self.layer_module = find_layer_module(model, hook.layer)

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def prepend_bos(self) -> bool:
        """Whether the SAE was trained on inputs that start with the tokenizer's BOS token (SAELens
        `metadata.prepend_bos`); only meaningful for tokenizers that have one (BERT's [CLS] is added by
        the tokenizer itself)."""
        meta = getattr(self.sae.cfg, "metadata", None)
        return bool(getattr(meta, "prepend_bos", False)) and self.tokenizer.bos_token_id is not None

    @property
    def fingerprint(self) -> str:
        """Hash of what decides the stored activations (model, SAE, hook, dtype, settings, code)."""
        return identity_fingerprint(self.identity)


def identity_fingerprint(identity: dict[str, Any]) -> str:
    """The activation cache key of a reader identity (what decides its stored activations)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def resolve_device(device: str) -> str:
    """`auto` -> `cuda` when available else `cpu`; `cuda` without a GPU is a clear error."""
    check_device_name(device)
    if device in ("cpu", "mps"):
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError(
            "device='cuda' was requested but no CUDA GPU is visible; use device='auto' or 'cpu'."
        )
    return device


def check_device_name(device: str) -> None:
    """Raise ValueError unless `device` names a device the reader can run on (nothing is imported)."""
    if device not in ("cpu", "mps", "auto") and not device.startswith("cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:<n>', 'mps' or 'auto'; got {device!r}.")


def _sae_files_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for name in sorted(p.name for p in path.iterdir() if p.suffix in (".json", ".safetensors")):
        if name == "training_report.json":
            continue
        digest.update(name.encode())
        digest.update((path / name).read_bytes())
    return digest.hexdigest()[:20]


def _sae_dir(sae_path: str | None) -> Path:
    path = Path(sae_path or DEFAULT_SAE_DIR)
    if not (path / "cfg.json").is_file():
        raise FileNotFoundError(
            f"No SAE found at {path}: expected SAELens on-disk format "
            "(cfg.json + sae_weights.safetensors). "
            "Point `sae_path` at such a folder, or set `release` and `sae_id`."
        )
    return path


def load_sae(
    *, sae_path: str | None, release: str | None, sae_id: str | None, device: str, dtype: str
) -> tuple[Any, dict[str, Any]]:
    """Load an SAE: from a SAELens on-disk folder, or a SAELens release (`release` + `sae_id`).

    Returns the SAE and an identity dict (what it is, and a content hash for on-disk weights).
    """
    from sae_lens import SAE

    if release:
        if not sae_id:
            raise ValueError(
                f"SAE release {release!r} needs an `sae_id` (see SAELens's pretrained_saes.yaml)."
            )
        sae = SAE.from_pretrained(release, sae_id, device=device, dtype=dtype)
        return sae, {"release": release, "sae_id": sae_id}
    path = _sae_dir(sae_path)
    sae = SAE.load_from_disk(str(path), device=device, dtype=dtype)
    return sae, {"sae_path_hash": _sae_files_digest(path)}


@dataclass(frozen=True)
class ReaderIdentity:
    """What decides a reader's stored activations, known without loading its weights."""

    identity: dict[str, Any]
    d_sae: int
    device_setting: str  # as configured ("auto", "cpu", "cuda:0"...): resolving "auto" imports torch
    activation_dtype: str

    @property
    def device(self) -> str:
        """The device the reader runs on (`resolve_device` of the setting)."""
        return resolve_device(self.device_setting)

    @property
    def fingerprint(self) -> str:
        """The activation cache key: equal to the loaded `SAEReader.fingerprint`."""
        return identity_fingerprint(self.identity)


def _identity(
    *,
    model: str,
    config: Any,
    sae_identity: dict[str, Any],
    hook: HookPoint,
    dtype: str,
    max_length: int,
    exclude_special_tokens: bool,
    chat_template: bool,
    exclude_template_tokens: bool,
    activation_dtype: str,
    chat_role: str = "user",
) -> dict[str, Any]:
    model_path = resolve_model_path(model)
    return {
        "model": model
        if model == EMBEDDED_READER or not Path(model_path).is_dir()
        else Path(model_path).name,
        "model_config": model_config_digest(model, config),
        "sae": sae_identity,
        "hook": [hook.layer, hook.position],
        "dtype": dtype,
        "max_length": max_length,
        "exclude_special_tokens": exclude_special_tokens,
        "chat_template": chat_template,
        "exclude_template_tokens": exclude_template_tokens,
        "activation_dtype": activation_dtype,
        "chat_role": chat_role,
        "engine": ENGINE_VERSION,
    }


def reader_identity(
    *,
    model: str = EMBEDDED_READER,
    sae_path: str | None = None,
    release: str | None = None,
    sae_id: str | None = None,
    hook_name: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    max_length: int = 512,
    exclude_special_tokens: bool = True,
    chat_template: bool = False,
    exclude_template_tokens: bool = True,
    activation_dtype: str = "float16",
    chat_role: str = "user",
    **_: Any,
) -> ReaderIdentity | None:
    """The reader's identity from its configuration files alone (model config, SAE cfg.json and weight
    hash), so an unchanged run can find its activations cached without loading the model. None for a
    SAELens release (its config lives with the release; `load_reader` knows it after loading)."""
    _check_settings(activation_dtype, chat_role)
    check_device_name(device)
    if release:
        return None
    sae_dir = _sae_dir(sae_path)
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    hook = parse_hook_name(hook_name or (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name"))
    identity = _identity(
        model=model,
        config=None,  # read from the model's files: nothing is loaded
        sae_identity={"sae_path_hash": _sae_files_digest(sae_dir)},
        hook=hook,
        dtype=dtype,
        max_length=max_length,
        exclude_special_tokens=exclude_special_tokens,
        chat_template=chat_template,
        exclude_template_tokens=exclude_template_tokens,
        activation_dtype=activation_dtype,
        chat_role=chat_role,
    )
    return ReaderIdentity(identity, int(cfg["d_sae"]), device, activation_dtype)


def load_reader(
    *,
    model: str = EMBEDDED_READER,
    sae_path: str | None = None,
    release: str | None = None,
    sae_id: str | None = None,
    hook_name: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    max_length: int = 512,
    token_budget: int = 16384,
    exclude_special_tokens: bool = True,
    chat_template: bool = False,
    exclude_template_tokens: bool = True,
    activation_dtype: str = "float16",
    chat_role: str = "user",
) -> SAEReader:
    """Load the reader model and the SAE and check that they fit together."""
    _check_settings(activation_dtype, chat_role)
    device = resolve_device(device)
    tokenizer, net = shared_reader_model(model, device=device, dtype=dtype)
    sae, sae_identity = load_sae(
        sae_path=sae_path, release=release, sae_id=sae_id, device=device, dtype=dtype
    )
    hook = parse_hook_name(hook_name or sae.cfg.metadata.hook_name)
    hidden = getattr(net.config, "hidden_size", None) or getattr(net.config, "n_embd", None)
    if hidden is not None and int(hidden) != int(sae.cfg.d_in):
        raise ValueError(
            f"The SAE expects inputs of width {sae.cfg.d_in} but model {model!r} has hidden size {hidden}; "
            "pick the model the SAE was trained on."
        )
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"chat_template=True but the tokenizer of {model!r} defines no chat template.")
    identity = _identity(
        model=model,
        config=net.config,
        sae_identity=sae_identity,
        hook=hook,
        dtype=dtype,
        max_length=max_length,
        exclude_special_tokens=exclude_special_tokens,
        chat_template=chat_template,
        exclude_template_tokens=exclude_template_tokens,
        activation_dtype=activation_dtype,
        chat_role=chat_role,
    )
    return SAEReader(
        tokenizer,
        net,
        sae,
        hook,
        device=device,
        dtype=dtype,
        max_length=max_length,
        token_budget=token_budget,
        exclude_special_tokens=exclude_special_tokens,
        chat_template=chat_template,
        exclude_template_tokens=exclude_template_tokens,
        identity=identity,
        activation_dtype=activation_dtype,
        chat_role=chat_role,
    )


CHAT_ROLES = ("user", "assistant")


def _check_settings(activation_dtype: str, chat_role: str) -> None:
    """The reader settings both `reader_identity` and `load_reader` check before any file is read."""
    if activation_dtype not in ("float16", "float32"):
        raise ValueError(
            f"activation_dtype must be 'float16' (compact, ~3 significant digits) or 'float32' (exact); "
            f"got {activation_dtype!r}."
        )
    if chat_role not in CHAT_ROLES:
        raise ValueError(f"chat_role must be one of {list(CHAT_ROLES)}; got {chat_role!r}.")


def _model_config_data(model: str, config: Any = None) -> dict[str, Any]:
    """The model's configuration as a dict: a model in a local folder (the embedded default included) from
    its `config.json`, read as JSON without importing transformers; a hub id from `config` (the loaded
    model's) or its AutoConfig."""
    path = resolve_model_path(model)
    file = Path(path) / "config.json"
    if file.is_file():
        return json.loads(file.read_text())
    if config is None:
        from transformers import AutoConfig

        from interp_assets.engine.reader_model import _offline

        config = AutoConfig.from_pretrained(path, local_files_only=_offline())
    return config.to_dict()


def model_layer_count(model: str) -> int:
    """How many blocks the model has (its hidden states are 0 .. this), from its configuration alone."""
    data = _model_config_data(model)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):  # BERT/Llama, GPT-2, others
        if isinstance(data.get(name), int):
            return int(data[name])
    raise ValueError(f"model {model!r}: its configuration names no layer count (num_hidden_layers, n_layer)")


def model_config_digest(model: str, config: Any = None) -> str:
    """Digest of the reader model's configuration, the same whether or not the model is loaded
    (`_model_config_data`)."""
    data = _model_config_data(model, config)
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        data.pop(volatile, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
