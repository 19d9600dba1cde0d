"""Recipes: mergekit's YAML schema for the methods we support, validated once at the edge."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from modelstock.errors import InvalidRecipe
from modelstock.methods.linear import LinearModelParameters, LinearParameters
from modelstock.methods.model_stock import ModelStockParameters
from modelstock.recipe import MergeRecipe, load_recipe, parse_recipe

MODEL_STOCK_YAML = """\
models:
  - model: s3://bucket/ft-1
  - model: s3://bucket/ft-2
  - model: /local/ft-3
merge_method: model_stock
base_model: s3://bucket/base
parameters:
  filter_wise: true
dtype: bfloat16
"""

LINEAR_YAML = """\
merge_method: linear
models:
  - model: hf://org/ft-a
    parameters:
      weight:
        - filter: self_attn
          value: 0.3
        - filter: mlp
          value: 2
        - value: 0.7
  - model: hf://org/ft-b
    parameters:
      weight: 1.5
  - model: hf://org/ft-c
parameters:
  normalize: false
  weight: 0.25
out_dtype: float32
dtype: float16
"""


def write(tmp_path: Path, text: str, name: str = "recipe.yml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_mergekit_accepts_our_examples() -> None:
    """The YAML we accept is mergekit's schema (checked with mergekit's own validator)."""
    from mergekit.config import MergeConfiguration

    for text in (MODEL_STOCK_YAML, LINEAR_YAML):
        MergeConfiguration.model_validate(yaml.safe_load(text))


def test_model_stock_recipe(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, MODEL_STOCK_YAML))
    assert isinstance(recipe, MergeRecipe)
    assert recipe.merge_method == "model_stock" and recipe.method.name == "model_stock"
    assert recipe.base_model == "s3://bucket/base"
    assert recipe.model_urls == ["s3://bucket/ft-1", "s3://bucket/ft-2", "/local/ft-3"]
    assert recipe.output_dtype == "BF16"
    params = recipe.tensor_parameters("model.layers.0.mlp.up_proj.weight")
    assert params.method == ModelStockParameters(filter_wise=True, clamp_t=False)
    assert len(params.models) == 3


def test_model_stock_defaults(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "merge_method: model_stock\nbase_model: b\nmodels: [{model: x}, {model: y}]\n"))
    assert recipe.tensor_parameters("w").method == ModelStockParameters(filter_wise=False, clamp_t=False)
    assert recipe.output_dtype is None  # the base model's dtype, decided from its header


def test_linear_recipe_with_conditional_weights(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, LINEAR_YAML))
    assert recipe.base_model is None
    assert recipe.output_dtype == "F32"  # out_dtype wins over dtype
    attention = recipe.tensor_parameters("model.layers.3.self_attn.q_proj.weight")
    assert attention.method == LinearParameters(normalize=False)
    # Per model: its own value (first matching filter), else the top-level one, else the default.
    assert [p.weight for p in attention.models] == [0.3, 1.5, 0.25]
    mlp = recipe.tensor_parameters("model.layers.3.mlp.down_proj.weight")
    assert [p.weight for p in mlp.models] == [2.0, 1.5, 0.25]
    assert all(isinstance(p, LinearModelParameters) for p in mlp.models)
    other = recipe.tensor_parameters("model.norm.weight")
    assert [p.weight for p in other.models] == [0.7, 1.5, 0.25]


def test_conditional_list_without_a_match_falls_back_to_the_default(tmp_path: Path) -> None:
    text = """\
    merge_method: linear
    models:
      - model: a
        parameters:
          weight: [{filter: self_attn, value: 3.0}]
      - model: b
    """
    recipe = load_recipe(write(tmp_path, text))
    assert [p.weight for p in recipe.tensor_parameters("mlp.weight").models] == [1.0, 1.0]
    assert [p.weight for p in recipe.tensor_parameters("self_attn.weight").models] == [3.0, 1.0]


def test_dtype_alone_sets_the_output_dtype(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "merge_method: linear\nmodels: [{model: a}, {model: b}]\ndtype: float16\n"))
    assert recipe.output_dtype == "F16"


def test_include_exclude(tmp_path: Path) -> None:
    text = "merge_method: linear\nmodels: [{model: a}, {model: b}]\nexclude: ['*.embed_tokens.*']\n"
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.is_excluded("model.embed_tokens.weight")
    assert not recipe.is_excluded("model.layers.0.mlp.up_proj.weight")


def test_recipe_hash_is_stable_and_content_sensitive(tmp_path: Path) -> None:
    first = load_recipe(write(tmp_path, MODEL_STOCK_YAML, "a.yml"))
    reordered = load_recipe(write(tmp_path, MODEL_STOCK_YAML.replace("dtype: bfloat16\n", "").replace(
        "merge_method", "dtype: bfloat16\nmerge_method"), "b.yml"))
    changed = load_recipe(write(tmp_path, MODEL_STOCK_YAML.replace("filter_wise: true", "filter_wise: false"), "c.yml"))
    assert first.sha256() == reordered.sha256()
    assert first.sha256() != changed.sha256()
    assert load_recipe(write(tmp_path, first.to_yaml(), "round.yml")) == first


# ----------------------------------------------------------------------------- refusals

BAD_RECIPES: dict[str, tuple[str, str]] = {
    # case: (YAML, pattern the single-line message must contain after the file name)
    "bad_yaml": ("merge_method: model_stock\nmodels: [\n  - model: a\n", r"invalid YAML"),
    "bad_yaml_tab_indent": ("merge_method: linear\nmodels:\n\t- model: a\n", r"invalid YAML"),
    "not_a_mapping": ("- model: a\n- model: b\n", r"mapping"),
    "empty_file": ("", r"mapping"),
    "unknown_top_level_key": (
        "merge_method: linear\nmodels: [{model: a}, {model: b}]\nmodules: {}\n", r"modules.*unknown key"
    ),
    "models_and_slices": (
        "merge_method: linear\nmodels: [{model: a}]\nslices: [{sources: [{model: a, layer_range: [0, 2]}]}]\n",
        r"either models or slices",
    ),
    "slice_sources_of_different_lengths": (
        "merge_method: linear\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 4]}\n"
        "      - {model: b, layer_range: [0, 3]}\n",
        r"same number of layers",
    ),
    "empty_layer_range": (
        "merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [3, 3]}]}]\n", r"layer_range"
    ),
    "gradient_of_strings_for_a_number": (
        "merge_method: slerp\nbase_model: a\nmodels: [{model: b}]\nparameters: {t: [0, high, 1]}\n", r"'high'"
    ),
    "unknown_model_key": (
        "merge_method: linear\nmodels: [{model: a, lora: x}, {model: b}]\n", r"lora.*unknown key"
    ),
    "unknown_method": ("merge_method: frankenmerge\nmodels: [{model: a}, {model: b}]\n", r"unknown merge_method 'frankenmerge'"),
    "missing_method": ("models: [{model: a}, {model: b}]\n", r"merge_method"),
    "no_models": ("merge_method: linear\nmodels: []\n", r"models"),
    "filter_wise_string": (
        "merge_method: model_stock\nbase_model: b\nmodels: [{model: x}, {model: y}]\nparameters:\n  filter_wise: \"yes\"\n",
        r"filter_wise.*'yes'",
    ),
    "filter_wise_number": (
        "merge_method: model_stock\nbase_model: b\nmodels: [{model: x}, {model: y}]\nparameters:\n  filter_wise: 1\n",
        r"filter_wise",
    ),
    "weight_string": (
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: heavy}\n  - model: b\n",
        r"model a: parameter 'weight'.*'heavy'",
    ),
    "weight_string_in_condition": (
        "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n"
        "      weight: [{filter: mlp, value: lots}]\n  - model: b\n",
        r"weight.*'lots'",
    ),
    "unknown_parameter": (
        "merge_method: model_stock\nbase_model: b\nmodels: [{model: x}, {model: y}]\nparameters: {densty: 0.5}\n",
        r"unknown parameter 'densty'",
    ),
    "method_parameter_on_a_model": (
        "merge_method: model_stock\nbase_model: b\nmodels:\n  - model: x\n    parameters: {filter_wise: true}\n  - model: y\n",
        r"model x: 'filter_wise' is a method-wide parameter",
    ),
    "one_finetune_for_model_stock": (
        "merge_method: model_stock\nbase_model: b\nmodels: [{model: x}]\n", r"at least 2 models"
    ),
    "model_stock_without_base": ("merge_method: model_stock\nmodels: [{model: x}, {model: y}]\n", r"needs base_model"),
    "base_among_models": (
        "merge_method: model_stock\nbase_model: s3://b/base\nmodels: [{model: s3://b/base/}, {model: x}, {model: y}]\n",
        r"base_model s3://b/base is also listed among the models",
    ),
    "model_listed_twice": (
        "merge_method: linear\nmodels: [{model: s3://b/x}, {model: s3://b/x/}]\n", r"model s3://b/x is listed twice"
    ),
    "unknown_dtype": ("merge_method: linear\nmodels: [{model: a}, {model: b}]\ndtype: float12\n", r"unknown dtype 'float12'"),
    "unknown_out_dtype": ("merge_method: linear\nmodels: [{model: a}, {model: b}]\nout_dtype: int8\n", r"out_dtype.*int8"),
    "empty_model_name": ("merge_method: linear\nmodels: [{model: ''}, {model: b}]\n", r"model"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe_is_refused_naming_the_file(tmp_path: Path, case: str) -> None:
    text, pattern = BAD_RECIPES[case]
    path = tmp_path / f"{case}.yml"
    path.write_text(text)
    with pytest.raises(InvalidRecipe, match=pattern) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message, message


def test_missing_recipe_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yml"
    with pytest.raises(InvalidRecipe, match=r"not found") as caught:
        load_recipe(path)
    assert str(path) in str(caught.value)


def test_yes_is_a_yaml_boolean_but_quoted_yes_is_not(tmp_path: Path) -> None:
    base = "merge_method: model_stock\nbase_model: b\nmodels: [{model: x}, {model: y}]\nparameters:\n  filter_wise: "
    assert load_recipe(write(tmp_path, base + "yes\n", "a.yml")).tensor_parameters("w").method.filter_wise is True
    with pytest.raises(InvalidRecipe):
        load_recipe(write(tmp_path, base + "'yes'\n", "b.yml"))


def test_parse_recipe_names_its_source() -> None:
    with pytest.raises(InvalidRecipe, match=r"^my-source: .*unknown merge_method"):
        parse_recipe({"merge_method": "nope", "models": [{"model": "a"}]}, source="my-source")
    weights_as_ints = parse_recipe(
        {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 2}}, {"model": "b"}]}
    )
    assert [p.weight for p in weights_as_ints.tensor_parameters("w").models] == [2.0, 1.0]


@pytest.mark.parametrize("method, parameters", [("ties", "{weight: 1.0, density: 0.5}"), ("task_arithmetic", "{weight: 1.0}")])
def test_base_among_models_is_skipped_as_mergekit_does(tmp_path: Path, method: str, parameters: str) -> None:
    path = tmp_path / "recipe.yml"
    path.write_text(
        f"merge_method: {method}\nbase_model: s3://b/base\nmodels:\n  - model: s3://b/base\n"
        f"  - model: s3://b/x\n    parameters: {parameters}\n"
    )
    assert load_recipe(path).model_urls == ["s3://b/x"]


def test_slerp_in_mergekit_form_lists_base_and_one_model(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yml"
    path.write_text("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\nparameters: {t: 0.3}\n")
    assert load_recipe(path).model_urls == ["b"]


# ----------------------------------------------------------------------------- gradients, scopes, slices

GRADIENT_SLERP = """\
slices:
  - sources:
      - {model: a, layer_range: [0, 5]}
      - {model: b, layer_range: [0, 5]}
merge_method: slerp
base_model: a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""


def test_gradient_values_interpolate_over_the_layer_position(tmp_path: Path) -> None:
    """mergekit's rule: anchors evenly spaced over t in [0, 1], linear in between."""
    from mergekit.config import MergeConfiguration

    MergeConfiguration.model_validate(yaml.safe_load(GRADIENT_SLERP))  # the canonical recipe is mergekit's
    recipe = load_recipe(write(tmp_path, GRADIENT_SLERP))
    spec = recipe.slice_specs()[0]
    assert spec.models == ("b",) and spec.base_model == "a"

    def t_at(name: str, t: float) -> float:
        return recipe.tensor_parameters(name, t, spec).method.t

    assert t_at("model.layers.0.self_attn.q_proj.weight", 0.0) == 0.0
    assert t_at("model.layers.1.self_attn.q_proj.weight", 0.25) == pytest.approx(0.5)
    assert t_at("model.layers.2.self_attn.q_proj.weight", 0.5) == pytest.approx(0.3)
    assert t_at("model.layers.2.self_attn.q_proj.weight", 0.375) == pytest.approx(0.5 * 0.5 + 0.5 * 0.3)
    assert t_at("model.layers.4.mlp.up_proj.weight", 1.0) == pytest.approx(0.0)
    assert t_at("model.layers.1.mlp.up_proj.weight", 0.25) == pytest.approx(0.5)
    assert t_at("model.norm.weight", 0.0) == 0.5


def test_a_value_that_does_not_apply_passes_to_the_next_scope(tmp_path: Path) -> None:
    """As mergekit: a model's conditional list with no matching filter falls back to the top level."""
    text = """\
    merge_method: linear
    models:
      - model: a
        parameters:
          weight: [{filter: self_attn, value: 3.0}]
      - model: b
    parameters:
      weight: 0.5
    """
    recipe = load_recipe(write(tmp_path, text))
    assert [p.weight for p in recipe.tensor_parameters("mlp.weight").models] == [0.5, 0.5]
    assert [p.weight for p in recipe.tensor_parameters("self_attn.weight").models] == [3.0, 0.5]


def test_slice_parameters_sit_between_the_model_and_the_top_level(tmp_path: Path) -> None:
    text = """\
    merge_method: linear
    slices:
      - sources:
          - {model: a, layer_range: [0, 2], parameters: {weight: 2.0}}
          - {model: b, layer_range: [0, 2]}
        parameters: {weight: 0.25}
      - sources:
          - {model: a, layer_range: [2, 4]}
          - {model: b, layer_range: [2, 4]}
    parameters: {weight: 1.5, normalize: false}
    """
    recipe = load_recipe(write(tmp_path, text))
    first, second = recipe.slice_specs()
    assert [p.weight for p in recipe.tensor_parameters("w", 0.0, first).models] == [2.0, 0.25]
    assert [p.weight for p in recipe.tensor_parameters("w", 0.0, second).models] == [1.5, 1.5]
    assert recipe.model_urls == ["a", "b"] and first.first_layers == (0, 0) and second.first_layers == (2, 2)


def test_a_gradient_keeps_boolean_anchors_discrete(tmp_path: Path) -> None:
    text = ("merge_method: model_stock\nbase_model: b\nmodels: [{model: x}, {model: y}]\n"
            "parameters: {filter_wise: [false, true]}\n")
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.tensor_parameters("w", 0.4).method.filter_wise is False
    assert recipe.tensor_parameters("w", 1.0).method.filter_wise is True
