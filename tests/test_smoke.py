from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.cli import main


def test_cli_merge_tiny_family_loads_in_transformers(tiny_family, tmp_path: Path, ray_local) -> None:
    from transformers import LlamaForCausalLM

    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"merge_method: model_stock\nbase_model: {tiny_family.base}\nmodels:\n"
        + "".join(f"  - model: {p}\n" for p in tiny_family.finetunes[:2])
    )
    out = tmp_path / "merged"
    assert main(["merge", str(recipe), str(out), "--quiet", "--shard-size", "20KB"]) == 0
    model = LlamaForCausalLM.from_pretrained(out)
    base = load_file(tiny_family.base / "model.safetensors")
    assert set(model.state_dict()) >= set(base)
    assert (out / "modelstock-manifest.json").exists()
    assert model.dtype == torch.float32
