"""Karcher mean (mergekit ``karcher``): the weighted Riemannian mean of the models' directions on the
unit sphere, scaled by their mean norm.

As mergekit, with N models x_i, alphas 1/N, norms n_i = |x_i| over the flattened tensor and units
u_i = x_i / n_i (0 for a zero tensor); the inputs with ``n_i > tol`` are *valid* and their alphas are
renormalised to a_i (1 / their count):

1. m = the normalised ``sum a_i u_i`` (the first valid unit when that sum's norm is below ``tol``);
2. up to ``max_iter`` times (default 10): with ``theta_i = acos(clamp(<m, u_i>, -1, 1))``, the
   tangent ``g = sum_{theta_i >= tol} a_i theta_i / sin(theta_i) (u_i - <m, u_i> m)``; stop when
   ``|g| < tol`` (default 1e-5), else ``m = cos|g| m + sin|g| g / |g|``, renormalised when its norm
   exceeds ``tol``;
3. w = (sum_i n_i / N) m.

Every vector involved stays in the span of the inputs, so the iteration runs on coefficient vectors
in that span with the Gram matrix ``<x_i, x_j>`` (one reduction pass, float64, over the engine's fixed
blocks) and the blend is ``sum_i c_i x_i``. One model is returned unchanged; no valid input gives
zeros. The report records the iterations and flags ``karcher_not_converged`` when ``max_iter`` ran out.

Base: mergekit ignores the base's role but, as mergekit appends ``base_model`` to the inputs, its
karcher averages the base with the models. Here the inputs are ``models`` alone; list the base
among them to include it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import torch

from modelstock.methods.base import (
    Coefficients,
    Domain,
    Finalized,
    MergeMethod,
    ModelsBlock,
    NoParameters,
    Reduction,
    TensorParameters,
)
from modelstock.methods.multislerp import combine, gram
from modelstock.methods.registry import register


@dataclass(frozen=True)
class KarcherParameters:
    max_iter: Annotated[int, Domain(ge=1)] = 10
    tol: Annotated[float, Domain(gt=0)] = 1e-5


Parameters = TensorParameters[KarcherParameters, NoParameters]


@dataclass(frozen=True)
class KarcherMean:
    """The mean direction as coefficients of the units, and how the iteration ended."""

    units: torch.Tensor  # (V,) coefficients of the valid units u_i
    iterations: int
    converged: bool


def _norm(vector: torch.Tensor, units_gram: torch.Tensor) -> float:
    return math.sqrt(max(float(vector @ units_gram @ vector), 0.0))


def karcher_mean(units_gram: torch.Tensor, max_iter: int, tol: float) -> KarcherMean:
    """The iteration of the module docstring on coefficient vectors over V valid units whose Gram
    matrix is ``units_gram`` (V, V): a vector ``sum_i y_i u_i`` is held as ``y``."""
    count = units_gram.shape[0]
    share = torch.full((count,), 1.0 / count, dtype=torch.float64)
    mean = share.clone()
    mean_norm = _norm(mean, units_gram)
    if mean_norm < tol:
        mean = torch.zeros_like(share)
        mean[0] = 1.0
    else:
        mean = mean / mean_norm
    for iteration in range(max(max_iter, 0)):
        dots = (units_gram @ mean).clamp(-1.0, 1.0)  # <m, u_i>
        theta = torch.acos(dots)
        moving = theta >= tol
        # a_i theta_i / sin(theta_i), 0 for the units already at m (mergekit skips them).
        factor = torch.where(moving, share * theta / torch.where(moving, torch.sin(theta), 1.0), 0.0)
        tangent = factor - float(factor @ dots) * mean  # sum_i factor_i (u_i - <m, u_i> m)
        tangent_norm = _norm(tangent, units_gram)
        if tangent_norm < tol:
            return KarcherMean(mean, iteration, True)
        mean = math.cos(tangent_norm) * mean + (math.sin(tangent_norm) / tangent_norm) * tangent
        unit_norm = _norm(mean, units_gram)
        if unit_norm > tol:
            mean = mean / unit_norm
    return KarcherMean(mean, max(max_iter, 0), False)


def finalize(reductions: torch.Tensor, coefficients: Coefficients, params: Parameters, count: int) -> Finalized:
    products = reductions.reshape(count, count)
    norms = products.diagonal().clamp_min(0).sqrt()
    tol = params.method.tol
    valid = torch.nonzero(norms > tol).reshape(-1)
    combination = torch.zeros(count, dtype=torch.float64)
    values: dict[str, object] = {"n_models": count, "norms": [float(n) for n in norms]}
    flags: list[str] = []
    if valid.numel() == 0:
        flags.append("karcher_no_valid_input")
        return Finalized(coefficients={"karcher": combination}, values=values, flags=flags)
    valid_norms = norms[valid]
    units_gram = products[valid][:, valid] / (valid_norms[:, None] * valid_norms[None, :])
    mean = karcher_mean(units_gram, params.method.max_iter, tol)
    scale = float(norms.sum()) / count  # sum_i alpha_i n_i over every input, alpha_i = 1 / N
    combination[valid] = scale * mean.units / valid_norms  # u_i = x_i / n_i
    values.update(iterations=mean.iterations, coefficients=[float(c) for c in combination])
    if not mean.converged:
        flags.append("karcher_not_converged")
    return Finalized(coefficients={"karcher": combination}, values=values, flags=flags)


def blend(block: ModelsBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype) -> torch.Tensor:
    if "karcher" not in coefficients:  # one model: returned as it is, as mergekit does
        return block.models[0].to(compute)
    return combine(block, coefficients["karcher"], compute)


METHOD = register(
    MergeMethod(
        name="karcher",
        summary="Karcher mean: the Riemannian mean of the models' directions on the sphere, at their mean norm",
        blend=blend,
        parameters=KarcherParameters,
        model_parameters=NoParameters,
        needs_base=False,
        min_models=1,
        reductions=(Reduction(gram, finalize, applies=lambda params: len(params.models) > 1),),
    )
)
