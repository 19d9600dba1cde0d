"""From a recipe and the inputs' tensor catalogs to one job per output tensor: the one planner
that both the Python API (state dicts in memory) and the Ray driver (checkpoints in storage) use.

All cross-model checks happen here, on names, shapes and dtypes alone, before any tensor byte is
read: the same tensors in every input, the same shapes and dtypes, no empty tensors, and each
method's own rules for the parameters resolved per tensor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from modelstock.checkpoint.reader import Checkpoint
from modelstock.dtypes import element_count, is_float
from modelstock.errors import IncompatibleModels, InvalidCheckpoint
from modelstock.jobs import TensorInput, TensorJob
from modelstock.recipe import MergeRecipe


@dataclass(frozen=True)
class CatalogEntry:
    """One tensor as an input lists it: dtype, shape, and the file (or label) it lives in."""

    dtype: str
    shape: tuple[int, ...]
    label: str


@dataclass(frozen=True)
class ModelCatalog:
    """The tensors of one input model, by name."""

    label: str
    tensors: Mapping[str, CatalogEntry]


def catalog_of(checkpoint: Checkpoint) -> ModelCatalog:
    return ModelCatalog(
        checkpoint.url,
        {name: CatalogEntry(loc.entry.dtype, loc.entry.shape, loc.file.url) for name, loc in checkpoint.tensors.items()},
    )


def natural_key(name: str) -> tuple[object, ...]:
    """Sort key that puts ``layers.2`` before ``layers.10``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _summarise(problems: list[str]) -> str:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more


def check_compatible(reference: ModelCatalog, others: Sequence[ModelCatalog]) -> None:
    """Every input holds the reference's tensors with the same shapes and dtypes."""
    problems: list[str] = []
    for other in others:
        for name in sorted(set(reference.tensors) - set(other.tensors), key=natural_key):
            problems.append(f"{other.label}: tensor {name!r} is missing (present in {reference.label})")
        for name in sorted(set(other.tensors) - set(reference.tensors), key=natural_key):
            problems.append(f"{other.tensors[name].label}: tensor {name!r} is not in {reference.label}")
    for other in others:
        for name in sorted(set(reference.tensors) & set(other.tensors), key=natural_key):
            mine, theirs = reference.tensors[name], other.tensors[name]
            if mine.shape != theirs.shape:
                problems.append(
                    f"{theirs.label}: tensor {name!r} has shape {list(theirs.shape)} but {mine.label} has {list(mine.shape)}"
                )
            elif mine.dtype != theirs.dtype:
                problems.append(f"{theirs.label}: tensor {name!r} is {theirs.dtype} but {mine.label} has {mine.dtype}")
    if problems:
        raise IncompatibleModels(_summarise(problems))
    for name, entry in reference.tensors.items():
        if element_count(entry.shape) == 0:
            raise InvalidCheckpoint(f"{entry.label}: tensor {name!r} has zero elements {list(entry.shape)}; nothing to merge")


def plan_tensors(recipe: MergeRecipe, base: ModelCatalog | None, models: Sequence[ModelCatalog]) -> list[TensorJob]:
    """One job per output tensor, in natural name order.

    Inputs are numbered as the merge opens them: the base first when the recipe has one (index 0),
    then the models in recipe order.
    """
    method = recipe.method
    reference = base if base is not None else models[0]
    check_compatible(reference, [*models] if base is not None else models[1:])
    first_model = 1 if base is not None else 0
    use_base = base is not None and method.needs_base
    out_dtype = recipe.output_dtype
    jobs: list[TensorJob] = []
    for name in sorted(reference.tensors, key=natural_key):
        entry = reference.tensors[name]
        flags = ("excluded",) if recipe.is_excluded(name) else ("not_floating_point",) if not is_float(entry.dtype) else ()
        if flags:
            jobs.append(
                TensorJob(
                    name=name,
                    shape=entry.shape,
                    out_dtype=out_dtype if out_dtype and is_float(entry.dtype) else entry.dtype,
                    method=None,
                    params=None,
                    inputs=(TensorInput(0, name, entry.dtype, entry.label),),
                    has_base=False,
                    flags=flags,
                )
            )
            continue
        params = recipe.tensor_parameters(name)
        if method.validate is not None:
            method.validate(params, name)
        inputs = [TensorInput(0, name, entry.dtype, entry.label)] if use_base else []
        inputs += [
            TensorInput(first_model + index, name, model.tensors[name].dtype, model.tensors[name].label)
            for index, model in enumerate(models)
        ]
        jobs.append(
            TensorJob(
                name=name,
                shape=entry.shape,
                out_dtype=out_dtype or entry.dtype,
                method=method.name,
                params=params,
                inputs=tuple(inputs),
                has_base=use_base,
            )
        )
    return jobs
