"""Arcee Fusion (mergekit ``arcee_fusion``): take the fine-tune where it changed the base most.

One model and the base. Each entry's importance is ``|w_1 - w_0| * KL``, where KL is the
divergence ``sum p log(p / q)`` of ``p = softmax(w_1) + 1e-8`` from ``q = softmax(w_0) + 1e-8``
along the tensor's last dimension (one value per row of a matrix, one for a vector). With ``Q1``,
``M``, ``Q3`` the importances at sorted (ascending) positions ``floor(q (n - 1))`` for
``q = 0.25, 0.5, 0.75``, the threshold is ``M + 1.5 (Q3 - Q1)`` and the merge takes ``w_1`` where
the importance is at least the threshold, ``w_0`` elsewhere. No parameters, as in mergekit.

Where we differ from mergekit, on purpose:
- the quantiles are exact on every tensor; mergekit sorts a random sample (with replacement,
  from torch's global RNG) of 10^6 entries on larger tensors, so its output there is not
  reproducible. On tensors of at most 10^6 entries the two agree;
- importances are computed in float64 and ranked as float32 (KL clamped at 0, its true lower bound,
  so rounding noise cannot make a score negative). The order statistics come from the exact
  selection of :mod:`modelstock.methods.selection` (two passes over fixed blocks, no sort), so a
  tensor larger than the memory budget merges chunk by chunk into the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from modelstock.methods.base import (
    BaseBlock,
    Coefficients,
    MergeMethod,
    ModelsBlock,
    NoParameters,
    TensorParameters,
)
from modelstock.methods.registry import register
from modelstock.methods.selection import Selection

SOFTMAX_EPS = 1e-8
QUANTILES = (1, 2, 3)  # quarters: Q1, median, Q3
IQR_FACTOR = 1.5

Parameters = TensorParameters[NoParameters, NoParameters]


def importance(block: ModelsBlock, params: Parameters, compute: torch.dtype) -> torch.Tensor:
    """(1, rows, cols) float32 scores >= 0: ``|d| * KL(softmax(w_1) || softmax(w_0))`` along the last dim."""
    assert isinstance(block, BaseBlock)
    base, model = block.base.to(torch.float64), block.models[0].to(torch.float64)
    rows, cols = base.shape
    last = block.shape[-1] if block.shape else 1
    # Blocks hold whole rows, and the last dimension divides a row: every softmax is block-local.
    fibers = (rows, cols // max(last, 1), last) if cols else (rows, 0, 1)
    p = torch.softmax(model.reshape(fibers), dim=-1) + SOFTMAX_EPS
    q = torch.softmax(base.reshape(fibers), dim=-1) + SOFTMAX_EPS
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    kl = torch.where(kl > 0, kl, 0.0)  # +0, never -0 or a rounding below 0: scores rank by bits
    scores = ((model - base).abs().reshape(fibers) * kl).reshape(rows, cols)
    return scores.to(torch.float32).unsqueeze(0)


def quartile_cutoffs(params: Parameters, numel: int, coefficients: Coefficients) -> Sequence[Sequence[int]]:
    """Ascending position ``j = floor(k (n - 1) / 4)`` is descending rank ``n - 1 - j``: cutoff ``n - j``."""
    return [[numel - (quarter * (numel - 1)) // 4 for quarter in QUANTILES]]


QUARTILES = Selection("fusion", importance, quartile_cutoffs)


def blend(block: BaseBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype) -> torch.Tensor:
    q1, median, q3 = (float(v) for v in QUARTILES.values(coefficients)[0])
    threshold = median + IQR_FACTOR * (q3 - q1)
    fused = importance(block, params, compute)[0].to(torch.float64) >= threshold
    return torch.where(fused, block.models[0].to(compute), block.base.to(compute))


METHOD = register(
    MergeMethod(
        name="arcee_fusion",
        summary="Arcee Fusion: the fine-tune's entries whose change (x KL of the row) is an upper outlier, the base elsewhere",
        blend=blend,
        parameters=NoParameters,
        model_parameters=NoParameters,
        needs_base=True,
        min_models=1,
        max_models=1,
        reductions=QUARTILES.value_reductions,
    )
)
