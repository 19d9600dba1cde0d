"""The registry of merge methods by name. A method module registers itself on import."""

from __future__ import annotations

from typing import Any

from modelstock.errors import InvalidRecipe
from modelstock.methods.base import MergeMethod

_REGISTRY: dict[str, MergeMethod[Any, Any]] = {}


def register(method: MergeMethod[Any, Any]) -> MergeMethod[Any, Any]:
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} registered twice")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod[Any, Any]:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise InvalidRecipe(f"unknown merge_method {name!r} (known: {known})") from None


def method_names() -> list[str]:
    return sorted(_REGISTRY)
