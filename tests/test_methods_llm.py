"""nuslerp, multislerp, karcher, sce, breadcrumbs(_ties) and della(_linear) against float64
re-computations written here.

The references follow mergekit's formulas step by step in float64 on whole tensors (multislerp
through its tangent space, karcher through its vector iteration, selections by sorting), without
calling the code under test; DELLA's draws are re-generated with a pure-Python splitmix64. Every
merged tensor must be within one rounding step of its output dtype of the reference; chunked
merges must give the bytes of unchunked ones.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import pytest
import torch

import modelstock
from modelstock import chunks
from modelstock.engine import chunk_plan_for, merge_in_memory
from modelstock.errors import InvalidRecipe
from modelstock.jobs import TensorInput, TensorJob
from modelstock.recipe import parse_recipe

NAME = "layers.0.mlp.weight"
SHAPES = ((7,), (6, 5), (12, 1), (2, 3, 2, 4))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ----------------------------------------------------------------------------------------------
# helpers

_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def ordered_key(tensor: torch.Tensor) -> torch.Tensor:
    """Integers in the order of the floats they encode, adjacent floats one apart (+0 == -0)."""
    width = tensor.element_size() * 8
    bits = tensor.contiguous().view(_BITS[tensor.dtype]).to(torch.int64)
    magnitude = bits & ((1 << (width - 1)) - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def assert_within_one_rounding(actual: torch.Tensor, reference: torch.Tensor) -> None:
    """``actual`` is the float64 ``reference`` rounded to its dtype, give or take one step."""
    assert actual.shape == reference.shape and reference.dtype == torch.float64
    distance = (ordered_key(actual) - ordered_key(reference.to(actual.dtype))).abs()
    worst = int(distance.reshape(-1).argmax())
    assert int(distance.max()) <= 1, (
        f"{int(distance.max())} steps off at {worst}: {float(actual.reshape(-1)[worst])!r} "
        f"vs {float(reference.reshape(-1)[worst])!r} ({actual.dtype})"
    )


def test_rounding_helper_can_fail() -> None:
    one = torch.ones(1, dtype=torch.float64)
    assert_within_one_rounding(torch.nextafter(torch.ones(1), torch.full((1,), 2.0)), one)
    with pytest.raises(AssertionError):
        assert_within_one_rounding(torch.tensor([1.0 + 2**-22]), one)


def family(shape: tuple[int, ...], dtype: torch.dtype, count: int = 3, seed: int = 0, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    models = [(base + spread * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype) for _ in range(count)]
    return base.to(dtype), models


def merge(method: str, models, base=None, parameters=None, model_parameters=None):
    merged, stats = modelstock.merge_state_dicts(
        method,
        [{NAME: m} for m in models],
        base=None if base is None else {NAME: base},
        parameters=parameters,
        model_parameters=model_parameters,
    )
    return merged[NAME], stats[0]


def job_for(
    method: str,
    shape: tuple[int, ...],
    count: int,
    has_base: bool,
    dtype: str = "F32",
    parameters: dict | None = None,
    model_parameters: Sequence[dict] | None = None,
) -> TensorJob:
    """A job as the planner makes it; ``has_base`` may give a base to methods registered without
    one (nuslerp, multislerp), to check their task-vector mode."""
    recipe = parse_recipe(
        {
            "merge_method": method,
            "base_model": "base" if modelstock.get_method(method).needs_base else None,
            "models": [
                {"model": f"m{i}", "parameters": dict(model_parameters[i]) if model_parameters else {}}
                for i in range(count)
            ],
            "parameters": dict(parameters or {}),
        }
    )
    inputs = tuple(TensorInput(i, NAME, dtype, f"input-{i}") for i in range(count + int(has_base)))
    return TensorJob(NAME, shape, dtype, method, recipe.tensor_parameters(NAME), inputs, has_base=has_base)


def f64(tensors):
    return [t.double() for t in tensors]


# ----------------------------------------------------------------------------------------------
# float64 references, from mergekit's formulas


def ref_nuslerp(x0: torch.Tensor, x1: torch.Tensor, t: float, flatten: bool, row_wise: bool) -> torch.Tensor:
    shape = x0.shape
    if flatten:
        x0, x1 = x0.reshape(-1), x1.reshape(-1)
    elif row_wise:
        x0, x1 = x0.transpose(0, -1), x1.transpose(0, -1)
    n0 = x0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    n1 = x1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = ((x0 / n0) * (x1 / n1)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos**2) <= 1e-16
    theta = torch.acos(torch.where(collinear, 0.0, cos))
    out = (torch.sin((1 - t) * theta) * x0 + torch.sin(t * theta) * x1) / torch.sin(theta)
    out = torch.where(collinear, (1 - t) * x0 + t * x1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def ref_multislerp(
    xs: list[torch.Tensor], weights: Sequence[float], normalize: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """mergekit's steps: tangent space at the weighted mean direction, exponential map back."""
    if len(xs) == 1:
        return xs[0]
    flat = torch.stack([x.reshape(-1) for x in xs])
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = flat.norm(dim=1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    if mean.norm() < eps:
        return (flat * w[:, None]).sum(0).reshape(xs[0].shape)
    mean = mean / mean.norm()
    tangents = units - (units @ mean)[:, None] * mean
    tangent = (tangents * w[:, None]).sum(0)
    length = tangent.norm() + eps
    out = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    return (out * (norms.squeeze(1) * w).sum()).reshape(xs[0].shape)


def ref_karcher(xs: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """mergekit's iteration on the full vectors."""
    if len(xs) == 1:
        return xs[0]
    norms = [float(x.norm()) for x in xs]
    valid = [(x / n).reshape(-1) for x, n in zip(xs, norms) if n > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    a = 1.0 / len(valid)
    mean = sum(a * u for u in valid)
    mean = valid[0].clone() if float(mean.norm()) < tol else mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in valid:
            dot = float(torch.dot(mean, u).clamp(-1, 1))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += a * theta / math.sin(theta) * (u - dot * mean)
        length = float(tangent.norm())
        if length < tol:
            break
        mean = math.cos(length) * mean + math.sin(length) * tangent / length
        if float(mean.norm()) > tol:
            mean = mean / mean.norm()
    return (sum(norms) / len(xs) * mean).reshape(xs[0].shape)


def order_largest_first(scores: torch.Tensor) -> list[int]:
    """Flat indices by float32 score, largest first, equal scores by position."""
    values = scores.reshape(-1).to(torch.float32).tolist()
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def order_smallest_first(scores: torch.Tensor) -> list[int]:
    """Flat indices by float32 score, smallest first, equal scores by position: a stable ascending
    sort, the order mergekit's breadcrumbs and DELLA rank by."""
    values = scores.reshape(-1).to(torch.float32).tolist()
    return sorted(range(len(values)), key=lambda i: (values[i], i))


def ref_sce(base: torch.Tensor, models: list[torch.Tensor], select_topk: float) -> torch.Tensor:
    deltas = [m - base for m in models]
    stacked = torch.stack(deltas)
    if select_topk < 1:
        mask = torch.zeros(base.numel(), dtype=torch.bool)
        if select_topk > 0:
            # mergekit's fp32 math: the variance of the task vectors rounded to float32.
            var = torch.var(stacked.float(), dim=0, unbiased=False)
            k = int(int(torch.count_nonzero(var)) * select_topk)
            mask[order_largest_first(var)[:k]] = True
        deltas = [torch.where(mask.reshape(base.shape), d, 0.0) for d in deltas]
    squares = torch.tensor([float((d**2).mean()) for d in deltas], dtype=torch.float64)
    weights = torch.full_like(squares, 1 / len(deltas)) if abs(float(squares.sum())) < 1e-6 else squares / squares.sum()
    majority = torch.where(sum(deltas) >= 0, 1.0, -1.0).double()
    mixed, divisor = torch.zeros_like(base), torch.zeros_like(base)
    for d, w in zip(deltas, weights):
        e = (torch.sign(d) == majority).double() * w
        mixed += d * e
        divisor += e
    return base + mixed / divisor.clamp(min=1e-6)


def combine(base: torch.Tensor, deltas, weights, ties: bool, normalize: bool, lam: float) -> torch.Tensor:
    """mergekit's generalized task arithmetic, after sparsification."""
    weighted = [w * d for w, d in zip(weights, deltas)]
    if ties:
        sign = torch.where(sum(weighted) >= 0, 1.0, -1.0).double()
        agree = [(torch.sign(x) == sign).double() for x in weighted]
        mixed = sum(x * a for x, a in zip(weighted, agree))
        divisor = sum(w * a for w, a in zip(weights, agree))
        divisor = torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed = sum(weighted)
        divisor = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def l1_rescaled(delta: torch.Tensor, kept: torch.Tensor, rescale: bool, to_float32: bool = False) -> torch.Tensor:
    before, after = float(delta.abs().sum()), float(kept.abs().sum())
    if not rescale or before < 1e-7 or after < 1e-7:
        return kept
    scale = before / after
    return kept * (float(torch.tensor(scale, dtype=torch.float32)) if to_float32 else scale)


def ref_crumbs(delta: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    if density >= 1:
        return delta
    n = delta.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    ascending = order_smallest_first(delta.abs())
    mask = torch.zeros(n, dtype=torch.bool)
    mask[ascending[bottom : bottom + target]] = True
    return l1_rescaled(delta, torch.where(mask.reshape(delta.shape), delta, 0.0), rescale)


MASK64 = (1 << 64) - 1


def uniforms(seed: int, tensor: str, model: int, count: int) -> list[float]:
    key = int.from_bytes(hashlib.sha256(f"{seed}\0{tensor}\0{model}".encode()).digest()[:8], "little")
    out = []
    for index in range(count):
        z = (key + (index + 1) * 0x9E3779B97F4A7C15) & MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        z ^= z >> 31
        out.append((z >> 11) * 2.0**-53)
    return out


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probabilities by magnitude rank along axis 1 (axis 0 of a vector), smallest rank 0."""
    work = delta.unsqueeze(0) if delta.dim() < 2 else delta
    moved = work.movedim(1, -1)
    fibers = moved.reshape(-1, moved.shape[-1])
    n = fibers.shape[1]
    probabilities = torch.empty_like(fibers)
    for f, fiber in enumerate(fibers):
        for rank, i in enumerate(order_smallest_first(fiber.abs())):
            probabilities[f, i] = density if n == 1 else (density - epsilon) + rank / (n - 1) * 2 * epsilon
    return probabilities.reshape(moved.shape).movedim(-1, 1).reshape(delta.shape)


def ref_della(
    delta: torch.Tensor, seed: int, model: int, density: float, epsilon: float, rescale: bool
) -> torch.Tensor:
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    draws = torch.tensor(uniforms(seed, NAME, model, delta.numel()), dtype=torch.float64).reshape(delta.shape)
    kept = torch.where(draws < della_probabilities(delta, density, epsilon), delta, 0.0)
    return l1_rescaled(delta, kept, rescale, to_float32=True)  # DARE's rule: factors rounded to float32


# ----------------------------------------------------------------------------------------------
# each method against its reference, on 1-D, 2-D and 4-D tensors in three dtypes


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("flatten, row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp_matches_reference(dtype, shape, flatten, row_wise):
    base, models = family(shape, dtype, count=2, seed=1, spread=1.0)
    params = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    weights = [{"weight": 0.3}, {"weight": 0.9}]
    merged, _ = merge("nuslerp", models, parameters=params, model_parameters=weights)
    assert_within_one_rounding(merged, ref_nuslerp(*f64(models), 0.75, flatten, row_wise))
    # Task-vector mode (mergekit's optional base): the method handles a base block.
    job = job_for(
        "nuslerp", shape, 2, has_base=True, dtype=merged_dtype(dtype), parameters=params, model_parameters=weights
    )
    with_base, _ = merge_in_memory(job, [base, *models])
    b = base.double()
    assert_within_one_rounding(with_base, b + ref_nuslerp(*(m - b for m in f64(models)), 0.75, flatten, row_wise))


def merged_dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]


def test_nuslerp_degenerate_cases():
    x = torch.linspace(-1, 2, 12, dtype=torch.float64).reshape(3, 4)
    # Collinear: linear interpolation; weights summing to zero: t = 0.5.
    merged, stats = merge("nuslerp", [x.float(), (2 * x).float()], model_parameters=[{"weight": 1.0}, {"weight": -1.0}])
    assert_within_one_rounding(merged, 0.5 * x + 0.5 * 2 * x)
    assert "collinear_linear_interpolation" in stats.flags and stats.values["t"] == 0.5
    merged, stats = merge("nuslerp", [x.float(), (-x).float()], model_parameters=[{"weight": 1.0}, {"weight": 3.0}])
    assert_within_one_rounding(merged, 0.25 * x - 0.75 * x)
    assert "collinear_linear_interpolation" in stats.flags and stats.values["cos"] == -1.0
    # A zero tensor: norms clamped to 1e-7, so cos = 0 and theta = pi / 2, as mergekit.
    merged, _ = merge("nuslerp", [x.float(), torch.zeros(3, 4)], model_parameters=[{"weight": 1.0}, {"weight": 1.0}])
    assert_within_one_rounding(merged, math.sin(math.pi / 4) * x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("normalize_weights", [True, False])
def test_multislerp_matches_reference(dtype, shape, normalize_weights):
    base, models = family(shape, dtype, count=3, seed=2, spread=0.5)
    weights = [0.2, 0.5, 1.3]
    params = {"normalize_weights": normalize_weights}
    merged, _ = merge("multislerp", models, parameters=params, model_parameters=[{"weight": w} for w in weights])
    assert_within_one_rounding(merged, ref_multislerp(f64(models), weights, normalize_weights))
    job = job_for(
        "multislerp",
        shape,
        3,
        has_base=True,
        dtype=merged_dtype(dtype),
        parameters=params,
        model_parameters=[{"weight": w} for w in weights],
    )
    with_base, _ = merge_in_memory(job, [base, *models])
    b = base.double()
    assert_within_one_rounding(with_base, b + ref_multislerp([m - b for m in f64(models)], weights, normalize_weights))


def test_multislerp_degenerate_cases():
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))
    # One model: returned as it is.
    merged, _ = merge("multislerp", [x], model_parameters=[{"weight": 2.0}])
    assert torch.equal(merged, x)
    # Antipodal inputs whose weights cancel: the linear combination, flagged.
    merged, stats = merge(
        "multislerp", [x, -x, 2 * x], model_parameters=[{"weight": 1.0}, {"weight": 1.0}, {"weight": 0.0}]
    )
    assert_within_one_rounding(merged, torch.zeros(4, 5, dtype=torch.float64))
    assert "multislerp_zero_mean" in stats.flags
    # A larger eps: cos(eps) scales the result (the tangent step is zero).
    _, models = family((4, 5), torch.float32, count=2, seed=4)
    merged, _ = merge(
        "multislerp", models, parameters={"eps": 0.01}, model_parameters=[{"weight": 1.0}, {"weight": 3.0}]
    )
    assert_within_one_rounding(merged, ref_multislerp(f64(models), [1.0, 3.0], eps=0.01))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("max_iter, tol, spread", [(10, 1e-5, 0.3), (3, 1e-12, 2.0), (10, 1e-5, 3.0)])
def test_karcher_matches_reference(dtype, shape, max_iter, tol, spread):
    _, models = family(shape, dtype, count=3, seed=5, spread=spread)
    merged, stats = merge("karcher", models, parameters={"max_iter": max_iter, "tol": tol})
    assert_within_one_rounding(merged, ref_karcher(f64(models), max_iter, tol))
    assert 0 < stats.values["iterations"] <= max_iter


def test_karcher_degenerate_cases():
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(6))
    merged, _ = merge("karcher", [x])
    assert torch.equal(merged, x)
    merged, stats = merge("karcher", [torch.zeros(3, 4), torch.zeros(3, 4)])
    assert torch.equal(merged, torch.zeros(3, 4)) and "karcher_no_valid_input" in stats.flags
    # A zero model is not valid (its direction is undefined) but counts in the mean norm.
    merged, _ = merge("karcher", [x, 2 * x, torch.zeros(3, 4)])
    assert_within_one_rounding(merged, ref_karcher(f64([x, 2 * x, torch.zeros(3, 4)])))
    _, stats = merge(
        "karcher", family((5, 6), torch.float32, seed=7, spread=2.0)[1], parameters={"max_iter": 1, "tol": 1e-12}
    )
    assert "karcher_not_converged" in stats.flags


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("select_topk", [1.0, 0.4, 0.05, 0.0])
def test_sce_matches_reference(dtype, shape, select_topk):
    base, models = family(shape, dtype, count=3, seed=8)
    merged, _ = merge("sce", models, base=base, parameters={"select_topk": select_topk})
    assert_within_one_rounding(merged, ref_sce(base.double(), f64(models), select_topk))


def test_sce_weights_are_uniform_below_the_threshold_and_one_model_keeps_the_base():
    base, models = family((8, 8), torch.float32, seed=9, spread=1e-4)
    merged, stats = merge("sce", models, base=base, parameters={"select_topk": 0.5})
    assert "sce_uniform_weights" in stats.flags
    assert_within_one_rounding(merged, ref_sce(base.double(), f64(models), 0.5))
    # One model: every variance is zero, nothing is selected.
    merged, stats = merge("sce", models[:1], base=base, parameters={"select_topk": 0.5})
    assert torch.equal(merged, base) and stats.values["nonzero_variance"] == 0


def test_sce_k_counts_only_the_entries_that_vary():
    """Entries where every model agrees have zero variance: k = int(nonzero * select_topk)."""
    base, models = family((10, 6), torch.float32, seed=16)
    shared = models[0][:4].clone()
    for model in models:
        model[:4] = shared  # 24 of 60 entries do not vary (but differ from the base)
    merged, stats = merge("sce", models, base=base, parameters={"select_topk": 0.5})
    assert stats.values["nonzero_variance"] == 36
    assert int((merged[4:] != base[4:]).sum()) <= 18 and torch.equal(merged[:4], base[:4])
    assert_within_one_rounding(merged, ref_sce(base.double(), f64(models), 0.5))


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("rescale, normalize, lam", [(False, False, 1.0), (True, True, 0.7)])
def test_breadcrumbs_matches_reference(method, dtype, shape, rescale, normalize, lam):
    base, models = family(shape, dtype, count=3, seed=10)
    weights, densities, gammas = [1.0, 0.6, -0.4], [0.5, 0.9, 1.0], [0.1, 0.3, 0.2]
    merged, _ = merge(
        method,
        models,
        base=base,
        parameters={"rescale": rescale, "normalize": normalize, "lambda": lam},
        model_parameters=[{"weight": w, "density": d, "gamma": g} for w, d, g in zip(weights, densities, gammas)],
    )
    b = base.double()
    crumbs = [ref_crumbs(m - b, d, g, rescale) for m, d, g in zip(f64(models), densities, gammas)]
    assert_within_one_rounding(merged, combine(b, crumbs, weights, method == "breadcrumbs_ties", normalize, lam))


def test_breadcrumbs_defaults_drop_the_top_one_percent():
    base, models = family((20, 10), torch.float32, count=1, seed=11)
    merged, _ = merge("breadcrumbs", models, base=base, model_parameters=[{"weight": 1.0, "density": 0.9}])
    kept = (merged != base).reshape(-1)
    order = order_largest_first((models[0].double() - base.double()).abs())
    assert not kept[order[:2]].any() and kept[order[2:182]].all() and not kept[order[182:]].any()


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("rescale", [True, False])
def test_della_matches_reference(method, dtype, shape, rescale):
    base, models = family(shape, dtype, count=3, seed=12)
    weights, densities, epsilons = [1.0, 0.5, 0.8], [0.5, 0.3, 1.0], [0.2, 0.1, 0.15]
    merged, stats = merge(
        method,
        models,
        base=base,
        parameters={"rescale": rescale, "random_seed": 5},
        model_parameters=[{"weight": w, "density": d, "epsilon": e} for w, d, e in zip(weights, densities, epsilons)],
    )
    b = base.double()
    pruned = [
        ref_della(m - b, 5, i, d, e, rescale) for i, (m, d, e) in enumerate(zip(f64(models), densities, epsilons))
    ]
    assert_within_one_rounding(merged, combine(b, pruned, weights, method == "della", method == "della", 1.0))
    assert stats.values["nonzero_kept"] == [int((p != 0).sum()) for p in pruned]


def test_della_keeps_each_rank_with_its_probability():
    """The kept fraction per magnitude-rank bucket matches density - eps + 2 eps r / (n - 1), for
    modelstock's seeded draws and for mergekit's own della_magprune (torch's RNG)."""
    rows, n, density, epsilon = 400, 50, 0.5, 0.3
    delta = torch.randn(rows, n, generator=torch.Generator().manual_seed(13))
    merged, _ = merge(
        "della_linear",
        [delta],
        base=torch.zeros(rows, n),
        parameters={"rescale": False},
        model_parameters=[{"weight": 1.0, "density": density, "epsilon": epsilon}],
    )
    rank = n - 1 - delta.abs().argsort(dim=1, descending=True).argsort(dim=1)  # 0 = smallest
    kept_by = {"modelstock": merged != 0}
    magprune = pytest.importorskip("mergekit.sparsify").della_magprune
    with torch.random.fork_rng():
        torch.manual_seed(0)
        kept_by["mergekit"] = magprune(delta, density, epsilon) != 0
    for source, kept in kept_by.items():
        for low in range(0, n, 10):
            bucket = (rank >= low) & (rank < low + 10)
            p = (density - epsilon) + rank[bucket].double() / (n - 1) * 2 * epsilon
            sigma = math.sqrt(float((p * (1 - p)).sum())) / int(bucket.sum())
            observed, expected = float(kept[bucket].double().mean()), float(p.mean())
            assert abs(observed - expected) < 5 * sigma, (source, low, observed, expected)


def test_della_is_seeded():
    base, models = family((30, 20), torch.float32, seed=14)
    params = {"model_parameters": [{"weight": 1.0, "density": 0.4}] * 3}
    first, _ = merge("della", models, base=base, parameters={"random_seed": 1}, **params)
    again, _ = merge("della", models, base=base, parameters={"random_seed": 1}, **params)
    other, _ = merge("della", models, base=base, parameters={"random_seed": 2}, **params)
    assert torch.equal(first, again) and not torch.equal(first, other)


# ----------------------------------------------------------------------------------------------
# chunked == unchunked, bytes


CHUNKED = [
    ("nuslerp", True, {"nuslerp_flatten": True}, [{"weight": 0.4}, {"weight": 0.6}]),
    ("nuslerp", False, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, [{"weight": 0.4}, {"weight": 0.6}]),
    ("nuslerp", False, {"nuslerp_flatten": False}, [{"weight": 0.4}, {"weight": 0.6}]),
    ("multislerp", True, {}, [{"weight": w} for w in (0.2, 0.3, 0.5)]),
    ("karcher", False, {}, None),
    ("sce", True, {"select_topk": 0.3}, None),
    ("breadcrumbs", True, {"rescale": True}, [{"weight": 1.0, "density": 0.6, "gamma": 0.05}] * 3),
    ("breadcrumbs_ties", True, {}, [{"weight": 1.0, "density": 0.6, "gamma": 0.05}] * 3),
    ("della", True, {"random_seed": 3}, [{"weight": 1.0, "density": 0.4}] * 3),
    ("della_linear", True, {}, [{"weight": 0.5, "density": 0.6, "epsilon": 0.3}] * 3),
]


@pytest.mark.parametrize(
    "method, has_base, parameters, model_parameters", CHUNKED, ids=[f"{c[0]}-{i}" for i, c in enumerate(CHUNKED)]
)
@pytest.mark.parametrize("shape, dtype", [((20, 6), "F32"), ((10, 2, 2, 3), "BF16")], ids=["2d-f32", "4d-bf16"])
def test_chunked_merge_is_bit_identical(monkeypatch, method, has_base, parameters, model_parameters, shape, dtype):
    count = len(model_parameters) if model_parameters else 3
    torch_dtype = {"F32": torch.float32, "BF16": torch.bfloat16}[dtype]
    base, models = family(shape, torch_dtype, count=count, seed=15)
    inputs = [base, *models] if has_base else models
    monkeypatch.setattr(chunks, "BLOCK_ELEMENTS", 24)  # 4 (2-D) or 2 (4-D) rows per block
    monkeypatch.setattr(chunks, "MIN_CHUNK_BYTES", 1)
    job = job_for(method, shape, count, has_base, dtype, parameters, model_parameters)
    budget = job.input_nbytes // 5
    assert len(chunk_plan_for(job, budget).chunks) >= 5
    whole, whole_stats = merge_in_memory(job, inputs)
    chunked, chunked_stats = merge_in_memory(job, inputs, memory_budget=budget)
    assert chunked.view(torch.uint8).equal(whole.view(torch.uint8))
    assert {k: v for k, v in chunked_stats.values.items() if k != "reread_bytes"} == whole_stats.values
    assert not torch.equal(whole, models[0]) and torch.isfinite(whole.float()).all()


# ----------------------------------------------------------------------------------------------
# recipes


@pytest.mark.parametrize(
    "method, base, parameters, model_parameters, message",
    [
        ("nuslerp", False, {}, [{}, {}], "needs parameter 'weight'"),
        ("nuslerp", False, {"tt": 0.5}, [{"weight": 1.0}] * 2, "unknown parameter 'tt' for nuslerp"),
        ("nuslerp", False, {"weight": 1.0}, [{}] * 3, "at most 2 models"),
        ("nuslerp", False, {"weight": 1.0}, [{}], "at least 2 models"),
        ("nuslerp", False, {"nuslerp_flatten": "yes"}, [{"weight": 1.0}] * 2, "nuslerp_flatten"),
        ("multislerp", False, {}, [{}, {}], "needs parameter 'weight'"),
        ("multislerp", False, {"weight": 1.0}, [{"normalize_weights": False}] * 2, "method-wide parameter"),
        ("multislerp", False, {}, [{"weight": 1.0}, {"weight": -1.0}], "weights sum to zero"),
        ("karcher", False, {"wieght": 1.0}, [{}] * 2, "unknown parameter 'wieght' for karcher"),
        ("karcher", False, {"max_iter": 2.5}, [{}] * 2, "max_iter"),
        ("sce", False, {}, [{}] * 2, "needs base_model"),
        ("sce", True, {}, [{"wieght": 1.0}] * 2, "unknown parameter 'wieght' for sce"),
        ("breadcrumbs", True, {"density": 0.5}, [{}] * 2, "needs parameter 'weight'"),
        ("breadcrumbs_ties", True, {"epsilom": 0.1}, [{"weight": 1.0}] * 2, "unknown parameter 'epsilom'"),
        ("della", True, {"gama": 0.1}, [{"weight": 1.0}] * 2, "unknown parameter 'gama'"),
        (
            "della_linear",
            True,
            {},
            [{"weight": 1.0, "density": 0.1}],
            r"density 0.1 \+- epsilon 0.15 must lie in \(0, 1\)",
        ),
        ("della", True, {"epsilon": 0.5}, [{"weight": 1.0, "density": 0.6}], "must lie in"),
    ],
)
def test_recipe_errors_are_one_clear_line(method, base, parameters, model_parameters, message):
    x = torch.ones(2, 3)
    with pytest.raises(InvalidRecipe, match=message) as error:
        modelstock.merge_state_dicts(
            method,
            [{"w": x + i} for i in range(len(model_parameters))],
            base={"w": x} if base else None,
            parameters=parameters,
            model_parameters=model_parameters,
        )
    assert "\n" not in str(error.value)


def test_defaults_and_names_follow_mergekit():
    expected = {
        "nuslerp": ({"nuslerp_flatten": True, "nuslerp_row_wise": False}, {"weight": None}),
        "multislerp": ({"normalize_weights": True, "eps": 1e-8}, {"weight": None}),
        "karcher": ({"max_iter": 10, "tol": 1e-5}, {}),
        "sce": ({"int8_mask": False, "select_topk": 1.0}, {}),
        "breadcrumbs": (
            {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.0},
            {"weight": None, "density": 1.0, "gamma": 0.01},
        ),
        "breadcrumbs_ties": (
            {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.0},
            {"weight": None, "density": 1.0, "gamma": 0.01},
        ),
        "della": (
            {"int8_mask": False, "normalize": True, "rescale": True, "lambda": 1.0, "random_seed": 0},
            {"weight": None, "density": 1.0, "epsilon": 0.15},
        ),
        "della_linear": (
            {"int8_mask": False, "normalize": False, "rescale": True, "lambda": 1.0, "random_seed": 0},
            {"weight": None, "density": 1.0, "epsilon": 0.15},
        ),
    }
    import dataclasses

    from modelstock.methods.base import recipe_name

    def defaults(kind):
        return {
            recipe_name(f): (None if f.default is dataclasses.MISSING else f.default) for f in dataclasses.fields(kind)
        }

    for name, (method_defaults, model_defaults) in expected.items():
        method = modelstock.get_method(name)
        assert defaults(method.parameters) == method_defaults, name
        assert defaults(method.model_parameters) == model_defaults, name
    assert set(expected) <= set(modelstock.method_names())
