"""A checkpoint folder's tokenizer, read from its small files through fsspec (never the weights,
never remote code): merges build output vocabularies from it, evaluation tokenizes with it.

Its JSON files are checked first (``side_files``), and a ``tokenizer_class`` transformers does not
know is refused: ``AutoTokenizer`` would otherwise fall back to a generic class without a word.
transformers' own warnings while loading go to our log at INFO, so ``--quiet`` stays one line.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from modelstock import storage
from modelstock.checkpoint.side_files import JSON_SIDE_FILES, check_side_files
from modelstock.errors import InvalidCheckpoint

log = logging.getLogger(__name__)

# The files a tokenizer is made of (what a merge writes for its own tokenizer, too).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
)
MAX_TOKENIZER_FILE_BYTES = 64 * 2**20


class _ToOurLog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        log.info("transformers: %s", record.getMessage())


@contextmanager
def transformers_quietly() -> Iterator[None]:
    """transformers' log records and Python warnings, for the duration, as INFO records of ours."""
    import transformers.utils.logging as hf_logging

    root = hf_logging.get_logger()
    handlers, propagate = list(root.handlers), root.propagate
    ours = _ToOurLog()
    for handler in handlers:
        root.removeHandler(handler)
    root.addHandler(ours)
    root.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for warning in caught:
            log.info("transformers: %s", warning.message)
    finally:
        root.removeHandler(ours)
        for handler in handlers:
            root.addHandler(handler)
        root.propagate = propagate


def check_tokenizer_class(config: dict[str, Any] | None, where: str) -> None:
    """A ``tokenizer_class`` that names no transformers tokenizer is refused (never a silent fallback)."""
    name = (config or {}).get("tokenizer_class")
    if not name:
        return
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    if tokenizer_class_from_name(name) is None and tokenizer_class_from_name(name.removesuffix("Fast")) is None:
        raise InvalidCheckpoint(f"{where}: tokenizer_class {name!r} is not a transformers tokenizer class")


def load_tokenizer(folder: storage.Location) -> Any:
    """The tokenizer of the checkpoint folder, through a temporary copy of its tokenizer files and
    config.json only: ``AutoTokenizer`` then applies exactly what transformers would (tokenizer class,
    BOS/EOS defaults, added tokens)."""
    from transformers import AutoTokenizer

    listed = set(storage.list_names(folder))
    present = [name for name in (*TOKENIZER_FILES, "config.json") if name in listed]
    if not any(name.startswith("tokenizer") or name in ("vocab.json", "vocab.txt") for name in present):
        raise InvalidCheckpoint(f"{folder.url}: no tokenizer files (tokenizer.json + tokenizer_config.json) beside the weights")
    checked = check_side_files(folder, [n for n in present if n in JSON_SIDE_FILES or n == "chat_template.jinja"])
    check_tokenizer_class(checked.get("tokenizer_config.json"), folder.join("tokenizer_config.json").url)
    with tempfile.TemporaryDirectory(prefix="modelstock-tokenizer-") as local:
        for name in present:
            location = folder.join(name)
            info = storage.object_info(location)
            if info.get("type") == "directory":
                raise InvalidCheckpoint(f"{location.url}: is a directory, not a file")
            if int(info.get("size") or 0) > MAX_TOKENIZER_FILE_BYTES:
                raise InvalidCheckpoint(f"{location.url}: larger than {MAX_TOKENIZER_FILE_BYTES} bytes, not a tokenizer file")
            (Path(local) / name).write_bytes(storage.read_bytes(location))
        try:
            with transformers_quietly():
                return AutoTokenizer.from_pretrained(local, trust_remote_code=False)
        # The tokenizers library raises plain Exception for a malformed tokenizer.json (e.g. "data did
        # not match any variant of untagged enum ModelWrapper"): every failure here is a bad input file.
        except Exception as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise InvalidCheckpoint(f"{folder.url}: cannot load its tokenizer ({first})") from None
