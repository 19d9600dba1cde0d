"""cluster.session: the embedded Ray gets its defaults however Ray was imported, starts while the
caller works, and stops without leaving a process behind, bad input or not; joining a cluster by
address sends the token and makes no call of its own; a refused token is one InputError line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from cluster.auth import use_current_credentials
from cluster.errors import ClusterAccessDenied
from cluster.session import is_loopback, ray_session, start_session
from cluster.testing import LocalCluster, start_head, stop, write_token
from modelstock.errors import InputError

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
RAY_ENV_VARS = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED", "RAY_ADDRESS")
# Ray retries a refused connection for ~20 s before giving up; its own knob shortens that here.
QUICK_REFUSAL = {"RAY_gcs_server_port_wait_time_s": "2"}

# Runs in a fresh interpreter that imports Ray first, as a notebook would, with none of our
# defaults in its environment. Every process a session started, grandchildren (agents, workers)
# included, is checked by PID after it closes.
EMBEDDED_SESSIONS = r"""
import json, os, threading, time
import ray
import pipeline.driver  # noqa: F401  - the notebook's import, before any session
import psutil
import ray._private.ray_constants as ray_constants
from cluster.session import start_session
from modelstock.errors import InvalidRecipe

def alive(processes):
    left = []
    for proc in processes:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{proc.pid} {proc.name()}")
        except psutil.NoSuchProcess:
            pass
    return left

report, began = {}, time.monotonic()
with start_session(num_cpus=1, quiet=True) as starting:
    report["start_returned_s"] = time.monotonic() - began
    session = starting.wait()
    report["started_s"] = time.monotonic() - began
    report["address"] = session.address
    time.sleep(1)  # Ray's processes outlive the start itself (they die with the thread that made them)
    report["task"] = ray.get(ray.remote(lambda: "ran").remote())
    processes = psutil.Process().children(recursive=True)  # agents and the worker included
    report["listening"] = sorted({c.laddr.ip for p in processes for c in p.net_connections("inet")
                                  if c.status == psutil.CONN_LISTEN})
    raylet = next(p for p in processes if p.name() == "raylet")
    report["raylet_env"] = {k: raylet.environ().get(k) for k in
                            ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")}
    closing = time.monotonic()
report["close_s"] = time.monotonic() - closing
time.sleep(0.3)
report["left_after_close"] = alive(processes)
report["env_after"] = {k: os.environ.get(k) for k in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE")}
report["loopback_constant_restored"] = ray_constants.ENABLE_RAY_CLUSTER

# Bad input found while Ray starts. A sampler notes every process below this one meanwhile, so
# each one the start made, before or after the raise, is checked by PID afterwards.
seen, sampled = {}, threading.Event()
def sample():
    while not sampled.wait(0.1):
        for proc in psutil.Process().children(recursive=True):
            seen.setdefault(proc.pid, proc)
threading.Thread(target=sample, daemon=True).start()
began = time.monotonic()
try:
    with start_session(num_cpus=1, quiet=True):
        time.sleep(0.5)  # planning, while Ray starts
        raise InvalidRecipe("bad input found by planning")
except InvalidRecipe:
    report["bad_input_exit_s"] = time.monotonic() - began
sampled.set()
time.sleep(0.3)
report["left_after_bad_input"] = alive(seen.values())
report["sampled_bad_input_processes"] = len(seen)
print(json.dumps(report))
"""


def test_embedded_session_defaults_start_and_clean_stop_when_ray_was_imported_first() -> None:
    env = {k: v for k, v in os.environ.items() if k not in RAY_ENV_VARS}
    result = subprocess.run([sys.executable, "-c", EMBEDDED_SESSIONS], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(json.dumps({k: v for k, v in report.items() if k.endswith("_s")}))  # the timings, for -s runs

    assert report["start_returned_s"] < 0.5, "start_session must return while Ray starts"
    assert report["address"].startswith("127.0.0.1:")
    assert report["listening"] and set(report["listening"]) <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
    assert report["raylet_env"] == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                                    "RAY_USAGE_STATS_ENABLED": "0"}
    assert report["task"] == "ran"
    assert report["left_after_close"] == []
    assert report["env_after"] == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": None, "RAY_AUTH_MODE": None}
    assert report["loopback_constant_restored"] is True  # Linux's default, as `import ray` set it

    assert report["sampled_bad_input_processes"] > 0, "Ray had started when the bad input was found"
    assert report["left_after_bad_input"] == []


# --- joining a cluster ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    head = start_head(token_file=write_token(tmp_path_factory.mktemp("ray-token")))
    yield head
    stop(head)


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No Ray connection in this process (a shared local one is restarted by the next test that
    needs it); afterwards Ray re-reads the environment the test leaves, as a fresh process would."""
    if ray.is_initialized():
        ray.shutdown()
    for key, value in QUICK_REFUSAL.items():
        monkeypatch.setenv(key, value)
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    yield
    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.undo()
    use_current_credentials()


def test_join_by_address_sends_the_token_and_makes_no_call_of_its_own(
    token_head: LocalCluster, no_ray: None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert token_head.token_file is not None
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_head.token_file))
    calls: list[str] = []
    for name in ("cluster_resources", "nodes"):
        real = getattr(ray, name)
        monkeypatch.setattr(ray, name, lambda real=real, name=name: calls.append(name) or real())

    with ray_session(token_head.gcs_address, num_cpus=7) as session:  # num_cpus is for an embedded Ray only
        assert not session.embedded and session.address == token_head.gcs_address
        assert calls == [], "joining asks the cluster nothing beyond what ray.init does"
        assert (session.nodes, session.cpus, session.gpus) == (1, 2.0, 0.0)
        assert sorted(calls) == ["cluster_resources", "nodes"]  # asked once, on first use
        assert ray.get(ray.remote(lambda: "ran").remote()) == "ran"
    assert not ray.is_initialized()
    assert token_head.process.poll() is None, "leaving a joined session leaves the cluster running"


def test_a_refused_token_is_one_input_error_line(token_head: LocalCluster, no_ray: None,
                                                 monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    with pytest.raises(ClusterAccessDenied, match="refused the Ray token from RAY_AUTH_TOKEN") as refused, \
            ray_session(token_head.gcs_address):
        pass
    assert isinstance(refused.value, InputError) and "\n" not in str(refused.value)
    assert not ray.is_initialized()

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    with pytest.raises(ClusterAccessDenied, match="RAY_AUTH_MODE is disabled; set RAY_AUTH_MODE=token"), \
            ray_session(token_head.gcs_address):
        pass

    # Token mode with no token anywhere: refused before any connection.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    with pytest.raises(ClusterAccessDenied, match="no token was found"):
        start_session(token_head.gcs_address)


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1:6379", True), ("localhost:6379", True), ("ray://127.0.0.1:10001", True), ("[::1]:6379", True),
    ("10.0.0.5:6379", False), ("ray://head.example.com:10001", False),
])
def test_loopback_addresses(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback
