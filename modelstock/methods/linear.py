"""Linear merge / uniform soup (Wortsman et al., 2022): ``sum_i a_i w_i / sum_i a_i``.

Equal weights give the uniform soup. As in mergekit, ``normalize: false`` skips the division.
A zero weight sum with ``normalize: true`` is refused when the recipe is planned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelstock.errors import InvalidRecipe
from modelstock.methods.base import Coefficients, MergeMethod, ModelsBlock, TensorParameters
from modelstock.methods.registry import register


@dataclass(frozen=True)
class LinearParameters:
    normalize: bool = True


@dataclass(frozen=True)
class LinearModelParameters:
    weight: float = 1.0


Parameters = TensorParameters[LinearParameters, LinearModelParameters]


def validate(params: Parameters, tensor: str) -> None:
    if params.method.normalize and sum(p.weight for p in params.models) == 0:
        raise InvalidRecipe(f"tensor {tensor!r}: the models' weights sum to zero, cannot normalize")


def blend(block: ModelsBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype) -> torch.Tensor:
    weights = [p.weight for p in params.models]
    # copy=True: .to() of a tensor already in the compute dtype would return the input itself.
    merged = block.models[0].to(compute, copy=True)
    if weights[0] != 1:
        merged.mul_(weights[0])
    for model, weight in zip(block.models[1:], weights[1:]):
        merged.add_(model, alpha=weight)  # in-place add upcasts the storage dtype in the kernel
    # One division after the sum (not a scaled sum): fewer roundings, so reordering the models
    # changes no output bit in practice.
    return merged.div_(sum(weights)) if params.method.normalize else merged


METHOD = register(
    MergeMethod(
        name="linear",
        summary="Weighted average of the models (uniform soup with equal weights)",
        blend=blend,
        parameters=LinearParameters,
        model_parameters=LinearModelParameters,
        needs_base=False,
        min_models=1,
        validate=validate,
    )
)
