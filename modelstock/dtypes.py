"""Safetensors dtype names, their torch equivalents and sizes, and tensor geometry."""

from __future__ import annotations

from collections.abc import Sequence

import torch

# The dtype list of the safetensors format (safetensors/src/tensor.rs). Sizes are in bits so the
# sub-byte float4/float6 entries of newer format versions can be recognised and refused clearly.
SAFETENSORS_DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "C64": 64,
}

_TORCH_BY_NAME: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
}
for _name, _attr in (
    ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("C64", "complex64"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("F8_E8M0", "float8_e8m0fnu"),
):
    if hasattr(torch, _attr):
        _TORCH_BY_NAME[_name] = getattr(torch, _attr)

_NAME_BY_TORCH = {dtype: name for name, dtype in _TORCH_BY_NAME.items()}

# Names users write in recipes (mergekit's `dtype` / `out_dtype`), mapped to safetensors names.
RECIPE_DTYPES: dict[str, str] = {
    "float32": "F32",
    "fp32": "F32",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float64": "F64",
}

# The torch dtype name config.json records for an output dtype (transformers' ``torch_dtype``).
CONFIG_DTYPE_NAMES: dict[str, str] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}

FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3", "F8_E5M2FNUZ", "F8_E4M3FNUZ"})


def dtype_bits(name: str) -> int:
    return SAFETENSORS_DTYPE_BITS[name]


def element_count(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def row_view(shape: Sequence[int]) -> tuple[int, int]:
    """(rows, cols) of the 2-D view every tensor is processed in: rows = the first dimension (one
    output row per output channel, as filter-wise methods need), 1 for vectors and scalars."""
    rows = shape[0] if len(shape) >= 2 else 1
    return rows, (element_count(shape) // rows if rows else 0)


def tensor_nbytes(name: str, shape: Sequence[int]) -> int:
    """Bytes a tensor of this dtype and shape occupies in a safetensors file."""
    bits = element_count(shape) * SAFETENSORS_DTYPE_BITS[name]
    return (bits + 7) // 8


def to_torch(name: str) -> torch.dtype:
    try:
        return _TORCH_BY_NAME[name]
    except KeyError:
        raise ValueError(f"dtype {name} has no torch equivalent") from None


def from_torch(dtype: torch.dtype) -> str:
    try:
        return _NAME_BY_TORCH[dtype]
    except KeyError:
        raise ValueError(f"torch dtype {dtype} cannot be stored in safetensors") from None


def is_float(name: str) -> bool:
    return name in FLOAT_DTYPES
