"""Extra readers (`<data_dir>/config/readers.json`): more SAEs or models that read every dataset beside the
default reader, each with its own token_activations -> pooled_embeddings lineage, and the feature_matches
between them (`interp_assets.defs.matching_assets`).

The file maps a reader name to the fields of `resources.sae_reader.SAEReaderResource`, plus `match_with`:
the reader its features are matched against (`default`, the reader of `INTERP_MODEL` / `INTERP_SAE_*`, or
another extra reader), e.g.

    {"seed1": {"sae_path": "/models/sae_seed1"},
     "layer2": {"sae_path": "/models/sae_layer2", "match_with": "seed1"}}

Readers decide which assets exist, so a mistake in the file fails loading the definitions with a message
naming the file, the reader and the fix (a bad entry is not skipped: its assets would silently vanish).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_READER = "default"  # the name of the reader configured by INTERP_MODEL / INTERP_SAE_* (`sae_reader`)
READERS_FILE = "readers.json"
MATCH_WITH = "match_with"
MAX_READERS = 16  # every extra reader adds assets and loads a model: a handful, not a sweep

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


@dataclass(frozen=True)
class ExtraReader:
    """One extra reader: its name (the asset key prefix), its `SAEReaderResource` fields, and the reader
    its features are matched against."""

    name: str
    settings: dict[str, Any] = field(default_factory=dict)
    match_with: str = DEFAULT_READER


def readers_file(config_dir: str | Path) -> Path:
    """`<config_dir>/readers.json`, beside datasets.json and comparisons.json."""
    return Path(config_dir) / READERS_FILE


def reader_fields() -> list[str]:
    """The settings a reader entry may hold: `SAEReaderResource`'s fields."""
    from resources.sae_reader import SAEReaderResource

    return sorted(SAEReaderResource.model_fields)


def check_reader(name: str, settings: dict[str, Any], where: str) -> ExtraReader:
    """One entry of a readers file as an `ExtraReader`; ValueError naming `where`, the reader and the fix
    for a bad name, an unknown field, or a value `SAEReaderResource` refuses."""
    from pydantic import ValidationError

    from interp_assets.engine.reader import _check_settings
    from resources.sae_reader import SAEReaderResource

    if not isinstance(name, str) or not _NAME.match(name) or name == DEFAULT_READER:
        raise ValueError(
            f"{where}: reader name {name!r} is not allowed: use 1-40 lowercase letters, digits or '_', "
            f"starting with a letter, and not {DEFAULT_READER!r} (the reader of INTERP_MODEL/INTERP_SAE_*). "
            "The name becomes the prefix of the reader's asset keys."
        )
    if not isinstance(settings, dict):
        raise ValueError(
            f"{where}: reader {name!r} must be an object of SAEReaderResource fields, e.g. "
            f'{{"sae_path": "/models/my_sae"}}; got {str(settings)[:200]}.'
        )
    settings = dict(settings)
    match_with = settings.pop(MATCH_WITH, DEFAULT_READER)
    if not isinstance(match_with, str):
        raise ValueError(f"{where}: reader {name!r}: {MATCH_WITH!r} must be a reader name (string).")
    allowed = reader_fields()
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(
            f"{where}: reader {name!r} has unknown field(s) {unknown}; a reader takes {allowed} and "
            f"{MATCH_WITH!r}."
        )
    try:
        resource = SAEReaderResource(**settings)
        _check_settings(resource.activation_dtype, resource.chat_role)
    except (ValidationError, ValueError) as exc:
        raise ValueError(f"{where}: reader {name!r} is invalid: {exc}") from None
    if resource.release and not resource.sae_id:
        raise ValueError(
            f"{where}: reader {name!r} sets 'release' without 'sae_id': set both, or 'sae_path'."
        )
    return ExtraReader(name, settings, match_with)


def load_readers(path: Path) -> dict[str, ExtraReader]:
    """The extra readers declared in `path` (a JSON object: name -> fields), in file order. Missing -> {}.

    Raises ValueError naming the file, the reader and the fix when the file is not a JSON object, a name or
    a field is bad (`check_reader`), or `match_with` names a reader that is not declared (or the reader
    itself).
    """
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{path}: not valid JSON ({exc}). Expected an object like "
            '{"seed1": {"sae_path": "/models/sae"}}.'
        ) from exc
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a JSON object mapping reader names to their settings, got "
            f"{type(data).__name__}."
        )
    if len(data) > MAX_READERS:
        raise ValueError(f"{path}: {len(data)} readers; at most {MAX_READERS} extra readers are supported.")
    readers = {name: check_reader(name, settings, str(path)) for name, settings in data.items()}
    for reader in readers.values():
        known = [DEFAULT_READER, *(n for n in readers if n != reader.name)]
        if reader.match_with not in known:
            raise ValueError(
                f"{path}: reader {reader.name!r} has {MATCH_WITH!r} {reader.match_with!r}, which is not a "
                f"reader it can be matched against: use one of {known} (or declare {reader.match_with!r})."
            )
    return readers
