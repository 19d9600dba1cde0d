"""RAM, Reinforced Agent Merging (arXiv 2601.13572; mergekit ``ram`` and ``ramplus_tl``).

With task vectors ``d_i = w_i - w_0``, an entry *contributes* in model i when ``|d_i| > epsilon``;
``c`` counts the contributing models per entry. RAM keeps the entries that only one model changed
and averages the shared ones over the models that changed them:
``w = w_0 + sum_i m_i d_i / max(c, 1)`` (``m_i`` the contribution mask; ``w_0`` where none does).

RAM+ tensor-local (``ramplus_tl``) also rescales each model's unique entries: per tensor and model,
``rho_i = shared_i / max(unique_i, epsilon)`` (entries where model i contributes with ``c > 1``
and ``c = 1``), ``lambda_i = 1 + r * clamp(rho_i, 0, alpha)``, and the unique entries of model i
are multiplied by ``lambda_i``. Defaults as mergekit: ``epsilon: 1e-5``, ``r: 0.1``, ``alpha: 0.2``.

Numerics: the masks are taken on the task vectors in float64 (exact for inputs up to float32),
so the same entries contribute whatever the output dtype; mergekit takes them in its ``dtype``
and may differ on entries within one rounding of ``epsilon``. The counts of ``ramplus_tl`` are one
reduction pass (exact integers summed over fixed blocks), so chunked merges give the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelstock.methods.base import (
    BaseBlock,
    Coefficients,
    Finalized,
    MergeMethod,
    ModelsBlock,
    NoParameters,
    Reduction,
    TensorParameters,
)
from modelstock.methods.registry import register


@dataclass(frozen=True)
class RamParameters:
    epsilon: float = 1e-5


@dataclass(frozen=True)
class RamPlusParameters:
    r: float = 0.1
    alpha: float = 0.2
    epsilon: float = 1e-5


Parameters = TensorParameters[RamParameters | RamPlusParameters, NoParameters]
LAMBDA = "ram.lambda"


def contributions(block: BaseBlock, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, rows, cols) float64 task vectors, their contribution masks, and (rows, cols) counts c."""
    base = block.base.to(torch.float64)
    deltas = torch.stack([model.to(torch.float64) - base for model in block.models])
    masks = deltas.abs() > epsilon
    return deltas, masks, masks.sum(dim=0)


def shared_and_unique(block: ModelsBlock, coefficients: Coefficients, params: Parameters,
                      compute: torch.dtype) -> torch.Tensor:
    """Per model, the block's contributing entries that others share and those it alone changed."""
    assert isinstance(block, BaseBlock)
    _, masks, counts = contributions(block, params.method.epsilon)
    shared = (masks & (counts > 1)).sum(dim=(1, 2))
    unique = (masks & (counts == 1)).sum(dim=(1, 2))
    return torch.cat([shared, unique]).to(torch.float64).reshape(1, -1)


def unique_scales(reductions: torch.Tensor, coefficients: Coefficients, params: Parameters, count: int) -> Finalized:
    method = params.method
    assert isinstance(method, RamPlusParameters)
    shared, unique = reductions.reshape(2, count)
    rho = shared / unique.clamp_min(method.epsilon)
    scale = 1 + method.r * rho.clamp(min=0, max=method.alpha)  # torch.clamp: max wins when alpha < 0
    values = {"shared_entries": [int(s) for s in shared], "unique_entries": [int(u) for u in unique],
              "rho": [float(v) for v in rho], "lambda": [float(v) for v in scale]}
    return Finalized(coefficients={LAMBDA: scale}, values=values, flags=[])


def blend(block: BaseBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype) -> torch.Tensor:
    """float64 rows (the engine rounds them once to the output dtype)."""
    deltas, masks, counts = contributions(block, params.method.epsilon)
    shared_weight = 1.0 / counts.clamp_min(1).to(torch.float64)
    merged = block.base.to(torch.float64, copy=True)
    scales = coefficients.get(LAMBDA)
    for index, (delta, mask) in enumerate(zip(deltas, masks)):
        unique_weight = 1.0 if scales is None else float(scales[index])
        weight = torch.where(counts == 1, unique_weight, shared_weight)
        merged += torch.where(mask, delta * weight, 0.0)
    return merged


def _method(name: str, summary: str, parameters: type, reductions: tuple[Reduction, ...]) -> MergeMethod[object, object]:
    return MergeMethod(
        name=name,
        summary=summary,
        blend=blend,
        parameters=parameters,
        model_parameters=NoParameters,
        needs_base=True,
        min_models=1,
        reductions=reductions,
    )


RAM = register(_method("ram", "RAM: keep what one model alone changed, average what several changed", RamParameters, ()))
RAMPLUS_TL = register(
    _method(
        "ramplus_tl",
        "RAM+ (tensor-local): RAM with each model's unique entries scaled up by its shared/unique ratio",
        RamPlusParameters,
        (Reduction(shared_and_unique, unique_scales),),
    )
)
