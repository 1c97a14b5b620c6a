"""The SAE reader resource: which language model and SAE read the documents, loaded once per process.

The loading itself (model, SAE, hook mapping) is `interp_assets.engine.reader`; this module is only the
Dagster configuration around it.
"""

from __future__ import annotations

import json
import threading

from dagster import ConfigurableResource
from pydantic import PrivateAttr

from interp_assets.engine.reader import ReaderIdentity, SAEReader, load_reader, reader_identity
from interp_assets.engine.reader_model import EMBEDDED_READER

_READERS: dict[str, SAEReader] = {}
_READERS_LOCK = threading.Lock()


class SAEReaderResource(ConfigurableResource):
    """The language model + SAE used to read documents. Loaded once per process, on first use.

    Defaults run the embedded all-MiniLM-L6-v2 reader with the SAE that ships in `resources/default_sae`.
    Point `model` at a Hugging Face id or folder and `release`/`sae_id` (or `sae_path`) at its SAE for real
    models, e.g. model="gpt2", release="gpt2-small-res-jb", sae_id="blocks.8.hook_resid_pre".
    `activation_dtype` is how token_activations stores values: float16 (default, half the bytes) or float32.
    """

    model: str = EMBEDDED_READER
    sae_path: str | None = None
    release: str | None = None
    sae_id: str | None = None
    hook_name: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    max_length: int = 512
    token_budget: int = 16384
    exclude_special_tokens: bool = True
    chat_template: bool = False
    chat_role: str = "user"  # with chat_template: the turn documents are read as, "user" or "assistant"
    exclude_template_tokens: bool = True
    activation_dtype: str = "float16"

    _reader: SAEReader | None = PrivateAttr(default=None)
    _identity: ReaderIdentity | None = PrivateAttr(default=None)

    @property
    def loaded(self) -> bool:
        """Whether this resource has loaded its model and SAE."""
        return self._reader is not None

    def get_identity(self) -> ReaderIdentity:
        """Fingerprint, SAE width and device, from configuration files alone when possible (no weights
        loaded: an unchanged run finds everything cached without touching the model); a SAELens release
        is loaded to learn them."""
        if self._identity is None:
            self._identity = reader_identity(**self.model_dump())
            if self._identity is None:
                reader = self.get_reader()
                self._identity = ReaderIdentity(
                    reader.identity, reader.d_sae, reader.device, reader.activation_dtype
                )
        return self._identity

    def get_reader(self) -> SAEReader:
        """The loaded reader (cached per process and configuration)."""
        if self._reader is None:
            key = json.dumps(self.model_dump(), sort_keys=True, default=str)
            with _READERS_LOCK:
                if key not in _READERS:
                    _READERS[key] = load_reader(**self.model_dump())
                self._reader = _READERS[key]
        return self._reader
