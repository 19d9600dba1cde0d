"""Greedy soup rule (pure), and the greedy soup / Ratatouille runner on Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from modelstock.errors import InvalidRecipe
from modelstock.evaluation.builders import BUILDER_KEY, ReferenceCNN
from modelstock.evaluation.datasets import DatasetSpec, EvalSuite, write_pixels_parquet
from modelstock.evaluation.soup import greedy_soup
from modelstock.recipe import parse_recipe
from pipeline.cli import main
from pipeline.soup import SOUP_FILE, SoupRequest, run_soup


def scorer(table: dict[frozenset, float], calls: list[list[str]]):
    def score(ingredients):
        calls.append(list(ingredients))
        return table[frozenset(ingredients)]
    return score


def test_greedy_orders_by_held_out_and_accepts_only_non_decreasing() -> None:
    held_out = {"a": 0.70, "b": 0.80, "c": 0.75, "d": 0.60}
    soups = {
        frozenset("bc"): 0.82,   # accepted: 0.82 >= 0.80
        frozenset("bca"): 0.81,  # rejected: 0.81 < 0.82
        frozenset("bcd"): 0.83,  # accepted
    }
    calls: list[list[str]] = []
    result = greedy_soup(list("abcd"), held_out, scorer(soups, calls))
    assert calls == [["b", "c"], ["b", "c", "a"], ["b", "c", "d"]]
    assert result.accepted == ["b", "c", "d"]
    assert [(s.candidate, s.score, s.accepted, s.best_before) for s in result.steps] == [
        ("b", 0.80, True, None), ("c", 0.82, True, 0.80), ("a", 0.81, False, 0.82), ("d", 0.83, True, 0.82),
    ]
    assert result.score == 0.83


def test_ties_are_accepted_with_ge_and_rejected_when_strict() -> None:
    held_out = {"x": 0.9, "y": 0.8, "z": 0.7}
    soups = {frozenset("xy"): 0.9, frozenset("xyz"): 0.9, frozenset("xz"): 0.9}
    assert greedy_soup(["z", "y", "x"], held_out, scorer(soups, [])).accepted == ["x", "y", "z"]
    calls: list[list[str]] = []
    strict = greedy_soup(["z", "y", "x"], held_out, scorer(soups, calls), strict=True)
    assert strict.accepted == ["x"]
    assert calls == [["x", "y"], ["x", "z"]]  # a rejected ingredient never enters later soups
    assert [s.accepted for s in strict.steps] == [True, False, False]


def test_single_ingredient_and_stable_order_on_equal_held_out() -> None:
    assert greedy_soup(["only"], {"only": 0.5}, lambda _: pytest.fail("no soup to score")).accepted == ["only"]
    calls: list[list[str]] = []
    greedy_soup(["p", "q", "r"], {"p": 0.5, "q": 0.5, "r": 0.5}, scorer({frozenset("pq"): 0.4, frozenset("pr"): 0.4}, calls))
    assert calls == [["p", "q"], ["p", "r"]]
    with pytest.raises(ValueError):
        greedy_soup([], {}, lambda _: 0.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=6), st.data(), st.booleans())
def test_greedy_invariants(individual: list[float], data, strict: bool) -> None:
    names = [f"m{i}" for i in range(len(individual))]
    held_out = dict(zip(names, individual))
    cache: dict[frozenset, float] = {}

    def score(ingredients):
        key = frozenset(ingredients)
        if key not in cache:
            cache[key] = data.draw(st.floats(0, 1))
        return cache[key]

    result = greedy_soup(names, held_out, score, strict=strict)
    order = sorted(names, key=lambda n: -held_out[n])
    assert result.accepted[0] == order[0]
    assert [s.candidate for s in result.steps] == order
    assert result.accepted == [s.candidate for s in result.steps if s.accepted]
    kept_scores = [s.score for s in result.steps if s.accepted]
    assert all((b > a) if strict else (b >= a) for a, b in zip(kept_scores, kept_scores[1:]))
    for step in result.steps[1:]:
        assert step.accepted == ((step.score > step.best_before) if strict else (step.score >= step.best_before))


def test_lower_is_better_mirrors_the_rule_for_perplexity() -> None:
    held_out = {"a": 30.0, "b": 20.0, "c": 25.0, "d": 40.0}  # held-out perplexities
    soups = {frozenset("bc"): 19.0, frozenset("bca"): 19.5, frozenset("bcd"): 19.0}
    calls: list[list[str]] = []
    result = greedy_soup(list("abcd"), held_out, scorer(soups, calls), higher_is_better=False)
    assert calls == [["b", "c"], ["b", "c", "a"], ["b", "c", "d"]]
    assert result.accepted == ["b", "c", "d"] and result.score == 19.0  # a tie is kept (the paper's >=)
    strict = greedy_soup(list("abcd"), held_out, scorer(soups, []), strict=True, higher_is_better=False)
    assert strict.accepted == ["b", "c"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 100), min_size=1, max_size=6), st.data(), st.booleans())
def test_lower_is_better_equals_the_rule_on_negated_scores(individual: list[float], data, strict: bool) -> None:
    names = [f"m{i}" for i in range(len(individual))]
    cache: dict[frozenset, float] = {}

    def score(ingredients):
        key = frozenset(ingredients)
        if key not in cache:
            cache[key] = data.draw(st.floats(0, 100))
        return cache[key]

    lower = greedy_soup(names, dict(zip(names, individual)), score, strict=strict, higher_is_better=False)
    higher = greedy_soup(names, {n: -v for n, v in zip(names, individual)}, lambda ings: -score(ings), strict=strict)
    assert lower.accepted == higher.accepted and lower.score == -higher.score


# --- the runner on Ray ---------------------------------------------------------------------

def save_cnn(folder: Path, state: dict[str, torch.Tensor]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({BUILDER_KEY: "reference-cnn", "width": 4}))
    return str(folder)


def accuracy_of(state: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor) -> float:
    model = ReferenceCNN(width=4)
    model.load_state_dict(state)
    with torch.no_grad():
        return float((model.eval()(images).argmax(1) == labels).float().mean())


def test_greedy_soup_runner_matches_an_in_process_replay(tmp_path: Path, ray_local) -> None:
    torch.manual_seed(0)
    base = ReferenceCNN(width=4).state_dict()
    generator = torch.Generator().manual_seed(1)
    states = {f"ft-{i}": {k: v + (0.05 + 0.1 * i) * torch.randn(v.shape, generator=generator) for k, v in base.items()}
              for i in range(4)}
    urls = {name: save_cnn(tmp_path / name, state) for name, state in states.items()}
    images = torch.rand(160, 1, 8, 8, generator=generator)
    # Labels the base model mostly predicts, so perturbations change accuracy in both directions.
    reference = ReferenceCNN(width=4)
    reference.load_state_dict(base)
    with torch.no_grad():
        labels = reference.eval()(images).argmax(1)
    labels[::3] = torch.randint(0, 10, labels[::3].shape, generator=generator)
    write_pixels_parquet(str(tmp_path / "val" / "p.parquet"), images, labels, rows_per_group=40)
    write_pixels_parquet(str(tmp_path / "test" / "p.parquet"), images[:80], labels[:80], rows_per_group=40)
    suite = EvalSuite(id=DatasetSpec(name="test", url=str(tmp_path / "test")),
                      held_out=DatasetSpec(name="val", url=str(tmp_path / "val")), rows_per_shard=40)
    recipe = parse_recipe({"merge_method": "linear", "models": [{"model": u, "init": "w0"} for u in urls.values()]})
    result = run_soup(SoupRequest(recipe=recipe, out_url=str(tmp_path / "soup"), greedy=True, suite=suite, progress=False))

    # Replay the rule in process with an independent scorer.
    held = {u: accuracy_of(states[n], images, labels) for n, u in urls.items()}
    by_url = {u: states[n] for n, u in urls.items()}

    def average(ingredients):
        return {k: sum(by_url[u][k] for u in ingredients) / len(ingredients) for k in base}

    replay = greedy_soup(list(urls.values()), held, lambda ings: accuracy_of(average(ings), images, labels))
    assert result.accepted == replay.accepted
    assert [s.score for s in result.greedy.steps] == pytest.approx([s.score for s in replay.steps], abs=1e-9)
    merged = load_file(next((tmp_path / "soup").glob("model-*.safetensors")))
    expected = average(result.accepted)
    assert all(torch.allclose(merged[k], expected[k], atol=1e-6) for k in base)
    record = json.loads((tmp_path / "soup" / SOUP_FILE).read_text())
    manifest = json.loads((tmp_path / "soup" / "modelstock-manifest.json").read_text())
    assert SOUP_FILE in manifest["files"]  # written before the manifest, and checksummed by it
    assert record["kind"] == "greedy" and record["strict"] is False and record["selection_set"] == "val"
    assert [a["model"] for a in record["accepted"]] == result.accepted
    assert len(record["steps"]) == 4 and record["ratatouille"] is False

    # The CLI: the same selection with --strict, then the soup's ID table.
    suite_path = tmp_path / "suite.yml"
    suite_path.write_text(yaml.safe_dump(suite.model_dump(mode="json", exclude_none=True)))
    recipe_path = tmp_path / "soup.yml"
    recipe_path.write_text(recipe.to_yaml())
    assert main(["soup", str(recipe_path), str(tmp_path / "strict"), "--greedy", "--strict",
                 "--eval", str(suite_path), "--quiet"]) == 0
    strict_record = json.loads((tmp_path / "strict" / SOUP_FILE).read_text())
    strict_replay = greedy_soup(list(urls.values()), held, lambda ings: accuracy_of(average(ings), images, labels), strict=True)
    assert strict_record["strict"] is True
    assert [a["model"] for a in strict_record["accepted"]] == strict_replay.accepted
    assert (tmp_path / "strict" / "eval" / "eval.json").exists()


def test_ratatouille_records_each_ingredients_init(tmp_path: Path, ray_local) -> None:
    states = []
    for seed in range(3):
        torch.manual_seed(seed)
        states.append(ReferenceCNN(width=4).state_dict())
    urls = [save_cnn(tmp_path / f"ft-{i}", s) for i, s in enumerate(states)]
    recipe_path = tmp_path / "ratatouille.yml"
    recipe_path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": urls[0], "init": "aux-task-a"}, {"model": urls[1], "init": "aux-task-b"},
        {"model": urls[2], "init": "aux-task-c"},
    ]}))
    assert main(["soup", str(recipe_path), str(tmp_path / "out"), "--quiet"]) == 0
    record = json.loads((tmp_path / "out" / SOUP_FILE).read_text())
    assert record["kind"] == "uniform" and record["ratatouille"] is True
    assert [i["init"] for i in record["ingredients"]] == ["aux-task-a", "aux-task-b", "aux-task-c"]
    written_recipe = yaml.safe_load((tmp_path / "out" / "modelstock-recipe.yml").read_text())
    assert [m["init"] for m in written_recipe["models"]] == ["aux-task-a", "aux-task-b", "aux-task-c"]
    merged = load_file(next((tmp_path / "out").glob("model-*.safetensors")))
    assert torch.allclose(merged["head.weight"], sum(s["head.weight"] for s in states) / 3, atol=1e-6)
    # --greedy needs a suite; a non-linear recipe is refused.
    assert main(["soup", str(recipe_path), str(tmp_path / "g"), "--greedy", "--quiet"]) == 2
    with pytest.raises(InvalidRecipe, match="linear"):
        run_soup(SoupRequest(recipe=parse_recipe({"merge_method": "model_stock", "base_model": urls[0],
                                                  "models": [{"model": urls[1]}, {"model": urls[2]}]}),
                             out_url=str(tmp_path / "x")))
