"""From a recipe and the inputs' headers to the list of output tensors and how to make each.

All cross-model checks happen here, on headers alone, before any tensor byte is read: the same
tensor names in every input, the same shapes and dtypes, and no empty tensors.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from modelstock.checkpoint.reader import Checkpoint, TensorLocation
from modelstock.dtypes import tensor_nbytes
from modelstock.engine import LayerJob, is_mergeable_dtype
from modelstock.errors import IncompatibleModels, InvalidCheckpoint, InvalidRecipe
from modelstock.recipe import MergeRecipe


@dataclass(frozen=True)
class LayerSource:
    """A layer job with the locations of its inputs (same order as ``job.inputs``)."""

    job: LayerJob
    locations: tuple[TensorLocation, ...]

    @property
    def out_nbytes(self) -> int:
        return tensor_nbytes(self.job.out_dtype, self.job.shape)


def natural_key(name: str) -> tuple[object, ...]:
    """Sort key that puts ``layers.2`` before ``layers.10``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _summarise(problems: list[str]) -> str:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more


def check_compatible(reference: Checkpoint, others: Sequence[Checkpoint]) -> None:
    """Every checkpoint holds the reference's tensors with the same shapes and dtypes."""
    problems: list[str] = []
    for other in others:
        for name in sorted(set(reference.tensors) - set(other.tensors), key=natural_key):
            problems.append(f"{other.url}: tensor {name!r} is missing (present in {reference.url})")
        for name in sorted(set(other.tensors) - set(reference.tensors), key=natural_key):
            problems.append(f"{other.tensors[name].file.url}: tensor {name!r} is not in {reference.url}")
    for other in others:
        for name in sorted(set(reference.tensors) & set(other.tensors), key=natural_key):
            mine, theirs = reference.tensors[name].entry, other.tensors[name].entry
            if mine.shape != theirs.shape:
                problems.append(
                    f"{other.tensors[name].file.url}: tensor {name!r} has shape {list(theirs.shape)} "
                    f"but {reference.tensors[name].file.url} has {list(mine.shape)}"
                )
            elif mine.dtype != theirs.dtype:
                problems.append(
                    f"{other.tensors[name].file.url}: tensor {name!r} is {theirs.dtype} "
                    f"but {reference.tensors[name].file.url} has {mine.dtype}"
                )
    if problems:
        raise IncompatibleModels(_summarise(problems))
    for name, location in reference.tensors.items():
        if location.entry.numel == 0:
            raise InvalidCheckpoint(
                f"{location.file.url}: tensor {name!r} has zero elements {list(location.entry.shape)}; nothing to merge"
            )


def plan_layers(recipe: MergeRecipe, base: Checkpoint | None, models: Sequence[Checkpoint]) -> list[LayerSource]:
    """One job per output tensor, in natural name order."""
    method = recipe.method
    reference = base if base is not None else models[0]
    check_compatible(reference, [m for m in ([*models] if base is not None else models[1:])])
    out_dtype = recipe.output_dtype
    sources: list[LayerSource] = []
    for name in sorted(reference.tensors, key=natural_key):
        ref = reference.tensors[name]
        flags: list[str] = []
        if recipe.is_excluded(name):
            flags.append("excluded")
        elif not is_mergeable_dtype(ref.entry.dtype):
            flags.append("not_floating_point")
        if flags:
            sources.append(
                LayerSource(
                    LayerJob(
                        name=name,
                        shape=ref.entry.shape,
                        out_dtype=out_dtype if out_dtype and is_mergeable_dtype(ref.entry.dtype) else ref.entry.dtype,
                        method=None,
                        params=None,
                        inputs=(ref.file.url,),
                        input_dtypes=(ref.entry.dtype,),
                        has_base=True,
                        flags=tuple(flags),
                    ),
                    (ref,),
                )
            )
            continue
        params = recipe.layer_parameters(name)
        weights = [getattr(p, "weight", None) for p in params.models]
        if getattr(params.method, "normalize", False) and None not in weights and sum(weights) == 0:
            raise InvalidRecipe(f"tensor {name!r}: the models' weights sum to zero, cannot normalize")
        inputs = ([base.tensors[name]] if base is not None and method.needs_base else []) + [
            m.tensors[name] for m in models
        ]
        sources.append(
            LayerSource(
                LayerJob(
                    name=name,
                    shape=ref.entry.shape,
                    out_dtype=out_dtype or ref.entry.dtype,
                    method=method.name,
                    params=params,
                    inputs=tuple(loc.file.url for loc in inputs),
                    input_dtypes=tuple(loc.entry.dtype for loc in inputs),
                    has_base=base is not None and method.needs_base,
                ),
                tuple(inputs),
            )
        )
    return sources
