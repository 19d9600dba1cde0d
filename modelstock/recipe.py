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

Instead of ``models``, a recipe may give ``slices`` (mergekit's layer slices: frankenmerges,
depth up-scaling, per-slice parameters): each output slice takes the same number of layers from
each of its sources (``layer_range: [first, last + 1]``), and the output's layers are the slices'
layers in order. ``models`` is the special case of one slice with every layer of every model.

Parameter values follow mergekit (``modelstock.parameters``): scalars, gradients over the layer
position, conditional lists; a model's own value first, then its slice's, then the top level's,
then the method's default. ``include`` / ``exclude`` (modelstock extensions) are glob patterns on
tensor names; excluded tensors are copied from the base model.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from modelstock.dtypes import RECIPE_DTYPES
from modelstock.errors import InvalidRecipe
from modelstock.methods import get_method
from modelstock.methods import method_names as registered_methods
from modelstock.methods.base import MergeMethod, TensorParameters
from modelstock.parameters import (
    ConditionalValue,
    ParameterValue,
    RecipeParameterValue,
    Scope,
    check_types,
    instantiate,
    required_names,
    resolve,
)
from modelstock.sources import source_url

log = logging.getLogger(__name__)


def _same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.rstrip("/") == b.rstrip("/")


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str = Field(min_length=1)
    parameters: dict[str, RecipeParameterValue] = Field(default_factory=dict)
    init: str | None = None  # Ratatouille: the initialisation this ingredient was fine-tuned from


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str = Field(min_length=1)
    layer_range: tuple[int, int]
    parameters: dict[str, RecipeParameterValue] = Field(default_factory=dict)

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 0 or value[1] <= value[0]:
            raise ValueError(f"layer_range {list(value)} must be [first, last + 1] with first < last + 1")
        return value

    @property
    def layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


class OutputSlice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, RecipeParameterValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _equal_lengths(self) -> OutputSlice:
        lengths = {s.layers for s in self.sources}
        if len(lengths) > 1:
            raise ValueError(f"the sources of a slice must span the same number of layers, got {sorted(lengths)}")
        return self


class ModelTokenSource(BaseModel):
    """A token's default row: a given token (by id or text) of a given model."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["model_token"]
    model: str = Field(min_length=1)
    token_id: int | None = Field(default=None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _one_token(self) -> ModelTokenSource:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id and token")
        return self


class ZeroSource(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["zero"]


class TokenSetting(BaseModel):
    """Where a token's row comes from where an input lacks it (``force``: everywhere)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: ModelTokenSource | ZeroSource | str | None = None
    force: bool = False


class TokenizerSettings(BaseModel):
    """mergekit's ``tokenizer:`` block."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: str = "union"
    tokens: dict[str, TokenSetting] = Field(default_factory=dict)
    pad_to_multiple_of: int | None = Field(default=None, gt=0)


@dataclass(frozen=True)
class SliceSpec:
    """One output slice as the planner uses it: its base, its models (base excluded when the method
    takes a base) with their own parameter scopes and first layers, and its own scope.
    ``first_layers`` is None for a ``models`` recipe (every layer of every model)."""

    base_model: str | None
    models: tuple[str, ...]
    model_scopes: tuple[Scope, ...]
    first_layers: tuple[int, ...] | None
    base_first_layer: int | None
    layers: int | None
    scope: Scope


class MergeRecipe(BaseModel):
    """A validated recipe. Build it with :func:`load_recipe` or :func:`parse_recipe`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[OutputSlice] | None = None
    parameters: dict[str, RecipeParameterValue] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None
    # Where the recipe came from (its file), for the messages of checks made after validation.
    _source: str = PrivateAttr(default="<recipe>")

    @property
    def source(self) -> str:
        return self._source

    # Two recipes are equal when their contents are, wherever they were read from.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, MergeRecipe) and self.canonical_json() == other.canonical_json()

    def __hash__(self) -> int:
        return hash(self.canonical_json())

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in RECIPE_DTYPES:
            raise ValueError(f"unknown dtype {value!r} (use one of {', '.join(sorted(RECIPE_DTYPES))})")
        return value

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, value: str | None) -> str | None:
        if value is not None and value != "auto" and "{" not in value:
            raise ValueError(
                f"chat_template {value[:40]!r}: give 'auto' (the inputs' most common template) or a Jinja template"
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _model_names_as_urls(cls, data: Any) -> Any:
        """Bare hub ids (``org/model@revision``) become ``hf://`` URLs, everywhere a model is named."""
        if not isinstance(data, dict):
            return data
        data = dict(data)

        def url(value: Any) -> Any:
            return source_url(value) if isinstance(value, str) else value

        def entries(items: Any) -> Any:
            if not isinstance(items, list):
                return items
            return [{**item, "model": url(item.get("model"))} if isinstance(item, dict) else item for item in items]

        data["base_model"] = url(data.get("base_model"))
        data["models"] = entries(data.get("models"))
        if isinstance(data.get("slices"), list):
            data["slices"] = [
                {**s, "sources": entries(s.get("sources")), "base_model": url(s.get("base_model"))} if isinstance(s, dict) else s
                for s in data["slices"]
            ]
        source = data.get("tokenizer_source")
        if isinstance(source, str) and source not in ("base", "union"):
            data["tokenizer_source"] = "model:" + source_url(source.removeprefix("model:"))
        tokenizer = data.get("tokenizer")
        if isinstance(tokenizer, dict):
            tokenizer = dict(tokenizer)
            if isinstance(tokenizer.get("source"), str) and tokenizer["source"] not in ("base", "union"):
                tokenizer["source"] = "model:" + source_url(tokenizer["source"].removeprefix("model:"))
            if isinstance(tokenizer.get("tokens"), dict):
                tokens = {}
                for token, setting in tokenizer["tokens"].items():
                    if isinstance(setting, dict):
                        origin = setting.get("source")
                        if isinstance(origin, str):
                            setting = {**setting, "source": source_url(origin)}
                        elif isinstance(origin, dict) and isinstance(origin.get("model"), str):
                            setting = {**setting, "source": {**origin, "model": source_url(origin["model"])}}
                    tokens[token] = setting
                tokenizer["tokens"] = tokens
            data["tokenizer"] = tokenizer
        return {k: v for k, v in data.items() if v is not None or k not in ("base_model", "models")}

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
        if not method.uses_base or method.refuse_base_in_models:
            return data
        base = str(data["base_model"])
        kept = [e for e in data["models"] if not (isinstance(e, dict) and _same(str(e.get("model", "")), base))]
        return {**data, "models": kept} if len(kept) != len(data["models"]) else data

    @model_validator(mode="after")
    def _method_rules(self) -> MergeRecipe:
        method = get_method(self.merge_method)
        if (self.models is None) == (self.slices is None):
            raise ValueError("give either models or slices")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give tokenizer_source or a tokenizer block, not both")
        source = self.vocabulary_source
        if source not in (None, "base", "union") and self.input_named(source) is None:
            raise ValueError(f"tokenizer source {source!r} is not one of the merge's models")
        for token, setting in (self.tokenizer.tokens if self.tokenizer else {}).items():
            model = setting.source.model if isinstance(setting.source, ModelTokenSource) else setting.source
            if isinstance(model, str) and self.input_named(model) is None:
                raise ValueError(f"tokenizer.tokens: {token!r}: model {model} is not one of the merge's models")
        if self.models is not None:
            if not self.models:
                raise ValueError("models: at least one model is needed")
            urls = [entry.model.rstrip("/") for entry in self.models]
            duplicates = sorted({u for u in urls if urls.count(u) > 1})
            if duplicates:
                raise ValueError(f"model {duplicates[0]} is listed twice")
            if method.uses_base and self.base_model and self.base_model.rstrip("/") in urls:
                raise ValueError(
                    f"base_model {self.base_model} is also listed among the models; "
                    f"{self.merge_method} takes it once, as base_model"
                )
        for index, spec in enumerate(self.slice_specs()):
            where = "" if self.models is not None else f"slices[{index}]: "
            if method.needs_base and not spec.base_model:
                raise ValueError(f"{where}merge_method {self.merge_method} needs base_model")
            if len(spec.models) < method.min_models:
                raise ValueError(
                    f"{where}merge_method {self.merge_method} needs at least {method.min_models} models besides "
                    f"the base, got {len(spec.models)}"
                )
            if method.max_models is not None and len(spec.models) > method.max_models:
                raise ValueError(
                    f"{where}merge_method {self.merge_method} takes at most {method.max_models} models besides "
                    f"the base, got {len(spec.models)}"
                )
        _check_parameter_names(self, method)
        return self

    @property
    def parameter_notices(self) -> ParameterNotices:
        """Parameters this method does not use, and values clamped to their domain (see
        :class:`ParameterNotices`); :func:`check_strict_parameters` refuses the unused ones."""
        return _check_parameter_names(self, get_method(self.merge_method))

    @property
    def method(self) -> MergeMethod[Any, Any]:
        return get_method(self.merge_method)

    def slice_specs(self) -> list[SliceSpec]:
        """The output slices (one for a ``models`` recipe)."""
        method = get_method(self.merge_method)
        if self.models is not None:
            return [SliceSpec(self.base_model, tuple(m.model for m in self.models),
                              tuple(m.parameters for m in self.models), None, None, None, {})]
        specs = []
        for output in self.slices or []:
            base = output.base_model or self.base_model
            is_base = [method.uses_base and _same(s.model, base) for s in output.sources]
            models = [s for s, skip in zip(output.sources, is_base) if not skip]
            base_sources = [s for s, skip in zip(output.sources, is_base) if skip]
            specs.append(SliceSpec(
                base_model=base,
                models=tuple(s.model for s in models),
                model_scopes=tuple(s.parameters for s in models),
                first_layers=tuple(s.layer_range[0] for s in models),
                # A base not listed among the sources takes the slice's layers at the same depth.
                base_first_layer=base_sources[0].layer_range[0] if base_sources else output.sources[0].layer_range[0],
                layers=output.sources[0].layers,
                scope=output.parameters,
            ))
        return specs

    @property
    def model_urls(self) -> list[str]:
        """Every model besides the base, once each, in order of first appearance."""
        seen: dict[str, None] = {}
        for spec in self.slice_specs():
            for url in spec.models:
                seen.setdefault(url.rstrip("/") if url.endswith("/") and len(url) > 1 else url, None)
        return list(seen)

    @property
    def base_urls(self) -> list[str]:
        """Every base model (slices may name their own), once each."""
        bases = [spec.base_model for spec in self.slice_specs() if spec.base_model]
        return list(dict.fromkeys(bases))

    @property
    def vocabulary_source(self) -> str | None:
        """Where the output's tokenizer comes from: 'base', 'union', a model's URL, or None (the base's
        tokenizer files copied, embeddings merged as they are)."""
        source = self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source
        return source.removeprefix("model:") if source else None

    def input_named(self, name: str) -> str | None:
        """The input URL a recipe refers to by ``name`` (the same string, up to a trailing slash)."""
        return next((url for url in recipe_models(self) if _same(url, name)), None)

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

    def tensor_parameters(self, tensor: str, t: float = 0.0, spec: SliceSpec | None = None) -> TensorParameters[Any, Any]:
        """The method's parameters for one tensor at layer position ``t`` of a slice (the only one of
        a ``models`` recipe by default), validated against their declared types."""
        method = self.method
        spec = spec or self.slice_specs()[0]
        method_names, model_names = method.parameter_names()
        shared_scopes = (spec.scope, self.parameters)
        method_values = {name: resolve(name, shared_scopes, tensor, t) for name in method_names}
        per_model = tuple(
            instantiate(
                method.model_parameters,
                {name: resolve(name, (own, *shared_scopes), tensor, t) for name in model_names},
                f"model {model}",
                tensor,
            )
            for model, own in zip(spec.models, spec.model_scopes)
        )
        return TensorParameters(method=instantiate(method.parameters, method_values, "parameters", tensor), models=per_model)


def _model_scopes(recipe: MergeRecipe) -> list[tuple[str, Mapping[str, ParameterValue]]]:
    if recipe.models is not None:
        return [(entry.model, entry.parameters) for entry in recipe.models]
    return [(source.model, source.parameters) for output in recipe.slices or [] for source in output.sources]


def known_parameter_names() -> set[str]:
    """Every parameter name some registered method takes (computed from the registry, so methods
    registered later count)."""
    names: set[str] = set()
    for name in registered_methods():
        method_names_, model_names = get_method(name).parameter_names()
        names |= method_names_ | model_names
    return names


def _unknown(name: str, method: MergeMethod[Any, Any], where: str, own: set[str]) -> ValueError:
    """A name no registered method takes: most likely a typo of one this method takes."""
    close = difflib.get_close_matches(name, sorted(own), n=1) or difflib.get_close_matches(
        name, sorted(known_parameter_names()), n=1
    )
    hint = f"; did you mean {close[0]!r}?" if close else f" (known: {sorted(own)})"
    return ValueError(f"{where}unknown parameter {name!r} for {method.name}{hint}")


@dataclass(frozen=True)
class ParameterNotices:
    """What a recipe's parameters do that the user should hear about, without being refused:
    names this method does not use (mergekit ignores them silently) and values clamped to their
    domain."""

    unused: tuple[str, ...]
    clamped: tuple[str, ...]


def _check_parameter_names(recipe: MergeRecipe, method: MergeMethod[Any, Any]) -> ParameterNotices:
    method_names_, model_names = method.parameter_names()
    own = method_names_ | model_names
    unused: list[str] = []
    shared: list[tuple[str, Mapping[str, ParameterValue]]] = [("parameters", recipe.parameters)]
    shared += [(f"slices[{i}].parameters", output.parameters) for i, output in enumerate(recipe.slices or [])]
    for where, scope in shared:
        for name in scope:
            if name not in own:
                if name not in known_parameter_names():
                    raise _unknown(name, method, "" if where == "parameters" else f"{where}: ", own)
                unused.append(f"{where}: {name}")
    for model, scope in _model_scopes(recipe):
        for name in scope:
            if name in method_names_:
                raise ValueError(f"model {model}: {name!r} is a method-wide parameter; set it under top-level parameters")
            if name not in model_names:
                if name not in known_parameter_names():
                    raise _unknown(name, method, f"model {model}: ", model_names)
                unused.append(f"model {model}: {name}")
    all_shared = [scope for _, scope in shared]
    for name in required_names(method.parameters):
        if not any(name in scope for scope in all_shared):
            raise ValueError(f"{method.name} needs parameter {name!r} under top-level parameters")
    for spec in recipe.slice_specs():
        for model, own_scope in zip(spec.models, spec.model_scopes):
            for name in required_names(method.model_parameters):
                if not any(name in scope for scope in (own_scope, spec.scope, recipe.parameters)):
                    raise ValueError(f"model {model}: {method.name} needs parameter {name!r}")
    # Type- and domain-check every value once up front (filters and gradients are resolved per
    # tensor); unused names have no effect, so their values are not checked.
    clamped: list[str] = []
    for where, shared_scope in shared:
        for name, value in shared_scope.items():
            if name in own:
                clamped += check_types(method, name, value, where)
    for model, scope in _model_scopes(recipe):
        for name, value in scope.items():
            if name in own:
                clamped += check_types(method, name, value, f"model {model}")
    return ParameterNotices(unused=tuple(unused), clamped=tuple(dict.fromkeys(clamped)))


def naming_the_recipe(recipe: MergeRecipe, exc: InvalidRecipe) -> InvalidRecipe:
    """A refusal found while planning (a value no method accepts for some tensor), prefixed with
    the recipe it came from, once."""
    message = str(exc)
    return InvalidRecipe(message if message.startswith(recipe.source) else f"{recipe.source}: {message}")


def check_strict_parameters(recipe: MergeRecipe, source: str | None = None) -> None:
    """Strict mode: a parameter this method does not use is refused, not ignored."""
    source = source or recipe.source
    unused = recipe.parameter_notices.unused
    if unused:
        raise InvalidRecipe(
            f"{source}: {unused[0]}: {recipe.merge_method} does not use this parameter "
            "(strict parameters refuse unused ones; drop it or run without --strict)"
        )


def log_parameter_notices(recipe: MergeRecipe) -> ParameterNotices:
    """Say once, on the driver, which parameters have no effect and which values were clamped."""
    notices = recipe.parameter_notices
    for where in notices.unused:
        log.warning("%s: unused by %s, ignored (as mergekit ignores it)", where, recipe.merge_method)
    for notice in notices.clamped:
        log.warning("%s", notice)
    return notices


def _conditional_filters(value: ParameterValue) -> list[str]:
    options = [value] if isinstance(value, ConditionalValue) else value if isinstance(value, list) else []
    return [o.filter for o in options if isinstance(o, ConditionalValue) and o.filter not in (None, "*")]


def check_filters_match(recipe: MergeRecipe, tensor_names: Iterable[str], allow_empty: bool = False) -> None:
    """``include``/``exclude`` patterns and parameter ``filter``s that match no tensor of the merge
    are refused (most likely a typo that would silently change nothing), unless ``allow_empty``."""
    if allow_empty:
        return
    names = list(dict.fromkeys(tensor_names))
    for key, patterns in (("include", recipe.include), ("exclude", recipe.exclude)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                raise InvalidRecipe(f"{recipe.source}: {key} pattern {pattern!r} matches no tensor of the merge "
                                    "(check it, or pass --allow-empty-filter)")
    scopes: list[Mapping[str, ParameterValue]] = [recipe.parameters, *(o.parameters for o in recipe.slices or [])]
    scopes += [scope for _, scope in _model_scopes(recipe)]
    for scope in scopes:
        for parameter, value in scope.items():
            for pattern in _conditional_filters(value):
                if not any(pattern in name for name in names):
                    raise InvalidRecipe(f"{recipe.source}: parameter {parameter!r}: filter {pattern!r} matches no "
                                        "tensor of the merge (check it, or pass --allow-empty-filter)")


def _location(loc: Sequence[int | str], data: Any) -> str:
    """The error's path in the user's recipe: keys and indices that exist there. pydantic adds its
    own steps (union members such as ``bool`` or ``function-after[...]``), which mean nothing to a user."""
    parts: list[str] = []
    for step in loc:
        present = (isinstance(data, Mapping) and step in data) or (
            isinstance(data, list) and isinstance(step, int) and 0 <= step < len(data)
        )
        if present:
            data = data[step]
        elif isinstance(step, str) and ("[" in step or "-" in step or step in _PYDANTIC_TAGS):
            continue
        parts.append(str(step))
    return ".".join(parts)


# Union members pydantic names in an error's location.
_PYDANTIC_TAGS = {"bool", "int", "float", "str", "list", "dict", "ConditionalValue", "ModelTokenSource", "ZeroSource"}


def _format_validation_error(source: str, exc: pydantic.ValidationError, data: Any = None) -> str:
    error = exc.errors()[0]
    location = _location(error["loc"], data) if data is not None else ".".join(str(p) for p in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key (not supported by modelstock)"
    return f"{source}: {location + ': ' if location else ''}{message}"


def parse_recipe(data: Mapping[str, Any] | Any, source: str = "<recipe>", strict_parameters: bool = False) -> MergeRecipe:
    """A validated recipe; ``strict_parameters`` also refuses parameters the method does not use."""
    if not isinstance(data, Mapping):
        raise InvalidRecipe(f"{source}: a recipe must be a mapping with merge_method, models, ...")
    try:
        recipe = MergeRecipe.model_validate(dict(data))
    except InvalidRecipe as exc:
        raise InvalidRecipe(f"{source}: {exc}") from None
    except pydantic.ValidationError as exc:
        raise InvalidRecipe(_format_validation_error(source, exc, data)) from None
    recipe._source = source
    if strict_parameters:
        check_strict_parameters(recipe, source)
    return recipe


def load_recipe(path: str | Path, strict_parameters: bool = False) -> MergeRecipe:
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
    return parse_recipe(data, str(path), strict_parameters)


def recipe_models(recipe: MergeRecipe) -> Sequence[str]:
    """Every input of a recipe: its base models then its models, each once (the merge's input order)."""
    return [*recipe.base_urls, *(url for url in recipe.model_urls if not any(_same(url, b) for b in recipe.base_urls))]
