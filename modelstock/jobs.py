"""What to compute for one output tensor: a small, picklable job (no tensors inside).

The planner (``modelstock.planner``) makes one job per output tensor from a recipe and the
inputs' tensor catalogs; the engine merges it; the shard writer streams it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from modelstock.dtypes import dtype_bits, element_count, row_view, tensor_nbytes
from modelstock.methods.base import TensorParameters
from modelstock.vocabulary import VocabularyMap


@dataclass(frozen=True)
class TensorInput:
    """One input of a job: which input model (its index in the merge's inputs: the base first when
    the recipe has one, then the models in recipe order), which tensor of it, its storage dtype,
    and a label for error messages (the file URL)."""

    model: int
    tensor: str
    dtype: str
    label: str
    # Block-quantized codes: the tensor of their scales and the (rows, cols) each scale covers.
    scale: str | None = None
    block: tuple[int, int] | None = None


@dataclass(frozen=True)
class TensorJob:
    """One output tensor and how to produce it.

    ``method`` is None for a tensor copied from its single input (excluded by the recipe, or not
    floating point). With ``has_base`` the first input is the base model's tensor.
    """

    name: str
    shape: tuple[int, ...]
    out_dtype: str
    method: str | None
    params: TensorParameters[Any, Any] | None
    inputs: tuple[TensorInput, ...]
    has_base: bool
    flags: tuple[str, ...] = field(default_factory=tuple)
    # Token-indexed tensors of inputs with different vocabularies: how each input's rows become the
    # output's (modelstock.vocabulary); None when every input's rows are the output's.
    vocabulary: VocabularyMap | None = None

    @property
    def rows(self) -> int:
        return row_view(self.shape)[0]

    @property
    def cols(self) -> int:
        return row_view(self.shape)[1]

    @property
    def numel(self) -> int:
        return element_count(self.shape)

    @property
    def out_nbytes(self) -> int:
        return tensor_nbytes(self.out_dtype, self.shape)

    @property
    def input_bytes_per_row(self) -> int:
        return max(1, self.cols * sum(dtype_bits(i.dtype) for i in self.inputs) // 8)

    @property
    def scaled_inputs(self) -> tuple[int, ...]:
        """Positions of the inputs stored as block-quantized codes (their scales follow the inputs)."""
        return tuple(index for index, source in enumerate(self.inputs) if source.scale is not None)

    @property
    def row_multiple(self) -> int:
        """Blocks and chunks start at multiples of this many rows (whole quantization blocks)."""
        multiple = 1
        for source in self.inputs:
            if source.block is not None:
                multiple = math.lcm(multiple, source.block[0])
        return multiple

    @property
    def input_nbytes(self) -> int:
        return sum(tensor_nbytes(i.dtype, self.shape) for i in self.inputs)
