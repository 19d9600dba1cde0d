"""``modelstock evaluate SUITE.yml MODEL...``, and the ``--eval`` step of ``merge``."""

from __future__ import annotations

import argparse
import posixpath
from collections.abc import Sequence
from typing import Any

from cluster.session import ray_session
from modelstock.errors import InvalidRecipe
from modelstock.evaluation.datasets import load_suite
from modelstock.evaluation.scoring import ModelSource
from pipeline.cli.options import EXIT_OK, RunOptions, add_ray_options
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


def evaluate_and_report(sources: Sequence[ModelSource], suite_path: str, options: RunOptions, out_url: str | None) -> None:
    """Evaluate on the connected Ray, print the table, write JSON/Parquet/PNG under ``out_url``."""
    suite = load_suite(suite_path)
    table = evaluate_models(sources, suite, options.storage_options, options.workers, progress=options.progress)
    print(table.format())
    if out_url:
        for url in table.write(out_url, options.storage_options):
            print(f"wrote {url}")


def evaluate_merged(merged_url: str, suite_path: str, options: RunOptions) -> None:
    """``modelstock merge --eval SUITE.yml``: evaluate the merge just written (inside the session)."""
    evaluate_and_report([ModelSource("merged", (merged_url,))], suite_path, options, evaluation_folder(merged_url))


def run(args: argparse.Namespace) -> int:
    options = RunOptions.from_args(args)
    sources = [model_source(text) for text in args.models]
    with ray_session(options.address, num_cpus=options.workers, quiet=options.quiet):
        evaluate_and_report(sources, args.suite, options, args.out)
    return EXIT_OK


def add_command(sub: Any) -> None:
    evaluate = sub.add_parser("evaluate", help="top-1 accuracy of models on an eval suite (ID + OOD), on Ray")
    evaluate.add_argument("suite", help="eval suite YAML (id, ood, held_out, batch_size, rows_per_shard)")
    evaluate.add_argument("models", nargs="+", help="NAME=URL or URL of a checkpoint folder")
    evaluate.add_argument("--out", help="folder URL for eval.json, eval.parquet and eval.png")
    add_ray_options(evaluate, "evaluation actors (default: one per CPU, or per GPU)")
    evaluate.set_defaults(handler=run)
