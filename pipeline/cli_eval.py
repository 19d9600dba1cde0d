"""CLI subcommands for evaluation, soups and the demo: ``evaluate``, ``soup``, ``demo``, and the
``--eval`` step of ``merge``. Each builds its validated inputs here, then asks ``cluster`` for Ray."""

from __future__ import annotations

import argparse
import posixpath
from typing import Any

EXIT_OK = 0


def _model_source(text: str) -> Any:
    """``NAME=URL`` or ``URL`` (named after its last path component)."""
    from modelstock.errors import InvalidRecipe
    from modelstock.evaluation.scoring import ModelSource

    name, sep, url = text.partition("=")
    if not sep:
        name, url = posixpath.basename(text.rstrip("/")) or text, text
    if not name or not url:
        raise InvalidRecipe(f"model {text!r}: expected NAME=URL or URL")
    return ModelSource(name, (url,))


def _eval_out(out: str | None, default_parent: str | None) -> str | None:
    if out:
        return out
    return default_parent.rstrip("/") + "/eval" if default_parent else None


def evaluate_and_report(sources: list[Any], suite_path: str, args: argparse.Namespace, out_url: str | None) -> int:
    """Evaluate on the connected Ray, print the table, write JSON/Parquet/PNG under ``out_url``."""
    from modelstock.evaluation.datasets import load_suite
    from pipeline.cli import parse_storage_options
    from pipeline.evaluate import evaluate_models

    suite = load_suite(suite_path)
    options = parse_storage_options(getattr(args, "storage_options", None))
    table = evaluate_models(sources, suite, options, getattr(args, "workers", None), progress=not args.quiet)
    print(table.format())
    if out_url:
        for url in table.write(out_url, options):
            print(f"wrote {url}")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cluster.session import ray_session

    sources = [_model_source(text) for text in args.models]
    with ray_session(args.address, num_cpus=args.workers, quiet=args.quiet):
        return evaluate_and_report(sources, args.suite, args, args.out)


def evaluate_merged(args: argparse.Namespace, out_url: str) -> None:
    """``modelstock merge --eval SUITE.yml``: evaluate the merge just written (inside the session)."""
    from modelstock.evaluation.scoring import ModelSource

    evaluate_and_report([ModelSource("merged", (out_url,))], args.eval, args, _eval_out(None, out_url))


def cmd_soup(args: argparse.Namespace) -> int:
    from cluster.session import ray_session
    from modelstock.evaluation.datasets import load_suite
    from modelstock.evaluation.scoring import ModelSource
    from modelstock.recipe import load_recipe
    from pipeline.cli import parse_storage_options
    from pipeline.evaluate import RayEvaluator
    from pipeline.soup import SoupRequest, check_soup_recipe, run_soup

    suite = load_suite(args.eval) if args.eval else None
    recipe = load_recipe(args.recipe)
    check_soup_recipe(recipe, args.greedy, suite)
    options = parse_storage_options(args.storage_options)
    request = SoupRequest(recipe=recipe, out_url=args.out_url, greedy=args.greedy, strict=args.strict, suite=suite,
                          storage_options=options, overwrite=args.overwrite, workers=args.workers,
                          progress=not args.quiet)
    with ray_session(args.address, num_cpus=args.workers, quiet=args.quiet):
        if suite is None:
            result = run_soup(request)
        else:
            with RayEvaluator(options, args.workers, suite.batch_size, not args.quiet) as evaluator:
                result = run_soup(request, evaluator)
                if result.greedy is not None:
                    for step in result.greedy.steps:
                        verdict = "kept" if step.accepted else "dropped"
                        print(f"{100 * step.score:7.2f}  {verdict:<7}  {step.candidate}")
                table = evaluator.evaluate([ModelSource("soup", (result.out_url,))], suite)
            print(table.format())
            table.write(_eval_out(None, result.out_url), options)
    print(f"{result.out_url}: soup of {len(result.accepted)} of {len(recipe.models)} ingredients")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import DemoConfig, run_demo

    config = DemoConfig.quick(args.out) if args.quick else DemoConfig(out_dir=args.out)
    run_demo(config, address=args.address, progress=not args.quiet)
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `evaluate`, `soup` and `demo` on the `modelstock` parser."""
    evaluate = sub.add_parser("evaluate", help="top-1 accuracy of models on an eval suite (ID + OOD), on Ray")
    evaluate.add_argument("suite", help="eval suite YAML (id, ood, held_out, batch_size, rows_per_shard)")
    evaluate.add_argument("models", nargs="+", help="NAME=URL or URL of a checkpoint folder")
    evaluate.add_argument("--out", help="folder URL for eval.json, eval.parquet and eval.png")
    evaluate.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else embedded local Ray)")
    evaluate.add_argument("--workers", type=int, help="evaluation actors (default: one per CPU, or per GPU)")
    evaluate.add_argument("--storage-options", help="JSON of fsspec storage options for every URL")
    evaluate.set_defaults(handler=cmd_evaluate)

    soup = sub.add_parser("soup", help="uniform or greedy soup (or Ratatouille) of a linear recipe's models")
    soup.add_argument("recipe", help="recipe YAML with merge_method: linear; models may name their init")
    soup.add_argument("out_url", help="output folder: local path or fsspec URL")
    soup.add_argument("--greedy", action="store_true", help="greedy soup (needs --eval): keep an ingredient if held-out accuracy does not drop")
    soup.add_argument("--strict", action="store_true", help="with --greedy: keep only if held-out accuracy rises (>)")
    soup.add_argument("--eval", metavar="SUITE.yml", help="eval suite: selection set for --greedy, then ID/OOD table of the soup")
    soup.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else embedded local Ray)")
    soup.add_argument("--workers", type=int, help="Ray workers for merging and evaluation")
    soup.add_argument("--overwrite", action="store_true", help="replace whatever is at OUT_URL")
    soup.add_argument("--storage-options", help="JSON of fsspec storage options for every URL")
    soup.set_defaults(handler=cmd_soup)

    demo = sub.add_parser("demo", help="the whole job on scikit-learn's digits: fine-tunes, merges, soups, ID/OOD table")
    demo.add_argument("--out", default="modelstock-demo", help="local folder for data, models and results")
    demo.add_argument("--quick", action="store_true", help="a small run for tests (under a minute)")
    demo.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else embedded local Ray)")
    demo.set_defaults(handler=cmd_demo)
