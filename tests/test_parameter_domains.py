"""Parameter values are validated where they enter (issue 19): every number finite and within the
method's declared domain (``modelstock.methods.base.Domain``), malformed values refused in words a
recipe's author reads, filters and include/exclude patterns that match nothing refused, pickle-only
models refused with how to convert. Each case runs through the real CLI in-process: exit 2, one
stderr line naming the recipe (and the model and parameter), no traceback, nothing at the output.
A hypothesis property feeds random finite and non-finite values to every registered method's
numeric parameters: each recipe validates or raises InvalidRecipe, never anything else.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import typing
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelstock.errors import InvalidRecipe
from modelstock.methods import get_method, method_names
from modelstock.methods.base import MergeMethod, recipe_name
from modelstock.parameters import required_names
from modelstock.recipe import parse_recipe
from modelstock.testing.synthetic import LlamaShape, write_family
from pipeline.cli import main

SHAPE = LlamaShape(hidden=16, intermediate=32, layers=2, vocab=32, heads=2, kv_heads=1)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    base, tuned = write_family(tmp_path_factory.mktemp("family"), SHAPE, finetunes=2, dtype=torch.float32, seed=5)
    return str(base), [str(t) for t in tuned]


def recipe_text(method: str, base: str, tuned: list[str], model_params: list[str] | None = None, extra: str = "") -> str:
    params = model_params or ["{}"] * len(tuned)
    models = "".join(f"  - model: {t}\n    parameters: {p}\n" for t, p in zip(tuned, params))
    return f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}{extra}"


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    return code, capsys.readouterr().err.splitlines()


def refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, *expect: str, extra: tuple[str, ...] = ()) -> str:
    """Run ``merge`` on a recipe; assert exit 2, one line naming the recipe and ``expect``, no output."""
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(text)
    out = tmp_path / "out"
    code, lines = run_cli(["merge", str(recipe), str(out), "--quiet", *extra], capsys)
    assert code == 2, lines
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("modelstock: error: ") and "Traceback" not in line, line
    for fragment in (*expect,):
        assert fragment in line, f"{fragment!r} not in {line!r}"
    for internal in ("function-after", ".bool:", "JSON compliant", "pydantic"):
        assert internal not in line, line
    assert not out.exists()
    return line


TIES = "{weight: 1.0, density: 0.5}"

# name -> (method, per-model parameters (second model TIES-like unless given), extra, expected fragments)
DOMAIN_CASES: dict[str, tuple[str, list[str], str, tuple[str, ...]]] = {
    "density_negative": ("ties", ["{weight: 1.0, density: -0.2}", TIES], "", ("parameter 'density'", "-0.2", "[0, 1]")),
    "density_empty_list": ("ties", ["{weight: 1.0, density: []}", TIES], "", ("parameter 'density'", "empty list")),
    "weight_nan": ("ties", ["{weight: .nan, density: 0.5}", TIES], "", ("parameter 'weight'", "not a finite number")),
    "weight_inf_in_gradient": ("ties", ["{weight: [0.5, .inf], density: 0.5}", TIES], "", ("'weight'", "inf")),
    "top_level_weight_nan": ("task_arithmetic", ["{}", "{}"], "parameters: {weight: .nan}\n", ("parameters", "'weight'")),
    "conditional_value_nan": ("ties", ["{weight: 1.0, density: [{filter: self_attn, value: .nan}, {value: 0.5}]}", TIES],
                              "", ("'density'", "nan")),
    "conditional_gradient_negative": ("ties", ["{weight: 1.0, density: [{filter: mlp, value: [0.5, -1]}, {value: 0.5}]}",
                                                TIES], "", ("'density'", "-1")),
    "della_epsilon_negative": ("della", ["{weight: 1.0, density: 0.5, epsilon: -0.1}", TIES], "", ("'epsilon'", "-0.1")),
    "della_epsilon_too_large": ("della", ["{weight: 1.0, density: 0.5, epsilon: 1.5}", TIES], "", ("'epsilon'", "1.5")),
    "della_density_plus_epsilon_out_of_range": ("della", ["{weight: 1.0, density: 0.2, epsilon: 0.3}", TIES], "",
                                                ("epsilon",)),
    "breadcrumbs_gamma_above_one": ("breadcrumbs", ["{weight: 1.0, density: 0.5, gamma: 1.5}", TIES], "", ("'gamma'",)),
    "karcher_max_iter_zero": ("karcher", ["{}", "{}"], "parameters: {max_iter: 0}\n", ("'max_iter'", "[1, inf)")),
    "karcher_max_iter_negative": ("karcher", ["{}", "{}"], "parameters: {max_iter: -3}\n", ("'max_iter'",)),
    "karcher_tol_zero": ("karcher", ["{}", "{}"], "parameters: {tol: 0}\n", ("'tol'", "(0, inf)")),
    "multislerp_eps_negative": ("multislerp", ["{weight: 1.0}", "{weight: 1.0}"], "parameters: {eps: -1.0e-8}\n", ("'eps'",)),
    "sce_select_topk_negative": ("sce", ["{}", "{}"], "parameters: {select_topk: -0.1}\n", ("'select_topk'",)),
    "slerp_t_nan": ("slerp", ["{}"], "parameters: {t: .nan}\n", ("'t'", "not a finite number")),
    "conditional_filter_not_a_string": ("slerp", ["{}"], "parameters: {t: [{filter: 3, value: 0.5}]}\n",
                                        ("parameters.t", "filter must be a string")),
    "conditional_entry_without_value": ("slerp", ["{}"], "parameters: {t: [{filter: mlp}, {value: 0.5}]}\n",
                                        ("parameters.t", "entry 0", "needs a value")),
    "conditional_entry_unknown_key": ("slerp", ["{}"], "parameters: {t: [{filter: mlp, valeu: 0.5}]}\n",
                                      ("entry 0", "unknown key 'valeu'")),
    "conditional_entry_not_a_mapping": ("slerp", ["{}"], "parameters: {t: [{filter: mlp, value: 0.3}, 0.5]}\n",
                                        ("entry 1", "0.5")),
    "conditional_value_boolean_for_float": ("slerp", ["{}"], "parameters: {t: [{filter: mlp, value: yes}, {value: 0.5}]}\n",
                                            ("'t'", "True")),
    "gradient_of_lists": ("slerp", ["{}"], "parameters: {t: [[0.1], 0.5]}\n", ("parameters.t", "gradient")),
    "typo_did_you_mean": ("ties", ["{weight: 1.0, densty: 0.5}", TIES], "", ("unknown parameter 'densty'",
                                                                             "did you mean 'density'")),
    "include_matches_nothing": ("ties", [TIES, TIES], "include: ['*.q_porj.*']\n", ("include", "q_porj", "matches no tensor")),
    "exclude_matches_nothing": ("ties", [TIES, TIES], "exclude: ['vision_tower.*']\n", ("exclude", "vision_tower")),
    "filter_matches_nothing": ("ties", ["{weight: 1.0, density: [{filter: self_atn, value: 0.4}, {value: 0.5}]}", TIES], "",
                               ("'density'", "self_atn", "matches no tensor")),
}


@pytest.mark.parametrize("name", sorted(DOMAIN_CASES))
def test_out_of_domain_value_is_refused_with_one_line(
    name: str, family: tuple[str, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str], ray_local: None
) -> None:
    method, params, extra, expect = DOMAIN_CASES[name]
    base, tuned = family
    text = recipe_text(method, base, tuned[: len(params)], params, extra)
    line = refused(tmp_path, capsys, text, *expect)
    assert "recipe.yml" in line  # the recipe file is named
    if params[0] != "{}" and not extra and "filter_matches" not in name and "epsilon_out" not in name:
        assert tuned[0] in line  # the model, where the value is per-model


def test_empty_filter_is_accepted_when_asked(
    family: tuple[str, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str], ray_local: None
) -> None:
    base, tuned = family
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(recipe_text("ties", base, tuned, [TIES, TIES], "exclude: ['vision_tower.*']\n"))
    code, lines = run_cli(["merge", str(recipe), str(tmp_path / "out"), "--quiet", "--allow-empty-filter"], capsys)
    assert code == 0, lines


def test_density_above_one_is_clamped_said_and_reported(
    family: tuple[str, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str], ray_local: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    base, tuned = family
    outputs = {}
    for label, density in (("clamped", 1.5), ("one", 1.0)):
        recipe = tmp_path / f"{label}.yml"
        params = [f"{{weight: 1.0, density: {density}}}", "{weight: 0.5, density: 0.5}"]
        recipe.write_text(recipe_text("ties", base, tuned, params))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            code, lines = run_cli(["merge", str(recipe), str(tmp_path / label), "--quiet"], capsys)
        assert code == 0, lines
        outputs[label] = [p.read_bytes() for p in sorted((tmp_path / label).glob("*.safetensors"))]
        report = json.loads((tmp_path / label / "modelstock-report.json").read_text())
        if label == "clamped":
            assert any("density 1.5 clamped to 1" in r.getMessage() for r in caplog.records), caplog.text
            assert report["summary"]["clamped_parameters"] == [f"model {tuned[0]}: density 1.5 clamped to 1 (as mergekit)"]
        else:
            assert report["summary"]["clamped_parameters"] == []
    assert outputs["clamped"] and outputs["clamped"] == outputs["one"]  # clamped means: merged as density 1


@pytest.mark.parametrize("files", [["pytorch_model.bin"], ["pytorch_model.bin.index.json"], ["model.pt", "config.json"]])
def test_pickle_only_model_is_refused_with_how_to_convert(
    files: list[str], family: tuple[str, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str], ray_local: None
) -> None:
    base, tuned = family
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    marker = tmp_path / "unpickled"
    for name in files:
        # A pickle that would create a file if it were ever loaded.
        payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR." if not name.endswith(".json") else b"{}"
        (pickled / name).write_bytes(payload)
    line = refused(tmp_path, capsys, recipe_text("ties", base, [tuned[0], str(pickled)], [TIES, TIES]),
                   str(pickled), "never unpickles", "torch.load", "weights_only=True", "safetensors")
    assert not marker.exists()
    assert "pickle" in line


# ----------------------------------------------------------------------------------------------
# Property: every registered method's numeric parameters, random values
# ----------------------------------------------------------------------------------------------


def _numeric_fields(kind: type) -> list[tuple[str, type]]:
    hints = typing.get_type_hints(kind)
    fields = []
    for f in dataclasses.fields(kind):
        hint = hints[f.name]
        options = typing.get_args(hint) or (hint,)
        number = next((o for o in options if o in (int, float)), None)
        if number is not None:
            fields.append((recipe_name(f), number))
    return fields


def _skeleton(method: MergeMethod[typing.Any, typing.Any]) -> dict[str, typing.Any]:
    """A recipe for ``method`` with its required parameters set to valid values."""
    count = max(method.min_models, 2) if method.max_models is None else method.max_models
    model_required = dict.fromkeys(required_names(method.model_parameters), 0.5)
    top_required = dict.fromkeys(required_names(method.parameters), 0.5)
    return {
        "merge_method": method.name,
        **({"base_model": "base"} if method.uses_base else {}),
        "models": [{"model": f"m{i}", "parameters": dict(model_required)} for i in range(count)],
        "parameters": top_required,
    }


SLOTS = [(name, scope, parameter, number)
         for name in method_names()
         for scope, kind in (("method", get_method(name).parameters), ("model", get_method(name).model_parameters))
         for parameter, number in _numeric_fields(kind)]


def test_every_method_has_a_valid_skeleton_and_numeric_slots() -> None:
    for name in method_names():
        recipe = parse_recipe(_skeleton(get_method(name)))
        recipe.tensor_parameters("model.layers.0.self_attn.q_proj.weight", 0.5)
    assert {"karcher", "della", "ties", "multislerp", "sce"} <= {s[0] for s in SLOTS}


values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-10**6, max_value=10**6),
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=4),
    st.builds(lambda f, v: [{"filter": f, "value": v}, {"value": 0.5}], st.sampled_from(["self_attn", "*", "mlp"]),
              st.floats(allow_nan=True, allow_infinity=True)),
)


@settings(max_examples=300, deadline=None)
@given(slot=st.sampled_from(SLOTS), value=values, per_model=st.booleans())
def test_random_values_validate_or_are_refused_as_invalid_recipes(slot, value, per_model: bool) -> None:
    name, scope, parameter, _ = slot
    method = get_method(name)
    data = _skeleton(method)
    if scope == "model" and per_model:
        data["models"][0]["parameters"][parameter] = value
    else:
        data["parameters"][parameter] = value
    try:
        recipe = parse_recipe(data, "prop.yml")
        for t in (0.0, 0.5, 1.0):
            for tensor in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"):
                params = recipe.tensor_parameters(tensor, t)
                if method.validate is not None:
                    method.validate(params, tensor)
                for p in (params.method, *params.models):
                    for f in dataclasses.fields(p):
                        v = getattr(p, f.name)
                        assert not isinstance(v, float) or math.isfinite(v)
    except InvalidRecipe as exc:
        assert "Traceback" not in str(exc) and "function-after" not in str(exc)
