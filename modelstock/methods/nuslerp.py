"""NuSLERP (mergekit ``nuslerp``): spherical interpolation of two models, weighted, whole-tensor or
per vector.

As mergekit, with the two models' ``weight`` (per model, required), ``t = w_2 / (w_1 + w_2)``
(0.5 when ``|w_1 + w_2| < 1e-6``), vectors v_1, v_2 (the models, or their task vectors when the block
has a base), ``cos = <v_1, v_2> / (max(|v_1|, 1e-7) max(|v_2|, 1e-7))`` clamped to [-1, 1]:

- collinear (``1 - cos^2 <= 1e-16``): ``(1 - t) v_1 + t v_2``;
- otherwise, with ``theta = acos(cos)``: ``(sin((1 - t) theta) v_1 + sin(t theta) v_2) / sin(theta)``.

Which vectors: ``nuslerp_flatten: true`` (the default) takes the whole tensor as one vector.
Otherwise ``nuslerp_row_wise: false`` (the default) takes the vectors along the last axis (each
row of a matrix), and ``nuslerp_row_wise: true`` those along the first axis (each column of a
matrix: mergekit's name, its code transposes dim 0 to the end); a 1-D tensor is always one vector.

Within the memory budget: vectors along the last axis lie inside a row, so the blend computes them
block by block; the whole tensor and the columns get their norms and inner products from one
reduction pass (float64, over the engine's fixed blocks). Statistics and coefficients are float64.

Base: optional, as in mergekit: with a recipe's ``base_model``, the task vectors are interpolated
and added to it; without, the models themselves are.
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
    Reduction,
    TensorParameters,
)
from modelstock.methods.multislerp import directions
from modelstock.methods.registry import register

NORM_EPS = 1e-7
COLLINEAR_EPS = 1e-8
WEIGHT_SUM_EPS = 1e-6


@dataclass(frozen=True)
class NuslerpParameters:
    nuslerp_row_wise: bool = False
    nuslerp_flatten: bool = True


@dataclass(frozen=True)
class NuslerpModelParameters:
    weight: float


Parameters = TensorParameters[NuslerpParameters, NuslerpModelParameters]


def interpolation_t(params: Parameters) -> float:
    first, second = (p.weight for p in params.models)
    total = first + second
    return 0.5 if abs(total) < WEIGHT_SUM_EPS else second / total


def nuslerp_coefficients(squares: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From ``|v_1|^2, |v_2|^2, <v_1, v_2>`` (3, ...) in float64: the coefficients of v_1 and v_2
    (2, ...), cos and whether the vectors count as collinear."""
    # max(|v|, 1e-7) as sqrt(max(|v|^2, 1e-14)), and one square root of the product: it rounds once
    # where |v_1| |v_2| rounds three times, so parallel (or opposite) vectors get cos = +-1 exactly.
    product = squares[0].clamp_min(NORM_EPS**2) * squares[1].clamp_min(NORM_EPS**2)
    cos = (squares[2] / product.sqrt()).clamp(-1.0, 1.0)
    collinear = (1 - cos * cos) <= COLLINEAR_EPS**2
    theta = torch.acos(torch.where(collinear, 0.0, cos))
    sin_theta = torch.sin(theta)
    spherical = torch.stack([torch.sin((1 - t) * theta) / sin_theta, torch.sin(t * theta) / sin_theta])
    linear = torch.stack([torch.full_like(cos, 1 - t), torch.full_like(cos, t)])
    return torch.where(collinear, linear, spherical), cos, collinear


def _squares(first: torch.Tensor, second: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    return torch.stack([(first * first).sum(dim=dim), (second * second).sum(dim=dim), (first * second).sum(dim=dim)])


def whole_vectors(params: Parameters, shape: tuple[int, ...]) -> bool:
    """Whether the tensor is one vector (else, with the reduction pass, one vector per column)."""
    return params.method.nuslerp_flatten or len(shape) < 2


def inner_products(
    block: ModelsBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype
) -> torch.Tensor:
    """Per block, float64: (1, 3) for the whole tensor, or (1, 3 * cols) for its columns."""
    first, second = directions(block, torch.float64)
    if whole_vectors(params, block.shape):
        return _squares(first, second, (0, 1)).reshape(1, 3)
    return _squares(first, second, 0).reshape(1, -1)


def finalize(reductions: torch.Tensor, coefficients: Coefficients, params: Parameters, count: int) -> Finalized:
    squares = reductions.reshape(3, -1)  # one column per vector
    t = interpolation_t(params)
    mixing, cos, collinear = nuslerp_coefficients(squares, t)
    values: dict[str, object] = {"t": t}
    if cos.numel() == 1:
        values.update(cos=float(cos[0]), coefficients=[float(c) for c in mixing[:, 0]])
    else:
        values.update(
            vectors=cos.numel(), cos_mean=float(cos.mean()), cos_min=float(cos.min()), cos_max=float(cos.max())
        )
    flags = ["collinear_linear_interpolation"] if bool(collinear.any()) else []
    return Finalized(coefficients={"nuslerp": mixing}, values=values, flags=flags)


def _segment_coefficients(first: torch.Tensor, second: torch.Tensor, shape: tuple[int, ...], t: float) -> torch.Tensor:
    """Coefficients (2, rows, cols) for the vectors along the last axis of one block's rows."""
    length = shape[-1] if len(shape) >= 2 else first.shape[1]
    rows = first.shape[0]
    first64 = first.to(torch.float64).reshape(rows, -1, length)
    second64 = second.to(torch.float64).reshape(rows, -1, length)
    mixing, _, _ = nuslerp_coefficients(_squares(first64, second64, -1), t)  # (2, rows, segments)
    return mixing.unsqueeze(-1).expand(2, rows, first64.shape[1], length).reshape(2, rows, -1)


def blend(block: ModelsBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype) -> torch.Tensor:
    first, second = directions(block, compute)
    if "nuslerp" in coefficients:
        mixing = coefficients["nuslerp"]  # (2, 1) or (2, cols): broadcast over the block's rows
    else:
        mixing = _segment_coefficients(first, second, block.shape, interpolation_t(params))
    mixing = mixing.to(compute)
    merged = first * mixing[0] + second * mixing[1]
    return merged.add_(block.base.to(compute)) if isinstance(block, BaseBlock) else merged


METHOD = register(
    MergeMethod(
        name="nuslerp",
        summary="NuSLERP: weighted spherical interpolation of two models, whole-tensor or per row/column",
        blend=blend,
        parameters=NuslerpParameters,
        model_parameters=NuslerpModelParameters,
        needs_base=False,
        accepts_base=True,
        min_models=2,
        max_models=2,
        reductions=(
            Reduction(
                inner_products,
                finalize,
                applies=lambda params: params.method.nuslerp_flatten or params.method.nuslerp_row_wise,
            ),
        ),
    )
)
