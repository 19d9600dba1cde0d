"""The small JSON files beside a checkpoint's weights (config, generation config, tokenizer files,
chat templates), read through one strict reader, as the safetensors header is: parse, validate, then
use. "Not a file" (a folder of that name), "not UTF-8 / not JSON", "not an object" and "a field of
the wrong type" are each an ``InvalidCheckpoint`` naming the file, never an ``IsADirectoryError``
or a ``JSONDecodeError`` deep inside transformers.

Only the fields this project or transformers' loaders read are typed (``FIELDS``); others pass.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from modelstock import storage
from modelstock.errors import InvalidCheckpoint

MAX_SIDE_FILE_BYTES = 64 * 2**20  # tokenizer.json of a 256k vocabulary is ~35 MB
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _exact_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return _exact_int(value) and value > 0


def _number(value: Any) -> bool:
    return (_exact_int(value) or isinstance(value, float)) and value == value and abs(value) != float("inf")


def _or_null(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _token_ids(value: Any) -> bool:
    return value is None or _exact_int(value) or (isinstance(value, list) and all(_exact_int(v) for v in value))


def _token(value: Any) -> bool:  # "<s>" or {"content": "<s>", ...} (an AddedToken)
    return value is None or isinstance(value, str) or (isinstance(value, dict) and isinstance(value.get("content"), str))


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is(kind: type) -> Callable[[Any], bool]:
    """An instance of ``kind``; true/false count as booleans only (JSON's, not Python's ints)."""
    return lambda value: isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


# (check, what a valid value is) per field, per file name.
Field = tuple[Callable[[Any], bool], str]
_POSITIVE: Field = (_positive_int, "a positive integer")
_POSITIVE_OR_NULL: Field = (_or_null(_positive_int), "a positive integer")
_STRING: Field = (_is(str), "a string")
_STRING_OR_NULL: Field = (_or_null(_is(str)), "a string")
_BOOL: Field = (_is(bool), "true or false")
_OBJECT_OR_NULL: Field = (_or_null(_is(dict)), "an object")
_NUMBER: Field = (_number, "a finite number")
_NUMBER_OR_NULL: Field = (_or_null(_number), "a finite number")
_IDS: Field = (_token_ids, "a token id or a list of token ids")
_TOKEN: Field = (_token, "a token (a string or an object with 'content')")
_TEMPLATE: Field = (lambda v: v is None or isinstance(v, (str, list)), "a Jinja string or a list of named templates")

FIELDS: dict[str, dict[str, Field]] = {
    "config.json": {
        "model_type": _STRING, "architectures": (_or_null(_strings), "a list of class names"),
        "vocab_size": _POSITIVE, "hidden_size": _POSITIVE,
        # A slice of embeddings and head alone (no blocks) is a model transformers builds.
        "num_hidden_layers": ((lambda v: _exact_int(v) and v >= 0), "a count"),
        "intermediate_size": _POSITIVE_OR_NULL, "num_attention_heads": _POSITIVE_OR_NULL,
        "num_key_value_heads": _POSITIVE_OR_NULL, "max_position_embeddings": _POSITIVE_OR_NULL,
        "tie_word_embeddings": _BOOL, "text_config": _OBJECT_OR_NULL, "quantization_config": _OBJECT_OR_NULL,
        "torch_dtype": _STRING_OR_NULL, "dtype": _STRING_OR_NULL, "rms_norm_eps": _NUMBER_OR_NULL,
        "layer_types": (_or_null(_strings), "a list of strings"),
        "num_nextn_predict_layers": (_or_null(lambda v: _exact_int(v) and v >= 0), "a count"),
    },
    "generation_config.json": {
        "bos_token_id": _IDS, "eos_token_id": _IDS, "pad_token_id": _IDS, "decoder_start_token_id": _IDS,
        "max_length": _POSITIVE_OR_NULL, "max_new_tokens": _POSITIVE_OR_NULL,
        "top_k": (_or_null(lambda v: _exact_int(v) and v >= 0), "a count"), "do_sample": _BOOL,
        "temperature": _NUMBER_OR_NULL, "top_p": _NUMBER_OR_NULL, "repetition_penalty": _NUMBER_OR_NULL,
    },
    "tokenizer.json": {
        "model": (_is(dict), "an object"), "added_tokens": (_is(list), "a list"),
        "normalizer": _OBJECT_OR_NULL, "pre_tokenizer": _OBJECT_OR_NULL, "post_processor": _OBJECT_OR_NULL,
        "decoder": _OBJECT_OR_NULL, "truncation": _OBJECT_OR_NULL, "padding": _OBJECT_OR_NULL,
    },
    "tokenizer_config.json": {
        "tokenizer_class": _STRING_OR_NULL, "chat_template": _TEMPLATE, "added_tokens_decoder": (_is(dict), "an object"),
        "model_max_length": _NUMBER, "bos_token": _TOKEN, "eos_token": _TOKEN, "unk_token": _TOKEN, "pad_token": _TOKEN,
        "additional_special_tokens": (_is(list), "a list"), "clean_up_tokenization_spaces": _BOOL,
        "add_bos_token": _BOOL, "add_eos_token": _BOOL, "padding_side": _STRING, "truncation_side": _STRING,
    },
    "chat_template.json": {"chat_template": _TEMPLATE},
}
REQUIRED: dict[str, tuple[str, ...]] = {"tokenizer.json": ("model",), "chat_template.json": ("chat_template",)}
# Files whose every value has one type: special tokens (str, object or list of them), added tokens (ids).
VALUES: dict[str, Field] = {
    "special_tokens_map.json": (lambda v: _token(v) or (isinstance(v, list) and all(_token(t) for t in v)),
                                "a token or a list of tokens"),
    "added_tokens.json": (lambda v: _exact_int(v) and v >= 0, "a token id"),
}
JSON_SIDE_FILES = (*FIELDS, *VALUES)


def check_fields(name: str, document: Mapping[str, Any], where: str) -> None:
    """Refuse a field of the wrong type (by the file's base ``name``); ``where`` names the file."""
    for key in REQUIRED.get(name, ()):
        if key not in document:
            raise InvalidCheckpoint(f"{where}: no {key!r} field")
    for key, (valid, what) in FIELDS.get(name, {}).items():
        if key in document and not valid(document[key]):
            raise InvalidCheckpoint(f"{where}: {key!r} is {json.dumps(document[key])[:80]}, expected {what}")
    if name == "config.json" and isinstance(document.get("text_config"), dict):
        check_fields(name, document["text_config"], f"{where} (text_config)")
    if name in VALUES:
        valid, what = VALUES[name]
        for key, value in document.items():
            if not valid(value):
                raise InvalidCheckpoint(f"{where}: {key!r} is {json.dumps(value)[:80]}, expected {what}")


def _read_file(location: storage.Location, max_bytes: int) -> bytes | None:
    """The bytes of a side file; None when there is none. A folder of that name is an error."""
    if not storage.exists(location):
        return None
    info = storage.object_info(location)
    if info.get("type") == "directory":
        raise InvalidCheckpoint(f"{location.url}: is a directory, not a file")
    if int(info.get("size") or 0) > max_bytes:
        raise InvalidCheckpoint(f"{location.url}: larger than {max_bytes} bytes")
    try:
        raw = storage.read_bytes(location)
    except (IsADirectoryError, NotADirectoryError):
        raise InvalidCheckpoint(f"{location.url}: is a directory, not a file") from None
    if len(raw) > max_bytes:
        raise InvalidCheckpoint(f"{location.url}: larger than {max_bytes} bytes")
    return raw


def parse_json_object(raw: bytes, where: str, name: str | None = None) -> dict[str, Any]:
    """``raw`` as a JSON object, its fields checked as ``name``'s (default: the base name of ``where``)."""
    try:
        document = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise InvalidCheckpoint(f"{where}: not UTF-8 text") from None
    except (json.JSONDecodeError, ValueError) as exc:
        raise InvalidCheckpoint(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise InvalidCheckpoint(f"{where}: not a JSON object (a {type(document).__name__})")
    check_fields(name or posixpath.basename(where), document, where)
    return document


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")  # Python's json accepts NaN and Infinity; JSON does not


def read_json_side_file(location: storage.Location, max_bytes: int = MAX_SIDE_FILE_BYTES) -> dict[str, Any] | None:
    """A side file as a checked JSON object; None when the folder has no such file."""
    raw = _read_file(location, max_bytes)
    return None if raw is None else parse_json_object(raw, location.url, posixpath.basename(location.path))


def read_text_side_file(location: storage.Location, max_bytes: int = MAX_SIDE_FILE_BYTES) -> str | None:
    """A text side file (``chat_template.jinja``) as UTF-8; None when there is none."""
    raw = _read_file(location, max_bytes)
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidCheckpoint(f"{location.url}: not UTF-8 text") from None


def check_side_files(folder: storage.Location, names: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """Every JSON side file of ``folder`` among ``names`` (default: all known), read and checked;
    ``chat_template.jinja`` must be UTF-8 text. Returns the parsed JSON files by name."""
    wanted = set(JSON_SIDE_FILES if names is None else names) | ({CHAT_TEMPLATE_FILE} if names is None else set())
    present = [name for name in storage.list_names(folder) if name in wanted]
    parsed: dict[str, dict[str, Any]] = {}
    for name in present:
        if name == CHAT_TEMPLATE_FILE:
            read_text_side_file(folder.join(name))
            continue
        document = read_json_side_file(folder.join(name))
        if document is not None:
            parsed[name] = document
    return parsed
