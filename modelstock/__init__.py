"""modelstock: Model Stock, model soups and Ratatouille merges of fine-tuned checkpoints.

The library part: merge math, checkpoint I/O, recipes and reports. No Ray here; the Ray
pipeline lives in ``pipeline`` and cluster access in ``cluster``.

The merge API is imported on first use (PEP 562), so that ``import modelstock.errors`` (the CLI's
error contract, ``cluster``) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from modelstock.errors import (
    IncompatibleModels,
    InputError,
    InvalidCheckpoint,
    InvalidRecipe,
    ModelStockError,
    OutputConflict,
    StorageAccessError,
    StorageError,
)

if TYPE_CHECKING:
    from modelstock.api import merge_recipe_in_memory, merge_state_dicts, plan_in_memory
    from modelstock.methods import get_method, method_names
    from modelstock.recipe import MergeRecipe, load_recipe, parse_recipe

    merge = merge_state_dicts

_LAZY = {
    "merge": ("modelstock.api", "merge_state_dicts"),
    "merge_state_dicts": ("modelstock.api", "merge_state_dicts"),
    "merge_recipe_in_memory": ("modelstock.api", "merge_recipe_in_memory"),
    "plan_in_memory": ("modelstock.api", "plan_in_memory"),
    "get_method": ("modelstock.methods", "get_method"),
    "method_names": ("modelstock.methods", "method_names"),
    "MergeRecipe": ("modelstock.recipe", "MergeRecipe"),
    "load_recipe": ("modelstock.recipe", "load_recipe"),
    "parse_recipe": ("modelstock.recipe", "parse_recipe"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'modelstock' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


__all__ = [
    "IncompatibleModels",
    "InputError",
    "InvalidCheckpoint",
    "InvalidRecipe",
    "MergeRecipe",
    "ModelStockError",
    "OutputConflict",
    "StorageAccessError",
    "StorageError",
    "get_method",
    "load_recipe",
    "merge",
    "merge_recipe_in_memory",
    "merge_state_dicts",
    "method_names",
    "parse_recipe",
    "plan_in_memory",
]
