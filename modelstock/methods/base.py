"""What a merge method is: pure functions over row blocks of one tensor, plus typed parameters.

A method is split the way chunked execution needs it:

- ``reduce`` (optional) turns one row block of the inputs into float64 partial sums, one row per
  input row. It also gets the blend's compute dtype (float32 for 16-bit outputs, else float64). Partials of a tensor are either summed (one statistic for the whole tensor) or kept
  per row (``filter_wise``-style methods), in a fixed block order, so a tensor processed in
  memory-bounded chunks gives exactly the bytes of the unchunked path.
- ``finalize`` turns the reductions into blend coefficients and the per-layer statistics that go
  into the report.
- ``blend`` produces the merged rows from the input rows and the coefficients.

Methods that need the whole tensor at once (e.g. top-k trimming) set ``whole_tensor=True``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

ReductionScope = Literal["tensor", "rows"]


@dataclass(frozen=True)
class NoParameters:
    """For methods without parameters at this level."""


@dataclass(frozen=True)
class LayerBlock:
    """Rows ``[row_start, row_stop)`` of one tensor in every input, each viewed as (rows, cols).

    ``base`` is None for methods without a base model. Tensors are read-only and keep their
    storage dtype; methods convert to their compute dtype themselves.
    """

    name: str
    shape: tuple[int, ...]
    row_start: int
    row_stop: int
    base: torch.Tensor | None
    models: Sequence[torch.Tensor]


@dataclass(frozen=True)
class LayerParameters:
    """A method's parameters resolved for one tensor: global ones and one set per model."""

    method: Any
    models: tuple[Any, ...]


@dataclass
class LayerStats:
    """What the report records for one tensor."""

    name: str
    method: str
    shape: tuple[int, ...]
    out_dtype: str
    values: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "method": self.method,
            "shape": list(self.shape),
            "out_dtype": self.out_dtype,
            **self.values,
            "flags": list(self.flags),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LayerStats":
        data = dict(data)
        return cls(
            name=data.pop("name"),
            method=data.pop("method"),
            shape=tuple(data.pop("shape")),
            out_dtype=data.pop("out_dtype"),
            flags=list(data.pop("flags", [])),
            values=data,
        )


@dataclass(frozen=True)
class Finalized:
    """Blend coefficients (any tensors the method's blend needs) and the report's values."""

    coefficients: dict[str, torch.Tensor]
    values: dict[str, Any]
    flags: list[str]
    # True when the reductions covered every input value and the blend is a convex combination
    # of the inputs: the output is then finite by construction and the engine skips checking it.
    convex: bool = False


ReduceFn = Callable[[LayerBlock, LayerParameters, torch.dtype], torch.Tensor]
FinalizeFn = Callable[[torch.Tensor, LayerParameters, int], Finalized]
BlendFn = Callable[[LayerBlock, dict[str, torch.Tensor], LayerParameters, torch.dtype], torch.Tensor]
ScopeFn = Callable[[LayerParameters, tuple[int, ...]], ReductionScope]


@dataclass(frozen=True)
class MergeMethod:
    """One merge method, registered by name."""

    name: str
    blend: BlendFn
    method_parameters: type = NoParameters
    model_parameters: type = NoParameters
    needs_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    reduce: ReduceFn | None = None
    finalize: FinalizeFn | None = None
    reduction_scope: ScopeFn = lambda params, shape: "tensor"
    whole_tensor: bool = False
    # mergekit configs list the base among the models; most methods skip it as mergekit does.
    refuse_base_in_models: bool = False
    summary: str = ""

    def parameter_names(self) -> tuple[set[str], set[str]]:
        """(global parameter names, per-model parameter names), as written in recipes."""
        return (
            {recipe_name(f) for f in dataclasses.fields(self.method_parameters)},
            {recipe_name(f) for f in dataclasses.fields(self.model_parameters)},
        )


def recipe_name(parameter: dataclasses.Field) -> str:
    """A parameter's name in recipes: the field name, unless metadata ``recipe_name`` overrides it.

    mergekit's ``lambda`` is a Python keyword, so its field is ``lambda_`` with
    ``field(metadata={"recipe_name": "lambda"})``.
    """
    return parameter.metadata.get("recipe_name", parameter.name)


def compute_dtype_for(out_dtype: torch.dtype) -> torch.dtype:
    """float64 when the output keeps float32 precision or more, else float32.

    Blending in float32 then rounding to bf16/f16 stays within one output rounding step of the
    exact result; float32 outputs need float64 arithmetic for the same guarantee.
    """
    return torch.float64 if out_dtype in (torch.float32, torch.float64) else torch.float32
