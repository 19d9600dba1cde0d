"""``modelstock demo``: the whole job on data that ships with the installed packages, offline.

Image classifiers on scikit-learn's digits by default; ``--llm``: a tiny Llama on Python's
documentation, its standard library sources and other packaged text."""

from __future__ import annotations

import argparse
from typing import Any

from cluster.session import ray_session
from pipeline.cli.options import EXIT_OK, RunOptions
from pipeline.demo.digits.config import DemoConfig
from pipeline.demo.digits.run import run_demo
from pipeline.demo.llm.config import LlmDemoConfig
from pipeline.demo.llm.run import run_llm_demo


def run(args: argparse.Namespace) -> int:
    options = RunOptions.from_args(args)
    if args.llm:
        out = args.out or "modelstock-demo-llm"
        llm_config = LlmDemoConfig.quick(out) if args.quick else LlmDemoConfig(out_dir=out)
        with ray_session(options.address, quiet=options.quiet) as session:
            print(f"[demo --llm] Ray: {session.nodes} node(s), {session.cpus:g} CPUs, {session.gpus:g} GPUs",
                  flush=True)
            run_llm_demo(llm_config, progress=options.progress)
        return EXIT_OK
    out = args.out or "modelstock-demo"
    config = DemoConfig.quick(out) if args.quick else DemoConfig(out_dir=out)
    with ray_session(options.address, quiet=options.quiet) as session:
        print(f"[demo] Ray: {session.nodes} node(s), {session.cpus:g} CPUs, {session.gpus:g} GPUs", flush=True)
        run_demo(config, progress=options.progress)
    return EXIT_OK


def add_command(sub: Any) -> None:
    demo = sub.add_parser("demo", help="the whole job offline: fine-tunes, merges, soups, ID/OOD table "
                                       "(image classifiers on digits, or --llm: a tiny Llama on packaged text)")
    demo.add_argument("--llm", action="store_true", help="the language-model demo (perplexity and multiple choice)")
    demo.add_argument("--out", help="local folder for data, models and results "
                                    "(default: modelstock-demo, or modelstock-demo-llm with --llm)")
    demo.add_argument("--quick", action="store_true", help="a small run for tests (about a minute)")
    demo.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    demo.set_defaults(handler=run)
