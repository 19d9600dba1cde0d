"""The merge recipe: mergekit's YAML schema for the methods we support, validated once.

```yaml
merge_method: model_stock
base_model: s3://bucket/base
models:
  - model: s3://bucket/ft-1
  - model: s3://bucket/ft-2
parameters:
  filter_wise: false
dtype: bfloat16          # output dtype unless out_dtype is given (we always compute in fp32+)
```

Parameters follow mergekit: a per-model parameter is looked up on the model, then in the
top-level ``parameters``, then the method's default. A value is a scalar or a conditional list
``[{filter: self_attn, value: 0.5}, {value: 1.0}]`` where the first entry whose ``filter`` is a
substring of the tensor name (or which has no filter, or filter `*`) applies.
``include`` / ``exclude`` (modelstock extensions) are glob patterns on tensor names; excluded
tensors are copied from the base model.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import typing
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Union

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from modelstock.dtypes import RECIPE_DTYPES
from modelstock.errors import InvalidRecipe
from modelstock.methods import get_method
from modelstock.methods.base import MergeMethod, TensorParameters, recipe_name

Scalar = Union[bool, int, float, str]


class ConditionalValue(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    filter: str | None = None
    value: Scalar


ParameterValue = Union[Scalar, list[ConditionalValue]]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str = Field(min_length=1)
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)
    init: str | None = None  # Ratatouille: the initialisation this ingredient was fine-tuned from


class MergeRecipe(BaseModel):
    """A validated recipe. Build it with :func:`load_recipe` or :func:`parse_recipe`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(min_length=1)
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    tokenizer_source: str | None = None

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in RECIPE_DTYPES:
            raise ValueError(f"unknown dtype {value!r} (use one of {', '.join(sorted(RECIPE_DTYPES))})")
        return value

    @field_validator("tokenizer_source")
    @classmethod
    def _tokenizer_source(cls, value: str | None) -> str | None:
        if value not in (None, "base"):
            raise ValueError("only tokenizer_source: base is supported (the tokenizer is copied from the base model)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _skip_base_among_models(cls, data: Any) -> Any:
        """mergekit lists the base among the models for ties, dare, slerp...; it is not a task vector.

        Such entries are dropped, as mergekit does. Model Stock refuses them instead (below): N and
        the angle would silently change.
        """
        if not isinstance(data, dict) or not isinstance(data.get("models"), list) or not data.get("base_model"):
            return data
        try:
            method = get_method(str(data.get("merge_method")))
        except InvalidRecipe:
            return data
        if not method.needs_base or method.refuse_base_in_models:
            return data
        base = str(data["base_model"]).rstrip("/")
        kept = [e for e in data["models"] if not (isinstance(e, dict) and str(e.get("model", "")).rstrip("/") == base)]
        return {**data, "models": kept} if len(kept) != len(data["models"]) else data

    @model_validator(mode="after")
    def _method_rules(self) -> "MergeRecipe":
        method = get_method(self.merge_method)
        if method.needs_base and not self.base_model:
            raise ValueError(f"merge_method {self.merge_method} needs base_model")
        if len(self.models) < method.min_models:
            raise ValueError(
                f"merge_method {self.merge_method} needs at least {method.min_models} models besides the base, "
                f"got {len(self.models)}"
            )
        if method.max_models is not None and len(self.models) > method.max_models:
            raise ValueError(
                f"merge_method {self.merge_method} takes at most {method.max_models} models besides the base, "
                f"got {len(self.models)}"
            )
        urls = [entry.model.rstrip("/") for entry in self.models]
        duplicates = sorted({u for u in urls if urls.count(u) > 1})
        if duplicates:
            raise ValueError(f"model {duplicates[0]} is listed twice")
        if method.needs_base and self.base_model and self.base_model.rstrip("/") in urls:
            raise ValueError(
                f"base_model {self.base_model} is also listed among the models; "
                f"{self.merge_method} takes it once, as base_model"
            )
        _check_parameter_names(self, method)
        return self

    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)

    @property
    def model_urls(self) -> list[str]:
        return [entry.model for entry in self.models]

    @property
    def output_dtype(self) -> str | None:
        """The safetensors dtype of the output, or None for 'the base model's dtype'."""
        name = self.out_dtype or self.dtype
        return RECIPE_DTYPES[name] if name else None

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)

    def is_excluded(self, tensor: str) -> bool:
        if self.include and not any(fnmatch.fnmatchcase(tensor, p) for p in self.include):
            return True
        return any(fnmatch.fnmatchcase(tensor, p) for p in self.exclude)

    def tensor_parameters(self, tensor: str) -> TensorParameters[Any, Any]:
        """The method's parameters for one tensor, validated against their declared types."""
        method = self.method
        global_names, model_names = method.parameter_names()
        method_values = {
            name: _value_for(self.parameters[name], tensor)
            for name in global_names
            if name in self.parameters
        }
        per_model = []
        for entry in self.models:
            values = {}
            for name in model_names:
                source = entry.parameters if name in entry.parameters else self.parameters
                if name in source:
                    values[name] = _value_for(source[name], tensor)
            per_model.append(_instantiate(method.model_parameters, values, f"model {entry.model}", tensor))
        return TensorParameters(
            method=_instantiate(method.parameters, method_values, "parameters", tensor),
            models=tuple(per_model),
        )


def _value_for(value: ParameterValue, tensor: str) -> Scalar | None:
    if not isinstance(value, list):
        return value
    for option in value:
        if option.filter is None or option.filter == "*" or option.filter in tensor:  # '*': as mergekit
            return option.value
    return None


def _freeze(values: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, (type(v).__name__, v)) for k, v in values.items() if v is not None))


@lru_cache(maxsize=256)
def _field_adapters(kind: type) -> dict[str, tuple[str, pydantic.TypeAdapter]]:
    """Recipe name -> (dataclass field name, validator)."""
    hints = typing.get_type_hints(kind)
    return {recipe_name(f): (f.name, pydantic.TypeAdapter(hints[f.name])) for f in dataclasses.fields(kind)}


def _required_names(kind: type) -> list[str]:
    return [
        recipe_name(f)
        for f in dataclasses.fields(kind)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]


def _validate_field(kind: type, name: str, value: Any) -> Any:
    # Strict: YAML's `yes`/"1" must not silently become True/1.0; ints are accepted as floats.
    return _field_adapters(kind)[name][1].validate_python(value, strict=True)


@lru_cache(maxsize=4096)
def _instantiate_cached(kind: type, frozen: tuple[tuple[str, Any], ...]) -> Any:
    adapters = _field_adapters(kind)
    return kind(**{adapters[name][0]: _validate_field(kind, name, value) for name, (_, value) in frozen})


def _instantiate(kind: type, values: dict[str, Any], where: str, tensor: str) -> Any:
    missing = [name for name in _required_names(kind) if values.get(name) is None]
    if missing:
        raise InvalidRecipe(f"{where}: missing required parameter {missing[0]!r} for tensor {tensor!r}")
    try:
        return _instantiate_cached(kind, _freeze(values))
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        raise InvalidRecipe(f"{where}: a parameter for tensor {tensor!r}: {error['msg']}") from None


def _check_parameter_names(recipe: MergeRecipe, method: MergeMethod) -> None:
    global_names, model_names = method.parameter_names()
    for name in recipe.parameters:
        if name not in global_names | model_names:
            raise ValueError(f"unknown parameter {name!r} for {method.name} (known: {sorted(global_names | model_names)})")
    for entry in recipe.models:
        for name in entry.parameters:
            if name in global_names:
                raise ValueError(f"model {entry.model}: {name!r} is a method-wide parameter; set it under top-level parameters")
            if name not in model_names:
                raise ValueError(f"model {entry.model}: unknown parameter {name!r} for {method.name} (known: {sorted(model_names)})")
    for name in _required_names(method.parameters):
        if name not in recipe.parameters:
            raise ValueError(f"{method.name} needs parameter {name!r} under top-level parameters")
    for name in _required_names(method.model_parameters):
        for entry in recipe.models:
            if name not in entry.parameters and name not in recipe.parameters:
                raise ValueError(f"model {entry.model}: {method.name} needs parameter {name!r}")
    # Type-check every value once up front (conditional values are re-checked per tensor).
    for name, value in recipe.parameters.items():
        _check_types(method, name, value, "parameters")
    for entry in recipe.models:
        for name, value in entry.parameters.items():
            _check_types(method, name, value, f"model {entry.model}")


def _check_types(method: MergeMethod, name: str, value: ParameterValue, where: str) -> None:
    global_names, _ = method.parameter_names()
    kind = method.parameters if name in global_names else method.model_parameters
    options = value if isinstance(value, list) else [ConditionalValue(value=value)]
    for option in options:
        try:
            _validate_field(kind, name, option.value)
        except pydantic.ValidationError as exc:
            raise ValueError(f"{where}: parameter {name!r}: {exc.errors()[0]['msg']}, got {option.value!r}") from None


def _format_validation_error(source: str, exc: pydantic.ValidationError) -> str:
    error = exc.errors()[0]
    location = ".".join(str(p) for p in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key (not supported by modelstock)"
    return f"{source}: {location + ': ' if location else ''}{message}"


def parse_recipe(data: Mapping[str, Any] | Any, source: str = "<recipe>") -> MergeRecipe:
    if not isinstance(data, Mapping):
        raise InvalidRecipe(f"{source}: a recipe must be a mapping with merge_method, models, ...")
    try:
        return MergeRecipe.model_validate(dict(data))
    except InvalidRecipe as exc:
        raise InvalidRecipe(f"{source}: {exc}") from None
    except pydantic.ValidationError as exc:
        raise InvalidRecipe(_format_validation_error(source, exc)) from None


def load_recipe(path: str | Path) -> MergeRecipe:
    """Read and validate a recipe YAML file from local disk."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidRecipe(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRecipe(f"{path}: cannot read recipe ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise InvalidRecipe(f"{path}: invalid YAML{where}: {problem}") from None
    return parse_recipe(data, str(path))
