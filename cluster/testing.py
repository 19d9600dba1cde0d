"""Test support, as ``modelstock.testing`` is for checkpoints: Ray clusters on this machine's
loopback that tests (and benches) start and stop without touching anyone else's Ray.

- ``start_head``: a ``ray start --head`` with the job API, optionally with token authentication.
- ``start_simulated_cluster``: a ``ray.cluster_utils.Cluster`` of several nodes, run by a helper
  process (``python -m cluster.testing``) so the test process never becomes its driver.

Each runs as its own process group with its own temp dir (``RAY_TMPDIR``, so not even
``/tmp/ray/ray_current_cluster`` is shared) and free ports, and ``stop`` ends it by PID. Never
``ray stop``: it ends every Ray process on the machine, other users' included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from cluster.auth import AUTH_MODE_VAR, TOKEN_PATH_VAR, TOKEN_VAR
from cluster.ray_env import LOOPBACK_VAR

VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 90
STOP_GRACE_S = 10
# `ray start --block` drains for 30 s on SIGTERM by default (Ray 2.60); a test head has nothing to drain.
TEST_RAY_ENV = {
    LOOPBACK_VAR: "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
}
CLIENT_VARS = ("RAY_ADDRESS", AUTH_MODE_VAR, TOKEN_VAR, TOKEN_PATH_VAR)


@dataclass(frozen=True)
class LocalCluster:
    gcs_address: str
    dashboard_url: str
    temp_dir: Path
    process: subprocess.Popen
    token_file: Path | None

    def client_env(self, *, token: bool | str = True, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of a client process: this venv first on PATH, no inherited Ray address or
        credentials, then the cluster's token (``token=True``), none (False) or a given one (str)."""
        env = {k: v for k, v in (os.environ if base is None else base).items() if k not in CLIENT_VARS}
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
        if token is True and self.token_file is not None:
            env.update({AUTH_MODE_VAR: "token", TOKEN_PATH_VAR: str(self.token_file)})
        elif isinstance(token, str):
            env.update({AUTH_MODE_VAR: "token", TOKEN_VAR: token})
        return env


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def write_token(folder: Path) -> Path:
    """A fresh random token in ``folder/auth_token``, readable by this user only."""
    path = Path(folder) / "auth_token"
    path.touch(mode=0o600)
    path.write_text(secrets.token_urlsafe(32) + "\n")
    return path


def ray_process_env(temp_dir: Path, token_file: Path | None) -> dict[str, str]:
    """The environment of a test cluster's own processes: loopback only, its own temp dir, token
    authentication from ``token_file`` or none."""
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_VARS}
    env.update(TEST_RAY_ENV)
    env["RAY_TMPDIR"] = str(temp_dir)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # jobs' `modelstock` is this venv's
    if token_file is None:
        env[AUTH_MODE_VAR] = "disabled"
    else:
        env.update({AUTH_MODE_VAR: "token", TOKEN_PATH_VAR: str(token_file)})
    return env


def _job_api_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # answering, and refusing us: token authentication is on
    except (OSError, ValueError):
        return False


def _short_temp_dir(prefix: str) -> Path:
    # Unix socket paths under it must stay below ~107 characters.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def start_head(*, token_file: Path | None = None, num_cpus: int = 2,
               timeout_s: float = START_TIMEOUT_S) -> LocalCluster:
    """``ray start --head --block`` on loopback with the job API; token authentication when
    ``token_file`` is given."""
    temp_dir = _short_temp_dir("ms-ray-")
    (gcs, dashboard, agent_http, agent_grpc, runtime_env_agent, metrics, client, object_manager,
     node_manager) = free_ports(9)
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={gcs}", f"--temp-dir={temp_dir}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env_agent}", f"--metrics-export-port={metrics}",
        f"--ray-client-server-port={client}", f"--object-manager-port={object_manager}",
        f"--node-manager-port={node_manager}",
        f"--num-cpus={num_cpus}", "--num-gpus=0", f"--object-store-memory={128 * 1024 * 1024}",
    ]
    log_path = temp_dir / "head.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, env=ray_process_env(temp_dir, token_file), stdout=log_file,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    head = LocalCluster(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", temp_dir, process, token_file)
    deadline = time.monotonic() + timeout_s
    while not _job_api_up(head.dashboard_url):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(head)
            raise RuntimeError(f"ray head did not start:\n{log_path.read_text(errors='replace')[-4000:]}")
        time.sleep(0.5)
    return head


def start_simulated_cluster(*, nodes: int = 3, cpus_per_node: int = 1, token_file: Path | None = None,
                            timeout_s: float = START_TIMEOUT_S) -> LocalCluster:
    """A ``ray.cluster_utils.Cluster`` of ``nodes`` nodes (head included) on loopback, run by a
    helper process; token authentication when ``token_file`` is given."""
    temp_dir = _short_temp_dir("ms-sim-")
    dashboard_port = free_ports(1)[0]
    command = [sys.executable, "-m", "cluster.testing", "--nodes", str(nodes), "--cpus-per-node", str(cpus_per_node),
               "--dashboard-port", str(dashboard_port)]
    log_path = temp_dir / "cluster.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, env=ray_process_env(temp_dir, token_file), stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=log_file, start_new_session=True,
                                   cwd=Path(__file__).resolve().parent.parent)
    cluster = LocalCluster("", "", temp_dir, process, token_file)
    ready = _read_ready_line(process, timeout_s)
    if ready is None:
        stop(cluster)
        raise RuntimeError(f"simulated cluster did not start:\n{log_path.read_text(errors='replace')[-4000:]}")
    return LocalCluster(ready["gcs_address"], ready["dashboard_url"], temp_dir, process, token_file)


def _read_ready_line(process: subprocess.Popen, timeout_s: float) -> dict | None:
    assert process.stdout is not None
    os.set_blocking(process.stdout.fileno(), False)
    deadline, buffered = time.monotonic() + timeout_s, b""
    while time.monotonic() < deadline and process.poll() is None:
        buffered += process.stdout.read() or b""
        if b"\n" in buffered:
            return json.loads(buffered.split(b"\n", 1)[0])
        time.sleep(0.2)
    return None


def _processes_of(cluster: LocalCluster) -> list[psutil.Process]:
    """The cluster's processes: descendants of its first process, and anything whose command line
    names its private temp dir (agents re-title themselves, e.g. ``ray::RuntimeEnvAgent``)."""
    try:
        ours = psutil.Process(cluster.process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        ours = []
    marker = str(cluster.temp_dir)
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid != os.getpid() and any(marker in part for part in proc.info["cmdline"] or ()):
                ours.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return ours


def stop(cluster: LocalCluster) -> None:
    """End the cluster by PID: a graceful stop, then SIGKILL for whatever is left of it."""
    ours = _processes_of(cluster)
    if cluster.process.stdin is not None:
        cluster.process.stdin.close()  # the helper's cue to shut its cluster down
    else:
        _signal_group(cluster.process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        cluster.process.wait(timeout=STOP_GRACE_S)
    _signal_group(cluster.process.pid, signal.SIGKILL)
    cluster.process.wait(timeout=STOP_GRACE_S)
    for proc in ours:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()  # psutil checks the PID still names the same process
    psutil.wait_procs(ours, timeout=STOP_GRACE_S)
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _run_simulated_cluster(argv: Sequence[str]) -> None:
    """The helper process: start the cluster, print its addresses as one JSON line, keep it up
    until stdin closes."""
    parser = argparse.ArgumentParser(prog="python -m cluster.testing")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--cpus-per-node", type=int, required=True)
    parser.add_argument("--dashboard-port", type=int, required=True)
    args = parser.parse_args(argv)

    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": args.cpus_per_node, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": args.dashboard_port, "object_store_memory": 128 * 1024 * 1024,
    })
    try:
        for _ in range(args.nodes - 1):
            cluster.add_node(num_cpus=args.cpus_per_node, object_store_memory=128 * 1024 * 1024)
        cluster.wait_for_nodes()
        print(json.dumps({"gcs_address": cluster.address,
                          "dashboard_url": f"http://127.0.0.1:{args.dashboard_port}"}), flush=True)
        sys.stdin.read()
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    _run_simulated_cluster(sys.argv[1:])
