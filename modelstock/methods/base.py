"""What a merge method is: pure functions over row blocks of one tensor, plus typed parameters.

A method is split the way memory-bounded execution needs it (docs/ARCHITECTURE.md, "Numerics"):

- ``reductions`` (optional, one or more passes): ``reduce`` turns one row block of the inputs into
  partial sums, one row per input row; partials of a tensor are either summed (one statistic
  for the whole tensor) or kept per row (``filter_wise``-style methods), over fixed blocks in a
  fixed order, so a tensor processed in memory-bounded chunks gives exactly the bytes of the
  unchunked path. ``finalize`` turns the sums into coefficients and the values the report
  records; a later pass sees the coefficients of the earlier ones (e.g. an exact top-k
  threshold found digit by digit).
- ``blend`` produces the merged rows from the input rows and the coefficients.

Methods that need the base model get a :class:`BaseBlock` (its ``base`` is a tensor, never
None); the others a :class:`ModelsBlock`. Blend-only methods are written as one decorated
function (:func:`modelstock.methods.define.blend_method`).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import torch

ReductionScope = Literal["tensor", "rows"]

P = TypeVar("P")  # the method's parameters (a frozen dataclass)
M = TypeVar("M")  # one model's parameters (a frozen dataclass)


@dataclass(frozen=True)
class Domain:
    """The values a numeric parameter may take, declared on its annotation and checked where the
    recipe enters: ``density: Annotated[float, Domain(ge=0, le=1, clamp=True)] = 1.0``.

    Every number must be finite whatever its domain. ``clamp`` clamps a value above ``le`` to
    ``le`` (reported, not refused), as mergekit treats a density above 1; values below the lower
    bound are always refused. ``why`` says where the bound comes from (shown in refusals).
    """

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    clamp: bool = False
    why: str = ""

    def describe(self) -> str:
        low = f"({self.gt:g}" if self.gt is not None else f"[{self.ge:g}" if self.ge is not None else "(-inf"
        high = f"{self.lt:g})" if self.lt is not None else f"{self.le:g}]" if self.le is not None else "inf)"
        return f"in {low}, {high}"

    def problem(self, value: float) -> str | None:
        """Why ``value`` is refused, or None (a value that will be clamped is not refused)."""
        if not math.isfinite(value):
            return f"{value} is not a finite number"
        too_low = (self.gt is not None and value <= self.gt) or (self.ge is not None and value < self.ge)
        too_high = (self.lt is not None and value >= self.lt) or (
            self.le is not None and value > self.le and not self.clamp
        )
        if too_low or too_high:
            return f"{value:g} must be {self.describe()}" + (f" ({self.why})" if self.why else "")
        return None

    def clamped(self, value: Any) -> Any:
        if self.clamp and self.le is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            return min(value, self.le) if value > self.le else value
        return value


# The fraction of a task vector's entries a sparsifying method keeps (ties, dare, della, breadcrumbs).
Density = typing.Annotated[float, Domain(ge=0, le=1, clamp=True, why="a density above 1 keeps everything, as in mergekit")]


def field_domains(kind: type) -> dict[str, Domain]:
    """Field name -> the :class:`Domain` declared in its ``Annotated`` type (fields without one omitted)."""
    hints = typing.get_type_hints(kind, include_extras=True)
    domains: dict[str, Domain] = {}
    for name, hint in hints.items():
        for meta in getattr(hint, "__metadata__", ()):
            if isinstance(meta, Domain):
                domains[name] = meta
    return domains


@dataclass(frozen=True)
class NoParameters:
    """For methods without parameters at this level."""


@dataclass(frozen=True)
class ModelsBlock:
    """Rows ``[row_start, row_stop)`` of one tensor in every model, each viewed as (rows, cols).

    Tensors are read-only and keep their storage dtype unless a method's wrapper says otherwise.
    """

    name: str
    shape: tuple[int, ...]
    row_start: int
    row_stop: int
    models: Sequence[torch.Tensor]

    @property
    def inputs(self) -> list[torch.Tensor]:
        return list(self.models)


@dataclass(frozen=True)
class BaseBlock(ModelsBlock):
    """A block of a method that needs the base model: ``base`` is always there."""

    base: torch.Tensor

    @property
    def inputs(self) -> list[torch.Tensor]:
        return [self.base, *self.models]


@dataclass(frozen=True)
class TensorParameters(Generic[P, M]):
    """A method's parameters resolved for one tensor: the method's own and one set per model."""

    method: P
    models: tuple[M, ...]


@dataclass
class TensorStats:
    """What the report records for one output tensor."""

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
    def from_json(cls, data: dict[str, Any]) -> TensorStats:
        data = dict(data)
        return cls(
            name=data.pop("name"),
            method=data.pop("method"),
            shape=tuple(data.pop("shape")),
            out_dtype=data.pop("out_dtype"),
            flags=list(data.pop("flags", [])),
            values=data,
        )


Coefficients = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Finalized:
    """Blend coefficients (any tensors the method's blend needs) and the report's values."""

    coefficients: Coefficients
    values: dict[str, Any]
    flags: list[str]
    # True when the reductions covered every input value and the blend is a convex combination
    # of the inputs: the output is then finite by construction and the engine skips checking it.
    convex: bool = False
    # Coefficients with one row per tensor row: the engine hands each block its rows of them.
    per_row: frozenset[str] = frozenset()


ReduceFn = Callable[[Any, Coefficients, TensorParameters[Any, Any], torch.dtype], torch.Tensor]
FinalizeFn = Callable[[torch.Tensor, Coefficients, TensorParameters[Any, Any], int], Finalized]
BlendFn = Callable[[Any, Coefficients, TensorParameters[Any, Any], torch.dtype], torch.Tensor]
ScopeFn = Callable[[TensorParameters[Any, Any], tuple[int, ...]], ReductionScope]
AppliesFn = Callable[[TensorParameters[Any, Any]], bool]
# Raises InvalidRecipe when the parameters resolved for a tensor (named) cannot be merged.
ValidateFn = Callable[[TensorParameters[Any, Any], str], None]


def whole_tensor_scope(params: TensorParameters[Any, Any], shape: tuple[int, ...]) -> ReductionScope:
    return "tensor"


def always(params: TensorParameters[Any, Any]) -> bool:
    return True


@dataclass(frozen=True)
class Reduction:
    """One pass over a tensor before the blend: partial sums per block, then coefficients.

    ``reduce(block, coefficients, params, compute)`` sees the coefficients of the earlier passes
    (per-row ones sliced to the block); ``finalize(reductions, coefficients, params, n_models)``
    adds its own. ``applies`` skips the pass for parameters that do not need it.
    """

    reduce: ReduceFn
    finalize: FinalizeFn
    scope: ScopeFn = whole_tensor_scope
    applies: AppliesFn = always


@dataclass(frozen=True)
class MergeMethod(Generic[P, M]):
    """One merge method, registered by name.

    ``blend`` receives a :class:`BaseBlock` when ``needs_base``, else a :class:`ModelsBlock`.
    """

    @property
    def uses_base(self) -> bool:
        """Whether a recipe's base model is an input of this method (required or optional)."""
        return self.needs_base or self.accepts_base

    def passes(self, params: TensorParameters[Any, Any]) -> tuple[Reduction, ...]:
        """The reductions that run before the blend for these parameters, in order."""
        return tuple(r for r in self.reductions if r.applies(params))

    name: str
    summary: str
    blend: BlendFn
    parameters: type[P]
    model_parameters: type[M]
    needs_base: bool
    min_models: int = 1
    # Takes the base when the recipe has one (the blend then gets a BaseBlock), else works without.
    accepts_base: bool = False
    max_models: int | None = None
    reductions: tuple[Reduction, ...] = ()
    validate: ValidateFn | None = None
    # mergekit configs list the base among the models; most methods skip it as mergekit does.
    refuse_base_in_models: bool = False

    def parameter_names(self) -> tuple[set[str], set[str]]:
        """(method parameter names, per-model parameter names), as written in recipes."""
        return (
            {recipe_name(f) for f in dataclasses.fields(self.parameters)},  # type: ignore[arg-type]
            {recipe_name(f) for f in dataclasses.fields(self.model_parameters)},  # type: ignore[arg-type]
        )


def recipe_name(parameter: dataclasses.Field[Any]) -> str:
    """A parameter's name in recipes: the field name, unless metadata ``recipe_name`` overrides it.

    mergekit's ``lambda`` is a Python keyword, so its field is ``lambda_`` with
    ``field(metadata={"recipe_name": "lambda"})``.
    """
    return str(parameter.metadata.get("recipe_name", parameter.name))


def compute_dtype_for(out_dtype: torch.dtype) -> torch.dtype:
    """float64 when the output keeps float32 precision or more, else float32.

    Blending in float32 then rounding to bf16/f16 stays within one output rounding step of the
    exact result; float32 outputs need float64 arithmetic for the same guarantee.
    """
    return torch.float64 if out_dtype in (torch.float32, torch.float64) else torch.float32
