"""A checkpoint folder's tokenizer, read from its small files through fsspec (never the weights,
never remote code): merges build output vocabularies from it, evaluation tokenizes with it."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from modelstock import storage
from modelstock.errors import InvalidCheckpoint

# The files a tokenizer is made of (what a merge writes for its own tokenizer, too).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
)
MAX_TOKENIZER_FILE_BYTES = 64 * 2**20


def load_tokenizer(folder: storage.Location) -> Any:
    """The tokenizer of the checkpoint folder, through a temporary copy of its tokenizer files and
    config.json only: ``AutoTokenizer`` then applies exactly what transformers would (tokenizer class,
    BOS/EOS defaults, added tokens)."""
    from transformers import AutoTokenizer

    listed = set(storage.list_names(folder))
    present = [name for name in (*TOKENIZER_FILES, "config.json") if name in listed]
    if not any(name.startswith("tokenizer") or name in ("vocab.json", "vocab.txt") for name in present):
        raise InvalidCheckpoint(f"{folder.url}: no tokenizer files (tokenizer.json + tokenizer_config.json) beside the weights")
    with tempfile.TemporaryDirectory(prefix="modelstock-tokenizer-") as local:
        for name in present:
            location = folder.join(name)
            if int(storage.object_info(location).get("size") or 0) > MAX_TOKENIZER_FILE_BYTES:
                raise InvalidCheckpoint(f"{location.url}: larger than {MAX_TOKENIZER_FILE_BYTES} bytes, not a tokenizer file")
            (Path(local) / name).write_bytes(storage.read_bytes(location))
        try:
            return AutoTokenizer.from_pretrained(local, trust_remote_code=False)
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise InvalidCheckpoint(f"{folder.url}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from None
