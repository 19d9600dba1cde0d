"""DARE (Yu et al., ICML 2024): drop task-vector entries at random, rescale, then merge.

``dare_linear`` adds the sparsified task vectors (task arithmetic), ``dare_ties`` elects signs
first (TIES). Each entry of model i's task vector is kept with probability ``density``; with
``rescale: true`` (the default) the kept entries are scaled so the task vector keeps its L1 norm,
which is what mergekit does (not the paper's ``1 / density``). Defaults as mergekit:
``normalize: false``, ``rescale: true``, ``lambda: 1``.

Determinism: the keep/drop decision of an entry is a pure function of (``random_seed``, tensor
name, model index, flat element index): ``splitmix64`` of a counter, the same integer arithmetic on
CPU and GPU. So the same recipe gives the same bytes on every run, worker, device and chunking,
and the tensor can be processed in row blocks: a first pass sums the L1 norms (before and after
dropping), a second pass blends. mergekit draws from torch's global RNG instead, so its DARE
output is not reproducible across runs and cannot be compared bit for bit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from modelstock.methods.base import BaseBlock, Coefficients, Finalized, MergeMethod, Reduction, TensorParameters
from modelstock.methods.registry import register
from modelstock.methods.task_arithmetic import TaskVectorWeight, combine_task_vectors, lambda_field

RESCALE_EPS = 1e-7
_U64 = 1 << 64


def _signed(value: int) -> int:
    value %= _U64
    return value - _U64 if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


@dataclass(frozen=True)
class DareParameters:
    normalize: bool = False
    rescale: bool = True
    lambda_: float = lambda_field()
    int8_mask: bool = False
    random_seed: int = 0


Parameters = TensorParameters[DareParameters, TaskVectorWeight]


def stream_key(random_seed: int, tensor: str, model_index: int) -> int:
    """The 64-bit key of one model's drop mask on one tensor (signed, as torch.int64 holds it)."""
    digest = hashlib.sha256(f"{random_seed}\0{tensor}\0{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def _shift_right(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's ``>>`` is arithmetic)."""
    return (values >> bits) & ((1 << (64 - bits)) - 1)


def uniform_at(key: int, index: torch.Tensor) -> torch.Tensor:
    """float64 uniforms in [0, 1): splitmix64's output number ``index`` (int64) for seed ``key``.

    int64 multiplication and addition wrap modulo 2**64 in torch, which is the arithmetic
    splitmix64 is defined with.
    """
    z = (index + 1) * _GOLDEN + key
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 11).to(torch.float64) * 2.0**-53


def keep_mask(key: int, row_start: int, rows: int, cols: int, density: float, device: torch.device) -> torch.Tensor:
    """Which entries of rows ``[row_start, row_start + rows)`` of a (·, cols) tensor are kept."""
    index = torch.arange(row_start * cols, (row_start + rows) * cols, dtype=torch.int64, device=device)
    return (uniform_at(key, index) < density).reshape(rows, cols)


def _dropped(block: BaseBlock, params: Parameters, index: int, delta: torch.Tensor) -> torch.Tensor:
    density = params.models[index].density
    if density >= 1:
        return delta
    key = stream_key(params.method.random_seed, block.name, index)
    rows = block.row_stop - block.row_start
    mask = keep_mask(key, block.row_start, rows, delta.numel() // max(rows, 1), density, delta.device)
    return torch.where(mask.reshape(delta.shape), delta, 0.0)


def l1_norms(block: BaseBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype) -> torch.Tensor:
    """Per row, per model: ``|d_i|_1``, ``|dropped d_i|_1`` and the kept count, in float64."""
    base = block.base.to(torch.float64)
    columns = []
    for index, model in enumerate(block.models):
        delta = model.to(torch.float64) - base
        kept = _dropped(block, params, index, delta)
        columns += [delta.abs().sum(dim=1), kept.abs().sum(dim=1), (kept != 0).sum(dim=1).to(torch.float64)]
    return torch.stack(columns, dim=1)


def finalize(reductions: torch.Tensor, coefficients: Coefficients, params: Parameters, count: int) -> Finalized:
    sums = reductions.reshape(count, 3)
    scales = []
    for index in range(count):
        before, after = float(sums[index, 0]), float(sums[index, 1])
        dense = params.models[index].density >= 1
        skip = dense or not params.method.rescale or before < RESCALE_EPS or after < RESCALE_EPS
        scales.append(1.0 if skip else before / after)
    # Rounded to float32 so the bytes do not depend on the reduction's summation order (devices).
    scale = torch.tensor(scales, dtype=torch.float32).to(torch.float64)
    values = {
        "n_models": count,
        "random_seed": params.method.random_seed,
        "rescale_factors": [float(s) for s in scale],
        "task_vector_l1": [float(s) for s in sums[:, 0]],
        "nonzero_kept": [int(s) for s in sums[:, 2]],
    }
    return Finalized(coefficients={"scale": scale.unsqueeze(0)}, values=values, flags=[])


def _blend(
    block: BaseBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype,
    sign_consensus: bool,
) -> torch.Tensor:
    base = block.base.to(compute)
    scale = coefficients["scale"].reshape(-1)
    deltas = [
        _dropped(block, params, index, model.to(compute) - base) * scale[index].to(compute)
        for index, model in enumerate(block.models)
    ]
    return combine_task_vectors(
        base,
        deltas,
        [p.weight for p in params.models],
        sign_consensus=sign_consensus,
        normalize=params.method.normalize,
        scale=params.method.lambda_,
    )


def blend_ties(
    block: BaseBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype
) -> torch.Tensor:
    return _blend(block, coefficients, params, compute, sign_consensus=True)


def blend_linear(
    block: BaseBlock, coefficients: Coefficients, params: Parameters, compute: torch.dtype
) -> torch.Tensor:
    return _blend(block, coefficients, params, compute, sign_consensus=False)


DARE_TIES = register(
    MergeMethod(
        name="dare_ties",
        summary="DARE-TIES: drop task-vector entries at random (seeded), rescale, elect signs, merge",
        parameters=DareParameters,
        model_parameters=TaskVectorWeight,
        needs_base=True,
        min_models=1,
        reductions=(Reduction(l1_norms, finalize),),
        blend=blend_ties,
    )
)

DARE_LINEAR = register(
    MergeMethod(
        name="dare_linear",
        summary="DARE: drop task-vector entries at random (seeded), rescale, add them to the base",
        parameters=DareParameters,
        model_parameters=TaskVectorWeight,
        needs_base=True,
        min_models=1,
        reductions=(Reduction(l1_norms, finalize),),
        blend=blend_linear,
    )
)
