"""The safetensors header parser meets hostile bytes: it answers InvalidCheckpoint or a valid
header, nothing else, quickly, and without allocating anything the size of a declared shape."""

from __future__ import annotations

import json
import tracemalloc
import uuid

import fsspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelstock.checkpoint.header import (
    LENGTH_PREFIX_BYTES,
    MAX_HEADER_BYTES,
    declared_header_length,
    parse_header,
)
from modelstock.checkpoint.reader import read_header
from modelstock.dtypes import SAFETENSORS_DTYPE_BITS, tensor_nbytes
from modelstock.errors import InvalidCheckpoint
from modelstock.storage import resolve

FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
URL = "memory://fuzz/model.safetensors"
WHOLE_BYTE_DTYPES = sorted(d for d, bits in SAFETENSORS_DTYPE_BITS.items() if bits % 8 == 0)


def parse_file(blob: bytes) -> object:
    """What the reader does with a whole file: the length prefix, then the header."""
    length = declared_header_length(URL, blob[:LENGTH_PREFIX_BYTES], len(blob))
    return parse_header(URL, blob[LENGTH_PREFIX_BYTES : LENGTH_PREFIX_BYTES + length], len(blob))


def outcome(blob: bytes) -> object:
    try:
        return parse_file(blob)
    except InvalidCheckpoint as exc:
        assert str(exc).startswith(URL) and "\n" not in str(exc), str(exc)
        return exc


def encode(header: dict | bytes, data_size: int) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + bytes(data_size)


# -- random bytes ---------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(blob: bytes) -> None:
    outcome(blob)


@FUZZ
@given(st.binary(max_size=400), st.integers(min_value=0, max_value=2**64 - 1), st.integers(0, 64))
def test_random_header_behind_any_declared_length(body: bytes, length: int, trailing: int) -> None:
    outcome(length.to_bytes(8, "little") + body + bytes(trailing))


@FUZZ
@given(st.binary(max_size=16), st.integers(min_value=-(2**70), max_value=2**70))
def test_declared_length_against_any_file_size(prefix: bytes, file_size: int) -> None:
    try:
        length = declared_header_length(URL, prefix, file_size)
    except InvalidCheckpoint:
        return
    assert 0 <= length <= MAX_HEADER_BYTES and LENGTH_PREFIX_BYTES + length <= file_size


# -- structure-aware: valid headers, then mutated -------------------------------------------------


@st.composite
def valid_files(draw) -> tuple[dict, int]:
    names = draw(st.lists(st.text(min_size=1, max_size=12).filter(lambda n: n != "__metadata__"),
                          min_size=1, max_size=6, unique=True))
    header: dict[str, object] = {}
    offset = 0
    for name in names:
        dtype = draw(st.sampled_from(WHOLE_BYTE_DTYPES))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        size = tensor_nbytes(dtype, tuple(shape))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
    return header, offset


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
HOSTILE_INTS = st.sampled_from([-1, -(2**63), 2**63, 2**64 + 7, 2**40, 2**62, 10**30])


@FUZZ
@given(valid_files())
def test_valid_headers_parse_exactly(file: tuple[dict, int]) -> None:
    header, data_size = file
    parsed = parse_file(encode(header, data_size))
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert set(parsed.tensors) == set(tensors)
    for name, entry in parsed.tensors.items():
        assert entry.dtype == tensors[name]["dtype"] and list(entry.shape) == tensors[name]["shape"]
        assert entry.nbytes == tensors[name]["data_offsets"][1] - tensors[name]["data_offsets"][0]


@FUZZ
@given(valid_files(), st.data())
def test_mutated_headers(file: tuple[dict, int], data: st.DataObject) -> None:
    header, data_size = file
    names = [k for k in header if k != "__metadata__"]
    name = data.draw(st.sampled_from(names))
    entry = header[name]
    mutation = data.draw(st.sampled_from([
        "field_any_json", "drop_field", "huge_shape", "hostile_offset", "shape_any_ints", "extra_field",
        "entry_any_json", "metadata_any_json", "data_size", "nest",
    ]))
    if mutation == "field_any_json":
        entry[data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = data.draw(JSON_VALUES)
    elif mutation == "drop_field":
        del entry[data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif mutation == "huge_shape":
        entry["shape"] = data.draw(st.lists(st.integers(2**20, 2**70), min_size=2, max_size=6))
    elif mutation == "hostile_offset":
        entry["data_offsets"][data.draw(st.integers(0, 1))] = data.draw(HOSTILE_INTS)
    elif mutation == "shape_any_ints":
        entry["shape"] = data.draw(st.lists(st.integers(-(2**65), 2**65), max_size=4))
    elif mutation == "extra_field":
        entry[data.draw(st.text(max_size=8))] = data.draw(JSON_VALUES)
    elif mutation == "entry_any_json":
        header[name] = data.draw(JSON_VALUES)
    elif mutation == "metadata_any_json":
        header["__metadata__"] = data.draw(JSON_VALUES)
    elif mutation == "data_size":
        data_size = max(0, data_size + data.draw(st.integers(-8, 8)))
    elif mutation == "nest":
        depth = data.draw(st.sampled_from([10, 1000, 100_000]))
        header[name] = {"dtype": "F32", "shape": [], "data_offsets": [0, 4], "x": None}
        raw = json.dumps(header).replace('"x": null', '"x": ' + "[" * depth + "]" * depth)
        outcome(encode(raw.encode(), data_size))
        return
    outcome(encode(header, data_size))


# -- no huge allocation, no hang -----------------------------------------------------------------


def test_absurd_shape_is_refused_without_allocating() -> None:
    for shape in ([2**40, 2**40], [2**63, 2**63, 2**63], [0, 2**200], [2**31] * 8):
        header = {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}
        tracemalloc.start()
        try:
            result = outcome(encode(header, 4))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert isinstance(result, InvalidCheckpoint), shape
        assert peak < 1_000_000, (shape, peak)


def test_deeply_nested_and_huge_number_headers_are_invalid() -> None:
    for raw in (b'{"a":' * 200_000, b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}",
                b'{"a":{"dtype":"F32","shape":[' + b"7" * 10_000 + b'],"data_offsets":[0,4]}}'):
        assert isinstance(outcome(encode(raw, 4)), InvalidCheckpoint)


# -- the same through read_header on memory:// files -----------------------------------------------


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=300), valid_files().map(lambda f: encode(*f))), st.integers(0, 3))
def test_read_header_on_memory_files(blob: bytes, cut: int) -> None:
    blob = blob[: len(blob) - cut] if cut else blob
    url = f"memory://fuzz-{uuid.uuid4().hex}/model.safetensors"
    location = resolve(url)
    location.fs.pipe_file(location.path, blob)
    try:
        header, fingerprint = read_header(location)
        assert fingerprint.size == len(blob)
        assert header.data_start + sum(e.nbytes for e in header.tensors.values()) == len(blob)
    except InvalidCheckpoint as exc:
        assert str(exc).startswith(url)
    finally:
        fsspec.filesystem("memory").rm(location.path)


def test_read_header_refuses_a_huge_declared_header_before_reading_it() -> None:
    """A header length of 99 MB in a 99 MB file is allowed by the format; a length beyond the
    file is refused from the 8-byte prefix alone (no 2**60-byte read is attempted)."""
    url = f"memory://fuzz-{uuid.uuid4().hex}/model.safetensors"
    location = resolve(url)
    location.fs.pipe_file(location.path, (2**60).to_bytes(8, "little") + b"{}")
    tracemalloc.start()
    try:
        try:
            read_header(location)
            raise AssertionError("accepted")
        except InvalidCheckpoint as exc:
            assert "exceeds" in str(exc)
        assert tracemalloc.get_traced_memory()[1] < 1_000_000
    finally:
        tracemalloc.stop()
