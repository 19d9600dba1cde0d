"""Parity with mergekit: the same YAML through `mergekit-yaml` and `modelstock merge` gives the same tensors.

mergekit runs as a subprocess of this venv's console script, on CPU, offline, with a float32
`dtype`, on the float32 tiny Llama family; modelstock runs in-process on the local Ray.
DARE is not compared: mergekit draws its masks from torch's global RNG.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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
    }


# Absolute tolerance in units of the float32 spacing (2**-23 relative) of the tensor's largest
# magnitude. modelstock computes in float64 and rounds once (<= 0.5 ulp); mergekit computes in
# float32: each of its ~N+3 operations rounds (<= 0.5 ulp of the running value), and model_stock
# also rounds t to float32 on our side. For model_stock the float32 norms and dot products
# (mergekit's torch.norm in fp32) put a relative error of ~1e-7..1e-6 on cos_theta and t, but t
# multiplies |mean(w_i) - w_0| ~ 2 % of |w|, so even that stays below an ulp of the output. 4 ulp
# of the largest magnitude (measured: <= 1.1) bounds every method with margin, and is ~1e5 times
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
    """Every recipe through mergekit-yaml, the subprocesses run side by side (each is mostly import time)."""
    root = tmp_path_factory.mktemp("mergekit")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    running = {}
    for name, text in recipes(tiny_family.base, tiny_family.finetunes).items():
        config = root / f"{name}.yml"
        config.write_text(text)
        out = root / name
        command = [
            MERGEKIT, str(config), str(out),
            "--no-cuda", "--no-lazy-unpickle", "--no-copy-tokenizer", "--no-write-model-card",
            "--no-async-write", "--quiet", "--random-seed", "0",
        ]
        running[name] = (out, subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = {}
    for name, (out, process) in running.items():
        log, _ = process.communicate(timeout=300)
        assert process.returncode == 0, f"mergekit-yaml failed on {name}:\n{log.decode(errors='replace')[-3000:]}"
        outputs[name] = out
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["model_stock", "linear", "task_arithmetic", "ties", "ties_rescaled", "nearswap"],
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
