"""Submitting a merge to a running Ray cluster as a Ray job: what ``ray job submit -- modelstock
merge …`` does, from Python.

The job's entrypoint is the ordinary CLI, run on the head node; the recipe travels in the job's
working directory. The cluster must have modelstock installed (the configs in
``cluster/configs`` do that), and every model and output path in the recipe must be reachable
from the cluster: bucket URLs, not paths on the submitting laptop. A cluster with Ray token
authentication (the configs in ``cluster/configs`` start theirs that way) wants the token as
``ray job submit`` does: ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` (cluster/README.md).

    python -m cluster.jobs --address http://HEAD:8265 recipe.yml s3://bucket/merged --wait -- --shard-size 5GB
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
import yaml
from ray.job_submission import JobStatus, JobSubmissionClient

from cluster.auth import access_denied, check_before_connecting, client_credentials, job_api_headers
from modelstock.errors import InputError, InvalidRecipe

log = logging.getLogger(__name__)

RECIPE_NAME = "recipe.yml"
FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED})
# Names of environment variables and storage options that hold secrets. Anyone who can reach the
# dashboard reads every job's runtime env and entrypoint, so neither may carry one.
CREDENTIAL_NAME = re.compile(r"token|secret|password|passwd|credential|connection_string|(^|_)key($|_)",
                             re.IGNORECASE)


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


def _storage_options(merge_args: Sequence[str]) -> Any:
    """The JSON given to ``--storage-options`` in ``merge_args``, or None."""
    for i, arg in enumerate(merge_args):
        text = None
        if arg == "--storage-options" and i + 1 < len(merge_args):
            text = merge_args[i + 1]
        elif arg.startswith("--storage-options="):
            text = arg.partition("=")[2]
        if text is not None:
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                return None  # the merge itself reports bad JSON
    return None


def _credential_names(options: Any, prefix: str = "") -> list[str]:
    """Keys, nested ones as ``outer.inner``, whose names say they hold a secret."""
    if not isinstance(options, Mapping):
        return []
    found = []
    for key, value in options.items():
        if CREDENTIAL_NAME.search(str(key)):
            found.append(f"{prefix}{key}")
        found.extend(_credential_names(value, f"{prefix}{key}."))
    return found


def refuse_credentials(runtime_env: Mapping[str, Any], merge_args: Sequence[str]) -> None:
    """Raise InvalidRecipe if the job would carry a secret where the dashboard shows it: in the
    runtime env's ``env_vars`` or in the entrypoint's ``--storage-options``."""
    in_env = _credential_names(runtime_env.get("env_vars"))
    if in_env:
        raise InvalidRecipe(f"runtime env: env_vars.{in_env[0]} looks like a credential and the dashboard shows a "
                            "job's runtime env; give the nodes bucket access (instance profile, service account)")
    in_options = _credential_names(_storage_options(merge_args))
    if in_options:
        raise InvalidRecipe(f"--storage-options: {in_options[0]} looks like a credential and the dashboard shows a "
                            "job's entrypoint; use a profile name or the nodes' own bucket access")


def check_merge_job(recipe: str | Path, runtime_env: Mapping[str, Any], merge_args: Sequence[str]) -> Path | None:
    """Everything about a merge job that can be wrong before it reaches a cluster; the recipe's
    path inside the runtime env's ``working_dir``, or None without one. Raises InvalidRecipe."""
    recipe = Path(recipe)
    if not recipe.is_file():
        raise InvalidRecipe(f"{recipe}: recipe file not found")
    refuse_credentials(runtime_env, merge_args)
    working_dir = runtime_env.get("working_dir")
    if working_dir is None:
        return None
    if "://" in str(working_dir):
        raise InvalidRecipe(f"working_dir {working_dir}: a remote working dir cannot carry the local recipe")
    try:
        return recipe.resolve().relative_to(Path(working_dir).resolve())
    except ValueError:
        raise InvalidRecipe(f"{recipe}: the recipe must lie inside the working dir {working_dir}") from None


def connect(address: str) -> JobSubmissionClient:
    """A job API client for the cluster whose dashboard is at ``address``, sending the Ray token as
    ``ray job submit`` does: with ``RAY_AUTH_MODE=token``, from ``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` (see cluster.auth).

    Raises ClusterAccessDenied when the cluster refuses this client, ConnectionError when nothing
    answers at ``address``.
    """
    credentials = client_credentials()
    check_before_connecting(address, credentials)
    try:
        return JobSubmissionClient(address, headers=job_api_headers(credentials))
    except ray.exceptions.AuthenticationError:
        raise access_denied(address, credentials) from None


def submit_merge(
    cluster: str | JobSubmissionClient,
    recipe: str | Path,
    out_url: str,
    *,
    merge_args: Sequence[str] = (),
    runtime_env: dict[str, Any] | None = None,
    submission_id: str | None = None,
) -> str:
    """Submit ``modelstock merge`` as a job to ``cluster``: a client from ``connect``, or the address
    of the cluster's dashboard.

    Without a ``working_dir`` in ``runtime_env`` the job's working dir is a staging folder that
    holds only the recipe; with a local ``working_dir`` (e.g. this checkout, so the cluster runs
    your code) the recipe must lie inside it. Everything is checked before connecting. Returns the
    submission id.
    """
    runtime_env = dict(runtime_env or {})
    relative = check_merge_job(recipe, runtime_env, merge_args)
    client = connect(cluster) if isinstance(cluster, str) else cluster
    if relative is not None:
        return client.submit_job(
            entrypoint=merge_entrypoint(relative.as_posix(), out_url, merge_args),
            runtime_env=runtime_env,
            submission_id=submission_id,
        )
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
    parser.add_argument("--address", required=True,
                        help="the cluster's job API (dashboard), e.g. http://127.0.0.1:8265; a Ray token is sent "
                             "as `ray job submit` sends it (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH)")
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
        check_merge_job(args.recipe, runtime_env or {}, args.merge_args)  # bad input never waits for the cluster
        client = connect(args.address)
        submission_id = submit_merge(
            client, args.recipe, args.out_url,
            merge_args=args.merge_args, runtime_env=runtime_env, submission_id=args.submission_id,
        )
    except InputError as exc:  # a bad recipe or runtime env, or a cluster that refuses this client
        print(f"cluster.jobs: error: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:
        print(f"cluster.jobs: failed: {args.address}: {exc}", file=sys.stderr)
        return 1
    print(f"submitted {submission_id}")
    if not args.wait:
        return 0
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
