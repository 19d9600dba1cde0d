"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.

Per tensor and model, the task vector keeps its ``k = max(1, int(density * numel))`` largest
entries by magnitude (none when ``density <= 0``, all when ``density >= 1``), optionally rescaled
to its original L1 norm (``rescale``); then the signs are elected and the agreeing entries
averaged (see :mod:`modelstock.methods.task_arithmetic`). Defaults as mergekit: ``normalize: true``,
``rescale: false``, ``lambda: 1``.

Ranking follows mergekit on float32 inputs exactly: magnitudes of the task vector rounded to
float32 (mergekit computes it in float32), and equal magnitudes are ranked by position (a stable
sort), so the selection is the same on every device. Top-k needs the whole tensor at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelstock.methods.registry import register
from modelstock.methods.base import BaseBlock, Coefficients, MergeMethod, TensorParameters
from modelstock.methods.task_arithmetic import TaskVectorWeight, combine_task_vectors, lambda_field

RESCALE_EPS = 1e-7


@dataclass(frozen=True)
class TiesParameters:
    normalize: bool = True
    rescale: bool = False
    lambda_: float = lambda_field()
    int8_mask: bool = False


Parameters = TensorParameters[TiesParameters, TaskVectorWeight]


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the ``max(1, int(density * numel))`` largest ``|delta|`` (ties by position)."""
    numel = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0 or numel == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    keep = max(1, int(density * numel))
    magnitudes = delta.abs().reshape(-1).to(torch.float32)
    top = torch.argsort(magnitudes, descending=True, stable=True)[:keep]
    mask = torch.zeros(numel, dtype=torch.bool, device=delta.device)
    mask[top] = True
    return mask.reshape(delta.shape)


def l1_rescale(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``kept * |delta|_1 / |kept|_1``, unless either norm is below 1e-7 (mergekit's rule)."""
    before = delta.abs().sum()
    after = kept.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept * (before / after)


def trim(delta: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    if density >= 1:
        return delta
    kept = torch.where(magnitude_mask(delta, density), delta, 0.0)
    return l1_rescale(delta, kept) if rescale else kept


def blend(
    block: BaseBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype
) -> torch.Tensor:
    base = block.base.to(compute)
    deltas = [
        trim(model.to(compute) - base, p.density, params.method.rescale)
        for model, p in zip(block.models, params.models)
    ]
    return combine_task_vectors(
        base,
        deltas,
        [p.weight for p in params.models],
        sign_consensus=True,
        normalize=params.method.normalize,
        scale=params.method.lambda_,
    )


METHOD = register(
    MergeMethod(
        name="ties",
        summary="TIES: keep each task vector's largest entries, elect signs, average the agreeing ones",
        parameters=TiesParameters,
        model_parameters=TaskVectorWeight,
        needs_base=True,
        min_models=1,
        blend=blend,
        whole_tensor=True,
    )
)
