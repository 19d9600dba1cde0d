"""Quantized inputs: block-FP8 checkpoints are dequantized with their scales and merged; every
other quantization is refused, never merged as numbers.

Block FP8 (DeepSeek-V3, Kimi-K2; transformers' ``FineGrainedFP8``): ``config.json`` has
``quantization_config: {quant_method: fp8, weight_block_size: [128, 128], ...}``, a weight ``W``
is stored as ``F8_E4M3`` codes and ``W_scale_inv`` holds one scale per 128 x 128 block, and the
weight is ``codes * scale`` block by block (transformers' ``_dequantize_fp8_weight``). The merge's
output is unquantized (``out_dtype``, bfloat16 by default for such tensors) and the output's
``config.json`` drops ``quantization_config``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from modelstock.errors import InvalidCheckpoint

SCALE_SUFFIX = "_scale_inv"
FP8_CODES = frozenset({"F8_E4M3", "F8_E5M2"})
SCALE_DTYPES = frozenset({"F32", "BF16", "F16", "F8_E8M0"})
DEQUANTIZED_DTYPE = "BF16"
# Tensor names of packed-integer schemes (GPTQ, AWQ, bitsandbytes, ...): never plain weights.
PACKED_NAME = re.compile(r"\.(qweight|qzeros|g_idx|SCB|weight_format|absmax|quant_map|quant_state\.\w+)$")


@dataclass(frozen=True)
class BlockFP8:
    """Block-wise FP8 weights: one scale per ``block`` (rows, cols) of codes."""

    block: tuple[int, int]

    def scale_of(self, tensor: str) -> str:
        return tensor + SCALE_SUFFIX


def quantization_of(config: Mapping[str, Any] | None, label: str) -> BlockFP8 | None:
    """The model's quantization from its config.json; an unsupported one is an error naming it."""
    settings = (config or {}).get("quantization_config")
    if not settings:
        return None
    if not isinstance(settings, Mapping):
        raise InvalidCheckpoint(f"{label}: config.json: quantization_config is not an object")
    method = settings.get("quant_method")
    block = settings.get("weight_block_size")
    if method == "fp8" and isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block):
        return BlockFP8((block[0], block[1]))
    what = f"quant_method {method!r}" + (f" with weight_block_size {block!r}" if method == "fp8" else "")
    raise InvalidCheckpoint(
        f"{label}: config.json: quantization {what} is not supported (only block-FP8 is dequantized); "
        "quantized weights are never merged as numbers: dequantize the checkpoint first"
    )


def check_scales(label: str, tensors: Mapping[str, tuple[str, tuple[int, ...]]], quantization: BlockFP8 | None) -> None:
    """Refuse tensors that look quantized when the model declares no (or another) quantization.

    ``tensors`` maps names to (dtype, shape) as the model's headers give them.
    """
    for name, (dtype, shape) in tensors.items():
        if PACKED_NAME.search(name):
            raise InvalidCheckpoint(f"{label}: tensor {name!r} is a packed quantized weight; dequantize the checkpoint first")
        if quantization is None and (dtype in FP8_CODES or name.endswith(SCALE_SUFFIX)):
            raise InvalidCheckpoint(
                f"{label}: tensor {name!r} is {dtype} ({'block scales' if name.endswith(SCALE_SUFFIX) else 'FP8 codes'}) "
                "but the model declares no quantization (config.json quantization_config): it is never merged as numbers"
            )
        if quantization is not None and dtype in FP8_CODES:
            if len(shape) != 2:
                raise InvalidCheckpoint(
                    f"{label}: tensor {name!r} is {dtype} {list(shape)}; block-FP8 codes are matrices (rows, cols) "
                    f"with one scale per {list(quantization.block)} block, not {len(shape)}-D"
                )
            scale = quantization.scale_of(name)
            if scale not in tensors:
                raise InvalidCheckpoint(f"{label}: tensor {name!r} is {dtype} without its block scales {scale!r}")
            expected = scale_shape(shape, quantization.block)
            if tuple(tensors[scale][1]) != expected or tensors[scale][0] not in SCALE_DTYPES:
                raise InvalidCheckpoint(
                    f"{label}: tensor {scale!r} is {tensors[scale][0]} {list(tensors[scale][1])}; block scales of "
                    f"{name!r} {list(shape)} in blocks of {list(quantization.block)} are {list(expected)} floats"
                )


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The scales of a (rows, cols) weight: one per block, partial blocks at the edges included."""
    rows, cols = shape
    return (math.ceil(rows / block[0]), math.ceil(cols / block[1]))


# Float8 has no isfinite kernel: the codes that are NaN/Inf, as (mask, value) on the byte (OCP FP8
# formats: E4M3FN has NaN only, S.1111.111; E5M2 has Inf and NaN, exponent 11111; the "fnuz"
# variants' single NaN is 0x80; E8M0 scales' NaN is 0xFF).
_NON_FINITE_CODES: dict[torch.dtype, tuple[int, int]] = {
    dtype: pattern for name, pattern in (
        ("float8_e4m3fn", (0x7F, 0x7F)), ("float8_e5m2", (0x7C, 0x7C)), ("float8_e4m3fnuz", (0xFF, 0x80)),
        ("float8_e5m2fnuz", (0xFF, 0x80)), ("float8_e8m0fnu", (0xFF, 0xFF)),
    ) if (dtype := getattr(torch, name, None)) is not None
}


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, for any dtype (integers are; float8 is read on its code bytes)."""
    pattern = _NON_FINITE_CODES.get(tensor.dtype)
    if pattern is not None:
        mask, value = pattern
        return not bool(((tensor.view(torch.uint8) & mask) == value).any())
    if not tensor.is_floating_point():
        return True
    return bool(torch.isfinite(tensor).all())


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, block: tuple[int, int], first_row: int, dtype: torch.dtype
) -> torch.Tensor:
    """Rows of a block-FP8 weight as ``dtype``: ``codes`` are rows ``first_row..`` of the weight,
    ``scales`` the scale rows from ``first_row // block[0]`` on."""
    rows, cols = codes.shape
    row_scale = (torch.arange(first_row, first_row + rows, device=codes.device) // block[0]) - first_row // block[0]
    col_scale = torch.arange(cols, device=codes.device) // block[1]
    expanded = scales.to(dtype)[row_scale][:, col_scale]
    return codes.to(dtype) * expanded
