"""Blend-only methods as one function: the signature is the method's parameter schema.

```python
@blend_method("nearswap", summary="...", max_models=1)
def nearswap(block: BaseBlock, *, t: float) -> torch.Tensor:
    ...
```

- The first argument's annotation says whether the method needs the base model:
  :class:`BaseBlock` (``block.base`` is a tensor) or :class:`ModelsBlock`.
- Keyword-only arguments are the recipe's parameters, validated against their annotations. A
  ``tuple[T, ...]`` annotation marks a per-model parameter: the function receives one value per
  model, in the recipe's order (set per model or once under ``parameters``). A default makes a
  parameter optional; a per-model parameter's default is written as a 1-tuple (``(1.0,)``: 1.0
  for every model). A trailing underscore is dropped from the recipe name (``lambda_``).
- A numeric parameter's valid values are declared on its annotation with
  :class:`~modelstock.methods.base.Domain`: ``t: Annotated[float, Domain(ge=0)]``, or per model
  ``density: tuple[Annotated[float, Domain(ge=0, le=1, clamp=True)], ...] = (1.0,)``; recipes
  whose values leave the domain are refused before any tensor is read.
- The function receives the block's tensors already in the compute dtype (float32 for 16-bit
  outputs, float64 otherwise) and returns the merged rows in that dtype.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from collections.abc import Callable
from typing import Any

import torch

from modelstock.methods.base import BaseBlock, Coefficients, MergeMethod, ModelsBlock, NoParameters, TensorParameters
from modelstock.methods.registry import register

BlendFunction = Callable[..., torch.Tensor]


def _per_model_type(annotation: Any) -> Any | None:
    """``T`` for a ``tuple[T, ...]`` annotation, else None."""
    if typing.get_origin(annotation) is tuple:
        arguments = typing.get_args(annotation)
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return arguments[0]
    return None


def _field(parameter: inspect.Parameter, kind: Any, per_model: bool) -> tuple[str, Any, Any]:
    recipe_name = parameter.name.rstrip("_")
    metadata = {"recipe_name": recipe_name} if recipe_name != parameter.name else {}
    if parameter.default is inspect.Parameter.empty:
        return parameter.name, kind, dataclasses.field(metadata=metadata)
    default = parameter.default
    if per_model:
        if not (isinstance(default, tuple) and len(default) == 1):
            raise TypeError(f"per-model parameter {parameter.name!r}: write its default as a 1-tuple")
        default = default[0]
    return parameter.name, kind, dataclasses.field(default=default, metadata=metadata)


def _parameter_class(function: BlendFunction, suffix: str, fields: list[tuple[str, Any, Any]]) -> type:
    """A frozen dataclass defined as a module attribute, so that instances pickle by reference
    (they travel to Ray workers inside tensor jobs)."""
    if not fields:
        return NoParameters
    name = "".join(part.title() for part in function.__name__.split("_")) + suffix
    # Fields without a default first: dataclasses require it; order does not matter to recipes.
    ordered = sorted(fields, key=lambda f: f[2].default is not dataclasses.MISSING)
    kind = dataclasses.make_dataclass(name, ordered, frozen=True)
    kind.__module__ = function.__module__
    kind.__qualname__ = name
    setattr(sys.modules[function.__module__], name, kind)
    return kind


def blend_method(
    name: str,
    *,
    summary: str,
    min_models: int = 1,
    max_models: int | None = None,
    refuse_base_in_models: bool = False,
) -> Callable[[BlendFunction], BlendFunction]:
    """Register ``function`` as the merge method ``name`` (see the module docstring)."""

    def define(function: BlendFunction) -> BlendFunction:
        hints = typing.get_type_hints(function, include_extras=True)  # keeps Domain annotations
        arguments = list(inspect.signature(function).parameters.values())
        if not arguments or hints.get(arguments[0].name) not in (BaseBlock, ModelsBlock):
            raise TypeError(f"{function.__name__}: the first argument must be annotated BaseBlock or ModelsBlock")
        needs_base = hints[arguments[0].name] is BaseBlock
        method_fields: list[tuple[str, Any, Any]] = []
        model_fields: list[tuple[str, Any, Any]] = []
        for parameter in arguments[1:]:
            if parameter.kind is not inspect.Parameter.KEYWORD_ONLY:
                raise TypeError(f"{function.__name__}: parameter {parameter.name!r} must be keyword-only")
            per_model = _per_model_type(hints[parameter.name])
            if per_model is not None:
                model_fields.append(_field(parameter, per_model, per_model=True))
            else:
                method_fields.append(_field(parameter, hints[parameter.name], per_model=False))
        method_names = [f[0] for f in method_fields]
        model_names = [f[0] for f in model_fields]

        def blend(block: ModelsBlock, coefficients: Coefficients, params: TensorParameters[Any, Any],
                  compute: torch.dtype) -> torch.Tensor:
            models = [m.to(compute) for m in block.models]
            if isinstance(block, BaseBlock):
                converted: ModelsBlock = dataclasses.replace(block, base=block.base.to(compute), models=models)
            else:
                converted = dataclasses.replace(block, models=models)
            values = {n: getattr(params.method, n) for n in method_names}
            values.update({n: tuple(getattr(m, n) for m in params.models) for n in model_names})
            return function(converted, **values)

        register(
            MergeMethod(
                name=name,
                summary=summary,
                blend=blend,
                parameters=_parameter_class(function, "Parameters", method_fields),
                model_parameters=_parameter_class(function, "ModelParameters", model_fields),
                needs_base=needs_base,
                min_models=min_models,
                max_models=max_models,
                refuse_base_in_models=refuse_base_in_models,
            )
        )
        return function

    return define
