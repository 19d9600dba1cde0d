"""SCE (Wan et al., 2024, FuseChat; mergekit ``sce``): select, calculate, erase.

As mergekit, with task vectors ``d_i = w_i - w_0`` (no per-model parameters):

1. *select* (``select_topk`` < 1, default 1): keep the entries whose variance across the models
   (population variance of the d_i, per entry) is among the ``k = int(nonzero * select_topk)``
   largest, where ``nonzero`` counts the entries of nonzero variance; zero the others in every d_i
   (``select_topk <= 0`` zeroes everything, so the merge is the base);
2. *calculate*: per model ``s_i = mean(d_i^2)`` over the tensor, weights ``a_i = s_i / sum_j s_j``
   (``1 / N`` each when ``|sum_j s_j| < 1e-6``);
3. *erase*: per entry, the elected sign is that of ``sum_i d_i`` (``+`` on 0); entries of another sign
   (or 0) are dropped: ``w = w_0 + sum_i a_i e_i d_i / max(sum_i a_i e_i, 1e-6)`` with e_i = 1 where
   d_i has the elected sign.

The variances are ranked as float32 values of their float64 computation from the float32 task
vectors (see :func:`variances`), equal ones by position, lower index first (mergekit's
``torch.topk`` leaves that order unspecified: CPU's partial sort picks among equal variances in its
own order, which only bf16 checkpoints, whose task vectors repeat values, make visible). ``int8_mask`` only changes mergekit's
memory use and is ignored. Within the memory budget: a pass counts the nonzero variances, the
exact top-k of :mod:`modelstock.methods.selection` takes three more, a fifth sums the squares
(float64, fixed blocks); the blend is per block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import torch

from modelstock.methods.base import (
    BaseBlock,
    Coefficients,
    Domain,
    Finalized,
    MergeMethod,
    ModelsBlock,
    NoParameters,
    Reduction,
    TensorParameters,
)
from modelstock.methods.registry import register
from modelstock.methods.selection import Selection

WEIGHT_SUM_EPS = 1e-6
DIVISOR_EPS = 1e-6
NONZERO = "sce.nonzero"


@dataclass(frozen=True)
class SceParameters:
    int8_mask: bool = False
    select_topk: Annotated[float, Domain(ge=0, le=1, clamp=True, why='1 keeps every entry, as in mergekit')] = 1.0


Parameters = TensorParameters[SceParameters, NoParameters]


def selects(params: Parameters) -> bool:
    return 0 < params.method.select_topk < 1


def variances(block: ModelsBlock, params: Parameters, compute: torch.dtype) -> torch.Tensor:
    """(1, rows, cols) float32: the population variance per entry of the task vectors as mergekit's
    float32 math has them (each ``d_i`` rounded to float32), accumulated in float64 whatever the
    compute dtype, so that every pass ranks the same scores. This is what ``torch.var`` gives on
    float32 (its CPU kernel accumulates in float64); the variance of the exact differences differs
    from it in the last bit for ~10 % of entries, enough to swap entries at the cutoff."""
    assert isinstance(block, BaseBlock)
    base = block.base.to(torch.float32)
    deltas = torch.stack([(model.to(torch.float32) - base).to(torch.float64) for model in block.models])
    mean = deltas.mean(dim=0)
    return (deltas - mean).square().mean(dim=0).to(torch.float32).unsqueeze(0)


def count_nonzero(
    block: ModelsBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype
) -> torch.Tensor:
    return torch.count_nonzero(variances(block, params, compute)).reshape(1, 1)


def keep_nonzero_count(
    reductions: torch.Tensor, coefficients: Coefficients, params: Parameters, count: int
) -> Finalized:
    nonzero = int(reductions.sum())
    return Finalized(coefficients={NONZERO: torch.tensor(nonzero)}, values={"nonzero_variance": nonzero}, flags=[])


def top_variance_cutoffs(params: Parameters, numel: int, coefficients: Coefficients) -> Sequence[Sequence[int]]:
    """k counts only the nonzero variances (found by the pass before the selection). The product is
    torch's, as in mergekit (an int64 count times a float: float32 arithmetic), so that k is
    mergekit's above 2**24 entries too, where float32 and float64 products truncate differently."""
    nonzero = coefficients[NONZERO].to(torch.int64)
    return [[int(nonzero * params.method.select_topk)]]


TOP_VARIANCES = Selection("sce", variances, top_variance_cutoffs, applies=selects)


def selected(
    block: BaseBlock, coefficients: Coefficients, params: Parameters, dtype: torch.dtype
) -> list[torch.Tensor]:
    """The task vectors in ``dtype``, zero outside the selected entries."""
    base = block.base.to(dtype)
    deltas = [model.to(dtype) - base for model in block.models]
    if params.method.select_topk <= 0:
        return [torch.zeros_like(delta) for delta in deltas]
    if not selects(params):
        return deltas
    keep = TOP_VARIANCES.top(variances(block, params, dtype), coefficients)[0, 0]
    return [torch.where(keep, delta, 0.0) for delta in deltas]


def squares(block: ModelsBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype) -> torch.Tensor:
    """Per model, float64: the sum of the selected d_i^2 over the block, then the block's element count."""
    assert isinstance(block, BaseBlock)
    deltas = selected(block, coefficients, params, torch.float64)
    sums = [delta.square().sum() for delta in deltas]
    return torch.stack([*sums, torch.tensor(float(deltas[0].numel()), dtype=torch.float64)]).reshape(1, -1)


def model_weights(reductions: torch.Tensor, coefficients: Coefficients, params: Parameters, count: int) -> Finalized:
    sums = reductions.reshape(-1)
    mean_squares = sums[:count] / sums[count]
    total = float(mean_squares.sum())
    uniform = abs(total) < WEIGHT_SUM_EPS
    weights = torch.full((count,), 1.0 / count, dtype=torch.float64) if uniform else mean_squares / total
    values = {
        "n_models": count,
        "mean_squares": [float(s) for s in mean_squares],
        "weights": [float(w) for w in weights],
    }
    return Finalized(
        coefficients={"sce.weights": weights}, values=values, flags=["sce_uniform_weights"] if uniform else []
    )


def blend(block: BaseBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype) -> torch.Tensor:
    base = block.base.to(compute)
    if params.method.select_topk <= 0:
        return base.clone()
    deltas = selected(block, coefficients, params, compute)
    majority = torch.where(torch.stack(deltas).sum(dim=0) >= 0, 1.0, -1.0).to(compute)
    mixed = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for delta, weight in zip(deltas, coefficients["sce.weights"].to(compute)):
        kept = torch.where(torch.sign(delta) == majority, weight, 0.0)
        mixed += delta * kept
        divisor += kept
    return base + mixed / divisor.clamp_min(DIVISOR_EPS)


METHOD = register(
    MergeMethod(
        name="sce",
        summary="SCE: keep the most varying entries, weight models by mean square, erase minority signs",
        blend=blend,
        parameters=SceParameters,
        model_parameters=NoParameters,
        needs_base=True,
        min_models=1,
        reductions=(
            Reduction(count_nonzero, keep_nonzero_count, applies=selects),
            *TOP_VARIANCES.reductions,
            Reduction(squares, model_weights, applies=lambda params: params.method.select_topk > 0),
        ),
    )
)
