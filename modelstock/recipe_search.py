"""The search spec: a recipe whose values may be ranges, and the expansion of one sampled point
into a plain :class:`~modelstock.recipe.MergeRecipe` (no Ray here; ``pipeline.search`` runs it).

```yaml
recipe:                                   # mergekit's schema; any value may be a range
  merge_method: task_arithmetic
  base_model: models/base
  models:
    - {model: models/ft-1, parameters: {weight: {min: 0, max: 1}}}
    - {model: models/ft-2, parameters: {weight: {min: 0, max: 1}}}
  parameters:
    normalize: true
    lambda: [{min: 0, max: 1.5}, {min: 0, max: 1.5}]   # a gradient: one searched knot per layer group
trials: 24            # --trials overrides
concurrency: 2        # trials at once
seed: 0
sampler: tpe          # tpe | cmaes | random (Optuna's samplers)
halving: {rungs: 3, reduction_factor: 2}   # optional: successive halving on growing held-out subsets
merge: auto           # auto | memory | scratch: where a candidate is merged
```

A range is ``{min: a, max: b}`` (``log: true`` samples on a log scale); a choice is
``{choice: [a, b, ...]}`` (``merge_method`` included). Each range is named by its place in the
recipe (``models[0].parameters.weight``, ``parameters.lambda[1]``): those names are the search
space's dimensions and the columns of the trials table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from modelstock.errors import InvalidRecipe
from modelstock.recipe import MergeRecipe, parse_recipe

Point = Mapping[str, float | int | str | bool]


@dataclass(frozen=True)
class Range:
    """A float searched uniformly (or on a log scale) in [low, high]."""

    low: float
    high: float
    log: bool = False

    @property
    def middle(self) -> float:
        return math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2


@dataclass(frozen=True)
class Choice:
    """One value picked among a list (a method, a boolean option, a value)."""

    options: tuple[Any, ...]


Dimension = Range | Choice


class Halving(BaseModel):
    """Successive halving (ASHA): trials are scored on ``rungs`` growing prefixes of the held-out
    set and the worse ones stopped early, keeping about 1 in ``reduction_factor`` per rung."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    rungs: int = Field(default=3, ge=2)
    reduction_factor: int = Field(default=2, ge=2)


class SearchSpec(BaseModel):
    """A validated search spec. Build it with :func:`load_search_spec` or :func:`parse_search_spec`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    recipe: dict[str, Any]
    trials: int = Field(default=24, ge=1)
    concurrency: int = Field(default=1, ge=1)
    seed: int = 0
    sampler: Literal["tpe", "cmaes", "random"] = "tpe"
    halving: Halving | None = None
    merge: Literal["auto", "memory", "scratch"] = "auto"

    @model_validator(mode="after")
    def _searchable(self) -> SearchSpec:
        if not dimensions(self.recipe):
            raise ValueError("recipe: no range or choice to search (give e.g. weight: {min: 0, max: 1})")
        return self

    @property
    def space(self) -> dict[str, Dimension]:
        return dimensions(self.recipe)

    def expand(self, point: Point, source: str = "<search>") -> MergeRecipe:
        """The plain recipe at ``point`` (every range replaced by the point's value)."""
        missing = [name for name in self.space if name not in point]
        if missing:
            raise InvalidRecipe(f"{source}: the point has no value for {missing[0]}")
        return parse_recipe(_substitute(self.recipe, "", point), source)

    def middle(self) -> dict[str, Any]:
        """A point inside the space (each range's middle, each choice's first option)."""
        return {name: dim.middle if isinstance(dim, Range) else dim.options[0] for name, dim in self.space.items()}


def _range_of(value: Mapping[str, Any], where: str) -> Dimension | None:
    keys = set(value)
    if "choice" in keys:
        if keys != {"choice"} or not isinstance(value["choice"], list) or len(value["choice"]) < 2:
            raise InvalidRecipe(f"{where}: a choice is {{choice: [a, b, ...]}} with at least two options")
        return Choice(tuple(value["choice"]))
    if keys & {"min", "max"}:
        if not {"min", "max"} <= keys or keys - {"min", "max", "log"}:
            raise InvalidRecipe(f"{where}: a range is {{min: a, max: b}} (optionally log: true), got keys {sorted(keys)}")
        low, high, log = value["min"], value["max"], value.get("log", False)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
        if not numbers or not isinstance(log, bool):
            raise InvalidRecipe(f"{where}: min and max must be numbers and log a boolean")
        if not low < high:
            raise InvalidRecipe(f"{where}: min ({low}) must be below max ({high})")
        if log and low <= 0:
            raise InvalidRecipe(f"{where}: a log range needs min > 0, got {low}")
        return Range(float(low), float(high), log)
    return None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def dimensions(value: Any, where: str = "") -> dict[str, Dimension]:
    """Every range and choice of a recipe tree, named by its place in the tree."""
    found: dict[str, Dimension] = {}
    if isinstance(value, Mapping):
        dimension = _range_of(value, where or "recipe")
        if dimension is not None:
            return {where: dimension}
        for key, item in value.items():
            found.update(dimensions(item, _join(where, str(key))))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.update(dimensions(item, f"{where}[{index}]"))
    return found


def _substitute(value: Any, where: str, point: Point) -> Any:
    if isinstance(value, Mapping):
        if where in point and _range_of(value, where or "recipe") is not None:
            return point[where]
        return {key: _substitute(item, _join(where, str(key)), point) for key, item in value.items()}
    if isinstance(value, list):
        return [_substitute(item, f"{where}[{index}]", point) for index, item in enumerate(value)]
    return value


def _format_error(source: str, exc: pydantic.ValidationError) -> str:
    error = exc.errors()[0]
    location = ".".join(str(p) for p in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{source}: {location + ': ' if location else ''}{message}"


def parse_search_spec(data: Any, source: str = "<search>") -> SearchSpec:
    """Validate a spec; every method choice is expanded once at the space's middle, so a range in
    the wrong place (an unknown parameter, a value out of a method's bounds) fails here."""
    if not isinstance(data, Mapping):
        raise InvalidRecipe(f"{source}: a search spec is a mapping with recipe:, trials:, ...")
    try:
        spec = SearchSpec.model_validate(dict(data))
    except InvalidRecipe as exc:
        raise InvalidRecipe(f"{source}: {exc}") from None
    except pydantic.ValidationError as exc:
        raise InvalidRecipe(_format_error(source, exc)) from None
    middle = spec.middle()
    methods = spec.space.get("merge_method")
    for option in methods.options if isinstance(methods, Choice) else [None]:
        point = {**middle, **({"merge_method": option} if option is not None else {})}
        spec.expand(point, f"{source}: recipe")
    return spec


def load_search_spec(path: str | Path) -> SearchSpec:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidRecipe(f"{path}: search spec not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRecipe(f"{path}: cannot read search spec ({exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise InvalidRecipe(f"{path}: invalid YAML{where}") from None
    return parse_search_spec(data, str(path))
