"""task_arithmetic, ties, dare_ties, dare_linear and slerp against float64 re-computations written here.

The references re-derive each method from its definition (mergekit's semantics) in float64 with
plain Python or torch arithmetic, without calling the code under test; DARE's drop masks are
re-generated with a pure-Python splitmix64. Outputs are float32: the merge computes in float64
and rounds once, so it must agree with the reference to within float32 rounding.
"""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelstock import chunks
from modelstock.api import merge_state_dicts
from modelstock.engine import chunk_plan_for, merge_in_memory
from modelstock.errors import InvalidRecipe
from modelstock.jobs import TensorInput, TensorJob
from modelstock.methods.base import TensorParameters
from modelstock.methods.dare import DareParameters
from modelstock.methods.task_arithmetic import TaskVectorWeight
from modelstock.methods.ties import TiesParameters

F32 = 2.0**-23


def family(seed: int, shapes: dict[str, tuple[int, ...]], models: int = 3, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g, dtype=torch.float64).float() for k, s in shapes.items()}
    fts = [{k: (v.double() + spread * torch.randn(v.shape, generator=g, dtype=torch.float64)).float()
            for k, v in base.items()} for _ in range(models)]
    return base, fts


SHAPES = {"layers.0.mlp.weight": (6, 5), "layers.0.self_attn.weight": (4, 8), "norm.weight": (7,)}


def assert_float32_of(actual: torch.Tensor, expected: torch.Tensor, scale: float, coefficient_ulps: float = 0) -> None:
    """``actual`` (float32) is ``expected`` (float64) rounded, up to ``coefficient_ulps`` float32 ulps of
    ``scale`` for methods that round a coefficient to float32 before the blend."""
    assert actual.dtype == torch.float32
    error = (actual.double() - expected).abs()
    bound = 0.5 * F32 * expected.abs() + coefficient_ulps * F32 * scale + 1e-300
    assert bool((error <= bound * 1.0000001).all()), f"max error {float(error.max()):.3e}"


def small_job(method: str, parameters: object, model: object, shape: tuple[int, int] = (64, 8)) -> TensorJob:
    """The job of tensor "big" (base + 3 float32 fine-tunes)."""
    inputs = tuple(TensorInput(i, "big", "F32", f"input-{i}") for i in range(4))
    return TensorJob("big", shape, "F32", method, TensorParameters(parameters, (model,) * 3), inputs, has_base=True)


def deltas64(base, fts, name):
    return [ft[name].double() - base[name].double() for ft in fts]


# ----------------------------------------------------------------------------------------------
# task arithmetic


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_matches_reference(normalize):
    base, fts = family(1, SHAPES)
    weights = [1.0, 0.6, -0.3]
    merged, _ = merge_state_dicts(
        "task_arithmetic", fts, base=base, parameters={"lambda": 0.8, "normalize": normalize},
        model_parameters=[{"weight": w} for w in weights],
    )
    for name in SHAPES:
        mixed = sum(w * d for w, d in zip(weights, deltas64(base, fts, name)))
        if normalize:
            mixed = mixed / sum(weights)
        assert_float32_of(merged[name], base[name].double() + 0.8 * mixed, 1.0)


def test_task_arithmetic_zero_weight_sum_is_not_divided():
    base, fts = family(2, SHAPES, models=2)
    merged, _ = merge_state_dicts("task_arithmetic", fts, base=base, parameters={"normalize": True},
                                  model_parameters=[{"weight": 1.0}, {"weight": -1.0}])
    for name in SHAPES:
        d1, d2 = deltas64(base, fts, name)
        assert_float32_of(merged[name], base[name].double() + d1 - d2, 1.0)


# ----------------------------------------------------------------------------------------------
# TIES


def reference_trim(delta: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep the max(1, int(density * n)) largest |delta| (float32 magnitudes, ties: lower index first)."""
    flat = delta.reshape(-1).tolist()
    if density >= 1:
        return delta.clone()
    keep = 0 if density <= 0 else max(1, int(density * len(flat)))
    magnitude = [float(torch.tensor(abs(v), dtype=torch.float32)) for v in flat]
    order = sorted(range(len(flat)), key=lambda i: (-magnitude[i], i))[:keep]
    kept = torch.zeros(len(flat), dtype=torch.float64)
    for i in order:
        kept[i] = flat[i]
    kept = kept.reshape(delta.shape)
    before, after = float(delta.abs().sum()), float(kept.abs().sum())
    if rescale and before >= 1e-7 and after >= 1e-7:
        kept = kept * (before / after)
    return kept


def reference_consensus(base: torch.Tensor, deltas, weights, normalize: bool, lam: float) -> torch.Tensor:
    weighted = [w * d for w, d in zip(weights, deltas)]
    total = sum(weighted)
    sign = torch.where(total >= 0, 1.0, -1.0).double()
    mixed = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for w, wd in zip(weights, weighted):
        agree = (torch.sign(wd) == sign).double()
        mixed += wd * agree
        divisor += w * agree
    divisor[divisor == 0] = 1
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


@pytest.mark.parametrize("rescale,normalize,lam", [(False, True, 1.0), (True, False, 1.5)])
def test_ties_matches_reference(rescale, normalize, lam):
    base, fts = family(3, SHAPES)
    weights, densities = [1.0, 0.7, 0.4], [0.5, 0.3, 0.8]
    merged, _ = merge_state_dicts(
        "ties", fts, base=base, parameters={"rescale": rescale, "normalize": normalize, "lambda": lam},
        model_parameters=[{"weight": w, "density": d} for w, d in zip(weights, densities)],
    )
    for name in SHAPES:
        trimmed = [reference_trim(d, p, rescale) for d, p in zip(deltas64(base, fts, name), densities)]
        expected = reference_consensus(base[name].double(), trimmed, weights, normalize, lam)
        assert_float32_of(merged[name], expected, 1.0)


def test_ties_breaks_magnitude_ties_by_position():
    base = {"w": torch.zeros(2, 4)}
    ft = {"w": torch.tensor([[0.5, -1.0, 0.5, 0.25], [-0.5, 1.0, 0.5, 0.125]])}
    merged, _ = merge_state_dicts("ties", [ft], base=base, model_parameters=[{"weight": 1.0, "density": 0.5}])
    # |d| = 1, 1 (positions 1, 5) then 0.5 at 0, 2, 4, 6: k = 4 keeps positions 1, 5, 0, 2.
    assert merged["w"].tolist() == [[0.5, -1.0, 0.5, 0.0], [0.0, 1.0, 0.0, 0.0]]


def test_ties_top_k_is_over_the_whole_tensor_even_when_chunked(monkeypatch):
    """Exact top-k within the memory budget: a tensor 4x the budget, read in chunks, gives the
    bytes of the whole-tensor path (and a per-chunk top-k would not)."""
    base, fts = family(4, {"big": (64, 8)})
    params = {"model_parameters": [{"weight": 1.0, "density": 0.2}] * 3}
    whole, _ = merge_state_dicts("ties", fts, base=base, **params)
    # Tiny blocks (2 rows) and a budget of a quarter of the tensor's inputs.
    monkeypatch.setattr(chunks, "BLOCK_ELEMENTS", 16)
    monkeypatch.setattr(chunks, "MIN_CHUNK_BYTES", 64)
    job = small_job("ties", TiesParameters(), TaskVectorWeight(weight=1.0, density=0.2))
    budget = job.input_nbytes // 4
    plan = chunk_plan_for(job, budget)
    assert len(plan.chunks) > 4 and plan.passes == 4 and plan.reread_bytes > 0
    chunked, stats = merge_in_memory(job, [base["big"], *(ft["big"] for ft in fts)], memory_budget=budget)
    assert chunked.view(torch.int32).equal(whole["big"].view(torch.int32))
    assert "reread" in stats.flags
    trimmed = [reference_trim(d, 0.2, False) for d in deltas64(base, fts, "big")]
    assert_float32_of(chunked, reference_consensus(base["big"].double(), trimmed, [1.0] * 3, True, 1.0), 1.0)


def test_ties_selection_with_many_equal_magnitudes_across_chunks(monkeypatch):
    """bf16-like task vectors have few distinct magnitudes: the k-th largest has many equals, and
    which of them are kept (by position) must not depend on chunk or block boundaries."""
    generator = torch.Generator().manual_seed(5)
    base = {"w": torch.zeros(40, 6)}
    fts = [{"w": torch.randint(-3, 4, (40, 6), generator=generator).float() * 0.25} for _ in range(2)]
    params = {"model_parameters": [{"weight": 1.0, "density": 0.3}, {"weight": 1.0, "density": 0.55}]}
    whole, _ = merge_state_dicts("ties", fts, base=base, **params)
    trimmed = [reference_trim(d, p, False) for d, p in zip(deltas64(base, fts, "w"), (0.3, 0.55))]
    assert_float32_of(whole["w"], reference_consensus(base["w"].double(), trimmed, [1.0, 1.0], True, 1.0), 1.0)
    monkeypatch.setattr(chunks, "BLOCK_ELEMENTS", 12)
    monkeypatch.setattr(chunks, "MIN_CHUNK_BYTES", 1)
    job = TensorJob("w", (40, 6), "F32", "ties", TensorParameters(TiesParameters(), (
        TaskVectorWeight(weight=1.0, density=0.3), TaskVectorWeight(weight=1.0, density=0.55))),
        tuple(TensorInput(i, "w", "F32", f"input-{i}") for i in range(3)), has_base=True)
    chunked, _ = merge_in_memory(job, [base["w"], fts[0]["w"], fts[1]["w"]], memory_budget=job.input_nbytes // 5)
    assert chunked.equal(whole["w"])


# ----------------------------------------------------------------------------------------------
# DARE

MASK64 = (1 << 64) - 1


def reference_uniforms(random_seed: int, tensor: str, model: int, count: int) -> list[float]:
    """splitmix64 outputs 0..count-1 for the stream (seed, tensor, model), as uniforms in [0, 1)."""
    key = int.from_bytes(hashlib.sha256(f"{random_seed}\0{tensor}\0{model}".encode()).digest()[:8], "little")
    out = []
    for index in range(count):
        z = (key + (index + 1) * 0x9E3779B97F4A7C15) & MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        z ^= z >> 31
        out.append((z >> 11) * 2.0**-53)
    return out


def reference_dare(delta: torch.Tensor, seed: int, tensor: str, model: int, density: float, rescale: bool):
    if density >= 1:
        return delta.clone(), 1.0
    keep = torch.tensor([u < density for u in reference_uniforms(seed, tensor, model, delta.numel())])
    kept = torch.where(keep.reshape(delta.shape), delta, 0.0)
    before, after = float(delta.abs().sum()), float(kept.abs().sum())
    scale = before / after if rescale and before >= 1e-7 and after >= 1e-7 else 1.0
    return kept * scale, scale


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("rescale", [True, False])
def test_dare_matches_reference(method, rescale):
    base, fts = family(5, SHAPES)
    weights, densities, seed = [0.9, 0.5, 0.3], [0.5, 0.7, 1.0], 11
    merged, stats = merge_state_dicts(
        method, fts, base=base, parameters={"random_seed": seed, "rescale": rescale, "lambda": 1.2},
        model_parameters=[{"weight": w, "density": d} for w, d in zip(weights, densities)],
    )
    by_name = {s.name: s for s in stats}
    for name in SHAPES:
        originals = deltas64(base, fts, name)
        dropped = [reference_dare(d, seed, name, i, p, rescale) for i, (d, p) in enumerate(zip(originals, densities))]
        deltas = [d for d, _ in dropped]
        if method == "dare_ties":
            expected = reference_consensus(base[name].double(), deltas, weights, False, 1.2)
        else:
            expected = base[name].double() + 1.2 * sum(w * d for w, d in zip(weights, deltas))
        # The rescale factors are rounded to float32 before the blend: 2 ulp of the largest term.
        terms = max(float(d.abs().max()) for d in deltas) * sum(abs(w) for w in weights) * 1.2
        assert_float32_of(merged[name], expected, terms, coefficient_ulps=2)
        assert by_name[name].values["rescale_factors"] == pytest.approx([s for _, s in dropped], rel=1e-7)


def test_dare_is_seeded_deterministic_and_independent_of_chunking(monkeypatch):
    base, fts = family(6, {"big": (96, 20), "norm.weight": (33,)})
    params = {"model_parameters": [{"weight": 1.0, "density": 0.3}] * 3}
    first, _ = merge_state_dicts("dare_ties", fts, base=base, parameters={"random_seed": 3}, **params)
    again, _ = merge_state_dicts("dare_ties", fts, base=base, parameters={"random_seed": 3}, **params)
    other, _ = merge_state_dicts("dare_ties", fts, base=base, parameters={"random_seed": 4}, **params)
    monkeypatch.setattr(chunks, "BLOCK_ELEMENTS", 40)  # 2 rows per block
    monkeypatch.setattr(chunks, "MIN_CHUNK_BYTES", 1)
    job = small_job("dare_ties", DareParameters(random_seed=3), TaskVectorWeight(weight=1.0, density=0.3), shape=(96, 20))
    assert len(chunk_plan_for(job, 1).chunks) > 10
    chunked, _ = merge_state_dicts("dare_ties", fts, base=base, parameters={"random_seed": 3}, **params)
    big, _ = merge_in_memory(job, [base["big"], *(ft["big"] for ft in fts)], memory_budget=1)
    assert torch.equal(big, chunked["big"])
    for name in first:
        assert torch.equal(first[name], again[name])
        assert torch.equal(first[name], chunked[name]), name
    assert not torch.equal(first["big"], other["big"])


def test_dare_keeps_about_density_of_the_entries():
    base, fts = family(7, {"w": (200, 250)}, models=1)
    _, stats = merge_state_dicts("dare_linear", fts, base=base, model_parameters=[{"weight": 1.0, "density": 0.25}])
    kept, n = stats[0].values["nonzero_kept"][0], 200 * 250
    assert abs(kept - 0.25 * n) < 5 * math.sqrt(n * 0.25 * 0.75)


# ----------------------------------------------------------------------------------------------
# SLERP


def reference_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    a, b = a.double(), b.double()
    na, nb = float(a.norm()), float(b.norm())
    na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
    cos = max(-1.0, min(1.0, float((a * b).sum()) / (na * nb)))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta) * a + math.sin(t * theta) / math.sin(theta) * b


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_matches_reference(t):
    base, fts = family(8, SHAPES, models=1, spread=1.0)
    merged, stats = merge_state_dicts("slerp", fts, base=base, parameters={"t": t})
    for name in SHAPES:
        scale = float(max(base[name].abs().max(), fts[0][name].abs().max()))
        assert_float32_of(merged[name], reference_slerp(base[name], fts[0][name], t), scale, coefficient_ulps=2)
    assert not any("collinear_linear_interpolation" in s.flags for s in stats)


def test_slerp_nearly_collinear_and_antipodal_tensors_interpolate_linearly():
    base = {"same": torch.linspace(-1, 1, 40).reshape(4, 10) + 0.1, "anti": torch.linspace(0.5, 2, 12)}
    ft = {"same": base["same"] * 2.0 + 1e-5, "anti": -3.0 * base["anti"]}
    t = [{"filter": "anti", "value": 0.25}, {"value": 0.4}]
    merged, stats = merge_state_dicts("slerp", [ft], base=base, parameters={"t": t})
    assert_float32_of(merged["same"], 0.6 * base["same"].double() + 0.4 * ft["same"].double(), 4.0, 2)
    assert_float32_of(merged["anti"], 0.75 * base["anti"].double() + 0.25 * ft["anti"].double(), 6.0, 2)
    assert all("collinear_linear_interpolation" in s.flags for s in stats)


def test_slerp_agrees_with_mergekits_function():
    slerp = pytest.importorskip("mergekit.merge_methods.slerp").slerp
    base, fts = family(9, SHAPES, models=1, spread=1.0)
    merged, _ = merge_state_dicts("slerp", fts, base=base, parameters={"t": 0.35})
    for name in SHAPES:
        theirs = slerp(torch.tensor([0.35]), base[name].double().unsqueeze(0), fts[0][name].double().unsqueeze(0))[0]
        scale = float(max(base[name].abs().max(), fts[0][name].abs().max()))
        assert_float32_of(merged[name], theirs, scale, coefficient_ulps=2)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), t=st.sampled_from([0.0, 1.0]))
def test_slerp_endpoints_return_the_inputs(seed, t):
    base, fts = family(seed, {"w": (3, 4)}, models=1, spread=1.0)
    merged, _ = merge_state_dicts("slerp", fts, base=base, parameters={"t": t})
    expected = (base if t == 0 else fts[0])["w"]
    assert torch.allclose(merged["w"], expected, rtol=4 * F32, atol=4 * F32 * float(expected.abs().max()))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), method=st.sampled_from(["ties", "dare_ties", "dare_linear", "task_arithmetic"]))
def test_identical_finetunes_with_normalize_return_the_finetune(seed, method):
    base, fts = family(seed, {"w": (3, 5)}, models=1)
    merged, _ = merge_state_dicts(method, fts * 1 + [dict(fts[0])], base=base, parameters={"normalize": True},
                                  model_parameters=[{"weight": 0.7}, {"weight": 0.3}])
    torch.testing.assert_close(merged["w"], fts[0]["w"], rtol=4 * F32, atol=4 * F32)


# ----------------------------------------------------------------------------------------------
# recipes


def test_recipe_parameter_rules():
    base, fts = family(10, SHAPES, models=2)
    with pytest.raises(InvalidRecipe, match="needs parameter 'weight'"):
        merge_state_dicts("ties", fts, base=base)
    with pytest.raises(InvalidRecipe, match="at most 1 models"):
        merge_state_dicts("slerp", fts, base=base, parameters={"t": 0.5})
    with pytest.raises(InvalidRecipe, match="needs parameter 't'"):
        merge_state_dicts("slerp", fts[:1], base=base)
    with pytest.raises(InvalidRecipe, match="lambda_"):
        merge_state_dicts("task_arithmetic", fts, base=base, parameters={"lambda_": 2.0},
                          model_parameters=[{"weight": 1.0}] * 2)
    # `lambda` is its recipe name; filter "*" matches every tensor, as in mergekit.
    star, _ = merge_state_dicts("task_arithmetic", fts, base=base,
                                parameters={"lambda": [{"filter": "*", "value": 0.0}]},
                                model_parameters=[{"weight": 1.0}] * 2)
    assert all(torch.equal(star[name], base[name]) for name in SHAPES)


# ----------------------------------------------------------------------------------------------
# NearSwap: one decorated function (modelstock/methods/nearswap.py)


def test_nearswap_matches_reference():
    base, fts = family(8, SHAPES, models=1, spread=0.01)
    merged, stats = merge_state_dicts("nearswap", fts, base=base, parameters={"t": 0.004})
    for name in SHAPES:
        a, b = base[name].double(), fts[0][name].double()
        share = (0.004 / (a - b).abs().clamp_min(1e-6)).clamp(0, 1)
        assert_float32_of(merged[name], share * b + (1 - share) * a, 1.0, coefficient_ulps=1)
        assert 0 < float(share.mean()) < 1, "t must make some entries swap and others not"
    assert {s.method for s in stats} == {"nearswap"}


def test_nearswap_takes_exactly_one_model_and_needs_t():
    base, fts = family(9, SHAPES, models=2)
    with pytest.raises(InvalidRecipe, match="at most 1"):
        merge_state_dicts("nearswap", fts, base=base, parameters={"t": 0.1})
    with pytest.raises(InvalidRecipe, match="'t'"):
        merge_state_dicts("nearswap", fts[:1], base=base)
