"""Parameter names as mergekit treats them (issue 23), without giving up our safety.

A name some registered method takes but this method does not use (``weight`` under ``slerp``,
``density`` under ``model_stock``) is accepted, said once on stderr, recorded in the report's
``unused_parameters`` and has no effect (the same bytes as without it). A name no method takes
(``densty``) is refused with a did-you-mean. Strict mode refuses unused names too: ``merge
--strict`` (alias ``--strict-parameters``), ``soup --strict-parameters``, ``strict_parameters`` in the
Python API. The oracle for "no effect" is the same merge run without the parameter.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import modelstock
from modelstock.errors import InvalidRecipe
from modelstock.methods import get_method, method_names
from modelstock.recipe import known_parameter_names, parse_recipe
from modelstock.testing.synthetic import LlamaShape, write_family
from pipeline.cli import main

SHAPE = LlamaShape(hidden=16, intermediate=32, layers=2, vocab=32, heads=2, kv_heads=1)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    base, tuned = write_family(tmp_path_factory.mktemp("family"), SHAPE, finetunes=2, dtype=torch.float32, seed=9)
    return str(base), [str(t) for t in tuned]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err.splitlines()


def slerp_recipe(base: str, tuned: str, weight: bool) -> str:
    own = "    parameters: {weight: 0.6}\n" if weight else ""
    return (f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n" + (own and "    parameters: {weight: 0.4}\n")
            + f"  - model: {tuned}\n{own}parameters: {{t: 0.3}}\n")


def tensors_of(folder: Path) -> list[bytes]:
    files = sorted(folder.glob("*.safetensors"))
    assert files
    return [f.read_bytes() for f in files]


def test_unused_parameter_is_accepted_warned_reported_and_has_no_effect(
    family: tuple[str, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str], ray_local: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    base, tuned = family
    with_weight, without = tmp_path / "with.yml", tmp_path / "without.yml"
    with_weight.write_text(slerp_recipe(base, tuned[0], weight=True))
    without.write_text(slerp_recipe(base, tuned[0], weight=False))
    with caplog.at_level(logging.WARNING):
        code, lines = run_cli(["merge", str(with_weight), str(tmp_path / "a"), "--quiet"], capsys)
    assert code == 0, lines
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "unused" in r.getMessage()]
    assert warnings == [f"model {tuned[0]}: weight: unused by slerp, ignored (as mergekit ignores it)"], warnings
    report = json.loads((tmp_path / "a" / "modelstock-report.json").read_text())
    assert report["summary"]["unused_parameters"] == [f"model {tuned[0]}: weight"]
    code, lines = run_cli(["merge", str(without), str(tmp_path / "b"), "--quiet"], capsys)
    assert code == 0, lines
    assert json.loads((tmp_path / "b" / "modelstock-report.json").read_text())["summary"]["unused_parameters"] == []
    assert tensors_of(tmp_path / "a") == tensors_of(tmp_path / "b")


@pytest.mark.parametrize("flag", ["--strict", "--strict-parameters"])
def test_strict_merge_refuses_unused_parameters(
    flag: str, family: tuple[str, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, tuned = family
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(slerp_recipe(base, tuned[0], weight=True))
    code, lines = run_cli(["merge", str(recipe), str(tmp_path / "out"), "--quiet", flag], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert str(recipe) in lines[0] and f"model {tuned[0]}: weight" in lines[0] and "does not use" in lines[0]
    assert not (tmp_path / "out").exists()


def test_soup_strict_parameters_refuses_unused_parameters(
    family: tuple[str, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, tuned = family
    recipe = tmp_path / "soup.yml"
    recipe.write_text("merge_method: linear\nmodels:\n" + "".join(f"  - model: {t}\n    parameters: {{density: 0.5}}\n"
                                                              for t in tuned))
    code, lines = run_cli(["soup", str(recipe), str(tmp_path / "out"), "--quiet", "--strict-parameters"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "density" in lines[0] and "linear does not use" in lines[0]
    assert not (tmp_path / "out").exists()
    # soup's own --strict (the greedy rule) is a different flag: it does not refuse parameters.
    assert parse_recipe({"merge_method": "linear", "models": [{"model": "a", "parameters": {"density": 0.5}}]})


@pytest.mark.parametrize(
    ("recipe", "fragment"),
    [
        ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x", "parameters": {"weight": 1, "densty": 0.5}}]},
         "model x: unknown parameter 'densty' for ties; did you mean 'density'?"),
        ({"merge_method": "model_stock", "base_model": "b", "models": [{"model": "x"}, {"model": "y"}],
          "parameters": {"filter_wize": True}}, "unknown parameter 'filter_wize' for model_stock; did you mean 'filter_wise'?"),
        ({"merge_method": "slerp", "base_model": "b", "models": [{"model": "x"}], "parameters": {"t": 0.5, "tt": 1}},
         "unknown parameter 'tt' for slerp"),
        ({"merge_method": "linear", "models": [{"model": "x", "parameters": {"wieght": 1}}]}, "did you mean 'weight'?"),
    ],
)
def test_name_no_method_takes_is_refused_with_did_you_mean(recipe: dict, fragment: str) -> None:
    with pytest.raises(InvalidRecipe, match="^r.yml: ") as caught:
        parse_recipe(recipe, "r.yml")
    assert fragment in str(caught.value)


def test_method_wide_name_on_a_model_is_still_refused() -> None:
    with pytest.raises(InvalidRecipe, match="'normalize' is a method-wide parameter"):
        parse_recipe({"merge_method": "ties", "base_model": "b",
                      "models": [{"model": "x", "parameters": {"weight": 1, "normalize": True}}]})


def test_known_names_come_from_the_registry() -> None:
    expected: set[str] = set()
    for name in method_names():
        own, per_model = get_method(name).parameter_names()
        expected |= own | per_model
    assert known_parameter_names() == expected
    assert {"weight", "density", "epsilon", "gamma", "t", "select_topk", "max_iter", "lambda"} <= expected


@pytest.mark.parametrize(
    ("method", "models", "parameters"),
    [
        ("slerp", [{"weight": 0.6}], {"t": 0.5}),
        ("model_stock", [{"weight": 0.6}, {"weight": 0.4, "density": 0.5}], {"normalize": True}),
        ("nearswap", [{"weight": 0.6, "density": 0.7}], {"t": 0.001}),
        ("karcher", [{"weight": 0.6}, {"weight": 0.4}], {"rescale": True}),
        ("sce", [{"weight": 0.6}, {"weight": 0.4}], {"select_topk": 0.5, "t": 0.3}),
    ],
)
def test_api_ignores_unused_parameters_unless_strict(
    method: str, models: list[dict], parameters: dict, caplog: pytest.LogCaptureFixture
) -> None:
    generator = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(4, 6, generator=generator)}
    tuned = [{"w": base["w"] + 0.1 * torch.randn(4, 6, generator=generator)} for _ in models]
    own = set().union(*get_method(method).parameter_names())
    used = {k: v for k, v in parameters.items() if k in own}
    with caplog.at_level(logging.WARNING):
        merged, _ = modelstock.merge(method, tuned, base=base, parameters=parameters, model_parameters=models)
    assert any("unused by " + method in r.getMessage() for r in caplog.records), caplog.text
    reference, _ = modelstock.merge(method, tuned, base=base, parameters=used,
                                    model_parameters=[{k: v for k, v in m.items() if k in own} for m in models])
    assert torch.equal(merged["w"], reference["w"])
    with pytest.raises(InvalidRecipe, match="does not use this parameter"):
        modelstock.merge(method, tuned, base=base, parameters=parameters, model_parameters=models, strict_parameters=True)


def test_merge_recipe_in_memory_strict_and_empty_filters() -> None:
    states = {"a": {"a.weight": torch.ones(2, 2)}, "b": {"a.weight": torch.full((2, 2), 3.0)}}
    recipe = parse_recipe({"merge_method": "linear", "models": [{"model": "a"}, {"model": "b", "parameters": {"density": 1}}],
                           "parameters": {"t": 0.5}, "exclude": ["b.*"]}, "mem.yml")
    with pytest.raises(InvalidRecipe, match="^mem.yml: exclude pattern 'b.\\*' matches no tensor"):
        modelstock.merge_recipe_in_memory(recipe, states)
    merged, _ = modelstock.merge_recipe_in_memory(recipe, states, allow_empty_filter=True)
    assert torch.equal(merged["a.weight"], torch.full((2, 2), 2.0))
    with pytest.raises(InvalidRecipe, match="does not use"):
        modelstock.merge_recipe_in_memory(recipe, states, strict_parameters=True, allow_empty_filter=True)
