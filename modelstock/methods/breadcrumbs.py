"""Model Breadcrumbs (Davari & Belilovsky, 2023; mergekit ``breadcrumbs`` and ``breadcrumbs_ties``).

Each task vector ``d_i = w_i - w_0`` (n entries) drops both tails of its magnitudes, as mergekit's
``magnitude_outliers``: with ``k = int(density * n)`` and ``g = int(gamma * n)``, the entries ranked
(largest magnitude first) in ``[n - b - k, n - b)`` are kept, ``b = max(0, n - k - g)``: the ``g``
largest go (fewer when ``k + g > n``) and so do the smallest beyond the ``k`` kept. ``density >= 1``
keeps the task vector whole (``gamma`` then has no effect). With ``rescale`` the kept entries are
scaled to the task vector's L1 norm (not when either norm is below 1e-7). Then ``breadcrumbs`` adds
them as task arithmetic does and ``breadcrumbs_ties`` elects signs first, as TIES
(:func:`modelstock.methods.task_arithmetic.combine_task_vectors`).

Parameters and defaults as mergekit: ``weight`` (per model, required), ``density`` (per model, 1),
``gamma`` (per model, 0.01), ``normalize: false``, ``rescale: false``, ``lambda: 1``; ``int8_mask``
only changes mergekit's memory use and is ignored.

Ranking: magnitudes rounded to float32 (mergekit's float32 math), equal ones in the order of a
*stable* version of mergekit's ascending sort: of equal magnitudes the lower index ranks as the
smaller, so the bottom cut drops it first and the top cut drops the higher index first. mergekit's
own ``torch.sort`` is unstable on CPU beyond 16 entries (its order among equal magnitudes is the
introsort's, not a function of values and positions); with bf16 checkpoints, whose float32 task
vectors repeat values, thousands of entries can share a cutoff's magnitude, and only those can be
chosen differently (issue 23: 2.6 % of the elements). Within the memory
budget: the exact top-k of :mod:`modelstock.methods.selection` (three passes, two cutoffs per
model), an L1 pass (float64) with ``rescale``, then a per-block blend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import torch

from modelstock.methods.base import BaseBlock, Coefficients, Density, Domain, MergeMethod, Reduction, TensorParameters
from modelstock.methods.registry import register
from modelstock.methods.selection import Selection
from modelstock.methods.task_arithmetic import combine_task_vectors, lambda_field
from modelstock.methods.ties import magnitudes, rescale_factors, task_vectors


@dataclass(frozen=True)
class BreadcrumbsParameters:
    normalize: bool = False
    rescale: bool = False
    lambda_: float = lambda_field()
    int8_mask: bool = False


@dataclass(frozen=True)
class BreadcrumbsModelParameters:
    weight: float
    density: Density = 1.0
    gamma: Annotated[float, Domain(ge=0, le=1)] = 0.01


Parameters = TensorParameters[BreadcrumbsParameters, BreadcrumbsModelParameters]


def kept_ranks(density: float, gamma: float, numel: int) -> tuple[int, int]:
    """The ranks ``[first, stop)`` (largest magnitude first) a task vector keeps."""
    if density >= 1:
        return 0, numel
    keep = max(0, int(density * numel))
    bottom = max(0, numel - keep - int(gamma * numel))
    start, stop = min(bottom, numel), min(bottom + keep, numel)  # in ascending order, as mergekit
    return numel - stop, numel - start


def cutoffs(params: Parameters, numel: int, coefficients: Coefficients) -> Sequence[Sequence[int]]:
    return [kept_ranks(p.density, p.gamma, numel) for p in params.models]


def sparsifies(params: Parameters) -> bool:
    return any(p.density < 1 for p in params.models)


# equal="last": the ranking of a stable ascending sort, read largest first (see the module docstring).
CRUMBS = Selection("crumbs", magnitudes, cutoffs, applies=sparsifies, equal="last")


def crumbs(
    block: BaseBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The task vectors and their sparsified versions (kept ranks only, others zero)."""
    deltas = task_vectors(block, compute)
    if not sparsifies(params):
        return deltas, deltas
    ranked = CRUMBS.top(torch.stack([d.abs().to(torch.float32) for d in deltas]), coefficients)  # (N, 2, rows, cols)
    kept = [
        delta if p.density >= 1 else torch.where(ranked[i, 1] & ~ranked[i, 0], delta, 0.0)
        for i, (delta, p) in enumerate(zip(deltas, params.models))
    ]
    return deltas, kept


def l1_norms(block: BaseBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype) -> torch.Tensor:
    """Per model: |d_i|_1 and |sparsified d_i|_1 of one block, in float64."""
    deltas, kept = crumbs(block, coefficients, params, compute)
    return torch.stack(
        [
            torch.stack([d.abs().sum(dtype=torch.float64), k.abs().sum(dtype=torch.float64)])
            for d, k in zip(deltas, kept)
        ]
    ).reshape(1, -1)


def _blend(
    block: BaseBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype, sign_consensus: bool
) -> torch.Tensor:
    _, kept = crumbs(block, coefficients, params, compute)
    if "scale" in coefficients:
        kept = [delta * float(scale) for delta, scale in zip(kept, coefficients["scale"])]
    return combine_task_vectors(
        block.base.to(compute),
        kept,
        [p.weight for p in params.models],
        sign_consensus=sign_consensus,
        normalize=params.method.normalize,
        scale=params.method.lambda_,
    )


def blend_linear(
    block: BaseBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype
) -> torch.Tensor:
    return _blend(block, coefficients, params, compute, sign_consensus=False)


def blend_ties(block: BaseBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype) -> torch.Tensor:
    return _blend(block, coefficients, params, compute, sign_consensus=True)


REDUCTIONS = (*CRUMBS.reductions, Reduction(l1_norms, rescale_factors, applies=lambda params: params.method.rescale))

BREADCRUMBS = register(
    MergeMethod(
        name="breadcrumbs",
        summary="Model Breadcrumbs: drop each task vector's largest and smallest entries, add the rest to the base",
        blend=blend_linear,
        parameters=BreadcrumbsParameters,
        model_parameters=BreadcrumbsModelParameters,
        needs_base=True,
        min_models=1,
        reductions=REDUCTIONS,
    )
)

BREADCRUMBS_TIES = register(
    MergeMethod(
        name="breadcrumbs_ties",
        summary="Model Breadcrumbs with TIES: drop both magnitude tails, elect signs, merge the agreeing entries",
        blend=blend_ties,
        parameters=BreadcrumbsParameters,
        model_parameters=BreadcrumbsModelParameters,
        needs_base=True,
        min_models=1,
        reductions=REDUCTIONS,
    )
)
