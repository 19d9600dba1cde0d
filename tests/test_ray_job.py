"""`ray job submit -- modelstock merge …` against a real Ray head on loopback (DESIGN §6).

The head runs as its own process group with its own temp dir and ports, so it can be stopped by
PID without touching anyone else's Ray (never `ray stop`: it ends every Ray process on the host).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from cluster.jobs import RECIPE_NAME, submit_merge, wait_for_job
from cluster.ray_env import RAY_DEFAULTS

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
HEAD_START_TIMEOUT_S = 60
JOB_TIMEOUT_S = 120
STOP_GRACE_S = 5


@dataclass(frozen=True)
class RayHead:
    dashboard_url: str
    temp_dir: Path
    process: subprocess.Popen


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _job_api_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=2) as response:
            return response.status == 200 and "ray_version" in json.loads(response.read())
    except (OSError, ValueError, urllib.error.URLError):
        return False


def _head_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_DEFAULTS)  # loopback only, no token auth, no usage stats: forced, not defaulted
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `modelstock` is the venv's
    return env


def _stop_head(head: RayHead) -> None:
    """SIGTERM the head's process group, then SIGKILL it and every process of this head: its
    descendants (agents retitle themselves, e.g. ``ray::RuntimeEnvAgent``) and anything whose
    command line names its private temp dir. Never ``ray stop``: that ends everyone's Ray."""
    try:
        ours = psutil.Process(head.process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        ours = []
    marker = str(head.temp_dir)
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid != os.getpid() and any(marker in part for part in proc.info["cmdline"] or ()):
                ours.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for sig, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 10)):
        try:
            os.killpg(head.process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            head.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    for proc in ours:
        try:
            proc.kill()  # psutil checks the PID still names the same process
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(ours, timeout=10)
    shutil.rmtree(head.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    # A short private temp dir: Unix socket paths under it must stay below ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="ms-ray-", dir="/tmp"))
    (gcs, dashboard, agent_http, agent_grpc, runtime_env_agent, metrics, client, object_manager,
     node_manager) = _free_ports(9)
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={gcs}", f"--temp-dir={temp_dir}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env_agent}", f"--metrics-export-port={metrics}",
        f"--ray-client-server-port={client}", f"--object-manager-port={object_manager}",
        f"--node-manager-port={node_manager}",
        "--num-cpus=2", "--num-gpus=0", f"--object-store-memory={128 * 1024 * 1024}",
    ]
    log_path = temp_dir / "head.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, env=_head_env(), stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    head = RayHead(dashboard_url=f"http://127.0.0.1:{dashboard}", temp_dir=temp_dir, process=process)
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while not _job_api_ready(head.dashboard_url):
            if process.poll() is not None:
                pytest.fail(f"ray head exited with {process.returncode}:\n{log_path.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                pytest.fail(f"job API not up after {HEAD_START_TIMEOUT_S} s:\n{log_path.read_text(errors='replace')}")
            time.sleep(0.5)
        yield head
    finally:
        _stop_head(head)


def _write_recipe(folder: Path, family, out_name: str = RECIPE_NAME) -> Path:
    # Absolute model paths: the job runs in Ray's copy of the working dir, not here.
    folder.mkdir(parents=True, exist_ok=True)
    recipe = folder / out_name
    recipe.write_text(
        f"merge_method: model_stock\nbase_model: {family.base}\nmodels:\n"
        + "".join(f"  - model: {path}\n" for path in family.finetunes[:2])
    )
    return recipe


def _assert_merged(out: Path, family) -> None:
    assert (out / "modelstock-manifest.json").is_file()
    shards = sorted(out.glob("*.safetensors"))
    assert shards, f"no shards in {out}"
    merged: dict = {}
    for shard in shards:
        merged.update(load_file(shard))
    base = load_file(family.base / "model.safetensors")
    assert set(merged) == set(base)
    assert all(merged[name].shape == base[name].shape for name in base)
    # A merge of distinct fine-tunes moves the weights off the base.
    assert any(not merged[name].equal(base[name]) for name in base)


def test_ray_job_submit_cli_runs_merge(ray_head: RayHead, tiny_family, tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    _write_recipe(job_dir, tiny_family)
    out = tmp_path / "merged"
    submission_id = f"modelstock-test-{uuid.uuid4().hex[:8]}"
    command = [
        str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head.dashboard_url,
        "--submission-id", submission_id, "--working-dir", str(job_dir),
        "--", "modelstock", "merge", RECIPE_NAME, str(out), "--quiet", "--shard-size", "20KB",
    ]
    result = subprocess.run(command, env=_head_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    logs = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, logs

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_head.dashboard_url)
    assert client.get_job_status(submission_id) == JobStatus.SUCCEEDED, logs
    assert "merged" in client.get_job_logs(submission_id)
    _assert_merged(out, tiny_family)


def test_submit_merge_helper_stages_recipe_and_reports_failure(ray_head: RayHead, tiny_family, tmp_path: Path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    recipe = _write_recipe(tmp_path / "recipes", tiny_family, out_name="stock.yml")
    out = tmp_path / "merged"
    client = JobSubmissionClient(ray_head.dashboard_url)
    job = submit_merge(ray_head.dashboard_url, recipe, str(out), merge_args=["--quiet", "--shard-size", "20KB"])
    assert wait_for_job(client, job, timeout_s=JOB_TIMEOUT_S) == JobStatus.SUCCEEDED, client.get_job_logs(job)
    _assert_merged(out, tiny_family)

    # The same output at a different shard size is refused by the merge (exit 2): the job FAILED.
    failed = submit_merge(ray_head.dashboard_url, recipe, str(out), merge_args=["--quiet", "--shard-size", "1MB"])
    assert wait_for_job(client, failed, timeout_s=JOB_TIMEOUT_S) == JobStatus.FAILED
    assert "--overwrite" in client.get_job_logs(failed)
