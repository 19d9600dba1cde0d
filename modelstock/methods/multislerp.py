"""Multi-SLERP (mergekit ``multislerp``): barycentric interpolation of N tensors on a hypersphere.

With x_i the models (their task vectors ``w_i - w_0`` when the block has a base, see below),
weights a_i (``weight``, per model, required; divided by their sum with ``normalize_weights``, the
default), n_i = |x_i| over the flattened tensor and unit vectors u_i = x_i / (n_i + eps)::

    m = sum_i a_i u_i,        w = cos(eps) * (sum_i a_i n_i) * m / |m|        (+ w_0 with a base)

mergekit projects the u_i onto the tangent space at m/|m|, averages them there and maps the average
back with the exponential map. That average is ``sum_i a_i (u_i - <u_i, m^> m^) = m - |m| m^ = 0``
exactly, so the map (whose angle mergekit offsets by ``eps``) returns ``cos(eps) m^``: the formula
above, which is what mergekit computes up to its float32 rounding. It needs only the Gram matrix
``G_ij = <x_i, x_j>``: one reduction pass in float64 over the engine's fixed blocks, then the blend
``sum_i c_i x_i`` with ``c_i = cos(eps) (sum_j a_j n_j) a_i / ((n_i + eps) |m|)``.

Degenerate cases: one model is returned unchanged (as mergekit); ``|m| < eps`` (antipodal inputs
whose weights cancel) gives the linear ``sum_i a_i x_i`` (+ w_0), flagged ``multislerp_zero_mean``
(mergekit does this for two models and raises for more: here a whole merge does not stop on one
tensor whose direction is undefined); ``normalize_weights`` with weights summing to zero is refused
when the recipe is planned (mergekit would divide by zero).

Base: optional, as in mergekit: with a recipe's ``base_model``, the task vectors are interpolated
and added to it; without, the models themselves are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import torch

from modelstock.errors import InvalidRecipe
from modelstock.methods.base import (
    BaseBlock,
    Coefficients,
    Domain,
    Finalized,
    MergeMethod,
    ModelsBlock,
    Reduction,
    TensorParameters,
)
from modelstock.methods.registry import register


@dataclass(frozen=True)
class MultislerpParameters:
    normalize_weights: bool = True
    eps: Annotated[float, Domain(gt=0)] = 1e-8


@dataclass(frozen=True)
class MultislerpModelParameters:
    weight: float


Parameters = TensorParameters[MultislerpParameters, MultislerpModelParameters]


def directions(block: ModelsBlock, dtype: torch.dtype) -> list[torch.Tensor]:
    """The vectors a spherical method interpolates: the models, or their task vectors with a base."""
    if isinstance(block, BaseBlock):
        base = block.base.to(dtype)
        return [model.to(dtype) - base for model in block.models]
    return [model.to(dtype) for model in block.models]


def gram(block: ModelsBlock, coefficients: Coefficients, params: object, compute: torch.dtype) -> torch.Tensor:
    """``<x_i, x_j>`` over one block, in float64: (1, N*N)."""
    vectors = torch.stack([x.reshape(-1) for x in directions(block, torch.float64)])
    products = vectors @ vectors.T
    # Symmetrised: <x_i, x_j> and <x_j, x_i> may round differently in a matrix product.
    return ((products + products.T) * 0.5).reshape(1, -1)


def combine(block: ModelsBlock, weights: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """``sum_i c_i x_i`` in the compute dtype, plus the base when the block has one."""
    merged: torch.Tensor | None = None
    for vector, weight in zip(directions(block, compute), weights.to(compute)):
        merged = vector * weight if merged is None else merged.add_(vector * weight)
    assert merged is not None
    return merged.add_(block.base.to(compute)) if isinstance(block, BaseBlock) else merged


def model_weights(params: Parameters) -> torch.Tensor:
    weights = torch.tensor([p.weight for p in params.models], dtype=torch.float64)
    return weights / weights.sum() if params.method.normalize_weights else weights


def validate(params: Parameters, tensor: str) -> None:
    if params.method.normalize_weights and len(params.models) > 1 and sum(p.weight for p in params.models) == 0:
        raise InvalidRecipe(f"tensor {tensor!r}: multislerp weights sum to zero, cannot normalize_weights")


def finalize(reductions: torch.Tensor, coefficients: Coefficients, params: Parameters, count: int) -> Finalized:
    products = reductions.reshape(count, count)
    weights = model_weights(params)
    eps = params.method.eps
    norms = products.diagonal().clamp_min(0).sqrt()
    unit_weights = weights / (norms + eps)  # m = sum_i unit_weights_i x_i
    mean_norm = math.sqrt(max(float(unit_weights @ products @ unit_weights), 0.0))
    flags: list[str] = []
    if mean_norm < eps:
        combination = weights
        flags.append("multislerp_zero_mean")
    else:
        combination = unit_weights * (math.cos(eps) * float(weights @ norms) / mean_norm)
    values = {
        "n_models": count,
        "weights": [float(w) for w in weights],
        "norms": [float(n) for n in norms],
        "coefficients": [float(c) for c in combination],
    }
    return Finalized(coefficients={"multislerp": combination}, values=values, flags=flags)


def blend(block: ModelsBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype) -> torch.Tensor:
    if "multislerp" not in coefficients:  # one model: returned as it is, as mergekit does
        return block.models[0].to(compute)
    return combine(block, coefficients["multislerp"], compute)


METHOD = register(
    MergeMethod(
        name="multislerp",
        summary="Multi-SLERP: weighted mean direction of N tensors on the sphere, scaled to their weighted norm",
        blend=blend,
        parameters=MultislerpParameters,
        model_parameters=MultislerpModelParameters,
        needs_base=False,
        accepts_base=True,
        min_models=1,
        reductions=(Reduction(gram, finalize, applies=lambda params: len(params.models) > 1),),
        validate=validate,
    )
)
