"""``modelstock demo``: the main job end to end on local data, on an embedded (or given) Ray."""

from __future__ import annotations

import argparse
from typing import Any

from cluster.session import ray_session
from pipeline.cli.options import EXIT_OK, RunOptions
from pipeline.demo.digits.config import DemoConfig
from pipeline.demo.digits.run import run_demo


def run(args: argparse.Namespace) -> int:
    options = RunOptions.from_args(args)
    config = DemoConfig.quick(args.out) if args.quick else DemoConfig(out_dir=args.out)
    with ray_session(options.address, quiet=options.quiet) as session:
        print(f"[demo] Ray: {session.nodes} node(s), {session.cpus:g} CPUs, {session.gpus:g} GPUs", flush=True)
        run_demo(config, progress=options.progress)
    return EXIT_OK


def add_command(sub: Any) -> None:
    demo = sub.add_parser("demo", help="the whole job on scikit-learn's digits: fine-tunes, merges, soups, ID/OOD table")
    demo.add_argument("--out", default="modelstock-demo", help="local folder for data, models and results")
    demo.add_argument("--quick", action="store_true", help="a small run for tests (under a minute)")
    demo.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    demo.set_defaults(handler=run)
