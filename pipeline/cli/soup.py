"""``modelstock soup RECIPE OUT_URL``: uniform or greedy soup (or Ratatouille) of a linear recipe."""

from __future__ import annotations

import argparse
from typing import Any

from cluster.session import ray_session
from modelstock.evaluation.datasets import load_suite
from modelstock.evaluation.scoring import ModelSource
from modelstock.recipe import load_recipe
from pipeline.cli.evaluate import add_actor_options, evaluation_folder
from pipeline.cli.options import EXIT_OK, RunOptions, add_ray_options
from pipeline.evaluate import RayEvaluator
from pipeline.soup import SoupRequest, check_soup_recipe, run_soup


def run(args: argparse.Namespace) -> int:
    options = RunOptions.from_args(args)
    suite = load_suite(args.eval) if args.eval else None
    recipe = load_recipe(args.recipe, strict_parameters=args.strict_parameters)
    check_soup_recipe(recipe, args.greedy, suite)
    request = SoupRequest(recipe=recipe, out_url=args.out_url, greedy=args.greedy, strict=args.strict, suite=suite,
                          storage_options=options.storage_options, overwrite=args.overwrite, workers=options.workers,
                          progress=options.progress, strict_parameters=args.strict_parameters,
                          allow_empty_filter=args.allow_empty_filter)
    with ray_session(options.address, num_cpus=options.workers, quiet=options.quiet):
        if suite is None:
            result = run_soup(request)
        else:
            with RayEvaluator(options.storage_options, options.workers, suite.batch_size, options.progress,
                              args.gpus_per_model, args.actor_memory) as evaluator:
                result = run_soup(request, evaluator)
                if result.greedy is not None:
                    accuracy = result.greedy.higher_is_better
                    print(f"greedy soup on {suite.selection_set.name}: "
                          + ("accuracy %, higher is better" if accuracy else "perplexity, lower is better"))
                    for step in result.greedy.steps:
                        verdict = "kept" if step.accepted else "dropped"
                        score = f"{100 * step.score:9.2f}" if accuracy else f"{step.score:9.4f}"
                        print(f"{score}  {verdict:<7}  {step.candidate}")
                    if result.scratch_merges:
                        print(f"{result.scratch_merges} candidate soup(s) were too large for an actor's memory: "
                              "merged on the cluster to a scratch folder, evaluated, removed")
                table = evaluator.evaluate([ModelSource("soup", (result.out_url,))], suite)
            print(table.format())
            table.write(evaluation_folder(result.out_url), options.storage_options)
    print(f"{result.out_url}: soup of {len(result.accepted)} of {len(recipe.model_urls)} ingredients")
    return EXIT_OK


def add_command(sub: Any) -> None:
    soup = sub.add_parser("soup", help="uniform or greedy soup (or Ratatouille) of a linear recipe's models")
    soup.add_argument("recipe", help="recipe YAML with merge_method: linear; models may name their init")
    soup.add_argument("out_url", help="output folder: local path or fsspec URL")
    soup.add_argument("--greedy", action="store_true",
                      help="greedy soup (needs --eval): keep an ingredient if the held-out score does not get worse "
                           "(accuracy: higher is better; perplexity: lower is better)")
    soup.add_argument("--strict", action="store_true", help="with --greedy: keep only if the held-out score improves")
    soup.add_argument("--strict-parameters", action="store_true",
                      help="refuse recipe parameters linear does not use (default: warn and ignore, as mergekit)")
    soup.add_argument("--allow-empty-filter", action="store_true",
                      help="accept exclude patterns and parameter filters that match no tensor")
    soup.add_argument("--eval", metavar="SUITE.yml",
                      help="eval suite: selection set for --greedy, then ID/OOD table of the soup")
    soup.add_argument("--overwrite", action="store_true", help="replace whatever is at OUT_URL")
    add_ray_options(soup, "Ray workers for merging and evaluation")
    add_actor_options(soup)
    soup.set_defaults(handler=run)
