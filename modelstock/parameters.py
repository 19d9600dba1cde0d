"""Recipe parameter values as mergekit writes them, resolved for one tensor.

A value is a scalar, a *gradient* (a list of numbers interpolated over the layer's position
``t`` in [0, 1]: evenly spaced anchors, linear in between; a list of booleans or strings picks
the anchor at ``int(t * (len - 1))``), or a conditional list ``[{filter: self_attn, value: ...},
{value: ...}]`` whose first entry with a matching filter (a substring of the tensor name, or no
filter, or ``*``) applies; its value may itself be a gradient.

Values are looked up in scopes from the most specific (a model's own parameters) to the least
(the recipe's top-level ``parameters``); a scope whose value does not apply to the tensor (no
filter matches) passes on to the next, as in mergekit. Values are then validated against the
method's typed parameter dataclasses, strictly (YAML's ``yes`` is a boolean, ``"1"`` is not a
number; integers are accepted where floats are expected), and against the domain each field
declares (:class:`~modelstock.methods.base.Domain`); every number must be finite.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Annotated, Any

import pydantic
from pydantic import BaseModel, ConfigDict

from modelstock.errors import InvalidRecipe
from modelstock.methods.base import Domain, MergeMethod, field_domains, recipe_name

Scalar = bool | int | float | str
Gradient = list[Scalar]


class ConditionalValue(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    filter: str | None = None
    value: Scalar | Gradient


ParameterValue = Scalar | Gradient | ConditionalValue | list[ConditionalValue]

_SHAPES = "a number, a boolean, a string, a gradient (a list of them) or a conditional list of {filter, value} entries"


def _check_option(option: Any, where: str) -> None:
    if not isinstance(option, Mapping):
        raise ValueError(f"{where} is {option!r}; a conditional list's entries are {{filter: ..., value: ...}} mappings")
    extra = sorted(str(k) for k in option if k not in ("filter", "value"))
    if extra:
        raise ValueError(f"{where}: unknown key {extra[0]!r} (an entry has a filter and a value)")
    if "value" not in option:
        raise ValueError(f"{where}: needs a value")
    if option.get("filter") is not None and not isinstance(option["filter"], str):
        raise ValueError(f"{where}: filter must be a string (part of a tensor name, or '*'), got {option['filter']!r}")
    value = option["value"]
    if isinstance(value, list):
        bad = [v for v in value if not isinstance(v, (bool, int, float, str))]
        if bad:
            raise ValueError(f"{where}: value: a gradient holds numbers, booleans or strings, got {bad[0]!r}")
    elif not isinstance(value, (bool, int, float, str)):
        raise ValueError(f"{where}: value must be a number, a boolean, a string or a gradient, got {value!r}")


def check_value_shape(value: Any) -> Any:
    """Refuse a malformed value in words a recipe's author reads (before pydantic tries each member
    of the union and reports the last one's complaint, such as 'Input should be a valid boolean')."""
    if isinstance(value, (bool, int, float, str, ConditionalValue)):
        return value
    if isinstance(value, Mapping):
        _check_option(value, "the conditional value")
        return value
    if isinstance(value, list):
        if any(isinstance(v, (Mapping, ConditionalValue)) for v in value):
            for index, option in enumerate(value):
                if not isinstance(option, ConditionalValue):
                    _check_option(option, f"entry {index}")
            return value
        bad = [v for v in value if not isinstance(v, (bool, int, float, str))]
        if bad:
            raise ValueError(f"a gradient holds numbers, booleans or strings, got {bad[0]!r}")
        return value
    raise ValueError(f"must be {_SHAPES}, got {value!r}")


# A parameter value as a recipe field: its shape checked first, with a clear message.
RecipeParameterValue = Annotated[ParameterValue, pydantic.BeforeValidator(check_value_shape)]
Scope = Mapping[str, ParameterValue]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def interpolate(gradient: Gradient, t: float) -> Scalar:
    """The gradient's value at position ``t`` in [0, 1] (mergekit's rule)."""
    if not all(_is_number(v) for v in gradient):
        return gradient[int(t * (len(gradient) - 1))]
    scaled = t * (len(gradient) - 1)
    low = int(scaled)
    high = min(len(gradient) - 1, low + 1)
    fraction = scaled - low
    return (1 - fraction) * float(gradient[low]) + fraction * float(gradient[high])


def value_for(value: ParameterValue, tensor: str, t: float) -> Scalar | None:
    """The scalar a value takes for one tensor at layer position ``t``; None if no filter matches."""
    if isinstance(value, ConditionalValue):
        value = [value]
    if isinstance(value, list) and value and isinstance(value[0], ConditionalValue):
        for option in value:
            assert isinstance(option, ConditionalValue)
            if option.filter is None or option.filter == "*" or option.filter in tensor:  # '*': as mergekit
                return value_for(option.value, tensor, t)
        return None
    if isinstance(value, list):
        return interpolate(typing.cast(Gradient, value), t) if value else None
    return value


def resolve(name: str, scopes: Iterable[Scope], tensor: str, t: float) -> Scalar | None:
    """The first scope's value for ``name`` that applies to the tensor."""
    for scope in scopes:
        if name in scope:
            resolved = value_for(scope[name], tensor, t)
            if resolved is not None:
                return resolved
    return None


def scalars_of(value: ParameterValue) -> list[Scalar]:
    """Every scalar a value can take (to type-check a recipe once, before any tensor)."""
    if isinstance(value, ConditionalValue):
        return scalars_of(value.value)
    if isinstance(value, list):
        return [s for item in value for s in (scalars_of(item) if isinstance(item, ConditionalValue) else [item])]
    return [value]


@lru_cache(maxsize=256)
def field_adapters(kind: type) -> dict[str, tuple[str, pydantic.TypeAdapter[Any]]]:
    """Recipe name -> (dataclass field name, validator)."""
    hints = typing.get_type_hints(kind)
    return {recipe_name(f): (f.name, pydantic.TypeAdapter(hints[f.name])) for f in dataclasses.fields(kind)}


def required_names(kind: type) -> list[str]:
    return [
        recipe_name(f)
        for f in dataclasses.fields(kind)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]


@lru_cache(maxsize=256)
def recipe_domains(kind: type) -> dict[str, Domain]:
    """Recipe name -> the field's declared domain (fields without one: only finiteness is checked)."""
    by_field = field_domains(kind)
    return {recipe_name(f): by_field[f.name] for f in dataclasses.fields(kind) if f.name in by_field}


def domain_problem(kind: type, name: str, value: Any) -> str | None:
    """Why a validated scalar is outside the parameter's domain, or None."""
    if not _is_number(value):
        return None
    domain = recipe_domains(kind).get(name)
    if domain is None:
        return None if math.isfinite(value) else f"{value} is not a finite number"
    return domain.problem(float(value))


def clamped(kind: type, name: str, value: Any) -> Any:
    """The value a clamping domain turns ``value`` into (mergekit's density above 1 is 1)."""
    domain = recipe_domains(kind).get(name)
    return domain.clamped(value) if domain is not None else value


def validate_value(kind: type, name: str, value: Any) -> Any:
    # Strict: YAML's `yes`/"1" must not silently become True/1.0; ints are accepted as floats.
    validated = field_adapters(kind)[name][1].validate_python(value, strict=True)
    problem = domain_problem(kind, name, validated)
    if problem is not None:
        raise ValueError(problem)
    return clamped(kind, name, validated)


@lru_cache(maxsize=4096)
def _instantiate_cached(kind: type, frozen: tuple[tuple[str, Any], ...]) -> Any:
    adapters = field_adapters(kind)
    return kind(**{adapters[name][0]: validate_value(kind, name, value) for name, (_, value) in frozen})


def instantiate(kind: type, values: Mapping[str, Any], where: str, tensor: str) -> Any:
    """The parameter dataclass ``kind`` from resolved values (missing ones take their defaults)."""
    missing = [name for name in required_names(kind) if values.get(name) is None]
    if missing:
        raise InvalidRecipe(f"{where}: missing required parameter {missing[0]!r} for tensor {tensor!r}")
    # The type name keeps 1 and 1.0 (and True) apart in the cache key.
    frozen = tuple(sorted((k, (type(v).__name__, v)) for k, v in values.items() if v is not None))
    try:
        return _instantiate_cached(kind, frozen)
    except pydantic.ValidationError as exc:
        raise InvalidRecipe(f"{where}: a parameter for tensor {tensor!r}: {exc.errors()[0]['msg']}") from None
    except ValueError as exc:
        raise InvalidRecipe(f"{where}: a parameter for tensor {tensor!r}: {exc}") from None


def _has_empty_list(value: ParameterValue) -> bool:
    if isinstance(value, ConditionalValue):
        return _has_empty_list(value.value)
    if isinstance(value, list):
        return not value or any(_has_empty_list(item) for item in value if isinstance(item, ConditionalValue))
    return False


def check_types(method: MergeMethod[Any, Any], name: str, value: ParameterValue, where: str) -> list[str]:
    """Every scalar a value can take has the parameter's type and lies in its domain (gradients:
    every anchor; conditional lists: every option). Returns the notices of clamped values."""
    method_names, _ = method.parameter_names()
    kind: type = method.parameters if name in method_names else method.model_parameters
    if _has_empty_list(value):
        raise ValueError(f"{where}: parameter {name!r}: an empty list is not a value (give a number or a non-empty gradient)")
    notices: list[str] = []
    for scalar in scalars_of(value):
        try:
            validated = field_adapters(kind)[name][1].validate_python(scalar, strict=True)
        except pydantic.ValidationError as exc:
            raise ValueError(f"{where}: parameter {name!r}: {exc.errors()[0]['msg']}, got {scalar!r}") from None
        problem = domain_problem(kind, name, validated)
        if problem is not None:
            raise ValueError(f"{where}: parameter {name!r}: {problem}")
        if clamped(kind, name, validated) != validated:
            notices.append(f"{where}: {name} {validated:g} clamped to {clamped(kind, name, validated):g} (as mergekit)")
    return notices
