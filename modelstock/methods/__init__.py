"""Merge methods: one module each, registered by name."""

from __future__ import annotations

from modelstock.errors import InvalidRecipe
from modelstock.methods.base import (
    Finalized,
    LayerBlock,
    LayerParameters,
    LayerStats,
    MergeMethod,
    compute_dtype_for,
)

_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} registered twice")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise InvalidRecipe(f"unknown merge_method {name!r} (known: {known})") from None


def method_names() -> list[str]:
    return sorted(_REGISTRY)


# Importing a method module registers it.
from modelstock.methods import linear, model_stock  # noqa: E402,F401
from modelstock.methods import dare, slerp, task_arithmetic, ties  # noqa: E402,F401

__all__ = [
    "Finalized",
    "LayerBlock",
    "LayerParameters",
    "LayerStats",
    "MergeMethod",
    "compute_dtype_for",
    "get_method",
    "method_names",
    "register",
]
