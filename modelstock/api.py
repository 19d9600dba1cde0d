"""Merging in-memory state dicts, without storage or Ray (notebooks, training loops, tests)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from modelstock.dtypes import from_torch, is_float
from modelstock.engine import LayerJob, merge_in_memory
from modelstock.errors import IncompatibleModels, InvalidRecipe
from modelstock.layers import natural_key
from modelstock.methods.base import LayerStats
from modelstock.recipe import MergeRecipe, parse_recipe

StateDict = Mapping[str, torch.Tensor]


def merge_state_dicts(
    method: str,
    models: Sequence[StateDict],
    base: StateDict | None = None,
    parameters: Mapping[str, Any] | None = None,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    out_dtype: torch.dtype | None = None,
    exclude: Sequence[str] = (),
) -> tuple[dict[str, torch.Tensor], list[LayerStats]]:
    """Merge state dicts with a registered method; returns the merged dict and per-layer stats.

    Example: ``merge_state_dicts("model_stock", [ft1, ft2], base=w0)``.
    """
    placeholders = [f"model-{i}" for i in range(len(models))]
    recipe = parse_recipe(
        {
            "merge_method": method,
            "base_model": "base" if base is not None else None,
            "models": [
                {"model": name, "parameters": dict(model_parameters[i]) if model_parameters else {}}
                for i, name in enumerate(placeholders)
            ],
            "parameters": dict(parameters or {}),
            "exclude": list(exclude),
            **({"out_dtype": _recipe_dtype_name(out_dtype)} if out_dtype is not None else {}),
        },
        source="merge_state_dicts",
    )
    return _merge(recipe, models, base)


_RECIPE_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


def _recipe_dtype_name(dtype: torch.dtype) -> str:
    try:
        return _RECIPE_DTYPE_NAMES[dtype]
    except KeyError:
        known = ", ".join(str(d) for d in _RECIPE_DTYPE_NAMES)
        raise InvalidRecipe(f"merge_state_dicts: out_dtype {dtype} is not supported (use one of {known})") from None


def _merge(recipe: MergeRecipe, models: Sequence[StateDict], base: StateDict | None) -> tuple[dict[str, torch.Tensor], list[LayerStats]]:
    reference = base if base is not None else models[0]
    for index, model in enumerate(models):
        if set(model) != set(reference):
            missing = sorted(set(reference) ^ set(model))
            raise IncompatibleModels(f"model {index}: tensor {missing[0]!r} is not in every state dict")
        for name, tensor in model.items():
            if tensor.shape != reference[name].shape or tensor.dtype != reference[name].dtype:
                raise IncompatibleModels(
                    f"model {index}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, "
                    f"expected {reference[name].dtype} {list(reference[name].shape)}"
                )
    method = recipe.method
    merged: dict[str, torch.Tensor] = {}
    stats: list[LayerStats] = []
    for name in sorted(reference, key=natural_key):
        source = reference[name]
        dtype = from_torch(source.dtype)
        copy = recipe.is_excluded(name) or not is_float(dtype)
        out_dtype = recipe.output_dtype if recipe.output_dtype and is_float(dtype) else dtype
        with_base = base is not None and method.needs_base and not copy
        inputs = [source] if copy else ([base[name]] if with_base else []) + [m[name] for m in models]
        job = LayerJob(
            name=name,
            shape=tuple(source.shape),
            out_dtype=out_dtype,
            method=None if copy else method.name,
            params=None if copy else recipe.layer_parameters(name),
            inputs=("base",) * int(with_base or copy) + tuple(f"models[{i}]" for i in range(len(inputs) - int(with_base or copy))),
            input_dtypes=tuple(dtype for _ in inputs),
            has_base=copy or with_base,
            flags=("excluded",) if recipe.is_excluded(name) else ("not_floating_point",) if copy else (),
        )
        tensor, layer_stats = merge_in_memory(job, inputs[0] if job.has_base else None, inputs[1:] if job.has_base else inputs)
        merged[name] = tensor
        stats.append(layer_stats)
    return merged, stats
