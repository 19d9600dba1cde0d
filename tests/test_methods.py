"""Model Stock and linear merges against an independent float64 re-computation.

The references below are written from the papers' formulas (README, "Methods") with plain float64
tensor arithmetic; nothing here calls the code under test to get an expected value. Outputs must
be within one rounding step (ulp) of the output dtype of the float64 reference.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modelstock
from modelstock.chunks import BLOCK_ELEMENTS, MIN_CHUNK_BYTES
from modelstock.engine import chunk_plan_for, merge_in_memory
from modelstock.jobs import TensorInput, TensorJob
from modelstock.methods.base import NoParameters, TensorParameters, TensorStats
from modelstock.methods.linear import LinearModelParameters, LinearParameters
from modelstock.methods.model_stock import ModelStockParameters

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = ((7,), (1,), (5, 9), (1, 12), (12, 1), (3, 4, 5), (2, 3, 2, 4))
COUNTS = (2, 3, 5)
NAME = "layer.weight"
PROPERTY_SETTINGS = settings(
    max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


# ----------------------------------------------------------------------------- references


@dataclass(frozen=True)
class ModelStockReference:
    merged: torch.Tensor  # float64
    t: torch.Tensor  # one per angle group
    cos_theta: torch.Tensor
    cos_pairs: dict[tuple[int, int], torch.Tensor]


def groups_of(tensor: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """(groups, elements): one group per output row (dim 0) with filter_wise on a matrix+."""
    if filter_wise and tensor.dim() >= 2:
        return tensor.reshape(tensor.shape[0], -1)
    return tensor.reshape(1, -1)


def reference_model_stock(
    base: torch.Tensor, models: Sequence[torch.Tensor], filter_wise: bool = False, clamp_t: bool = False
) -> ModelStockReference:
    count = len(models)
    base64 = base.to(torch.float64)
    deltas = [groups_of(m.to(torch.float64) - base64, filter_wise) for m in models]
    norms = [torch.sqrt((d * d).sum(dim=1)) for d in deltas]
    cos_pairs: dict[tuple[int, int], torch.Tensor] = {}
    for i, j in itertools.combinations(range(count), 2):
        dot = (deltas[i] * deltas[j]).sum(dim=1)
        both = (norms[i] > 0) & (norms[j] > 0)
        safe = torch.where(both, norms[i] * norms[j], torch.ones_like(dot))
        cos_pairs[(i, j)] = torch.where(both, dot / safe, torch.zeros_like(dot))
    cos_theta = sum(cos_pairs.values()) / len(cos_pairs)
    denominator = 1 + (count - 1) * cos_theta
    near_zero = denominator.abs() < 1e-6
    t = torch.where(near_zero, torch.zeros_like(cos_theta), count * cos_theta / torch.where(near_zero, 1.0, denominator))
    if clamp_t:
        t = t.clamp(0.0, 1.0)
    average = groups_of(sum(m.to(torch.float64) for m in models) / count, filter_wise)
    merged = t[:, None] * average + (1 - t[:, None]) * groups_of(base64, filter_wise)
    return ModelStockReference(merged.reshape(base.shape), t, cos_theta, cos_pairs)


def reference_linear(models: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    total = sum(w * m.to(torch.float64) for w, m in zip(weights, models))
    return total / sum(weights) if normalize else total


# ----------------------------------------------------------------------------- ulp comparison

_BITS_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def ordered_key(tensor: torch.Tensor) -> torch.Tensor:
    """Integers in the order of the floats they encode, adjacent floats one apart (+0 == -0)."""
    width = tensor.element_size() * 8
    bits = tensor.contiguous().view(_BITS_VIEW[tensor.dtype]).to(torch.int64)
    magnitude = bits & ((1 << (width - 1)) - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def ulp_distance(actual: torch.Tensor, reference64: torch.Tensor) -> torch.Tensor:
    """How many representable values of ``actual.dtype`` lie between it and the rounded reference."""
    assert actual.dtype in _BITS_VIEW
    rounded = reference64.to(actual.dtype)
    return (ordered_key(actual) - ordered_key(rounded)).abs()


def assert_within_one_ulp(actual: torch.Tensor, reference64: torch.Tensor) -> None:
    assert actual.shape == reference64.shape
    assert torch.isfinite(actual).all()
    distance = ulp_distance(actual, reference64)
    worst = int(distance.argmax()) if distance.numel() else 0
    assert int(distance.max()) <= 1, (
        f"{int(distance.max())} ulps off at flat index {worst}: got {float(actual.reshape(-1)[worst])!r}, "
        f"reference {float(reference64.reshape(-1)[worst])!r} ({actual.dtype})"
    )


def test_ulp_helper_can_fail() -> None:
    one = torch.tensor([1.0], dtype=torch.float32)
    next_up = torch.nextafter(one, torch.tensor([2.0]))
    assert int(ulp_distance(next_up, one.double())) == 1
    assert int(ulp_distance(torch.nextafter(next_up, torch.tensor([2.0])), one.double())) == 2
    assert int(ulp_distance(torch.tensor([-0.0]), torch.tensor([0.0], dtype=torch.float64))) == 0
    assert int(ulp_distance(torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([1.0078125], dtype=torch.float64))) == 1


# ----------------------------------------------------------------------------- helpers


def stable_seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


def finetune_family(
    shape: tuple[int, ...], dtype: torch.dtype, count: int, seed: int, independent: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and ``count`` models: either small perturbations of the base, or unrelated tensors."""
    generator = torch.Generator().manual_seed(seed)
    base = random_tensor(shape, dtype, generator)
    if independent:
        return base, [random_tensor(shape, dtype, generator) for _ in range(count)]
    shared = torch.randn(shape, generator=generator, dtype=torch.float64)
    models = [
        (base.double() + 0.05 * (shared + torch.randn(shape, generator=generator, dtype=torch.float64))).to(dtype)
        for _ in range(count)
    ]
    return base, models


def merge_one(
    method: str,
    models: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    parameters: dict[str, object] | None = None,
    model_parameters: Sequence[dict[str, object]] | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, TensorStats]:
    merged, stats = modelstock.merge(
        method,
        [{NAME: m} for m in models],
        base=None if base is None else {NAME: base},
        parameters=parameters,
        model_parameters=model_parameters,
        out_dtype=out_dtype,
    )
    assert [s.name for s in stats] == [NAME]
    return merged[NAME], stats[0]


def inputs_of(count: int, dtype: str) -> tuple[TensorInput, ...]:
    return tuple(TensorInput(i, NAME, dtype, f"input-{i}") for i in range(count))


def model_stock_job(shape: tuple[int, ...], count: int, out_dtype: str, in_dtype: str, **params: bool) -> TensorJob:
    return TensorJob(
        name=NAME,
        shape=shape,
        out_dtype=out_dtype,
        method="model_stock",
        params=TensorParameters(method=ModelStockParameters(**params), models=tuple(NoParameters() for _ in range(count))),
        inputs=inputs_of(count + 1, in_dtype),
        has_base=True,
    )


# ----------------------------------------------------------------------------- model stock vs reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("filter_wise", [False, True], ids=["global", "filter_wise"])
def test_model_stock_matches_float64_reference(
    dtype: torch.dtype, shape: tuple[int, ...], count: int, filter_wise: bool
) -> None:
    seed = stable_seed(dtype, shape, count, filter_wise)
    for independent in (False, True):
        base, models = finetune_family(shape, dtype, count, seed, independent=independent)
        merged, stats = merge_one("model_stock", models, base, {"filter_wise": filter_wise})
        reference = reference_model_stock(base, models, filter_wise=filter_wise)
        assert merged.dtype == dtype
        assert_within_one_ulp(merged, reference.merged)
        per_row = filter_wise and len(shape) >= 2
        if per_row and shape[0] > 1:
            assert stats.values["t_min"] == pytest.approx(float(reference.t.min()), rel=1e-9, abs=1e-12)
            assert stats.values["t_max"] == pytest.approx(float(reference.t.max()), rel=1e-9, abs=1e-12)
        else:
            assert stats.values["t"] == pytest.approx(float(reference.t[0]), rel=1e-9, abs=1e-12)
            assert stats.values["cos_theta"] == pytest.approx(float(reference.cos_theta[0]), rel=1e-9, abs=1e-12)
            for (i, j), cos in reference.cos_pairs.items():
                assert stats.values["cos"][f"{i},{j}"] == pytest.approx(float(cos[0]), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_model_stock_out_dtype_rounds_the_float64_result(dtype: torch.dtype, out_dtype: torch.dtype) -> None:
    base, models = finetune_family((16, 24), dtype, 3, seed=11, independent=True)
    merged, stats = merge_one("model_stock", models, base, out_dtype=out_dtype)
    assert merged.dtype == out_dtype
    assert stats.out_dtype == {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[out_dtype]
    assert_within_one_ulp(merged, reference_model_stock(base, models).merged)


@pytest.mark.parametrize("method", ["model_stock", "linear"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_merge_leaves_its_inputs_untouched(method: str, dtype: torch.dtype, out_dtype: torch.dtype) -> None:
    base, models = finetune_family((6, 8), dtype, 3, seed=12)
    copies = [base.clone()] + [m.clone() for m in models]
    merge_one(method, models, base, out_dtype=out_dtype)
    for original, after in zip(copies, [base, *models]):
        assert torch.equal(original, after)


def test_out_dtype_float64_and_unsupported_out_dtype() -> None:
    base, models = finetune_family((5, 6), torch.float32, 2, seed=14)
    merged, _ = merge_one("model_stock", models, base, out_dtype=torch.float64)
    assert merged.dtype == torch.float64
    assert torch.allclose(merged, reference_model_stock(base, models).merged, rtol=1e-12, atol=1e-15)
    with pytest.raises(modelstock.InvalidRecipe, match="out_dtype"):
        merge_one("model_stock", models, base, out_dtype=torch.int8)


def test_model_stock_filter_wise_has_one_angle_per_row() -> None:
    # Row 0: parallel task vectors (t = 1); row 1: orthogonal ones (t = 0).
    base = torch.zeros(2, 4)
    first = torch.tensor([[1.0, 2.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    second = torch.tensor([[2.0, 4.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    merged, stats = merge_one("model_stock", [first, second], base, {"filter_wise": True})
    assert stats.values["t_min"] == 0.0
    assert stats.values["t_max"] == pytest.approx(1.0, abs=1e-12)
    assert torch.equal(merged[0], (first[0] + second[0]) / 2)
    assert torch.equal(merged[1], base[1])
    # The same tensor merged globally has one angle in between.
    merged_global, global_stats = merge_one("model_stock", [first, second], base)
    assert 0.0 < global_stats.values["t"] < 1.0
    assert not torch.equal(merged_global, merged)


# ----------------------------------------------------------------------------- degenerate cases


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("filter_wise", [False, True], ids=["global", "filter_wise"])
def test_one_zero_task_vector_has_zero_cosines(dtype: torch.dtype, filter_wise: bool) -> None:
    base, models = finetune_family((6, 10), dtype, 3, seed=3)
    models[1] = base.clone()
    merged, stats = merge_one("model_stock", models, base, {"filter_wise": filter_wise})
    reference = reference_model_stock(base, models, filter_wise=filter_wise)
    assert float(reference.cos_pairs[(0, 1)].abs().max()) == 0.0
    assert_within_one_ulp(merged, reference.merged)
    assert "zero_task_vector" in stats.flags
    assert "all_task_vectors_zero" not in stats.flags
    assert stats.values["cos"]["0,1"] == 0.0 and stats.values["cos"]["1,2"] == 0.0
    assert stats.values["cos"]["0,2"] > 0.2
    if not filter_wise:
        assert stats.values["cos"]["0,2"] == pytest.approx(float(reference.cos_pairs[(0, 2)][0]), rel=1e-9)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("filter_wise", [False, True], ids=["global", "filter_wise"])
def test_all_zero_task_vectors_give_the_base(dtype: torch.dtype, count: int, filter_wise: bool) -> None:
    base, _ = finetune_family((4, 5), dtype, 1, seed=4)
    merged, stats = merge_one("model_stock", [base.clone() for _ in range(count)], base, {"filter_wise": filter_wise})
    assert torch.equal(merged, base)
    assert stats.values["t"] == 0.0
    assert {"zero_task_vector", "all_task_vectors_zero"} <= set(stats.flags)


def antiparallel_pair(scale: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Integer-valued tensors so that d2 = scale * -d1 holds exactly in every dtype."""
    generator = torch.Generator().manual_seed(5)
    base = torch.randint(-8, 9, (5, 6), generator=generator).float()
    delta = torch.randint(-4, 5, (5, 6), generator=generator).float()
    delta[:, 0] = 2.0  # no zero row
    return base, [base + 2 * delta, base - 2 * scale * delta]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_negative_cosine_follows_the_formula_and_is_flagged(dtype: torch.dtype) -> None:
    base, models = antiparallel_pair(scale=0.5)
    generator = torch.Generator().manual_seed(6)
    models[1] = models[1] + torch.randint(-1, 2, base.shape, generator=generator).float()  # cos in (-1, 0)
    base, models = base.to(dtype), [m.to(dtype) for m in models]
    reference = reference_model_stock(base, models)
    assert -1.0 < float(reference.cos_theta[0]) < 0.0
    assert float(reference.t[0]) < 0.0
    merged, stats = merge_one("model_stock", models, base)
    assert stats.values["t"] == pytest.approx(float(reference.t[0]), rel=1e-9)
    assert_within_one_ulp(merged, reference.merged)
    assert {"nonpositive_cos_theta", "t_outside_0_1"} <= set(stats.flags)
    assert "t_clamped" not in stats.flags

    clamped, clamped_stats = merge_one("model_stock", models, base, {"clamp_t": True})
    assert clamped_stats.values["t"] == 0.0
    assert torch.equal(clamped, base)
    assert {"nonpositive_cos_theta", "t_clamped"} <= set(clamped_stats.flags)
    assert "t_outside_0_1" not in clamped_stats.flags
    assert_within_one_ulp(clamped, reference_model_stock(base, models, clamp_t=True).merged)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("filter_wise", [False, True], ids=["global", "filter_wise"])
def test_denominator_near_zero_keeps_the_base(dtype: torch.dtype, filter_wise: bool) -> None:
    base, models = antiparallel_pair(scale=1.0)
    base, models = base.to(dtype), [m.to(dtype) for m in models]
    merged, stats = merge_one("model_stock", models, base, {"filter_wise": filter_wise})
    assert torch.equal(merged, base)
    assert stats.values["t"] == 0.0
    assert {"denominator_near_zero", "nonpositive_cos_theta"} <= set(stats.flags)
    assert "t_outside_0_1" not in stats.flags


def test_positive_cosine_raises_no_flags() -> None:
    base, models = finetune_family((8, 8), torch.float32, 3, seed=8)
    _, stats = merge_one("model_stock", models, base)
    assert stats.flags == []
    assert 0.0 < stats.values["t"] < 1.0


def test_non_finite_input_is_an_error() -> None:
    base, models = finetune_family((4, 4), torch.float32, 2, seed=9)
    models[1] = models[1].clone()
    models[1][2, 3] = float("nan")
    with pytest.raises(modelstock.InvalidCheckpoint, match=f"{NAME}.*NaN or Inf"):
        merge_one("model_stock", models, base)


# ----------------------------------------------------------------------------- linear vs reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("count", COUNTS)
def test_linear_matches_float64_reference(dtype: torch.dtype, shape: tuple[int, ...], count: int) -> None:
    _, models = finetune_family(shape, dtype, count, seed=stable_seed(dtype, shape, count), independent=True)
    merged, stats = merge_one("linear", models)
    assert merged.dtype == dtype and stats.method == "linear"
    assert_within_one_ulp(merged, reference_linear(models, [1.0] * count))

    weights = [0.25 + 0.5 * i for i in range(count)]
    weighted, _ = merge_one("linear", models, model_parameters=[{"weight": w} for w in weights])
    assert_within_one_ulp(weighted, reference_linear(models, weights))

    summed, _ = merge_one(
        "linear", models, parameters={"normalize": False}, model_parameters=[{"weight": w} for w in weights]
    )
    assert_within_one_ulp(summed, reference_linear(models, weights, normalize=False))


def test_linear_ignores_the_base_and_weights_sum_to_zero_is_refused() -> None:
    _, models = finetune_family((3, 3), torch.float32, 2, seed=10, independent=True)
    with_base, _ = merge_one("linear", models, base=torch.full((3, 3), 100.0))
    assert_within_one_ulp(with_base, reference_linear(models, [1.0, 1.0]))
    with pytest.raises(modelstock.InvalidRecipe):
        merge_one("linear", models, model_parameters=[{"weight": 1.0}, {"weight": -1.0}])


# ----------------------------------------------------------------------------- properties (hypothesis)

shapes = st.sampled_from(SHAPES + ((9, 3), (4, 2, 3)))
dtypes = st.sampled_from(DTYPES)
counts = st.sampled_from(COUNTS)
seeds = st.integers(0, 2**31 - 1)


@PROPERTY_SETTINGS
@given(shape=shapes, dtype=dtypes, count=counts, seed=seeds, filter_wise=st.booleans(), independent=st.booleans())
def test_property_matches_reference(
    shape: tuple[int, ...], dtype: torch.dtype, count: int, seed: int, filter_wise: bool, independent: bool
) -> None:
    base, models = finetune_family(shape, dtype, count, seed, independent=independent)
    merged, _ = merge_one("model_stock", models, base, {"filter_wise": filter_wise})
    assert_within_one_ulp(merged, reference_model_stock(base, models, filter_wise=filter_wise).merged)


@PROPERTY_SETTINGS
@given(shape=shapes, dtype=dtypes, count=counts, seed=seeds, filter_wise=st.booleans())
def test_property_identical_finetunes_return_themselves(
    shape: tuple[int, ...], dtype: torch.dtype, count: int, seed: int, filter_wise: bool
) -> None:
    base, (finetune,) = finetune_family(shape, dtype, 1, seed)
    merged, _ = merge_one("model_stock", [finetune.clone() for _ in range(count)], base, {"filter_wise": filter_wise})
    assert torch.equal(merged, finetune)
    linear, _ = merge_one("linear", [finetune.clone() for _ in range(count)])
    assert torch.equal(linear, finetune)


def integer_tensor(shape: tuple[int, ...], low: int, high: int, generator: torch.Generator) -> torch.Tensor:
    """Small integers: every sum and scaled copy below is exact in every dtype."""
    return torch.randint(low, high + 1, shape, generator=generator).to(torch.float64)


@PROPERTY_SETTINGS
@given(shape=shapes, dtype=dtypes, count=counts, seed=seeds)
def test_property_orthogonal_task_vectors_give_t_zero(
    shape: tuple[int, ...], dtype: torch.dtype, count: int, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    base = integer_tensor(shape, -8, 8, generator)
    flat_size = math.prod(shape)
    models = []
    for index in range(count):
        # Disjoint supports: task vector i lives on the elements whose flat index is i mod N.
        mask = (torch.arange(flat_size) % count == index).reshape(shape)
        delta = integer_tensor(shape, 1, 4, generator) * mask
        models.append((base + delta).to(dtype))
    merged, stats = merge_one("model_stock", models, base.to(dtype))
    assert stats.values["t"] == 0.0
    assert torch.equal(merged, base.to(dtype))


@PROPERTY_SETTINGS
@given(shape=shapes, dtype=dtypes, count=counts, seed=seeds, filter_wise=st.booleans())
def test_property_parallel_task_vectors_give_t_one(
    shape: tuple[int, ...], dtype: torch.dtype, count: int, seed: int, filter_wise: bool
) -> None:
    generator = torch.Generator().manual_seed(seed)
    base = integer_tensor(shape, -8, 8, generator)
    direction = integer_tensor(shape, 1, 4, generator) * torch.where(integer_tensor(shape, 0, 1, generator) > 0, 1, -1)
    models = [(base + (index + 1) * direction).to(dtype) for index in range(count)]
    merged, stats = merge_one("model_stock", models, base.to(dtype), {"filter_wise": filter_wise})
    for key in ("t", "t_min", "t_max"):
        if key in stats.values:
            assert stats.values[key] == pytest.approx(1.0, abs=1e-12)
    average = sum(m.double() for m in models) / count
    assert_within_one_ulp(merged, average)


@PROPERTY_SETTINGS
@given(shape=shapes, dtype=dtypes, count=counts, seed=seeds, filter_wise=st.booleans(), independent=st.booleans())
def test_property_merge_lies_between_base_and_average(
    shape: tuple[int, ...], dtype: torch.dtype, count: int, seed: int, filter_wise: bool, independent: bool
) -> None:
    base, models = finetune_family(shape, dtype, count, seed, independent=independent)
    reference = reference_model_stock(base, models, filter_wise=filter_wise)
    merged, _ = merge_one("model_stock", models, base, {"filter_wise": filter_wise})
    if not bool(((reference.t >= 0) & (reference.t <= 1)).all()):
        return
    average = sum(m.double() for m in models) / count
    low = torch.minimum(base.double(), average).to(dtype)
    high = torch.maximum(base.double(), average).to(dtype)
    # Between the (rounded) end points, allowing one rounding step outside.
    below = (ordered_key(low) - ordered_key(merged)).clamp_min(0)
    above = (ordered_key(merged) - ordered_key(high)).clamp_min(0)
    assert int(below.max()) <= 1 and int(above.max()) <= 1


@PROPERTY_SETTINGS
@given(
    shape=shapes, dtype=dtypes, count=counts, seed=seeds, filter_wise=st.booleans(), order_seed=st.integers(0, 10_000)
)
def test_property_permuting_finetunes_changes_nothing(
    shape: tuple[int, ...], dtype: torch.dtype, count: int, seed: int, filter_wise: bool, order_seed: int
) -> None:
    base, models = finetune_family(shape, dtype, count, seed, independent=seed % 2 == 0)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(order_seed)).tolist()
    merged, stats = merge_one("model_stock", models, base, {"filter_wise": filter_wise})
    permuted, permuted_stats = merge_one("model_stock", [models[i] for i in order], base, {"filter_wise": filter_wise})
    assert torch.equal(merged, permuted)
    assert permuted_stats.values["t"] == pytest.approx(stats.values["t"], rel=1e-12, abs=1e-15)
    assert permuted_stats.flags == stats.flags
    linear, _ = merge_one("linear", models)
    linear_permuted, _ = merge_one("linear", [models[i] for i in order])
    assert torch.equal(linear, linear_permuted)


# ----------------------------------------------------------------------------- engine: chunked == unchunked


@pytest.mark.parametrize(
    "filter_wise, out_dtype", [(False, "F32"), (True, "F32"), (False, "BF16")], ids=["global", "filter_wise", "global-bf16"]
)
def test_chunked_merge_is_bit_identical_to_unchunked(filter_wise: bool, out_dtype: str) -> None:
    rows, cols, count = 4 * BLOCK_ELEMENTS // 1536 + 7, 1536, 2
    assert rows * cols > 3 * BLOCK_ELEMENTS
    generator = torch.Generator().manual_seed(12)
    base = torch.randn(rows, cols, generator=generator)
    models = [base + 0.01 * torch.randn(rows, cols, generator=generator) for _ in range(count)]
    job = model_stock_job((rows, cols), count, out_dtype, "F32", filter_wise=filter_wise)
    small_budget = MIN_CHUNK_BYTES
    assert rows * cols * 4 * (count + 1) > small_budget
    assert len(chunk_plan_for(job, small_budget).chunks) > 1, "the small budget must force several chunks"
    assert len(chunk_plan_for(job, 1 << 62).chunks) == 1

    chunked, chunked_stats = merge_in_memory(job, [base, *models], memory_budget=small_budget)
    whole, whole_stats = merge_in_memory(job, [base, *models])
    assert chunked.dtype == whole.dtype
    assert chunked.contiguous().view(torch.uint8).equal(whole.contiguous().view(torch.uint8))
    assert chunked_stats.values == {**whole_stats.values, "reread_bytes": chunked_stats.values["reread_bytes"]}
    assert chunked_stats.flags == ["reread", *whole_stats.flags]
    # And both agree with the reference (a sample of rows, to keep the test fast).
    reference = reference_model_stock(base, models, filter_wise=filter_wise)
    assert_within_one_ulp(whole[::97], reference.merged[::97])


def test_chunked_linear_is_bit_identical_to_unchunked() -> None:
    rows, cols = 4 * BLOCK_ELEMENTS // 1024 + 3, 1024
    generator = torch.Generator().manual_seed(13)
    models = [torch.randn(rows, cols, generator=generator) for _ in range(3)]
    job = TensorJob(
        name=NAME,
        shape=(rows, cols),
        out_dtype="F32",
        method="linear",
        params=TensorParameters(LinearParameters(), tuple(LinearModelParameters(weight=w) for w in (1.0, 0.5, 2.0))),
        inputs=inputs_of(3, "F32"),
        has_base=False,
    )
    assert len(chunk_plan_for(job, MIN_CHUNK_BYTES).chunks) > 1
    chunked, _ = merge_in_memory(job, models, memory_budget=MIN_CHUNK_BYTES)
    whole, _ = merge_in_memory(job, models)
    assert chunked.view(torch.uint8).equal(whole.view(torch.uint8))
    assert_within_one_ulp(whole[::131], reference_linear([m[::131] for m in models], [1.0, 0.5, 2.0]))
