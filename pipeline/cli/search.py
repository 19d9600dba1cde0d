"""``modelstock search SEARCH.yml OUT_URL --eval SUITE.yml``: tune a recipe's parameters on held-out
data with Ray Tune, merge the best recipe to OUT_URL, then evaluate it ID/OOD on the suite."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.cli.options import EXIT_OK, RunOptions, add_ray_options, positive_int


def run(args: argparse.Namespace) -> int:
    # Heavy imports here, not at module top: the CLI starts without torch, Ray or transformers.
    from cluster.session import ray_session
    from modelstock.evaluation.datasets import load_suite
    from modelstock.evaluation.scoring import ModelSource
    from modelstock.recipe_search import load_search_spec
    from pipeline.cli.evaluate import evaluation_folder
    from pipeline.evaluate import RayEvaluator
    from pipeline.search import SearchRequest, check_search_suite, experiment_folder, run_search

    options = RunOptions.from_args(args)
    spec = load_search_spec(args.spec)
    suite = check_search_suite(load_suite(args.eval))
    request = SearchRequest(spec=spec, suite=suite, out_url=args.out_url, trials=args.trials,
                            experiment_dir=args.experiment_dir, storage_options=options.storage_options,
                            overwrite=args.overwrite, progress=options.progress)
    experiment_folder(request)  # a remote output without --experiment-dir is refused before Ray starts
    with ray_session(options.address, num_cpus=options.workers, quiet=options.quiet):
        result = run_search(request)
        print(f"search: {len(result.records)} trials on {suite.selection_set.name} ({result.metric}, "
              f"{'lower' if result.mode == 'min' else 'higher'} is better); best trial {result.best.number}: "
              f"{result.best.score:.4f}")
        for name, value in result.best.point.items():
            print(f"  {name} = {value}")
        with RayEvaluator(options.storage_options, options.workers, suite.batch_size, options.progress) as evaluator:
            table = evaluator.evaluate([ModelSource("searched", (result.out_url,))], suite, include_held_out=True)
        print(table.format())
        table.write(evaluation_folder(result.out_url), options.storage_options)
    print(f"{result.out_url}: searched recipe merged (modelstock-recipe.yml; trials in {', '.join(result.files)})")
    return EXIT_OK


def add_command(sub: Any) -> None:
    search = sub.add_parser("search", help="tune a recipe's parameters on held-out data (Ray Tune + Optuna), "
                                           "merge the best and evaluate it")
    search.add_argument("spec", help="search spec YAML: a recipe whose values may be ranges, trials, sampler, ...")
    search.add_argument("out_url", help="output folder for the searched merge: local path or fsspec URL")
    search.add_argument("--eval", metavar="SUITE.yml", required=True,
                        help="text eval suite: trials are scored on its held_out set, the result on ID/OOD")
    search.add_argument("--trials", type=positive_int, help="number of trials (default: the spec's)")
    search.add_argument("--experiment-dir", help="local folder for Ray Tune's state (default: OUT/.modelstock/search); "
                                                 "run again with the same arguments to resume a killed search")
    search.add_argument("--overwrite", action="store_true", help="discard a previous search and output at OUT_URL")
    add_ray_options(search, "CPUs of the embedded local Ray")
    search.set_defaults(handler=run)
