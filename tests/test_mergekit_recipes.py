"""mergekit's LLM recipe forms side by side with mergekit itself: gradients over the layer position,
slices (the canonical gradient SLERP recipe, frankenmerges with passthrough), on a 5-layer tiny Llama.

mergekit runs as a subprocess of this venv's `mergekit-yaml` on CPU, float32 math; modelstock runs
in-process on the local Ray. Tolerance: as tests/test_mergekit_parity.py (4 float32 ulps of the
tensor's largest magnitude: both round differently, a wrong t or layer would be ~1e5 times more).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from mergekit_runner import run_mergekit
from safetensors.torch import load_file

from pipeline.cli import main

MERGEKIT = shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent))
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MERGEKIT is None, reason="mergekit-yaml is not installed")]

ULPS, FLOAT32_EPS, LAYERS = 4, 2.0**-23, 5


def recipes(a: Path, b: Path, c: Path) -> dict[str, str]:
    return {
        "slerp_gradient_slices": f"""
slices:
  - sources:
      - {{model: {a}, layer_range: [0, {LAYERS}]}}
      - {{model: {b}, layer_range: [0, {LAYERS}]}}
merge_method: slerp
base_model: {a}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
        "slerp_gradient_models": f"""
models:
  - model: {a}
  - model: {b}
merge_method: slerp
base_model: {a}
parameters:
  t: [0.1, 0.9, 0.4]
dtype: float32
""",
        "linear_gradient_weights": f"""
merge_method: linear
models:
  - model: {b}
    parameters:
      weight: [{{filter: mlp, value: [1.0, 0.2]}}, {{value: 0.6}}]
  - model: {c}
    parameters:
      weight: [0.3, 1.0, 0.5]
dtype: float32
""",
        "ties_gradient_density": f"""
merge_method: ties
base_model: {a}
models:
  - model: {b}
    parameters: {{weight: 1.0, density: [0.2, 0.9]}}
  - model: {c}
    parameters: {{weight: 0.5, density: 0.6}}
dtype: float32
""",
        "passthrough_frankenmerge": f"""
merge_method: passthrough
slices:
  - sources:
      - {{model: {b}, layer_range: [0, 3]}}
  - sources:
      - {{model: {c}, layer_range: [2, 5]}}
dtype: float32
""",
    }


def make_family(root: Path) -> list[Path]:
    """A 5-layer tiny Llama (float32) and two fine-tunes of it with layer-varying drift."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False)
    torch.manual_seed(7)
    base = LlamaForCausalLM(config)
    folders = []
    generator = torch.Generator().manual_seed(8)
    for index in range(3):
        model = LlamaForCausalLM(config)
        state = {k: v.clone() for k, v in base.state_dict().items()}
        if index:
            for tensor in state.values():
                scale = 0.05 * (1 + index) * (tensor.abs().mean() + 1e-3)
                tensor += scale * torch.randn(tensor.shape, generator=generator)
        model.load_state_dict(state)
        folder = root / ("base" if index == 0 else f"ft-{index}")
        model.save_pretrained(folder, safe_serialization=True)
        folders.append(folder)
    return folders


def load_output(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_family(tmp_path_factory.mktemp("five-layers"))


@pytest.fixture(scope="module")
def mergekit_outputs(family: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return run_mergekit(recipes(*family), tmp_path_factory.mktemp("mergekit-recipes"))


@pytest.mark.parametrize("name", sorted(recipes(Path("a"), Path("b"), Path("c"))))
def test_same_tensors_as_mergekit(name: str, family: list[Path], mergekit_outputs: dict[str, Path], ray_local,
                                  tmp_path: Path) -> None:
    config = tmp_path / "recipe.yml"
    config.write_text(recipes(*family)[name])
    out = tmp_path / "out"
    assert main(["merge", str(config), str(out), "--quiet"]) == 0
    ours, theirs = load_output(out), load_output(mergekit_outputs[name])
    assert sorted(ours) == sorted(theirs)
    for tensor, expected in theirs.items():
        actual = ours[tensor]
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, tensor
        scale = float(expected.abs().max())
        difference = float((actual.double() - expected.double()).abs().max())
        assert difference <= ULPS * FLOAT32_EPS * scale, (
            f"{name}: {tensor}: max |ours - mergekit| = {difference:.3e} ({difference / (scale * FLOAT32_EPS):.2f} ulp)"
        )


def test_frankenmerge_output_loads_with_its_new_depth(family: list[Path], ray_local, tmp_path: Path) -> None:
    """Slices change the layer count: config.json follows, and transformers loads and runs the result."""
    from transformers import LlamaForCausalLM

    config = tmp_path / "recipe.yml"
    config.write_text(recipes(*family)["passthrough_frankenmerge"])
    out = tmp_path / "out"
    assert main(["merge", str(config), str(out), "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    merged = LlamaForCausalLM.from_pretrained(out)
    ft2 = load_output(family[2])
    # Output layer 3 is layer 2 of the second fine-tune; output layer 5 its layer 4.
    state = merged.state_dict()
    for out_layer, in_layer in ((3, 2), (5, 4)):
        name = "mlp.down_proj.weight"
        assert torch.equal(state[f"model.layers.{out_layer}.{name}"], ft2[f"model.layers.{in_layer}.{name}"])
    logits = merged(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 64) and bool(torch.isfinite(logits).all())
