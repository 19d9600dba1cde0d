"""Block-FP8 inputs (DeepSeek-V3 / Kimi-K2 layout) are dequantized with their scales and merged;
other quantizations are refused, never merged as numbers.

The independent oracle for dequantization is transformers' own (``_dequantize_fp8_weight`` of its
fine-grained FP8 integration), applied in float64; the merge of the dequantized weights is then the
in-memory API's on plain float tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import modelstock
from modelstock import chunks
from modelstock.errors import InvalidCheckpoint
from modelstock.quantization import BlockFP8
from pipeline.cli import main

BLOCK = (16, 16)
FP8_MAX = 448.0


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise FP8 E4M3 codes and float32 scales (absmax / 448 per block), as DeepSeek stores them."""
    rows, cols = weight.shape
    scales = torch.zeros(-(-rows // BLOCK[0]), -(-cols // BLOCK[1]))
    codes = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            block = weight[i * BLOCK[0]:(i + 1) * BLOCK[0], j * BLOCK[1]:(j + 1) * BLOCK[1]]
            scale = float(block.abs().max()) / FP8_MAX or 1.0
            scales[i, j] = scale
            codes[i * BLOCK[0]:(i + 1) * BLOCK[0], j * BLOCK[1]:(j + 1) * BLOCK[1]] = (block / scale).to(torch.float8_e4m3fn)
    return codes, scales


def dequantized(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    return _dequantize_fp8_weight(codes, scales, list(BLOCK), torch.float64)


def fp8_checkpoint(source: Path, target: Path) -> dict[str, torch.Tensor]:
    """A copy of a float32 checkpoint folder with every projection stored as block FP8; returns the
    float64 weights transformers would dequantize it to."""
    target.mkdir()
    tensors = load_file(str(source / "model.safetensors"))
    stored, weights = {}, {}
    for name, tensor in tensors.items():
        if name.endswith("proj.weight"):
            codes, scales = quantize(tensor)
            stored[name], stored[name + "_scale_inv"] = codes, scales
            weights[name] = dequantized(codes, scales)
        else:
            stored[name] = tensor
            weights[name] = tensor.double()
    save_file(stored, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(BLOCK)}
    (target / "config.json").write_text(json.dumps(config))
    return weights


@pytest.fixture(scope="module")
def fp8_family(tiny_family, tmp_path_factory) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    root = tmp_path_factory.mktemp("fp8")
    folders, weights = [], []
    for index, source in enumerate([tiny_family.base, *tiny_family.finetunes[:2]]):
        folder = root / f"model-{index}"
        weights.append(fp8_checkpoint(source, folder))
        folders.append(folder)
    return folders, weights


def test_block_fp8_inputs_are_dequantized_then_merged(fp8_family, tmp_path: Path, ray_local) -> None:
    folders, weights = fp8_family
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"merge_method: model_stock\nbase_model: {folders[0]}\nmodels:\n  - model: {folders[1]}\n"
                      f"  - model: {folders[2]}\ndtype: float32\n")
    out = tmp_path / "merged"
    assert main(["merge", str(recipe), str(out), "--quiet"]) == 0
    merged = {}
    for path in out.glob("model-*.safetensors"):
        merged.update(load_file(str(path)))
    assert not any(name.endswith("_scale_inv") for name in merged)
    plain = [{k: v.float() for k, v in w.items()} for w in weights]
    expected, _ = modelstock.merge("model_stock", plain[1:], base=plain[0], out_dtype=torch.float32)
    assert sorted(merged) == sorted(expected)
    for name, tensor in expected.items():
        assert merged[name].dtype == torch.float32
        assert torch.allclose(merged[name], tensor, rtol=0, atol=4 * 2.0**-23 * float(tensor.abs().max())), name
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config.get("dtype", config.get("torch_dtype")) == "float32"
    from transformers import LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(out)  # a plain, unquantized model


def test_default_output_of_fp8_weights_is_bfloat16(fp8_family, tmp_path: Path, ray_local) -> None:
    folders, _ = fp8_family
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {folders[1]}\n  - model: {folders[2]}\n")
    assert main(["merge", str(recipe), str(tmp_path / "merged"), "--quiet"]) == 0
    merged = load_file(str(next((tmp_path / "merged").glob("model-*.safetensors"))))
    assert merged["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert merged["model.norm.weight"].dtype == torch.float32


def test_dequantization_follows_block_boundaries_in_any_chunking(monkeypatch) -> None:
    """Blocks and chunks start at multiples of the quantization block's rows; bytes do not depend
    on the chunking."""
    generator = torch.Generator().manual_seed(3)
    weights = [torch.randn(72, 40, generator=generator) for _ in range(3)]
    states = []
    for weight in weights:
        codes, scales = quantize(weight)
        states.append({"w": codes, "w_scale_inv": scales})
    whole, _ = modelstock.merge("linear", states, quantization=BlockFP8(BLOCK), out_dtype=torch.float32)
    monkeypatch.setattr(chunks, "BLOCK_ELEMENTS", 100)  # 2 rows, rounded up to 16
    monkeypatch.setattr(chunks, "MIN_CHUNK_BYTES", 1)
    from modelstock.engine import chunk_plan_for, merge_in_memory
    from modelstock.jobs import TensorInput, TensorJob
    from modelstock.methods.base import TensorParameters
    from modelstock.methods.linear import LinearModelParameters, LinearParameters

    inputs = tuple(TensorInput(i, "w", "F8_E4M3", f"m{i}", "w_scale_inv", BLOCK) for i in range(3))
    job = TensorJob("w", (72, 40), "F32", "linear", TensorParameters(LinearParameters(), (LinearModelParameters(),) * 3),
                    inputs, has_base=False)
    plan = chunk_plan_for(job, 72 * 40)
    assert len(plan.chunks) > 2 and all(start % 16 == 0 for start, _ in plan.chunks) and plan.block_rows == 16
    chunked, _ = merge_in_memory(job, [s["w"] for s in states] + [s["w_scale_inv"] for s in states], 72 * 40)
    assert chunked.equal(whole["w"])
    reference = sum(dequantized(s["w"], s["w_scale_inv"]) for s in states) / 3
    assert torch.allclose(whole["w"].double(), reference, rtol=2.0**-23, atol=0)


@pytest.mark.parametrize(
    "quantization, expected",
    [
        ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq'"),
        ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "quant_method 'bitsandbytes'"),
        ({"quant_method": "fp8"}, "weight_block_size None"),
        (None, "declares no quantization"),
    ],
)
def test_other_quantizations_are_refused(fp8_family, tmp_path: Path, capsys, quantization, expected) -> None:
    folders, _ = fp8_family
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "model.safetensors").write_bytes((folders[1] / "model.safetensors").read_bytes())
    config = json.loads((folders[1] / "config.json").read_text())
    config.pop("quantization_config")
    if quantization is not None:
        config["quantization_config"] = quantization
    (odd / "config.json").write_text(json.dumps(config))
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {folders[2]}\n  - model: {odd}\n")
    assert main(["merge", str(recipe), str(tmp_path / "merged"), "--quiet"]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and str(odd) in line and expected in line
    assert not (tmp_path / "merged").exists()


def test_packed_integer_weights_are_refused() -> None:
    state = {"model.layers.0.mlp.up_proj.qweight": torch.zeros(4, 4, dtype=torch.int32)}
    with pytest.raises(InvalidCheckpoint, match="packed quantized weight"):
        modelstock.merge("linear", [state, state])
