"""DELLA (Deep, Bhardwaj & Kumar, 2024; mergekit ``della`` and ``della_linear``): drop task-vector
entries at random with a probability set by their magnitude rank, rescale, merge.

As mergekit's ``della_magprune``: the entries of ``d_i = w_i - w_0`` are ranked by magnitude along
the tensor's second axis (within each row of a matrix; a 1-D tensor is one vector; for more axes,
per index of the others), from 0 (smallest) to n - 1, and an entry of rank r is kept with
probability ``p = density - epsilon + 2 epsilon r / (n - 1)`` (``density`` when n = 1, where
mergekit's 0/0 fails). ``density >= 1`` keeps the task vector whole, ``density <= 0`` drops it; in
between, ``density +- epsilon`` must lie in (0, 1) (refused when the recipe is planned, as mergekit
refuses). With ``rescale`` (default) the kept entries are scaled to the task vector's L1 norm over the
whole tensor (not when either norm is below 1e-7), as mergekit does (not the paper's 1 / p). Then
``della`` elects signs (TIES) and ``della_linear`` adds the task vectors as task arithmetic does
(:func:`modelstock.methods.task_arithmetic.combine_task_vectors`).

Parameters and defaults as mergekit: ``weight`` (per model, required), ``density`` (per model, 1),
``epsilon`` (per model, 0.15), ``rescale: true``, ``lambda: 1``, ``normalize`` (``true`` for
``della``, ``false`` for ``della_linear``); ``int8_mask`` is ignored (memory only); ``random_seed``
(default 0) is modelstock's, as for DARE.

Determinism: as DARE (:mod:`modelstock.methods.dare`), the entry's uniform draw is splitmix64 of
(``random_seed``, tensor name, model index, flat element index) and it is kept when the draw is below
p; ranks are by float32 magnitude, equal ones as a stable version of mergekit's ascending
``argsort`` ranks them (the lower index ranks as the smaller; mergekit's unstable CPU sort leaves
that order to its introsort), and lie within rows. So the same recipe gives the same bytes on
every run, worker, device and chunking: one L1 pass (float64), then the blend. mergekit draws from torch's global RNG instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch

from modelstock.errors import InvalidRecipe
from modelstock.methods import dare
from modelstock.methods.base import BaseBlock, Coefficients, Density, Domain, MergeMethod, Reduction, TensorParameters
from modelstock.methods.registry import register
from modelstock.methods.task_arithmetic import combine_task_vectors, lambda_field


@dataclass(frozen=True)
class DellaParameters:
    normalize: bool = True
    rescale: bool = True
    lambda_: float = lambda_field()
    int8_mask: bool = False
    random_seed: int = 0


@dataclass(frozen=True)
class DellaLinearParameters:
    normalize: bool = False
    rescale: bool = True
    lambda_: float = lambda_field()
    int8_mask: bool = False
    random_seed: int = 0


@dataclass(frozen=True)
class DellaModelParameters:
    weight: float
    density: Density = 1.0
    epsilon: Annotated[float, Domain(ge=0, lt=1, why='density +- epsilon must lie in (0, 1), as mergekit requires')] = 0.15


Parameters = TensorParameters[DellaParameters | DellaLinearParameters, DellaModelParameters]


def validate(params: Parameters, tensor: str) -> None:
    for index, p in enumerate(params.models):
        if 0 < p.density < 1 and not (p.density - p.epsilon > 0 and p.density + p.epsilon < 1):
            raise InvalidRecipe(
                f"tensor {tensor!r}: model {index}: density {p.density} +- epsilon {p.epsilon} must lie in (0, 1)"
            )


def keep_probabilities(delta: torch.Tensor, shape: tuple[int, ...], density: float, epsilon: float) -> torch.Tensor:
    """(rows, cols) float64: each entry's keep probability from its magnitude rank along axis 1."""
    rows = delta.shape[0]
    length = shape[1] if len(shape) >= 2 else delta.shape[1]
    magnitudes = delta.abs().to(torch.float32).reshape(rows, length, -1)
    if length == 1:
        return torch.full(delta.shape, density, dtype=torch.float64, device=delta.device)
    # Ascending and stable, as mergekit's argsort read with its ties in index order: rank 0 is the smallest.
    order = torch.argsort(magnitudes, dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(length, device=delta.device).view(1, -1, 1).expand_as(order)
    ).to(torch.float64)
    probability = (density - epsilon) + rank / (length - 1) * (2 * epsilon)
    return probability.reshape(delta.shape)


def dropped(block: BaseBlock, params: Parameters, index: int, delta: torch.Tensor) -> torch.Tensor:
    """Model ``index``'s task vector rows with the dropped entries zeroed (deterministic draws)."""
    p = params.models[index]
    if p.density >= 1:
        return delta
    if p.density <= 0:
        return torch.zeros_like(delta)
    key = dare.stream_key(params.method.random_seed, block.name, index)
    rows, cols = delta.shape
    first = block.row_start * cols
    draws = dare.uniform_at(key, torch.arange(first, first + rows * cols, dtype=torch.int64, device=delta.device))
    keep = draws.reshape(rows, cols) < keep_probabilities(delta, block.shape, p.density, p.epsilon)
    return torch.where(keep, delta, 0.0)


def l1_norms(block: BaseBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype) -> torch.Tensor:
    """Per row, per model: ``|d_i|_1``, ``|dropped d_i|_1`` and the kept count, in float64."""
    base = block.base.to(torch.float64)
    columns = []
    for index, model in enumerate(block.models):
        delta = model.to(torch.float64) - base
        kept = dropped(block, params, index, delta)
        columns += [delta.abs().sum(dim=1), kept.abs().sum(dim=1), (kept != 0).sum(dim=1).to(torch.float64)]
    return torch.stack(columns, dim=1)


def _blend(
    block: BaseBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype, sign_consensus: bool
) -> torch.Tensor:
    base = block.base.to(compute)
    scale = coefficients["scale"].reshape(-1)
    deltas = [
        dropped(block, params, index, model.to(compute) - base) * scale[index].to(compute)
        for index, model in enumerate(block.models)
    ]
    return combine_task_vectors(
        base,
        deltas,
        [p.weight for p in params.models],
        sign_consensus=sign_consensus,
        normalize=params.method.normalize,
        scale=params.method.lambda_,
    )


def blend_ties(block: BaseBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype) -> torch.Tensor:
    return _blend(block, coefficients, params, compute, sign_consensus=True)


def blend_linear(
    block: BaseBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype
) -> torch.Tensor:
    return _blend(block, coefficients, params, compute, sign_consensus=False)


# DARE's finalize: rescale factors (rounded to float32, as DARE's) and the report's counts.
L1_PASS = Reduction(l1_norms, dare.finalize)

DELLA = register(
    MergeMethod(
        name="della",
        summary="DELLA: drop task-vector entries at random, the larger ones less often (seeded), rescale, TIES-merge",
        blend=blend_ties,
        parameters=DellaParameters,
        model_parameters=DellaModelParameters,
        needs_base=True,
        min_models=1,
        reductions=(L1_PASS,),
        validate=validate,
    )
)

DELLA_LINEAR = register(
    MergeMethod(
        name="della_linear",
        summary="DELLA-linear: drop task-vector entries at random by magnitude rank (seeded), rescale, add them",
        blend=blend_linear,
        parameters=DellaLinearParameters,
        model_parameters=DellaModelParameters,
        needs_base=True,
        min_models=1,
        reductions=(L1_PASS,),
        validate=validate,
    )
)
