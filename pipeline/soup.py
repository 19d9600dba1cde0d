"""Uniform and greedy soups, and Ratatouille, on Ray.

The ingredients come from a ``linear`` recipe (mergekit schema). Each entry may say which
initialisation it was fine-tuned from (``init:``); ingredients from several inits make a
Ratatouille, which needs no shared base model. A greedy soup scores each candidate soup on the
suite's held-out set with the Ray evaluator, then the accepted ingredients are merged by the
ordinary pipeline (``run_merge``). ``modelstock-soup.json`` beside the merge records the
ingredients, their inits and every step.

Selection is on held-out accuracy (image classifiers, multiple-choice sets: higher is better) or
perplexity (language-model text sets: lower is better). A candidate soup is averaged in an
actor's memory when the actor can hold it with its ingredients (``modelstock.evaluation.sizing``);
a language-model soup too large for that is merged on the cluster to a scratch folder under the
output's state folder, evaluated from there like any checkpoint, and removed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from modelstock import storage
from modelstock.errors import InvalidRecipe
from modelstock.evaluation.datasets import AnySuite, TextSuite
from modelstock.evaluation.scoring import ModelSource
from modelstock.evaluation.soup import GreedySoupResult, greedy_soup
from modelstock.recipe import MergeRecipe, ModelEntry, check_strict_parameters
from pipeline.driver import MergeRequest, MergeResult, run_merge
from pipeline.evaluate import RayEvaluator

log = logging.getLogger(__name__)

SOUP_FILE = "modelstock-soup.json"
SCRATCH_DIR = ".modelstock/scratch"  # under the output's state folder: never taken for output content


@dataclass(frozen=True)
class SoupRequest:
    recipe: MergeRecipe
    out_url: str
    greedy: bool = False
    strict: bool = False
    suite: AnySuite | None = None
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    workers: int | None = None
    progress: bool = True
    strict_parameters: bool = False  # refuse recipe parameters linear does not use (as merge --strict)
    allow_empty_filter: bool = False


@dataclass(frozen=True)
class SoupResult:
    out_url: str
    accepted: list[str]
    held_out: dict[str, float]
    greedy: GreedySoupResult[str] | None
    merge: MergeResult
    scratch_merges: int = 0  # candidate soups merged on the cluster (too large for an actor's memory)


def ingredients(recipe: MergeRecipe) -> list[ModelEntry]:
    """A soup recipe's entries (``check_soup_recipe`` makes sure it lists them under ``models:``)."""
    return list(recipe.models or [])


def check_soup_recipe(recipe: MergeRecipe, greedy: bool, suite: AnySuite | None) -> None:
    if recipe.merge_method != "linear":
        raise InvalidRecipe(f"a soup recipe uses merge_method: linear, got {recipe.merge_method}")
    if not recipe.models:
        raise InvalidRecipe("a soup recipe lists its ingredients under models: (slices are not supported)")
    if greedy and suite is None:
        raise InvalidRecipe("--greedy needs an eval suite (--eval SUITE.yml) to score candidate soups")
    if greedy and any("weight" in entry.parameters for entry in ingredients(recipe)):
        raise InvalidRecipe("a greedy soup is a uniform average: per-model weights are not allowed")


@dataclass
class CandidateScorer:
    """Scores candidate soups on the selection set: in an actor's memory when it fits, else through
    a scratch merge under the output (language models too large to average in one actor)."""

    request: SoupRequest
    suite: AnySuite
    evaluator: RayEvaluator
    scratch_merges: int = 0

    def __call__(self, urls: Sequence[str]) -> float:
        name = f"soup-of-{len(urls)}"
        suite = self.suite
        if not isinstance(suite, TextSuite) or self.evaluator.soup_fits_in_memory(urls, suite):
            return self.evaluator.selection_scores([ModelSource(name, tuple(urls))], suite)[name]
        return self._from_scratch_merge(name, urls, suite)

    def _from_scratch_merge(self, name: str, urls: Sequence[str], suite: TextSuite) -> float:
        request = self.request
        scratch = storage.resolve(request.out_url, request.storage_options).join(*SCRATCH_DIR.split("/"), name)
        log.info("greedy soup: %s is too large for an actor's memory; merging it to %s", name, scratch.url)
        by_url = {entry.model: entry for entry in ingredients(request.recipe)}
        recipe = request.recipe.model_copy(update={"models": [by_url[url] for url in urls], "base_model": None})
        self.evaluator.release()  # the merge tasks need the CPUs/GPUs the actors hold
        try:
            run_merge(MergeRequest(recipe=recipe, out_url=scratch.url, storage_options=request.storage_options,
                                   overwrite=True, workers=request.workers, progress=request.progress,
                                   allow_empty_filter=request.allow_empty_filter))
            self.scratch_merges += 1
            return self.evaluator.selection_scores([ModelSource(name, (scratch.url,))], suite)[name]
        finally:
            self.evaluator.release()
            storage.remove_tree(scratch)


def select_greedy(request: SoupRequest, suite: AnySuite,
                  evaluator: RayEvaluator) -> tuple[GreedySoupResult[str], dict[str, float], int]:
    """Held-out score of every ingredient, then the greedy rule with the evaluator in the loop;
    also returns how many candidate soups went through a scratch merge."""
    urls = request.recipe.model_urls
    held_out = evaluator.selection_scores([ModelSource(url, (url,)) for url in urls], suite)
    log.info("greedy soup: selecting on %s", suite.selection_set.name)
    scorer = CandidateScorer(request, suite, evaluator)
    result = greedy_soup(urls, held_out, scorer, strict=request.strict,
                         higher_is_better=evaluator.selection_higher_is_better(suite))
    return result, held_out, scorer.scratch_merges


def soup_record(recipe: MergeRecipe, request: SoupRequest, accepted: list[str], held_out: Mapping[str, float],
                result: GreedySoupResult[str] | None) -> dict[str, Any]:
    inits = {entry.model: entry.init for entry in ingredients(recipe)}
    suite = request.suite if request.greedy else None
    metric = None if suite is None else ("accuracy" if RayEvaluator.selection_higher_is_better(suite) else "perplexity")
    return {
        "kind": "greedy" if request.greedy else "uniform",
        "strict": request.strict if request.greedy else None,
        "ratatouille": len(set(inits.values())) > 1,
        "selection_set": suite.selection_set.name if suite else None,
        "selection_metric": metric,  # accuracy: higher is better; perplexity: lower is better
        "ingredients": [
            {"model": url, "init": inits[url], f"held_out_{metric or 'score'}": held_out.get(url)}
            for url in recipe.model_urls
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
    if request.strict_parameters:  # before any evaluation, as merge --strict refuses before any read
        check_strict_parameters(recipe)
    held_out: dict[str, float] = {}
    result: GreedySoupResult[str] | None = None
    scratch_merges = 0
    accepted = recipe.model_urls
    if request.greedy:
        assert request.suite is not None
        if evaluator is None:
            with RayEvaluator(request.storage_options, request.workers, request.suite.batch_size,
                              request.progress) as own:
                result, held_out, scratch_merges = select_greedy(request, request.suite, own)
        else:
            result, held_out, scratch_merges = select_greedy(request, request.suite, evaluator)
            evaluator.release()  # the merge tasks below need the CPUs/GPUs the actors hold
        accepted = result.accepted
        log.info("greedy soup: kept %d of %d ingredients", len(accepted), len(ingredients(recipe)))
    by_url = {entry.model: entry for entry in ingredients(recipe)}
    soup = recipe.model_copy(update={"models": [by_url[url] for url in accepted], "base_model": None})
    record = soup_record(recipe, request, accepted, held_out, result)
    merged = run_merge(MergeRequest(
        recipe=soup, out_url=request.out_url, storage_options=request.storage_options,
        overwrite=request.overwrite, workers=request.workers, progress=request.progress,
        strict_parameters=request.strict_parameters, allow_empty_filter=request.allow_empty_filter,
        extra_files={SOUP_FILE: (json.dumps(record, indent=1) + "\n").encode()},  # before the manifest
    ))
    return SoupResult(merged.out_url, accepted, held_out, result, merged, scratch_merges)
