"""``modelstock evaluate SUITE.yml MODEL...``, and the ``--eval`` step of ``merge``.

The suite's ``kind`` decides what is measured: top-1 accuracy (image classifiers) or perplexity
and multiple-choice accuracy (language models, ``kind: text``)."""

from __future__ import annotations

import argparse
import posixpath
from collections.abc import Sequence
from typing import Any

from cluster.session import ray_session
from modelstock.errors import InvalidRecipe
from modelstock.evaluation.datasets import load_suite, parse_byte_size
from modelstock.evaluation.scoring import ModelSource
from pipeline.cli.options import EXIT_OK, RunOptions, add_ray_options, positive_int
from pipeline.evaluate import evaluate_models


def model_source(text: str) -> ModelSource:
    """``NAME=URL`` or ``URL`` (named after its last path component)."""
    name, sep, url = text.partition("=")
    if not sep:
        name, url = posixpath.basename(text.rstrip("/")) or text, text
    if not name or not url:
        raise InvalidRecipe(f"model {text!r}: expected NAME=URL or URL")
    return ModelSource(name, (url,))


def evaluation_folder(model_url: str) -> str:
    """Where a model's evaluation results go by default: ``<model>/eval``."""
    return model_url.rstrip("/") + "/eval"


def actor_memory_size(text: str) -> int:
    try:
        return parse_byte_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_actor_options(parser: argparse.ArgumentParser) -> None:
    """Language-model actors: GPUs per model and memory per actor (override the suite's)."""
    parser.add_argument("--gpus-per-model", type=positive_int,
                        help="text suites: GPUs one actor holds a model on, its layers split across them")
    parser.add_argument("--actor-memory", type=actor_memory_size,
                        help="text suites: memory of one evaluation actor (e.g. 80GiB), instead of the measured one")


def evaluate_and_report(sources: Sequence[ModelSource], suite_path: str, options: RunOptions, out_url: str | None,
                        gpus_per_model: int | None = None, actor_memory: int | None = None, checked: bool = False) -> None:
    """Evaluate on the connected Ray, print the table, write JSON/Parquet/PNG under ``out_url``
    (``checked``: the inputs were checked already, before Ray started)."""
    suite = load_suite(suite_path)
    if not checked:
        check_inputs(sources, suite, options)
    table = evaluate_models(sources, suite, options.storage_options, options.workers, progress=options.progress,
                            gpus_per_model=gpus_per_model, actor_memory=actor_memory)
    print(table.format())
    if out_url:
        for url in table.write(out_url, options.storage_options):
            print(f"wrote {url}")


def evaluate_merged(merged_url: str, suite_path: str, options: RunOptions) -> None:
    """``modelstock merge --eval SUITE.yml``: evaluate the merge just written (inside the session)."""
    evaluate_and_report([ModelSource("merged", (merged_url,))], suite_path, options, evaluation_folder(merged_url))


def check_inputs(sources: Sequence[ModelSource], suite: Any, options: RunOptions) -> None:
    """The suite's datasets and the models' tokenizers checked on the driver, before any actor."""
    from modelstock.evaluation.preflight import check_evaluation_inputs

    check_evaluation_inputs(sources, suite, options.storage_options)


def run(args: argparse.Namespace) -> int:
    options = RunOptions.from_args(args)
    sources = [model_source(text) for text in args.models]
    # Bad suites, datasets and model names are refused before Ray starts.
    check_inputs(sources, load_suite(args.suite), options)
    with ray_session(options.address, num_cpus=options.workers, quiet=options.quiet):
        evaluate_and_report(sources, args.suite, options, args.out, args.gpus_per_model, args.actor_memory, checked=True)
    return EXIT_OK


def add_command(sub: Any) -> None:
    evaluate = sub.add_parser("evaluate", help="ID + OOD evaluation on Ray: top-1 (images) or perplexity and "
                                               "choice accuracy (language models, kind: text)")
    evaluate.add_argument("suite", help="eval suite YAML (kind, id, ood, held_out, ...)")
    evaluate.add_argument("models", nargs="+", help="NAME=URL or URL of a checkpoint folder")
    evaluate.add_argument("--out", help="folder URL for eval.json, eval.parquet and eval.png")
    add_ray_options(evaluate, "evaluation actors (default: one per CPU, or per GPU; language models: as memory allows)")
    add_actor_options(evaluate)
    evaluate.set_defaults(handler=run)
