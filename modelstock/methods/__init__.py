"""Merge methods: one module each, registered by name when imported here."""

from __future__ import annotations

from modelstock.methods import dare, linear, model_stock, nearswap, slerp, task_arithmetic, ties  # noqa: F401  (registration)
from modelstock.methods.base import (
    BaseBlock,
    Finalized,
    MergeMethod,
    ModelsBlock,
    TensorParameters,
    TensorStats,
    compute_dtype_for,
)
from modelstock.methods.registry import get_method, method_names, register

__all__ = [
    "BaseBlock",
    "Finalized",
    "MergeMethod",
    "ModelsBlock",
    "TensorParameters",
    "TensorStats",
    "compute_dtype_for",
    "get_method",
    "method_names",
    "register",
]
