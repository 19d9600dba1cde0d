"""The strict safetensors header parser against files written by the official library.

Well-formed files come from ``safetensors.torch.save_file``; what our parser reports is compared
with what ``safetensors.safe_open`` reports. Malformed files are built byte by byte; each must be
refused with InvalidCheckpoint naming the file and, where one is at fault, the tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modelstock import storage
from modelstock.checkpoint.header import MAX_HEADER_BYTES, SafetensorsHeader
from modelstock.checkpoint.reader import TensorLocation, read_header, read_tensor
from modelstock.errors import InvalidCheckpoint

# Every dtype safetensors.torch can write, with the name the format gives it.
OFFICIAL_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu,
}


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if dtype == torch.complex64:
        return torch.randn(shape, generator=generator, dtype=torch.complex64)
    if dtype.is_floating_point:
        values = torch.rand(shape, generator=generator) * 4 + 0.25  # positive: valid for E8M0 too
        return values.to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -100), min(info.max, 100), shape, generator=generator).to(dtype)


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def header_of(path: Path) -> SafetensorsHeader:
    header, _ = read_header(storage.resolve(str(path)))
    return header


def raw_header(path: Path) -> tuple[int, dict[str, object]]:
    """An independent decode of the header: its length and JSON."""
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    return length, json.loads(blob[8 : 8 + length])


@pytest.mark.parametrize("dtype_name", list(OFFICIAL_DTYPES))
def test_official_file_round_trips(tmp_path: Path, dtype_name: str) -> None:
    dtype = OFFICIAL_DTYPES[dtype_name]
    tensors = {
        "model.layers.10.weight": sample(dtype, (3, 5), 1),
        "model.layers.2.weight": sample(dtype, (2, 3, 4), 2),
        "bias": sample(dtype, (7,), 3),
        "scalar": sample(dtype, (), 4),
        "empty": sample(dtype, (0, 4), 5),
        "f32_neighbour": torch.arange(5, dtype=torch.float32),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "ünïcode ok"})
    header = header_of(path)
    length, parsed_json = raw_header(path)

    assert header.url == str(path)
    assert header.file_size == path.stat().st_size
    assert header.data_start == 8 + length
    assert header.metadata == {"format": "pt", "note": "ünïcode ok"}
    with safe_open(str(path), framework="pt") as official:
        assert sorted(header.tensors) == sorted(official.keys())
        for name in official.keys():
            entry = header.tensors[name]
            view = official.get_slice(name)
            assert entry.name == name
            assert entry.dtype == view.get_dtype()
            assert list(entry.shape) == list(view.get_shape())
            begin, end = parsed_json[name]["data_offsets"]  # type: ignore[index]
            assert (entry.start, entry.end) == (8 + length + begin, 8 + length + end)
            expected = official.get_tensor(name)
            assert entry.nbytes == expected.numel() * expected.element_size()
            raw = path.read_bytes()[entry.start : entry.end]
            assert raw == as_bytes(expected).numpy().tobytes()
            ours = read_tensor(TensorLocation(storage.resolve(str(path)), entry))
            assert ours.dtype == expected.dtype and torch.equal(as_bytes(ours), as_bytes(expected))


def test_header_is_read_without_touching_tensor_data(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(256, 256)}, str(path))
    header = header_of(path)
    assert header.file_size > 256 * 256 * 4
    assert header.tensors["w"].end == header.file_size


# ----------------------------------------------------------------------------- malformed files


def write_raw(path: Path, header: bytes | dict[str, object] | str, data: bytes = b"", length: int | None = None) -> Path:
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8")
    declared = len(header) if length is None else length
    path.write_bytes(struct.pack("<Q", declared) + header + data)
    return path


def f32(shape: list[int], begin: int, end: int, dtype: str = "F32") -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


MALFORMED: dict[str, tuple[object, bytes, int | None, str | None, str]] = {
    # case: (header, data, declared length override, tensor named in the message, message pattern)
    "header_length_beyond_file": ({"w": f32([2], 0, 8)}, bytes(8), 10_000, None, r"runs past the end"),
    "header_over_limit": ({"w": f32([2], 0, 8)}, bytes(8), MAX_HEADER_BYTES + 1, None, r"exceeds the safetensors limit"),
    "invalid_json": ('{"w": {"dtype": "F32", ', b"", None, None, r"not valid JSON"),
    "not_an_object": ("[1, 2, 3]", b"", None, None, r"JSON object"),
    "non_utf8": (b'{"w\xff": {}}', b"", None, None, r"not valid UTF-8"),
    "duplicate_names": (
        '{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
        '"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
        bytes(8), None, "w", r"appears twice",
    ),
    "overlapping_offsets": ({"a": f32([2], 0, 8), "b": f32([2], 4, 12)}, bytes(12), None, "b", r"overlaps"),
    "gap_between_tensors": ({"a": f32([2], 0, 8), "b": f32([2], 12, 20)}, bytes(20), None, "b", r"gap"),
    "gap_at_start": ({"a": f32([2], 4, 12)}, bytes(12), None, "a", r"gap"),
    "offsets_past_end_of_file": ({"a": f32([2], 0, 8), "b": f32([4], 8, 24)}, bytes(12), None, None, r"truncated"),
    "begin_after_end": ({"a": f32([0], 8, 0)}, bytes(8), None, "a", r"begin 8 is after end 0"),
    "negative_offset": ({"a": f32([2], -8, 0)}, bytes(8), None, "a", r"data_offsets"),
    "unknown_dtype": ({"a": f32([2], 0, 8, dtype="F12")}, bytes(8), None, "a", r"unknown dtype 'F12'"),
    "shape_times_dtype_mismatch": ({"a": f32([3], 0, 8)}, bytes(8), None, "a", r"needs 12 bytes but data_offsets span 8"),
    "bf16_shape_mismatch": ({"a": f32([2, 2], 0, 4, dtype="BF16")}, bytes(4), None, "a", r"needs 8 bytes"),
    "negative_dimension": ({"a": f32([-2], 0, 8)}, bytes(8), None, "a", r"shape"),
    "float_dimension": ({"a": f32([2.0], 0, 8)}, bytes(8), None, "a", r"shape"),  # type: ignore[list-item]
    "unknown_entry_field": ({"a": {**f32([2], 0, 8), "extra": 1}}, bytes(8), None, "a", r"unknown header fields"),
    "trailing_bytes": ({"a": f32([2], 0, 8)}, bytes(9), None, None, r"trailing bytes"),
    "bad_metadata": ({"__metadata__": {"k": 1}, "a": f32([2], 0, 8)}, bytes(8), None, None, r"__metadata__"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_header_is_refused_naming_file_and_tensor(tmp_path: Path, case: str) -> None:
    header, data, length, tensor, pattern = MALFORMED[case]
    path = write_raw(tmp_path / "bad.safetensors", header, data, length)  # type: ignore[arg-type]
    with pytest.raises(InvalidCheckpoint, match=pattern) as caught:
        header_of(path)
    message = str(caught.value)
    assert message.startswith(str(path)), message
    assert "\n" not in message
    if tensor is not None:
        assert f"tensor {tensor!r}" in message, message


@pytest.mark.parametrize("size", [0, 3, 7])
def test_file_shorter_than_the_length_prefix(tmp_path: Path, size: int) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01" * size)
    with pytest.raises(InvalidCheckpoint, match=r"too short.*truncated") as caught:
        header_of(path)
    assert str(path) in str(caught.value)


def test_truncated_official_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(4, 4), "b": torch.zeros(8)}, str(path))
    blob = path.read_bytes()
    path.write_bytes(blob[:-5])
    with pytest.raises(InvalidCheckpoint, match=r"truncated") as caught:
        header_of(path)
    assert str(path) in str(caught.value)
    # The official reader refuses it too: we are not stricter than the format here.
    with pytest.raises(Exception):
        safe_open(str(path), framework="pt")


def test_official_reader_agrees_on_trailing_bytes(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(4)}, str(path))
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(InvalidCheckpoint, match="trailing bytes"):
        header_of(path)
    with pytest.raises(Exception):
        safe_open(str(path), framework="pt")


def test_header_longer_than_the_speculative_read(tmp_path: Path) -> None:
    # Many tensors: a header bigger than the first ranged read still parses (second read).
    tensors = {f"model.layers.{i}.mlp.gate_proj.weight.with.a.long.name": torch.full((1,), float(i)) for i in range(3000)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    length, _ = raw_header(path)
    assert length > 64 * 1024
    header = header_of(path)
    assert len(header.tensors) == 3000
    entry = header.tensors["model.layers.2999.mlp.gate_proj.weight.with.a.long.name"]
    assert float(read_tensor(TensorLocation(storage.resolve(str(path)), entry))[0]) == 2999.0
