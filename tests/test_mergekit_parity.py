"""Parity with mergekit: the same YAML through `mergekit-yaml` and `modelstock merge` gives the same tensors.

mergekit runs as a subprocess of this venv's console script, on CPU, offline, with a float32
`dtype`, on the float32 tiny Llama family; modelstock runs in-process on the local Ray.
DARE is not compared: mergekit draws its masks from torch's global RNG; nor is DELLA bit for bit:
its kept fraction per magnitude-rank bucket is compared with the intended probabilities, for both
tools, and modelstock's output with itself across runs.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from mergekit_runner import run_mergekit
from safetensors.torch import load_file

from pipeline.cli import main

MERGEKIT = shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent))

pytestmark = pytest.mark.skipif(MERGEKIT is None, reason="mergekit-yaml is not installed in this environment")


def recipes(base: Path, finetunes: list[Path]) -> dict[str, str]:
    ft1, ft2, ft3 = finetunes
    return {
        "model_stock": f"""
merge_method: model_stock
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
dtype: float32
""",
        "linear": f"""
merge_method: linear
models:
  - model: {ft1}
    parameters: {{weight: 1.0}}
  - model: {ft2}
    parameters: {{weight: 0.5}}
  - model: {ft3}
    parameters: {{weight: [{{filter: mlp, value: 0.25}}, {{value: 2.0}}]}}
dtype: float32
""",
        "task_arithmetic": f"""
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 1.0}}
  - model: {ft2}
    parameters: {{weight: 0.6}}
  - model: {ft3}
    parameters: {{weight: -0.3}}
parameters:
  lambda: 0.8
dtype: float32
""",
        "ties": f"""
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.7, density: [{{filter: self_attn, value: 0.3}}, {{value: 0.6}}]}}
  - model: {ft3}
    parameters: {{weight: 0.4, density: 0.8}}
parameters:
  int8_mask: true
dtype: float32
""",
        "ties_rescaled": f"""
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.3}}
  - model: {ft3}
    parameters: {{weight: 0.9}}
parameters:
  density: 0.4
  rescale: true
  normalize: false
  lambda: 1.5
dtype: float32
""",
        "nearswap": f"""
merge_method: nearswap
base_model: {base}
models:
  - model: {ft1}
parameters:
  t: 0.0005
dtype: float32
""",
        "nuslerp": f"""
merge_method: nuslerp
models:
  - model: {ft1}
    parameters: {{weight: 0.4}}
  - model: {ft2}
    parameters: {{weight: 0.6}}
dtype: float32
""",
        "nuslerp_rows": f"""
merge_method: nuslerp
models:
  - model: {ft1}
    parameters: {{weight: 1.0}}
  - model: {ft3}
    parameters: {{weight: [{{filter: mlp, value: 0.5}}, {{value: 2.0}}]}}
parameters:
  nuslerp_flatten: false
dtype: float32
""",
        "nuslerp_columns": f"""
merge_method: nuslerp
models:
  - model: {ft2}
    parameters: {{weight: 0.7}}
  - model: {ft3}
    parameters: {{weight: 0.3}}
parameters:
  nuslerp_flatten: false
  nuslerp_row_wise: true
dtype: float32
""",
        "nuslerp_base": f"""
merge_method: nuslerp
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.4}}
  - model: {ft2}
    parameters: {{weight: 0.6}}
dtype: float32
""",
        "multislerp_base": f"""
merge_method: multislerp
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.3}}
  - model: {ft3}
    parameters: {{weight: 0.2}}
dtype: float32
""",
        "multislerp": f"""
merge_method: multislerp
models:
  - model: {ft1}
    parameters: {{weight: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.3}}
  - model: {ft3}
    parameters: {{weight: 0.2}}
dtype: float32
""",
        "karcher": f"""
merge_method: karcher
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
dtype: float32
""",
        "karcher_iterated": f"""
merge_method: karcher
models:
  - model: {base}
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
parameters:
  max_iter: 5
  tol: 1.0e-9
dtype: float32
""",
        "sce": f"""
merge_method: sce
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
parameters:
  select_topk: 0.4
dtype: float32
""",
        "sce_default": f"""
merge_method: sce
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
dtype: float32
""",
        "breadcrumbs": f"""
merge_method: breadcrumbs
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 1.0, density: 0.8}}
  - model: {ft2}
    parameters: {{weight: 0.5, density: [{{filter: self_attn, value: 0.6}}, {{value: 0.9}}], gamma: 0.05}}
  - model: {ft3}
    parameters: {{weight: 0.7}}
parameters:
  density: 0.7
dtype: float32
""",
        "breadcrumbs_ties": f"""
merge_method: breadcrumbs_ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.6}}
  - model: {ft2}
    parameters: {{weight: 0.3}}
  - model: {ft3}
    parameters: {{weight: 0.9, gamma: 0.1}}
parameters:
  density: 0.75
  gamma: 0.02
  rescale: true
  normalize: true
  lambda: 1.2
dtype: float32
""",
        # Random: compared statistically (test_random_methods_agree_with_mergekit_statistically).
        "della_linear_one": f"""
merge_method: della_linear
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 1.0, density: 0.5, epsilon: 0.3}}
dtype: float32
""",
        "della_one": f"""
merge_method: della
base_model: {base}
models:
  - model: {ft2}
    parameters: {{weight: 0.8, density: 0.4}}
dtype: float32
""",
        "della": f"""
merge_method: della
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 1.0}}
  - model: {ft2}
    parameters: {{weight: 0.6}}
  - model: {ft3}
    parameters: {{weight: 0.4}}
parameters:
  density: 0.5
dtype: float32
""",
    }


# Absolute tolerance in units of the float32 spacing (2**-23 relative) of the tensor's largest
# magnitude. modelstock computes in float64 and rounds once (<= 0.5 ulp); mergekit computes in
# float32: each of its ~N+3 operations rounds (<= 0.5 ulp of the running value), and model_stock
# also rounds t to float32 on our side. For model_stock the float32 norms and dot products
# (mergekit's torch.norm in fp32) put a relative error of ~1e-7..1e-6 on cos_theta and t, but t
# multiplies |mean(w_i) - w_0| ~ 2 % of |w|, so even that stays below an ulp of the output. 4 ulp
# of the largest magnitude (measured: <= 1.1; <= 2.5 for the spherical methods, whose float32
# normalisations add roundings on mergekit's side) bounds every method with margin, and is ~1e5 times
# smaller than any real difference (a dropped/kept entry or a wrong sign changes a value by ~1e-2 |w|).
ULPS = 4
FLOAT32_EPS = 2.0**-23


def load_output(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.fixture(scope="module")
def mergekit_outputs(tiny_family, tmp_path_factory) -> dict[str, Path]:
    """Every recipe through mergekit, in one process."""
    return run_mergekit(recipes(tiny_family.base, tiny_family.finetunes), tmp_path_factory.mktemp("mergekit"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "model_stock", "linear", "task_arithmetic", "ties", "ties_rescaled", "nearswap",
        "nuslerp", "nuslerp_rows", "nuslerp_columns", "nuslerp_base", "multislerp", "multislerp_base", "karcher",
        "karcher_iterated",
        "sce", "sce_default", "breadcrumbs", "breadcrumbs_ties",
    ],
)
def test_same_tensors_as_mergekit(name, tiny_family, mergekit_outputs, ray_local, tmp_path):
    config = tmp_path / "recipe.yml"
    config.write_text(recipes(tiny_family.base, tiny_family.finetunes)[name])
    out = tmp_path / "out"
    assert main(["merge", str(config), str(out), "--quiet"]) == 0

    ours = load_output(out)
    theirs = load_output(mergekit_outputs[name])
    assert sorted(ours) == sorted(theirs)
    inputs = load_output(tiny_family.base)
    worst = 0.0
    for tensor, expected in theirs.items():
        actual = ours[tensor]
        assert actual.dtype == expected.dtype == torch.float32, tensor
        assert actual.shape == expected.shape, tensor
        scale = float(expected.abs().max())
        difference = float((actual.double() - expected.double()).abs().max())
        worst = max(worst, difference / (scale * FLOAT32_EPS))
        assert difference <= ULPS * FLOAT32_EPS * scale, (
            f"{name}: {tensor}: max |ours - mergekit| = {difference:.3e} "
            f"({difference / (scale * FLOAT32_EPS):.2f} ulp of max |w| = {scale:.3e})"
        )
        # The merge did something: a check that cannot pass by copying the base.
        if name != "linear":
            assert not torch.equal(actual, inputs[tensor]), tensor
    print(f"{name}: worst difference {worst:.2f} float32 ulp of the tensor's max |w|")


def kept_by_rank(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor], model: dict[str, torch.Tensor],
                 density: float, epsilon: float, buckets: int = 5) -> list[tuple[float, float, float]]:
    """Pooled over tensors, per bucket of normalised magnitude rank (DELLA ranks along axis 1, the
    smallest first): (kept fraction, intended probability, its standard deviation)."""
    kept = torch.zeros(buckets, dtype=torch.float64)
    probability, variance, count = kept.clone(), kept.clone(), kept.clone()
    for name, out in merged.items():
        delta = model[name].double() - base[name].double()
        fibers = (delta.unsqueeze(0) if delta.dim() < 2 else delta).movedim(1, -1)
        length = fibers.shape[-1]
        rank = fibers.abs().argsort(dim=-1).argsort(dim=-1).double() / (length - 1)
        p = (density - epsilon) + rank * 2 * epsilon
        changed = (out != base[name]).reshape(delta.unsqueeze(0).shape if delta.dim() < 2 else delta.shape)
        changed = changed.movedim(1, -1)
        bucket = (rank * buckets).long().clamp(max=buckets - 1)
        for b in range(buckets):
            where = bucket == b
            kept[b] += changed[where].double().sum()
            probability[b] += p[where].sum()
            variance[b] += (p[where] * (1 - p[where])).sum()
            count[b] += where.sum()
    return [(float(k / n), float(q / n), float(v.sqrt() / n)) for k, q, v, n in zip(kept, probability, variance, count)]


@pytest.mark.slow
def test_random_methods_agree_with_mergekit_statistically(tiny_family, mergekit_outputs, ray_local, tmp_path):
    """DELLA: per magnitude-rank bucket, modelstock and mergekit keep the intended fraction of the
    entries (within 5 standard deviations); modelstock gives the same bytes on a second run; with
    three models, the merged task vectors have the norm of mergekit's."""
    texts = recipes(tiny_family.base, tiny_family.finetunes)
    base = load_output(tiny_family.base)
    ours = {}
    for name in ("della_linear_one", "della_one", "della"):
        config = tmp_path / f"{name}.yml"
        config.write_text(texts[name])
        assert main(["merge", str(config), str(tmp_path / name), "--quiet"]) == 0
        ours[name] = load_output(tmp_path / name)
    for name, model, density, epsilon in (("della_linear_one", 0, 0.5, 0.3), ("della_one", 1, 0.4, 0.15)):
        finetune = load_output(tiny_family.finetunes[model])
        for source, merged in (("modelstock", ours[name]), ("mergekit", load_output(mergekit_outputs[name]))):
            buckets = kept_by_rank(merged, base, finetune, density, epsilon)
            for bucket, (observed, expected, sigma) in enumerate(buckets):
                assert abs(observed - expected) < 5 * sigma, (name, source, bucket, observed, expected, sigma)
    theirs = load_output(mergekit_outputs["della"])
    for tensor, expected in theirs.items():
        if expected.numel() >= 1000:
            ratio = float((ours["della"][tensor].double() - base[tensor].double()).norm()
                          / (expected.double() - base[tensor].double()).norm())
            assert 0.85 < ratio < 1.15, (tensor, ratio)
    config = tmp_path / "della.yml"
    assert main(["merge", str(config), str(tmp_path / "again"), "--quiet"]) == 0
    again = load_output(tmp_path / "again")
    assert all(torch.equal(again[k], v) for k, v in ours["della"].items())
