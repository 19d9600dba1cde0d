"""The GPU path: blocks merged on the GPU from pinned read buffers. Runs only where CUDA is present
(``bench/gpu_check.sh`` runs it with the GPU benchmark); skipped elsewhere.

The numerics contract holds on the GPU as on the CPU: every merged tensor within one output
rounding step of a float64 re-computation, and the same bytes whatever the chunking on one device.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_methods import assert_within_one_ulp

from modelstock import storage
from modelstock.checkpoint.reader import open_checkpoint
from modelstock.recipe import parse_recipe
from modelstock.shard import merge_into_shard
from modelstock.testing.synthetic import LlamaShape, write_family
from pipeline.driver import MergeRequest, plan_merge

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SHAPE = LlamaShape(hidden=256, intermediate=640, layers=2, vocab=2048, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    return write_family(tmp_path_factory.mktemp("gpu-family"), SHAPE, finetunes=2, dtype=torch.bfloat16)


def merged_on(device: str, family: tuple[str, list[str]], method: str, out: Path, budget: int) -> dict[str, torch.Tensor]:
    base, tuned = family
    extra = {"parameters": {"weight": 1.0, "density": 0.5}} if method == "ties" else {}
    recipe = parse_recipe({"merge_method": method, "base_model": base, "models": [{"model": m} for m in tuned], **extra})
    plan, _, _, _ = plan_merge(MergeRequest(recipe=recipe, out_url=str(out)))
    tensors: dict[str, torch.Tensor] = {}
    for shard in plan.shards:
        location = storage.resolve(str(out)).join(f"{device}-{budget}-{shard.file}")
        merge_into_shard(location, shard.tensors, budget, torch.device(device))
        tensors.update(load_file(location.path))
    return tensors


@pytest.mark.parametrize("method", ["model_stock", "ties"])
def test_gpu_merge_meets_the_contract_and_ignores_chunking(family, method: str, tmp_path: Path) -> None:
    on_gpu = merged_on("cuda", family, method, tmp_path, 1 << 30)
    chunked = merged_on("cuda", family, method, tmp_path, 8 * 1024 * 1024)
    on_cpu = merged_on("cpu", family, method, tmp_path, 1 << 30)
    for name, tensor in on_gpu.items():
        assert tensor.view(torch.int16).equal(chunked[name].view(torch.int16)), name
        # GPU and CPU reduce in different orders: each within one rounding step of the other's.
        assert_within_one_ulp(tensor, on_cpu[name].double())


def test_gpu_model_stock_against_float64(family, tmp_path: Path) -> None:
    base, tuned = family
    merged = merged_on("cuda", family, "model_stock", tmp_path, 1 << 30)
    locations = [open_checkpoint(url) for url in (base, *tuned)]
    name = "model.layers.1.mlp.down_proj.weight"
    w0, w1, w2 = (load_file(str(next(Path(c.url).glob("*.safetensors"))))[name].double() for c in locations)
    d1, d2 = w1 - w0, w2 - w0
    cos = float((d1 * d2).sum() / (d1.norm() * d2.norm()))
    t = 2 * cos / (1 + cos)
    assert_within_one_ulp(merged[name], t * (w1 + w2) / 2 + (1 - t) * w0)
