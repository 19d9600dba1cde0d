"""Model Stock (Jang, Yun & Han, ECCV 2024).

Per tensor (or per output row with ``filter_wise``), with task vectors ``d_i = w_i - w_0``:
``cos_theta`` is the mean of the pairwise cosines ``<d_i, d_j> / (|d_i| |d_j|)`` over i < j (the
authors' rule for N > 2, as mergekit does), ``t = N cos / (1 + (N - 1) cos)`` and the merge is
``t * mean_i(w_i) + (1 - t) * w_0``.

Degenerate cases, each flagged in the report:
- a task vector that is exactly zero has cosine 0 with every other (so all-zero gives t = 0);
- ``cos_theta <= 0`` keeps the formula's t (<= 0), as the authors and mergekit do, unless
  ``clamp_t`` clamps t to [0, 1];
- ``|1 + (N - 1) cos_theta| < 1e-6`` (t would explode): t = 0, the base weights are kept.

Numerics (docs/ARCHITECTURE.md, "Numerics"): inner products are computed in float64 over the
engine's fixed, cache-sized blocks and summed in block order; t stays float64. Measured on the
1.1B benchmark, float32 block sums would make this pass ~1.4x faster but move t by ~1e-8
relative, which makes the report inexact and lets a reordering of the fine-tunes flip bf16
roundings; the pass is not the merge's bottleneck, so float64 stays.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelstock.methods.base import (
    BaseBlock,
    Coefficients,
    Finalized,
    MergeMethod,
    NoParameters,
    Reduction,
    ReductionScope,
    TensorParameters,
)
from modelstock.methods.registry import register

DENOMINATOR_EPS = 1e-6


@dataclass(frozen=True)
class ModelStockParameters:
    filter_wise: bool = False
    clamp_t: bool = False


Parameters = TensorParameters[ModelStockParameters, NoParameters]


def reduction_scope(params: Parameters, shape: tuple[int, ...]) -> ReductionScope:
    # One angle per output row of a matrix; a vector (bias, norm) is a single row, as in mergekit.
    return "rows" if params.method.filter_wise and len(shape) >= 2 else "tensor"


def task_vector_gram(block: BaseBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype) -> torch.Tensor:
    """Inner products <d_i, d_j> of one block in float64: (rows, N*N) per row, or (1, N*N)."""
    base = block.base.to(torch.float64)
    count = len(block.models)
    deltas = torch.empty((count, *base.shape), dtype=torch.float64, device=base.device)
    for index, model in enumerate(block.models):
        # Convert-copy then same-dtype subtract: ~3x faster than one mixed-dtype subtract kernel.
        deltas[index].copy_(model).sub_(base)
    if reduction_scope(params, block.shape) == "rows":
        per_row = deltas.permute(1, 0, 2)  # (rows, N, cols)
        gram = torch.bmm(per_row, per_row.transpose(1, 2))
    else:
        flat = deltas.reshape(count, -1)
        gram = (flat @ flat.T).unsqueeze(0)
    # Symmetrised: <d_i, d_j> and <d_j, d_i> may round differently in a matrix product, and
    # permuting the fine-tunes must not change t.
    gram = (gram + gram.transpose(1, 2)) * 0.5
    return gram.reshape(-1, count * count)


def model_stock_ratio(cos_theta: torch.Tensor, count: int) -> torch.Tensor:
    """t = N cos / (1 + (N - 1) cos), the interpolation ratio of Model Stock (eq. 4 of the paper)."""
    return count * cos_theta / (1 + (count - 1) * cos_theta)


def finalize(reductions: torch.Tensor, coefficients: Coefficients, params: Parameters, count: int) -> Finalized:
    gram = reductions.reshape(-1, count, count)
    squared_norms = torch.diagonal(gram, dim1=1, dim2=2).clamp_min(0)  # (G, N)
    norms = squared_norms.sqrt()
    pairs = [(i, j) for i in range(count) for j in range(i + 1, count)]
    nonzero = norms > 0
    cosines = []
    for i, j in pairs:
        # sqrt(|d_i|^2 |d_j|^2) rounds once where |d_i| |d_j| rounds three times: parallel task
        # vectors then get cos = 1 and t = 1 exactly (t = 1 - 1e-16 would leave a trace of w_0).
        denom = (squared_norms[:, i] * squared_norms[:, j]).sqrt()
        both = nonzero[:, i] & nonzero[:, j]
        cos = torch.where(both, gram[:, i, j] / torch.where(both, denom, torch.ones_like(denom)), 0.0)
        cosines.append(cos.clamp(-1.0, 1.0))
    cos_pairs = torch.stack(cosines, dim=1)  # (G, pairs)
    cos_theta = cos_pairs.mean(dim=1)
    denominator = 1 + (count - 1) * cos_theta
    near_zero = denominator.abs() < DENOMINATOR_EPS
    t = torch.where(near_zero, 0.0, model_stock_ratio(cos_theta, count))

    flags: list[str] = []
    if bool((~nonzero).any()):
        flags.append("zero_task_vector")
    if bool((~nonzero).all()):
        flags.append("all_task_vectors_zero")
    if bool((cos_theta <= 0).any()):
        flags.append("nonpositive_cos_theta")
    if bool(near_zero.any()):
        flags.append("denominator_near_zero")
    if params.method.clamp_t:
        clamped = t.clamp(0.0, 1.0)
        if bool((clamped != t).any()):
            flags.append("t_clamped")
        t = clamped
    elif bool(((t < 0) | (t > 1)).any()):
        flags.append("t_outside_0_1")

    values: dict[str, object] = {
        "n_models": count,
        "task_vector_norms": [float(v) for v in norms.square().sum(dim=0).sqrt()],
    }
    if gram.shape[0] == 1:
        values.update(
            cos={f"{i},{j}": float(cos_pairs[0, k]) for k, (i, j) in enumerate(pairs)},
            cos_theta=float(cos_theta[0]),
            t=float(t[0]),
        )
    else:
        values.update(
            filter_wise=True,
            cos={f"{i},{j}": float(cos_pairs[:, k].mean()) for k, (i, j) in enumerate(pairs)},
            cos_theta=float(cos_theta.mean()),
            cos_theta_min=float(cos_theta.min()),
            cos_theta_max=float(cos_theta.max()),
            t=float(t.mean()),
            t_min=float(t.min()),
            t_max=float(t.max()),
        )
    convex = bool(((t >= 0) & (t <= 1)).all())
    per_row = frozenset({"t"}) if gram.shape[0] > 1 else frozenset()
    return Finalized(coefficients={"t": t.unsqueeze(1)}, values=values, flags=flags, convex=convex, per_row=per_row)


def blend(block: BaseBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype) -> torch.Tensor:
    """t * mean_i(w_i) + (1 - t) * w_0, row by row when t is per row."""
    t = coefficients["t"]
    # copy=True: when the inputs already have the compute dtype, .to() returns the input itself and
    # the in-place ops below would overwrite the caller's (or the read buffer's) weights.
    average = block.models[0].to(compute, copy=True)
    for model in block.models[1:]:
        average.add_(model)  # in-place add upcasts the storage dtype inside the kernel
    if t.numel() == 1:
        # (t / N) * sum_i w_i + (1 - t) * w_0: the mean's division folded into the scaling pass.
        ratio = float(t)
        return average.mul_(ratio / len(block.models)).add_(block.base, alpha=1.0 - ratio)
    average.div_(len(block.models))
    t = t.to(compute)
    return average.mul_(t).add_(block.base.to(compute) * (1 - t))


METHOD = register(
    MergeMethod(
        name="model_stock",
        summary="Model Stock: interpolate the fine-tunes' average toward the base by the task vectors' angle",
        blend=blend,
        parameters=ModelStockParameters,
        model_parameters=NoParameters,
        needs_base=True,
        min_models=2,
        reductions=(Reduction(task_vector_gram, finalize, reduction_scope),),
        refuse_base_in_models=True,  # N and the angle would silently include a zero task vector
    )
)
