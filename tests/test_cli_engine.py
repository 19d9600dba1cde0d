"""`modelstock merge` and `modelstock inspect` end to end, on a tiny real transformers Llama.

The merged weights are checked against a float64 re-computation made here from the input
safetensors files (the references of tests/test_methods.py), and must load in transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_methods import assert_within_one_ulp, reference_linear, reference_model_stock

import modelstock
from pipeline.cli import main

ROOT = Path(__file__).resolve().parent.parent
TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass(frozen=True)
class MergeCase:
    family: str  # fixture name
    method: str
    count: int
    parameters: str = ""  # YAML lines under `parameters:`
    weights: tuple[float, ...] = ()
    dtype: str | None = None
    out_dtype: str | None = None
    shard_size: str = "2GB"

    @property
    def id(self) -> str:
        parts = [self.family.removeprefix("tiny_family").strip("_") or "f32", self.method, f"n{self.count}"]
        parts += [p.split(":")[0] for p in self.parameters.splitlines() if "true" in p]
        parts += [f"dtype-{self.dtype}"] if self.dtype else []
        parts += [f"out-{self.out_dtype}"] if self.out_dtype else []
        parts += ["weighted"] if self.weights else []
        parts += [f"shards-{self.shard_size}"] if self.shard_size != "2GB" else []
        return "-".join(parts)


CASES = [
    MergeCase("tiny_family", "model_stock", 2),
    MergeCase("tiny_family", "model_stock", 3, parameters="filter_wise: true", shard_size="20KB"),
    MergeCase("tiny_family_bf16", "model_stock", 3),
    MergeCase("tiny_family_bf16", "model_stock", 2, parameters="filter_wise: true", dtype="float32"),
    MergeCase("tiny_family", "linear", 3, weights=(1.0, 0.5, 2.0), dtype="float16", out_dtype="bfloat16"),
    MergeCase("tiny_family_bf16", "linear", 2, shard_size="10KB"),
]


def recipe_text(case: MergeCase, base: Path, finetunes: list[Path]) -> str:
    lines = [f"merge_method: {case.method}"]
    if case.method == "model_stock":
        lines.append(f"base_model: {base}")
    lines.append("models:")
    for index, path in enumerate(finetunes):
        lines.append(f"  - model: {path}")
        if case.weights:
            lines.append(f"    parameters: {{weight: {case.weights[index]}}}")
    if case.parameters:
        lines.append("parameters:")
        lines += [f"  {line}" for line in case.parameters.splitlines()]
    lines += [f"dtype: {case.dtype}"] if case.dtype else []
    lines += [f"out_dtype: {case.out_dtype}"] if case.out_dtype else []
    return "\n".join(lines) + "\n"


def expected_out_dtype(case: MergeCase, base_dtype: torch.dtype) -> torch.dtype:
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if case.out_dtype:
        return names[case.out_dtype]
    if case.dtype:
        return names[case.dtype]
    return base_dtype


def load_output(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(out / file)))
    return tensors


def assert_nothing_at(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.rglob("*"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_merge_matches_float64_reference_and_loads_in_transformers(
    case: MergeCase, request: pytest.FixtureRequest, tmp_path: Path, ray_local: None
) -> None:
    from transformers import LlamaForCausalLM

    family = request.getfixturevalue(case.family)
    finetunes = family.finetunes[: case.count]
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(recipe_text(case, family.base, finetunes))
    out = tmp_path / "merged"
    assert main(["merge", str(recipe), str(out), "--quiet", "--shard-size", case.shard_size]) == 0

    base = load_file(str(family.base / "model.safetensors"))
    models = [load_file(str(path / "model.safetensors")) for path in finetunes]
    merged = load_output(out)
    assert sorted(merged) == sorted(base)
    out_dtype = expected_out_dtype(case, family.dtype)
    filter_wise = "filter_wise: true" in case.parameters
    for name, tensor in merged.items():
        assert tensor.dtype == out_dtype, name
        inputs = [m[name] for m in models]
        if case.method == "model_stock":
            reference = reference_model_stock(base[name], inputs, filter_wise=filter_wise).merged
        else:
            reference = reference_linear(inputs, list(case.weights) or [1.0] * case.count)
        assert_within_one_ulp(tensor, reference)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_files = sorted(p.name for p in out.glob("*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == shard_files
    assert sorted(index["weight_map"]) == sorted(base)
    for name, file in index["weight_map"].items():
        with safe_open(str(out / file), framework="pt") as shard:
            assert name in shard.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    if case.shard_size != "2GB":
        assert len(shard_files) >= 3, shard_files
        count = len(shard_files)
        assert shard_files == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        limit = int(case.shard_size.removesuffix("KB")) * 1000
        for file in shard_files:
            names = [n for n, f in index["weight_map"].items() if f == file]
            data = sum(merged[n].numel() * merged[n].element_size() for n in names)
            assert data <= limit or len(names) == 1
    else:
        assert shard_files == ["model-00001-of-00001.safetensors"]

    manifest = json.loads((out / "modelstock-manifest.json").read_text())
    import hashlib

    for shard in manifest["shards"]:
        assert hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]

    model = LlamaForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == out_dtype
    state = model.state_dict()
    for name, tensor in merged.items():
        assert torch.equal(state[name], tensor), name


def test_output_dtype_defaults_to_the_base_dtype(tiny_family_bf16, tmp_path: Path, ray_local: None) -> None:
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {tiny_family_bf16.finetunes[0]}\n  - model: {tiny_family_bf16.finetunes[1]}\n"
    )
    out = tmp_path / "merged"
    assert main(["merge", str(recipe), str(out), "--quiet"]) == 0
    merged = load_output(out)
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


# ----------------------------------------------------------------------------- inspect


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_inspect_lists_what_safetensors_sees(
    tiny_family, tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str
) -> None:
    source = tiny_family.base
    if layout == "sharded":
        from transformers import LlamaForCausalLM

        source = tmp_path / "sharded"
        LlamaForCausalLM.from_pretrained(tiny_family.base).save_pretrained(source, max_shard_size="20KB")
    files = sorted(source.glob("*.safetensors"))
    official: dict[str, tuple[str, list[int], int]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                official[name] = (handle.get_slice(name).get_dtype(), list(tensor.shape), tensor.numel() * tensor.element_size())

    assert main(["inspect", str(source)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(official) + 1
    listed = {}
    for line in lines[:-1]:
        name, dtype, shape, nbytes = line.split()
        listed[name] = (dtype, [int(d) for d in shape.split("x")], int(nbytes.replace(",", "")))
    assert listed == official
    total = sum(v[2] for v in official.values())
    assert lines[-1] == f"{len(official)} tensors, {total:,d} bytes in {len(files)} file(s); headers valid"

    assert main(["inspect", str(source), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {t["name"]: (t["dtype"], t["shape"], t["bytes"]) for t in report["tensors"]} == official
    assert report["total_bytes"] == total
    assert len(report["files"]) == len(files)


def test_inspect_bad_checkpoint_is_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    assert main(["inspect", str(folder)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and str(folder / "model.safetensors") in err[0] and "JSON" in err[0]


# ----------------------------------------------------------------------------- bad input: exit 2, one line, nothing written


def copy_model(source: Path, target: Path, change: dict[str, torch.Tensor | None]) -> Path:
    """A copy of a checkpoint folder with some tensors replaced (or removed, for None)."""
    shutil.copytree(source, target)
    tensors = load_file(str(source / "model.safetensors"))
    for name, tensor in change.items():
        if tensor is None:
            del tensors[name]
        else:
            tensors[name] = tensor
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def run_bad_merge(recipe_body: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(recipe_body)
    out = tmp_path / "merged"
    code = main(["merge", str(recipe), str(out), "--quiet"])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(err) == 1, err
    assert_nothing_at(out)
    return err[0]


def model_stock_recipe(base: Path, *models: Path) -> str:
    return f"merge_method: model_stock\nbase_model: {base}\nmodels:\n" + "".join(f"  - model: {m}\n" for m in models)


LAYER = "model.layers.1.mlp.up_proj.weight"


def test_shape_mismatch_between_finetunes(tiny_family, tmp_path: Path, capsys, ray_local: None) -> None:
    wrong = copy_model(tiny_family.finetunes[1], tmp_path / "wrong-shape", {LAYER: torch.zeros(63, 32)})
    line = run_bad_merge(model_stock_recipe(tiny_family.base, tiny_family.finetunes[0], wrong), tmp_path, capsys)
    assert str(wrong / "model.safetensors") in line and repr(LAYER) in line and "shape" in line


def test_mixed_input_dtypes_are_cast_to_the_compute_dtype(tiny_family, tmp_path: Path, capsys, ray_local: None) -> None:
    """As mergekit: a fine-tune stored in another dtype is merged (cast to the compute dtype), and the
    output keeps the base's dtype; the CLI and the in-memory API give the same bytes."""
    states = [load_file(str(folder / "model.safetensors")) for folder in (tiny_family.base, *tiny_family.finetunes[:2])]
    states[2][LAYER] = states[2][LAYER].to(torch.float16)
    wrong = copy_model(tiny_family.finetunes[1], tmp_path / "wrong-dtype", {LAYER: states[2][LAYER]})
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(model_stock_recipe(tiny_family.base, tiny_family.finetunes[0], wrong))
    assert main(["merge", str(recipe), str(tmp_path / "merged"), "--quiet"]) == 0
    merged = load_file(str(next((tmp_path / "merged").glob("model-*.safetensors"))))
    expected, _ = modelstock.merge("model_stock", states[1:], base=states[0])
    assert merged[LAYER].dtype == torch.float32
    assert merged[LAYER].equal(expected[LAYER])


def test_missing_tensor(tiny_family, tmp_path: Path, capsys, ray_local: None) -> None:
    partial = copy_model(tiny_family.finetunes[0], tmp_path / "partial", {LAYER: None})
    line = run_bad_merge(model_stock_recipe(tiny_family.base, partial, tiny_family.finetunes[1]), tmp_path, capsys)
    assert str(partial) in line and repr(LAYER) in line and "missing" in line


def test_nan_in_a_finetune(tiny_family, tmp_path: Path, capsys, ray_local: None) -> None:
    tensor = load_file(str(tiny_family.finetunes[1] / "model.safetensors"))[LAYER].clone()
    tensor[3, 4] = float("nan")
    poisoned = copy_model(tiny_family.finetunes[1], tmp_path / "nan", {LAYER: tensor})
    line = run_bad_merge(model_stock_recipe(tiny_family.base, tiny_family.finetunes[0], poisoned), tmp_path, capsys)
    assert str(poisoned / "model.safetensors") in line and repr(LAYER) in line and "NaN" in line


def test_model_folder_that_does_not_exist(tiny_family, tmp_path: Path, capsys, ray_local: None) -> None:
    ghost = tmp_path / "no-such-model"
    line = run_bad_merge(model_stock_recipe(tiny_family.base, tiny_family.finetunes[0], ghost), tmp_path, capsys)
    assert str(ghost) in line


def test_pickle_only_model(tiny_family, tmp_path: Path, capsys, ray_local: None) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    line = run_bad_merge(model_stock_recipe(tiny_family.base, tiny_family.finetunes[0], pickled), tmp_path, capsys)
    assert str(pickled) in line and "pickle" in line


def test_unknown_method(tiny_family, tmp_path: Path, capsys) -> None:
    body = model_stock_recipe(tiny_family.base, *tiny_family.finetunes[:2]).replace("model_stock", "model_soup_deluxe")
    line = run_bad_merge(body, tmp_path, capsys)
    assert str(tmp_path / "recipe.yml") in line and "model_soup_deluxe" in line


def test_base_listed_among_models(tiny_family, tmp_path: Path, capsys) -> None:
    line = run_bad_merge(model_stock_recipe(tiny_family.base, tiny_family.base, *tiny_family.finetunes[:2]), tmp_path, capsys)
    assert str(tmp_path / "recipe.yml") in line and "also listed among the models" in line


def test_bad_input_in_a_fresh_process_prints_one_line(tiny_family, tmp_path: Path) -> None:
    """The real console: nothing but the one error line on stderr (no log lines, no traceback)."""
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"merge_method: model_stock\nbase_model: {tiny_family.base}\nmodels:\n  - model: {tiny_family.finetunes[0]}\n"
    )
    out = tmp_path / "merged"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "merge", str(recipe), str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("modelstock: error: ") and str(recipe) in lines[0] and "at least 2 models" in lines[0]
    assert result.stdout == ""
    assert_nothing_at(out)


def test_tensors_only_some_inputs_have_are_left_out_and_reported(tiny_family, tmp_path: Path, ray_local: None) -> None:
    """As mergekit: the output is shaped as the base; a fine-tune's extra tensor is left out (and the
    report says so), and a fine-tune that ties its lm_head to its embeddings merges its embeddings."""
    extra = copy_model(tiny_family.finetunes[0], tmp_path / "extra", {"model.extra.weight": torch.ones(4, 4)})
    embeddings = load_file(str(tiny_family.finetunes[1] / "model.safetensors"))["model.embed_tokens.weight"]
    tied = copy_model(tiny_family.finetunes[1], tmp_path / "tied", {"lm_head.weight": None})
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(model_stock_recipe(tiny_family.base, extra, tied))
    assert main(["merge", str(recipe), str(tmp_path / "merged"), "--quiet"]) == 0
    report = json.loads((tmp_path / "merged" / "modelstock-report.json").read_text())
    assert report["summary"]["ignored_tensors"] == [f"{extra}: model.extra.weight"]
    head = next(t for t in report["tensors"] if t["name"] == "lm_head.weight")
    assert "tied_lm_head" in head["flags"]
    states = [load_file(str(f / "model.safetensors")) for f in (tiny_family.base, tiny_family.finetunes[0])]
    states.append({**load_file(str(tiny_family.finetunes[1] / "model.safetensors")), "lm_head.weight": embeddings})
    expected, _ = modelstock.merge("model_stock", states[1:], base=states[0])
    merged = load_file(str(next((tmp_path / "merged").glob("model-*.safetensors"))))
    assert "model.extra.weight" not in merged
    assert merged["lm_head.weight"].equal(expected["lm_head.weight"])


def test_methods_lists_every_method_with_its_parameters(capsys) -> None:
    assert main(["methods", "--json"]) == 0
    methods = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert sorted(methods) == modelstock.method_names()
    nearswap = methods["nearswap"]
    assert nearswap["needs_base"] and nearswap["models"] == {"min": 1, "max": 1}
    assert nearswap["parameters"] == [{"name": "t", "type": "float", "required": True, "default": None}]
    ties = {p["name"]: p for p in methods["ties"]["model_parameters"]}
    assert ties["weight"]["required"] and ties["density"]["default"] == 1.0
    assert "lambda" in {p["name"] for p in methods["ties"]["parameters"]}
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert "model_stock  (base + 2+ models)" in text and "filter_wise: bool = False" in text
