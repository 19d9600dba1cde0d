"""Task arithmetic (Ilharco et al., 2023), and the combination step TIES and DARE share with it.

With task vectors ``d_i = w_i - w_0`` and weights ``a_i``: ``w = w_0 + lambda * sum_i a_i d_i / D``
where ``D = sum_i a_i`` with ``normalize: true`` (1 when ``|sum_i a_i| < 1e-8``, as mergekit) and
``D = 1`` otherwise (the default, as mergekit). With sign consensus (TIES, DARE-TIES) only the
entries whose sign agrees with the elected sign (that of ``sum_i a_i d_i``, ``+`` on ties) are
summed, and ``D`` is the sum of the agreeing weights per entry (1 where none agrees).

Parameter names and defaults follow mergekit's generalized task arithmetic, so its YAML works
unchanged: ``weight`` (per model, required), ``density`` (per model), ``normalize``, ``rescale``,
``lambda``, ``int8_mask``. Here ``density`` and ``rescale`` have no effect (no sparsification), as
in mergekit; ``int8_mask`` only changes mergekit's memory use, never its result, and is ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from modelstock.methods.base import BaseBlock, Density
from modelstock.methods.define import blend_method

WEIGHT_SUM_EPS = 1e-8


def lambda_field() -> Any:
    """The ``lambda`` parameter (a Python keyword, hence the field name ``lambda_``)."""
    return field(default=1.0, metadata={"recipe_name": "lambda"})


@dataclass(frozen=True)
class TaskVectorWeight:
    """Per-model parameters of the task-vector methods."""

    weight: float
    density: Density = 1.0


def elect_sign(weighted: Sequence[torch.Tensor]) -> torch.Tensor:
    """TIES' elected sign per entry: +1 where ``sum_i a_i d_i >= 0``, else -1 (mergekit's 'sum')."""
    total = torch.stack(list(weighted)).sum(dim=0)
    return torch.where(total >= 0, 1.0, -1.0).to(total.dtype)


def combine_task_vectors(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sign_consensus: bool,
    normalize: bool,
    scale: float,
) -> torch.Tensor:
    """``base + scale * sum_i a_i d_i / D`` (see the module docstring for ``D`` and consensus)."""
    weighted = [delta * weight for delta, weight in zip(deltas, weights)]
    divisor: torch.Tensor
    if sign_consensus:
        majority = elect_sign(weighted)
        agree = [torch.sign(w) == majority for w in weighted]
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for contribution, agrees, weight in zip(weighted, agree, weights):
            mixed += torch.where(agrees, contribution, 0.0)
            divisor += agrees.to(base.dtype) * weight
        divisor = torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed = torch.stack(weighted).sum(dim=0)
        total = float(sum(weights))
        divisor = torch.tensor(1.0 if abs(total) < WEIGHT_SUM_EPS else total, dtype=base.dtype)
    if normalize:
        mixed = mixed / divisor
    if scale != 1:
        mixed = mixed * scale
    return base + mixed


@blend_method("task_arithmetic", summary="Task arithmetic: add the weighted sum of the task vectors to the base")
def task_arithmetic(
    block: BaseBlock,
    *,
    weight: tuple[float, ...],
    density: tuple[Density, ...] = (1.0,),
    normalize: bool = False,
    lambda_: float = 1.0,
    rescale: bool = False,
    int8_mask: bool = False,
) -> torch.Tensor:
    deltas = [model - block.base for model in block.models]
    return combine_task_vectors(
        block.base, deltas, weight, sign_consensus=False, normalize=normalize, scale=lambda_
    )
