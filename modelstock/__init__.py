"""modelstock: Model Stock, model soups and Ratatouille merges of fine-tuned checkpoints.

The library part: merge math, checkpoint I/O, recipes and reports. No Ray here; the Ray
pipeline lives in ``pipeline`` and cluster access in ``cluster``.
"""

from modelstock.api import merge_recipe_in_memory, merge_state_dicts, plan_in_memory
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
from modelstock.methods import get_method, method_names
from modelstock.recipe import MergeRecipe, load_recipe, parse_recipe

merge = merge_state_dicts

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
