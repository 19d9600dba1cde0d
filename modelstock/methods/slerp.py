"""SLERP: spherical interpolation between the base ``w_0`` and one model ``w_1``, per tensor.

As mergekit: with the flattened tensors' norms (a norm <= 1e-8 counts as 1) and
``cos = <w_0, w_1> / (|w_0| |w_1|)`` clamped to [-1, 1], nearly collinear or antipodal tensors
(``|cos| > 0.9995``) are interpolated linearly, ``(1 - t) w_0 + t w_1``; otherwise, with
``theta = acos(cos)``, ``w = sin((1 - t) theta) / sin(theta) * w_0 + sin(t theta) / sin(theta) * w_1``.
``t`` (required) is 0 for the base and 1 for the model; a conditional list sets it per tensor.
The base is ``base_model``; ``models`` names the other one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from modelstock.methods.base import BaseBlock, Coefficients, Finalized, MergeMethod, NoParameters, Reduction, TensorParameters
from modelstock.methods.registry import register

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


@dataclass(frozen=True)
class SlerpParameters:
    t: float


Parameters = TensorParameters[SlerpParameters, NoParameters]


def inner_products(block: BaseBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype) -> torch.Tensor:
    """Per row, in float64: ``|w_0|^2``, ``|w_1|^2``, ``<w_0, w_1>``."""
    a = block.base.to(torch.float64)
    b = block.models[0].to(torch.float64)
    return torch.stack([(a * a).sum(dim=1), (b * b).sum(dim=1), (a * b).sum(dim=1)], dim=1)


def slerp_coefficients(norm_a: float, norm_b: float, dot: float, t: float) -> tuple[float, float, float, bool]:
    """(coefficient of w_0, coefficient of w_1, cos, linear?) from the norms and the inner product."""
    norm_a = norm_a if norm_a > NORM_EPS else 1.0
    norm_b = norm_b if norm_b > NORM_EPS else 1.0
    cos = min(1.0, max(-1.0, dot / (norm_a * norm_b)))
    if abs(cos) > DOT_THRESHOLD:
        return 1.0 - t, t, cos, True
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta, cos, False


def finalize(reductions: torch.Tensor, coefficients: Coefficients, params: Parameters, count: int) -> Finalized:
    squared_a, squared_b, dot = (float(v) for v in reductions.reshape(3))
    t = params.method.t
    norm_a, norm_b = math.sqrt(max(squared_a, 0.0)), math.sqrt(max(squared_b, 0.0))
    coef_a, coef_b, cos, linear = slerp_coefficients(norm_a, norm_b, dot, t)
    # Rounded to float32 so the bytes do not depend on the reduction's summation order (devices).
    pair = torch.tensor([coef_a, coef_b], dtype=torch.float32).to(torch.float64)
    values = {"t": t, "cos": cos, "theta": math.acos(cos), "coefficients": [float(c) for c in pair]}
    return Finalized(
        coefficients={"slerp": pair.unsqueeze(0)},
        values=values,
        flags=["collinear_linear_interpolation"] if linear else [],
    )


def blend(
    block: BaseBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype
) -> torch.Tensor:
    coef_a, coef_b = coefficients["slerp"].reshape(2).to(compute)
    return block.base.to(compute) * coef_a + block.models[0].to(compute) * coef_b


METHOD = register(
    MergeMethod(
        name="slerp",
        summary="SLERP: spherical interpolation between the base and one model",
        parameters=SlerpParameters,
        model_parameters=NoParameters,
        needs_base=True,
        min_models=1,
        max_models=1,
        reductions=(Reduction(inner_products, finalize),),
        blend=blend,
    )
)
