"""A checkpoint folder's ``config.json``: read as JSON, never executed (no remote code)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from modelstock import storage
from modelstock.errors import InvalidCheckpoint, StorageAccessError

CONFIG_FILE = "config.json"
MAX_CONFIG_BYTES = 16 * 1024 * 1024


def read_model_config(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The parsed config.json of the checkpoint folder at ``url``; None when it has none (or when
    ``url`` names a single .safetensors file)."""
    folder = storage.resolve(url, storage_options)
    if folder.path.endswith(".safetensors"):
        return None
    location = folder.join(CONFIG_FILE)
    try:
        raw = storage.read_bytes(location)
    except StorageAccessError:
        return None
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidCheckpoint(f"{location.url}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidCheckpoint(f"{location.url}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidCheckpoint(f"{location.url}: not a JSON object")
    return config
