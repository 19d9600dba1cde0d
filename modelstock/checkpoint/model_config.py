"""A checkpoint folder's ``config.json``: read as JSON, never executed (no remote code)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modelstock import storage
from modelstock.checkpoint.side_files import read_json_side_file

CONFIG_FILE = "config.json"
MAX_CONFIG_BYTES = 16 * 1024 * 1024


def read_model_config(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The parsed, checked config.json of the checkpoint folder at ``url``; None when it has none
    (or when ``url`` names a single .safetensors file)."""
    folder = storage.resolve(url, storage_options)
    if folder.path.endswith(".safetensors"):
        return None
    return read_json_side_file(folder.join(CONFIG_FILE), MAX_CONFIG_BYTES)
