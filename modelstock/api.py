"""Merging in-memory state dicts, without storage or Ray (notebooks, training loops, tests).

The same planner and engine as the Ray pipeline: a recipe is built from the arguments, the
state dicts are described as tensor catalogs, and each planned job is merged in memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from modelstock.dtypes import CONFIG_DTYPE_NAMES, from_torch
from modelstock.engine import merge_in_memory
from modelstock.errors import InvalidRecipe
from modelstock.methods.base import TensorStats
from modelstock.planner import CatalogEntry, ModelCatalog, TensorPlan, plan_tensors
from modelstock.quantization import BlockFP8
from modelstock.recipe import (
    MergeRecipe,
    check_filters_match,
    check_strict_parameters,
    log_parameter_notices,
    naming_the_recipe,
    parse_recipe,
    recipe_models,
)

StateDict = Mapping[str, torch.Tensor]


def merge_state_dicts(
    method: str,
    models: Sequence[StateDict],
    base: StateDict | None = None,
    parameters: Mapping[str, Any] | None = None,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    out_dtype: torch.dtype | None = None,
    exclude: Sequence[str] = (),
    quantization: BlockFP8 | None = None,
    strict_parameters: bool = False,
    allow_empty_filter: bool = False,
) -> tuple[dict[str, torch.Tensor], list[TensorStats]]:
    """Merge state dicts with a registered method; returns the merged dict and per-tensor stats.

    Example: ``merge_state_dicts("model_stock", [ft1, ft2], base=w0)``. With ``quantization``
    (block-FP8 state dicts: codes plus ``*_scale_inv`` block scales), weights are dequantized.
    A parameter another method takes but this one does not is ignored with a warning, or refused
    with ``strict_parameters``; ``exclude`` patterns matching nothing are refused unless ``allow_empty_filter``.
    """
    labels = [f"models[{i}]" for i in range(len(models))]
    recipe = parse_recipe(
        {
            "merge_method": method,
            "base_model": "base" if base is not None else None,
            "models": [
                {"model": label, "parameters": dict(model_parameters[i]) if model_parameters else {}}
                for i, label in enumerate(labels)
            ],
            "parameters": dict(parameters or {}),
            "exclude": list(exclude),
            **({"out_dtype": _recipe_dtype_name(out_dtype)} if out_dtype is not None else {}),
        },
        source="merge_state_dicts",
        strict_parameters=strict_parameters,
    )
    states = {"base": base} if base is not None else {}
    states.update(zip(labels, models))
    return merge_recipe_in_memory(recipe, states, quantization, strict_parameters, allow_empty_filter)


def plan_in_memory(recipe: MergeRecipe, states: Mapping[str, StateDict], quantization: BlockFP8 | None = None,
                   allow_empty_filter: bool = False) -> TensorPlan:
    """The jobs of ``recipe`` on state dicts named as the recipe names its models (the planner the
    Ray driver uses, on catalogs made from the tensors instead of headers)."""
    missing = [name for name in recipe_models(recipe) if name not in states]
    if missing:
        raise InvalidRecipe(f"merge: no state dict for model {missing[0]!r}")
    check_filters_match(recipe, (name for model in recipe_models(recipe) for name in states[model]), allow_empty_filter)
    catalogs = {name: _catalog(name, states[name], quantization) for name in recipe_models(recipe)}
    try:
        return plan_tensors(recipe, catalogs)
    except InvalidRecipe as exc:  # as the Ray driver says it: naming the recipe
        raise naming_the_recipe(recipe, exc) from None


def merge_recipe_in_memory(
    recipe: MergeRecipe,
    states: Mapping[str, StateDict],
    quantization: BlockFP8 | None = None,
    strict_parameters: bool = False,
    allow_empty_filter: bool = False,
) -> tuple[dict[str, torch.Tensor], list[TensorStats]]:
    """Merge state dicts as a recipe says (any method, slices, gradients), keyed by the recipe's
    model names; returns the merged dict and per-tensor stats. Parameters the method does not use
    are warned about (refused with ``strict_parameters``)."""
    if strict_parameters:
        check_strict_parameters(recipe)
    log_parameter_notices(recipe)
    plan = plan_in_memory(recipe, states, quantization, allow_empty_filter)
    inputs = [states[name] for name in recipe_models(recipe)]
    merged: dict[str, torch.Tensor] = {}
    stats: list[TensorStats] = []
    for job in plan.jobs:
        tensors = [inputs[i.model][i.tensor] for i in job.inputs]
        tensors += [inputs[i.model][i.scale] for i in job.inputs if i.scale is not None]
        tensor, tensor_stats = merge_in_memory(job, tensors)
        merged[job.name] = tensor
        stats.append(tensor_stats)
    return merged, stats


def _catalog(label: str, state: StateDict, quantization: BlockFP8 | None) -> ModelCatalog:
    try:
        entries = {name: CatalogEntry(from_torch(t.dtype), tuple(t.shape), label) for name, t in state.items()}
    except ValueError as exc:
        raise InvalidRecipe(f"{label}: {exc}") from None
    return ModelCatalog(label, entries, quantization)


def _recipe_dtype_name(dtype: torch.dtype) -> str:
    name = CONFIG_DTYPE_NAMES.get(from_torch(dtype)) if dtype.is_floating_point else None
    if name is None:
        known = sorted(CONFIG_DTYPE_NAMES.values())
        raise InvalidRecipe(f"merge_state_dicts: out_dtype {dtype} is not supported (use one of {known})")
    return name
