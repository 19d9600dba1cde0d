"""``modelstock merge CONFIG.yml OUT_URL``: plan from headers, merge on Ray, optionally evaluate.

Joining a running cluster (``--address``, ``RAY_ADDRESS``: ``ray job submit``) costs little, so
it happens at once, while the driver reads headers and plans. An embedded Ray costs seconds to
start: it starts while the driver plans unless planning is over quickly (local inputs), so that
bad input is refused before Ray starts at all. Once Ray is up, workers warm up (import torch and
the merge code) while planning goes on.
"""

from __future__ import annotations

import argparse
import math
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from cluster.session import cluster_address, start_session
from modelstock.recipe import load_recipe
from pipeline.cli.evaluate import evaluate_merged
from pipeline.cli.options import EXIT_OK, RunOptions, add_ray_options, parse_size, positive_int
from pipeline.driver import (
    DEFAULT_MEMORY_BUDGET,
    DEFAULT_SHARD_SIZE,
    MergeRequest,
    MergeResult,
    PreparedMerge,
    prepare_merge,
    run_merge,
)
from pipeline.warmup import warm_workers

# Planning that takes longer than this (object stores, big checkpoints) overlaps an embedded
# Ray's start.
QUICK_PLAN_S = 0.3
# Workers warmed while planning goes on: enough for the first shards, few on a shared cluster.
WARM_WORKERS = 16


def _merge(request: MergeRequest, options: RunOptions, suite: str | None) -> MergeResult:
    attached = cluster_address(options.address) is not None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="plan") as planner:
        planning: Future[PreparedMerge] = planner.submit(prepare_merge, request)
        prepared: PreparedMerge | None = None
        if not attached:
            try:
                prepared = planning.result(timeout=QUICK_PLAN_S)
            except FutureTimeout:
                pass
        with start_session(options.address, num_cpus=options.workers, quiet=options.quiet) as starting:
            if prepared is None:
                session = starting.wait()
                warm_workers(min(math.floor(session.cpus), WARM_WORKERS))
                prepared = planning.result()
            else:
                starting.wait()
            result = run_merge(request, prepared)
            if suite:  # the merge just written, on the same Ray session
                evaluate_merged(result.out_url, suite, options)
    return result


def run(args: argparse.Namespace) -> int:
    options = RunOptions.from_args(args)
    request = MergeRequest(
        recipe=load_recipe(args.config, strict_parameters=args.strict_parameters),
        out_url=args.out_url,
        storage_options=options.storage_options,
        shard_size=args.shard_size,
        memory_budget=args.memory_budget,
        overwrite=args.overwrite,
        workers=options.workers,
        progress=options.progress,
        device=args.device,
        io_concurrency=args.io_concurrency,
        strict_parameters=args.strict_parameters,
        allow_empty_filter=args.allow_empty_filter,
    )
    result = _merge(request, options, args.eval)
    if result.already_complete:
        print(f"{result.out_url}: already complete (same recipe and inputs); nothing to do")
    else:
        print(
            f"{result.out_url}: merged {len(result.shards)} shards "
            f"({len(result.computed)} computed, {len(result.resumed)} resumed)"
        )
    return EXIT_OK


def add_command(sub: Any) -> None:
    merge = sub.add_parser("merge", help="merge checkpoints as a recipe says")
    merge.add_argument("config", help="recipe YAML (mergekit schema)")
    merge.add_argument("out_url", help="output folder: local path or fsspec URL")
    add_ray_options(merge, "most shards merged at once (default: as many as Ray schedules)")
    merge.add_argument("--shard-size", type=parse_size, default=DEFAULT_SHARD_SIZE,
                       help="output shard size (default 2GB)")
    merge.add_argument("--memory-budget", type=parse_size, default=DEFAULT_MEMORY_BUDGET,
                       help="tensor memory per worker; bigger tensors are processed in chunks (default 512MiB)")
    merge.add_argument("--io-concurrency", type=positive_int,
                       help="ranged reads in flight per worker (default: sized by backend and node)")
    merge.add_argument("--overwrite", action="store_true", help="replace whatever is at OUT_URL")
    merge.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                       help="where shards are merged: auto = GPUs when the cluster has them now; "
                            "gpu = one GPU per shard even on a cluster still scaling up")
    merge.add_argument("--strict", "--strict-parameters", dest="strict_parameters", action="store_true",
                       help="refuse recipe parameters the method does not use (default: warn and ignore, as mergekit)")
    merge.add_argument("--allow-empty-filter", action="store_true",
                       help="accept include/exclude patterns and parameter filters that match no tensor")
    merge.add_argument("--eval", metavar="SUITE.yml", help="evaluate the merge on this eval suite (ID + OOD table)")
    merge.set_defaults(handler=run)
