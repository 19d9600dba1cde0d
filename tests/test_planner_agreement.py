"""One planner: every recipe of a corpus gives the same jobs and the same bytes through the CLI (Ray
workers reading checkpoints by byte ranges) and through the in-memory API (state dicts) — including
the cases where they used to disagree (task arithmetic with weights summing to zero)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import modelstock
from modelstock.errors import InvalidRecipe
from modelstock.recipe import load_recipe, recipe_models
from pipeline.cli import main
from pipeline.driver import MergeRequest, plan_merge


def corpus(base: Path, a: Path, b: Path, c: Path) -> dict[str, str]:
    three = f"models:\n  - model: {a}\n  - model: {b}\n  - model: {c}\n"
    return {
        "model_stock": f"merge_method: model_stock\nbase_model: {base}\n{three}",
        "model_stock_filter_wise_bf16": (
            f"merge_method: model_stock\nbase_model: {base}\n{three}parameters: {{filter_wise: true}}\ndtype: bfloat16\n"
        ),
        "linear_weights": (
            f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: [{{filter: mlp, value: 0.2}}, "
            f"{{value: 1.0}}]}}\n  - model: {b}\n    parameters: {{weight: [0.5, 2.0]}}\n"
        ),
        "task_arithmetic_zero_sum_normalize": (
            f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0}}\n"
            f"  - model: {b}\n    parameters: {{weight: -1.0}}\nparameters: {{normalize: true}}\n"
        ),
        "ties_density_gradient": (
            f"merge_method: ties\nbase_model: {base}\nmodels:\n"
            f"  - model: {a}\n    parameters: {{weight: 1.0, density: [0.3, 0.9]}}\n"
            f"  - model: {b}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        ),
        "dare_ties": (
            f"merge_method: dare_ties\nbase_model: {base}\nmodels:\n"
            f"  - model: {a}\n    parameters: {{weight: 1.0, density: 0.6}}\n"
            f"  - model: {b}\n    parameters: {{weight: 1.0, density: 0.4}}\nparameters: {{random_seed: 7}}\n"
        ),
        "slerp_slices_gradient": (
            f"merge_method: slerp\nbase_model: {base}\nslices:\n  - sources:\n      - {{model: {base}, layer_range: [0, 2]}}\n"
            f"      - {{model: {a}, layer_range: [0, 2]}}\nparameters: {{t: [0.2, 0.8]}}\n"
        ),
        "passthrough_frankenmerge": (
            f"merge_method: passthrough\nslices:\n  - sources: [{{model: {a}, layer_range: [0, 2]}}]\n"
            f"  - sources: [{{model: {b}, layer_range: [1, 2]}}]\n"
        ),
        "breadcrumbs_excluding_embeddings": (
            f"merge_method: breadcrumbs_ties\nbase_model: {base}\n{three}parameters: {{weight: 1.0, density: 0.6}}\n"
            "exclude: ['*embed_tokens*']\n"
        ),
    }


def states_of(recipe: Any) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(Path(name) / "model.safetensors")) for name in recipe_models(recipe)}


def job_signature(job: Any) -> tuple[Any, ...]:
    """A job without the labels naming where inputs live (file URLs vs model names)."""
    return (job.name, job.shape, job.out_dtype, job.method, job.params, job.has_base, job.flags,
            tuple((i.model, i.tensor, i.dtype) for i in job.inputs))


@pytest.mark.parametrize("name", sorted(corpus(*(Path(p) for p in "wxyz"))))
def test_the_cli_and_the_api_plan_and_merge_alike(name: str, tiny_family, ray_local, tmp_path: Path) -> None:
    recipe_file = tmp_path / "recipe.yml"
    recipe_file.write_text(corpus(tiny_family.base, *tiny_family.finetunes)[name])
    recipe = load_recipe(recipe_file)
    states = states_of(recipe)

    plan, _, _, _ = plan_merge(MergeRequest(recipe=recipe, out_url=str(tmp_path / "out")))
    driver_jobs = [job_signature(t.job) for shard in plan.shards for t in shard.tensors]
    api_jobs = [job_signature(job) for job in modelstock.plan_in_memory(recipe, states).jobs]
    assert sorted(driver_jobs, key=str) == sorted(api_jobs, key=str)

    assert main(["merge", str(recipe_file), str(tmp_path / "out"), "--quiet"]) == 0
    on_ray = {}
    for path in (tmp_path / "out").glob("model-*.safetensors"):
        on_ray.update(load_file(str(path)))
    in_memory, _ = modelstock.merge_recipe_in_memory(recipe, states)
    assert sorted(on_ray) == sorted(in_memory)
    for tensor, expected in in_memory.items():
        assert on_ray[tensor].dtype == expected.dtype and on_ray[tensor].equal(expected), tensor


def test_a_refusal_is_the_same_line_in_both(tiny_family, tmp_path: Path, capsys) -> None:
    text = (f"merge_method: linear\nmodels:\n  - model: {tiny_family.finetunes[0]}\n    parameters: {{weight: 1.0}}\n"
            f"  - model: {tiny_family.finetunes[1]}\n    parameters: {{weight: -1.0}}\n")
    recipe_file = tmp_path / "recipe.yml"
    recipe_file.write_text(text)
    recipe = load_recipe(recipe_file)
    with pytest.raises(InvalidRecipe) as caught:
        modelstock.merge_recipe_in_memory(recipe, states_of(recipe))
    assert main(["merge", str(recipe_file), str(tmp_path / "out"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == f"modelstock: error: {caught.value}"
