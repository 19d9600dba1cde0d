"""Submitting a merge to a running Ray cluster as a Ray job: what ``ray job submit -- modelstock
merge …`` does, from Python.

The job's entrypoint is the ordinary CLI, run on the head node; the recipe travels in the job's
working directory. The cluster must have modelstock installed (the configs in
``cluster/configs`` do that), and every model and output path in the recipe must be reachable
from the cluster: bucket URLs, not paths on the submitting laptop.

    python -m cluster.jobs --address http://HEAD:8265 recipe.yml s3://bucket/merged --wait -- --shard-size 5GB
"""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from cluster.ray_env import apply_ray_defaults

apply_ray_defaults()

from ray.job_submission import JobStatus, JobSubmissionClient  # noqa: E402

from modelstock.errors import InvalidRecipe  # noqa: E402

log = logging.getLogger(__name__)

RECIPE_NAME = "recipe.yml"
FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED})


def merge_entrypoint(recipe: str, out_url: str, merge_args: Sequence[str] = ()) -> str:
    """The shell command a merge job runs: ``modelstock merge RECIPE OUT_URL [flags…]``, quoted."""
    return shlex.join(["modelstock", "merge", recipe, out_url, *merge_args])


def load_runtime_env(path: str | Path) -> dict[str, Any]:
    """A runtime env YAML (``cluster/configs/runtime_env.yaml``) as the dict Ray's job API takes."""
    path = Path(path)
    try:
        runtime_env = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidRecipe(f"{path}: cannot read runtime env ({exc})") from None
    if not isinstance(runtime_env, dict):
        raise InvalidRecipe(f"{path}: a runtime env must be a YAML mapping")
    return runtime_env


def submit_merge(
    address: str,
    recipe: str | Path,
    out_url: str,
    *,
    merge_args: Sequence[str] = (),
    runtime_env: dict[str, Any] | None = None,
    submission_id: str | None = None,
) -> str:
    """Submit ``modelstock merge`` as a job to the cluster whose dashboard is at ``address``.

    Without a ``working_dir`` in ``runtime_env`` the job's working dir is a staging folder that
    holds only the recipe; with a local ``working_dir`` (e.g. this checkout, so the cluster runs
    your code) the recipe must lie inside it. Returns the submission id.
    """
    recipe = Path(recipe)
    if not recipe.is_file():
        raise InvalidRecipe(f"{recipe}: recipe file not found")
    runtime_env = dict(runtime_env or {})
    working_dir = runtime_env.get("working_dir")
    if working_dir is not None:
        if "://" in str(working_dir):
            raise InvalidRecipe(f"working_dir {working_dir}: a remote working dir cannot carry the local recipe")
        try:
            relative = recipe.resolve().relative_to(Path(working_dir).resolve())
        except ValueError:
            raise InvalidRecipe(f"{recipe}: the recipe must lie inside the working dir {working_dir}") from None
        return JobSubmissionClient(address).submit_job(
            entrypoint=merge_entrypoint(relative.as_posix(), out_url, merge_args),
            runtime_env=runtime_env,
            submission_id=submission_id,
        )
    client = JobSubmissionClient(address)
    # The client zips and uploads the working dir inside submit_job, so the staging folder can go
    # as soon as it returns.
    with tempfile.TemporaryDirectory(prefix="modelstock-job-") as staging:
        shutil.copyfile(recipe, Path(staging) / RECIPE_NAME)
        return client.submit_job(
            entrypoint=merge_entrypoint(RECIPE_NAME, out_url, merge_args),
            runtime_env={**runtime_env, "working_dir": staging},
            submission_id=submission_id,
        )


def wait_for_job(client: JobSubmissionClient, submission_id: str, timeout_s: float, poll_s: float = 1.0) -> JobStatus:
    """Poll until the job finishes; its final status. Raises TimeoutError past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(submission_id)
        if status in FINISHED:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {submission_id} still {status.value} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.jobs", description="submit `modelstock merge` as a Ray job",
        epilog="flags after `--` go to `modelstock merge` (e.g. -- --shard-size 5GB --overwrite)",
    )
    parser.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://127.0.0.1:8265")
    parser.add_argument("--runtime-env", help="runtime env YAML (e.g. cluster/configs/runtime_env.yaml)")
    parser.add_argument("--submission-id", help="job id to use (default: Ray picks one)")
    parser.add_argument("--wait", action="store_true", help="wait for the job, print its logs, exit 0 only on success")
    parser.add_argument("--timeout", type=float, default=24 * 3600, help="seconds to --wait (default one day)")
    parser.add_argument("recipe", help="local recipe YAML; its model paths must be reachable from the cluster")
    parser.add_argument("out_url", help="output folder as the cluster sees it (a bucket URL)")
    return parser


def parse_command_line(argv: Sequence[str]) -> argparse.Namespace:
    """Our flags, then everything after the first ``--`` as ``merge_args`` (argparse alone cannot
    tell a trailing ``--`` list from positionals once optionals sit between them)."""
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:split])
    args.merge_args = argv[split + 1:]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_command_line(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        runtime_env = load_runtime_env(args.runtime_env) if args.runtime_env else None
        submission_id = submit_merge(
            args.address, args.recipe, args.out_url,
            merge_args=args.merge_args, runtime_env=runtime_env, submission_id=args.submission_id,
        )
    except InvalidRecipe as exc:
        print(f"cluster.jobs: error: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:
        print(f"cluster.jobs: failed: {args.address}: {exc}", file=sys.stderr)
        return 1
    print(f"submitted {submission_id}")
    if not args.wait:
        return 0
    client = JobSubmissionClient(args.address)
    try:
        status = wait_for_job(client, submission_id, args.timeout)
    except TimeoutError as exc:
        print(f"cluster.jobs: failed: {exc}", file=sys.stderr)
        return 1
    print(client.get_job_logs(submission_id), end="")
    print(f"{submission_id}: {status.value}")
    return 0 if status == JobStatus.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
