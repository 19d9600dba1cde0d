"""Merge methods: one module each, registered by name when imported here."""

from __future__ import annotations

from modelstock.methods import (  # noqa: F401  (registration)
    arcee_fusion,
    breadcrumbs,
    dare,
    della,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    sce,
    slerp,
    task_arithmetic,
    ties,
)
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
