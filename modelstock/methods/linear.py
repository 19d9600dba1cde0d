"""Linear merge / uniform soup (Wortsman et al., 2022): ``sum_i a_i w_i / sum_i a_i``.

Equal weights give the uniform soup. As in mergekit, ``normalize: false`` skips the division.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelstock.errors import InvalidRecipe
from modelstock.methods import register
from modelstock.methods.base import LayerBlock, LayerParameters, MergeMethod


@dataclass(frozen=True)
class LinearParameters:
    normalize: bool = True


@dataclass(frozen=True)
class LinearModelParameters:
    weight: float = 1.0


def blend(
    block: LayerBlock, coefficients: dict[str, torch.Tensor], params: LayerParameters, compute: torch.dtype
) -> torch.Tensor:
    weights = [p.weight for p in params.models]
    total = sum(weights)
    merged = block.models[0].to(compute) * weights[0]
    for model, weight in zip(block.models[1:], weights[1:]):
        merged += model.to(compute) * weight
    if params.method.normalize:
        if total == 0:
            raise InvalidRecipe(f"tensor {block.name!r}: the models' weights sum to zero, cannot normalize")
        merged /= total
    return merged


METHOD = register(
    MergeMethod(
        name="linear",
        summary="Weighted average of the models (uniform soup with equal weights)",
        method_parameters=LinearParameters,
        model_parameters=LinearModelParameters,
        needs_base=False,
        min_models=1,
        blend=blend,
    )
)
