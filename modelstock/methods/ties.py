"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.

Per tensor and model, the task vector keeps its ``k = max(1, int(density * numel))`` largest
entries by magnitude (none when ``density <= 0``, all when ``density >= 1``), optionally rescaled
to its original L1 norm (``rescale``); then the signs are elected and the agreeing entries
averaged (see :mod:`modelstock.methods.task_arithmetic`). Defaults as mergekit: ``normalize: true``,
``rescale: false``, ``lambda: 1``.

Ranking follows mergekit on float32 inputs: magnitudes of the task vector rounded to float32
(mergekit computes it in float32); equal magnitudes are ranked by position, as a stable sort
would, so the selection is the same on every device. The top-k is exact over the whole tensor
and found within the memory budget (:mod:`modelstock.methods.selection`), so a tensor larger
than the budget is merged chunk by chunk into the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from modelstock.methods.base import (
    BaseBlock,
    Coefficients,
    Finalized,
    MergeMethod,
    ModelsBlock,
    Reduction,
    TensorParameters,
)
from modelstock.methods.registry import register
from modelstock.methods.selection import Selection
from modelstock.methods.task_arithmetic import TaskVectorWeight, combine_task_vectors, lambda_field

RESCALE_EPS = 1e-7


@dataclass(frozen=True)
class TiesParameters:
    normalize: bool = True
    rescale: bool = False
    lambda_: float = lambda_field()
    int8_mask: bool = False


Parameters = TensorParameters[TiesParameters, TaskVectorWeight]


def keep_count(density: float, numel: int) -> int:
    """How many entries a task vector keeps: ``max(1, int(density * numel))``, all or none at the ends."""
    if density >= 1:
        return numel
    if density <= 0:
        return 0
    return max(1, int(density * numel))


def task_vectors(block: BaseBlock, compute: torch.dtype) -> list[torch.Tensor]:
    base = block.base.to(compute)
    return [model.to(compute) - base for model in block.models]


def magnitudes(block: ModelsBlock, params: Parameters, compute: torch.dtype) -> torch.Tensor:
    assert isinstance(block, BaseBlock)
    return torch.stack([delta.abs().to(torch.float32) for delta in task_vectors(block, compute)])


def cutoffs(params: Parameters, numel: int, coefficients: Coefficients) -> Sequence[Sequence[int]]:
    return [[keep_count(p.density, numel)] for p in params.models]


TOP_MAGNITUDES = Selection("trim", magnitudes, cutoffs)


def trimmed(block: BaseBlock, coefficients: Coefficients, compute: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The task vectors and their trimmed versions (largest entries kept, others zero)."""
    deltas = task_vectors(block, compute)
    keep = TOP_MAGNITUDES.top(torch.stack([d.abs().to(torch.float32) for d in deltas]), coefficients)
    return deltas, [torch.where(keep[i, 0], delta, 0.0) for i, delta in enumerate(deltas)]


def l1_norms(block: BaseBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype) -> torch.Tensor:
    """Per model: |d_i|_1 and |trimmed d_i|_1 of one block, in float64."""
    deltas, kept = trimmed(block, coefficients, compute)
    return torch.stack([torch.stack([d.abs().sum(dtype=torch.float64), k.abs().sum(dtype=torch.float64)])
                        for d, k in zip(deltas, kept)]).reshape(1, -1)


def rescale_factors(reductions: torch.Tensor, coefficients: Coefficients, params: Parameters, count: int) -> Finalized:
    """``|d|_1 / |trimmed d|_1`` per model (1 when either is below 1e-7, mergekit's rule)."""
    sums = reductions.reshape(count, 2)
    scales = [1.0 if before < RESCALE_EPS or after < RESCALE_EPS else before / after for before, after in sums.tolist()]
    scale = torch.tensor(scales, dtype=torch.float64)
    return Finalized(coefficients={"scale": scale}, values={"rescale_factors": scales}, flags=[])


def blend(block: BaseBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype) -> torch.Tensor:
    _, kept = trimmed(block, coefficients, compute)
    if "scale" in coefficients:
        kept = [delta * float(scale) for delta, scale in zip(kept, coefficients["scale"])]
    return combine_task_vectors(
        block.base.to(compute),
        kept,
        [p.weight for p in params.models],
        sign_consensus=True,
        normalize=params.method.normalize,
        scale=params.method.lambda_,
    )


METHOD = register(
    MergeMethod(
        name="ties",
        summary="TIES: keep each task vector's largest entries, elect signs, average the agreeing ones",
        blend=blend,
        parameters=TiesParameters,
        model_parameters=TaskVectorWeight,
        needs_base=True,
        min_models=1,
        reductions=(*TOP_MAGNITUDES.reductions, Reduction(l1_norms, rescale_factors, applies=lambda p: p.method.rescale)),
    )
)
