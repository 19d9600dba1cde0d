"""Uniform and greedy soups, and Ratatouille, on Ray.

The ingredients come from a ``linear`` recipe (mergekit schema). Each entry may say which
initialisation it was fine-tuned from (``init:``); ingredients from several inits make a
Ratatouille, which needs no shared base model. A greedy soup scores each candidate soup on the
suite's held-out set with the Ray evaluator (candidate soups are averaged in the workers' memory,
never written), then the accepted ingredients are merged by the ordinary pipeline (``run_merge``).
``modelstock-soup.json`` beside the merge records the ingredients, their inits and every step.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from modelstock.errors import InvalidRecipe
from modelstock.evaluation.datasets import EvalSuite
from modelstock.evaluation.scoring import ModelSource
from modelstock.evaluation.soup import GreedySoupResult, greedy_soup
from modelstock.recipe import MergeRecipe
from pipeline.driver import MergeRequest, MergeResult, run_merge
from pipeline.evaluate import RayEvaluator

log = logging.getLogger(__name__)

SOUP_FILE = "modelstock-soup.json"


@dataclass(frozen=True)
class SoupRequest:
    recipe: MergeRecipe
    out_url: str
    greedy: bool = False
    strict: bool = False
    suite: EvalSuite | None = None
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    workers: int | None = None
    progress: bool = True


@dataclass(frozen=True)
class SoupResult:
    out_url: str
    accepted: list[str]
    held_out: dict[str, float]
    greedy: GreedySoupResult[str] | None
    merge: MergeResult


def check_soup_recipe(recipe: MergeRecipe, greedy: bool, suite: EvalSuite | None) -> None:
    if recipe.merge_method != "linear":
        raise InvalidRecipe(f"a soup recipe uses merge_method: linear, got {recipe.merge_method}")
    if greedy and suite is None:
        raise InvalidRecipe("--greedy needs an eval suite (--eval SUITE.yml) to score candidate soups")
    if greedy and any("weight" in entry.parameters for entry in recipe.models):
        raise InvalidRecipe("a greedy soup is a uniform average: per-model weights are not allowed")


def select_greedy(recipe: MergeRecipe, suite: EvalSuite, evaluator: RayEvaluator, strict: bool) -> tuple[GreedySoupResult[str], dict[str, float]]:
    """Held-out accuracy of every ingredient, then the greedy rule with the evaluator in the loop."""
    urls = recipe.model_urls
    held_out = evaluator.selection_accuracy([ModelSource(url, (url,)) for url in urls], suite)
    log.info("greedy soup: selecting on %s", suite.selection_set.name)

    def score_soup(ingredients: list[str]) -> float:
        name = f"soup-of-{len(ingredients)}"
        return evaluator.selection_accuracy([ModelSource(name, tuple(ingredients))], suite)[name]

    return greedy_soup(urls, held_out, score_soup, strict=strict), held_out


def soup_record(recipe: MergeRecipe, request: SoupRequest, accepted: list[str], held_out: Mapping[str, float],
                result: GreedySoupResult[str] | None) -> dict[str, Any]:
    inits = {entry.model: entry.init for entry in recipe.models}
    return {
        "kind": "greedy" if request.greedy else "uniform",
        "strict": request.strict if request.greedy else None,
        "ratatouille": len({init for init in inits.values()}) > 1,
        "selection_set": request.suite.selection_set.name if request.suite and request.greedy else None,
        "ingredients": [
            {"model": url, "init": inits[url], "held_out_accuracy": held_out.get(url)} for url in recipe.model_urls
        ],
        "accepted": [{"model": url, "init": inits[url]} for url in accepted],
        "steps": [
            {"candidate": step.candidate, "init": inits[step.candidate], "score": step.score,
             "best_before": step.best_before, "accepted": step.accepted}
            for step in (result.steps if result else [])
        ],
    }


def run_soup(request: SoupRequest, evaluator: RayEvaluator | None = None) -> SoupResult:
    """Select (greedy) or take all (uniform) ingredients, merge them, record the soup."""
    recipe = request.recipe
    check_soup_recipe(recipe, request.greedy, request.suite)
    held_out: dict[str, float] = {}
    result: GreedySoupResult[str] | None = None
    accepted = recipe.model_urls
    if request.greedy:
        assert request.suite is not None
        if evaluator is None:
            with RayEvaluator(request.storage_options, request.workers, request.suite.batch_size, request.progress) as own:
                result, held_out = select_greedy(recipe, request.suite, own, request.strict)
        else:
            result, held_out = select_greedy(recipe, request.suite, evaluator, request.strict)
            evaluator.release()  # the merge tasks below need the CPUs/GPUs the actors hold
        accepted = result.accepted
        log.info("greedy soup: kept %d of %d ingredients", len(accepted), len(recipe.models))
    by_url = {entry.model: entry for entry in recipe.models}
    soup = recipe.model_copy(update={"models": [by_url[url] for url in accepted], "base_model": None})
    record = soup_record(recipe, request, accepted, held_out, result)
    merged = run_merge(MergeRequest(
        recipe=soup, out_url=request.out_url, storage_options=request.storage_options,
        overwrite=request.overwrite, workers=request.workers, progress=request.progress,
        extra_files={SOUP_FILE: (json.dumps(record, indent=1) + "\n").encode()},  # before the manifest
    ))
    return SoupResult(merged.out_url, accepted, held_out, result, merged)
