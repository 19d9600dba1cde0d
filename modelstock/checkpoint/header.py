"""Strict parsing of a safetensors header, validated before a single tensor byte is read.

Mirrors the checks of the official parser (safetensors/src/tensor.rs): header size limit, a JSON
object with a known dtype, an integer shape and ``[begin, end]`` offsets per tensor, offsets that
are contiguous from 0 and end exactly at the end of the file, and ``end - begin`` equal to the
shape's element count times the dtype size. Additionally refuses duplicate tensor names, which
JSON parsers would otherwise resolve silently.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from modelstock.dtypes import SAFETENSORS_DTYPE_BITS, element_count, tensor_nbytes
from modelstock.errors import InvalidCheckpoint

LENGTH_PREFIX_BYTES = 8
MAX_HEADER_BYTES = 100_000_000  # the official parser's limit
METADATA_KEY = "__metadata__"
# Element count above which shape arithmetic is certainly corrupt (and could allocate absurdly).
MAX_ELEMENTS = 1 << 50


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: absolute byte offsets in its file, dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return element_count(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: tensors in file order, the free-form metadata, the file's size."""

    url: str
    file_size: int
    header_bytes: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_start(self) -> int:
        return LENGTH_PREFIX_BYTES + self.header_bytes


def declared_header_length(url: str, prefix: bytes, file_size: int) -> int:
    """The header length from the 8-byte little-endian prefix, checked against the file size."""
    if file_size < LENGTH_PREFIX_BYTES or len(prefix) < LENGTH_PREFIX_BYTES:
        raise InvalidCheckpoint(
            f"{url}: file is {file_size} bytes, too short for a safetensors header (truncated?)"
        )
    (length,) = struct.unpack("<Q", prefix[:LENGTH_PREFIX_BYTES])
    if length > MAX_HEADER_BYTES:
        raise InvalidCheckpoint(
            f"{url}: header length {length} exceeds the safetensors limit of {MAX_HEADER_BYTES} bytes"
        )
    if LENGTH_PREFIX_BYTES + length > file_size:
        raise InvalidCheckpoint(
            f"{url}: header length {length} runs past the end of the {file_size}-byte file (truncated?)"
        )
    return length


def _reject_duplicates(url: str) -> Callable[[list[tuple[str, object]]], dict[str, object]]:
    def hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        seen: dict[str, object] = {}
        for key, value in pairs:
            if key in seen:
                raise InvalidCheckpoint(f"{url}: tensor {key!r}: name appears twice in the header")
            seen[key] = value
        return seen

    return hook


def _parse_json(url: str, raw: bytes) -> dict[str, object]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidCheckpoint(f"{url}: header is not valid UTF-8 (byte {exc.start})") from None
    stripped = text.rstrip(" ")  # writers pad the header with spaces to an 8-byte boundary
    if not stripped.startswith("{"):
        raise InvalidCheckpoint(f"{url}: header does not start with a JSON object")
    try:
        parsed = json.loads(stripped, object_pairs_hook=_reject_duplicates(url))
    except json.JSONDecodeError as exc:
        raise InvalidCheckpoint(f"{url}: header is not valid JSON ({exc.msg} at char {exc.pos})") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits (int_max_str_digits)
        raise InvalidCheckpoint(f"{url}: header is not valid JSON ({exc})") from None
    except RecursionError:
        raise InvalidCheckpoint(f"{url}: header JSON is nested too deeply") from None
    if not isinstance(parsed, dict):
        raise InvalidCheckpoint(f"{url}: header is not a JSON object")
    return parsed


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(url: str, name: str, raw: object, data_start: int) -> TensorEntry:
    where = f"{url}: tensor {name!r}"
    if not isinstance(raw, dict):
        raise InvalidCheckpoint(f"{where}: header entry is not an object")
    unknown = set(raw) - {"dtype", "shape", "data_offsets"}
    if unknown:
        raise InvalidCheckpoint(f"{where}: unknown header fields {sorted(unknown)}")
    dtype = raw.get("dtype")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BITS:
        raise InvalidCheckpoint(f"{where}: unknown dtype {dtype!r}")
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise InvalidCheckpoint(f"{where}: shape {shape!r} is not a list of non-negative integers")
    offsets = raw.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
    ):
        raise InvalidCheckpoint(f"{where}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if begin > end:
        raise InvalidCheckpoint(f"{where}: data_offsets begin {begin} is after end {end}")
    numel = 1
    for dim in shape:
        numel *= dim
        if numel > MAX_ELEMENTS:
            raise InvalidCheckpoint(f"{where}: shape {shape} is implausibly large")
    expected = tensor_nbytes(dtype, tuple(shape))
    if end - begin != expected:
        raise InvalidCheckpoint(
            f"{where}: {dtype} {tuple(shape)} needs {expected} bytes but data_offsets span {end - begin}"
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def parse_header(url: str, header: bytes, file_size: int) -> SafetensorsHeader:
    """Validate header JSON bytes (without the 8-byte prefix) of a file of ``file_size`` bytes."""
    data_start = LENGTH_PREFIX_BYTES + len(header)
    parsed = _parse_json(url, header)
    metadata_raw = parsed.pop(METADATA_KEY, None)
    metadata: dict[str, str] = {}
    if metadata_raw is not None:
        if not isinstance(metadata_raw, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata_raw.items()
        ):
            raise InvalidCheckpoint(f"{url}: __metadata__ must map strings to strings")
        metadata = dict(metadata_raw)

    entries = [_parse_entry(url, name, raw, data_start) for name, raw in parsed.items()]
    entries.sort(key=lambda e: (e.start, e.end))
    expected_start = data_start
    for entry in entries:
        if entry.start != expected_start:
            problem = "overlaps the previous tensor" if entry.start < expected_start else "leaves a gap"
            raise InvalidCheckpoint(
                f"{url}: tensor {entry.name!r}: data_offsets [{entry.start - data_start}, "
                f"{entry.end - data_start}] {problem} (expected begin {expected_start - data_start})"
            )
        expected_start = entry.end
    if expected_start != file_size:
        raise InvalidCheckpoint(
            f"{url}: tensor data ends at byte {expected_start} but the file has {file_size} bytes"
            + (" (truncated?)" if expected_start > file_size else " (trailing bytes)")
        )
    return SafetensorsHeader(
        url=url,
        file_size=file_size,
        header_bytes=len(header),
        tensors={entry.name: entry for entry in entries},
        metadata=metadata,
    )
