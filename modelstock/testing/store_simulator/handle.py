"""``StoreSimulator``: start the server as a subprocess and drive it from a test or a benchmark.

A subprocess, not a thread: the server's CPU stays off the caller's GIL, so a benchmark
measures the client rather than the two sharing one interpreter.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from .config import DEFAULT_REGION, SimulatorConfig, SimulatorStats
from .http_handlers import HTTP_PREFIX
from .server import ADMIN_PREFIX

# The server runs this package as a top-level package rather than as
# ``modelstock.testing.store_simulator``: it imports nothing from modelstock, and importing
# ``modelstock`` (which imports torch) would add ~2.5 s to every start and restart.
SERVER_PACKAGE = Path(__file__).resolve().parent.name
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
ADMIN_TIMEOUT_S = 10.0


class StoreSimulatorError(RuntimeError):
    """The simulator process could not be started or did not answer."""


class StoreSimulator:
    """A loopback S3/HTTP object store serving ``root`` (buckets are its sub-folders).

    Use as a context manager. Objects can be written through S3 or placed directly under
    ``bucket_path(bucket)``; both survive ``restart()``, which comes back on the same port.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        config: SimulatorConfig | None = None,
        port: int = 0,
        region: str = DEFAULT_REGION,
    ) -> None:
        self.root = Path(root)
        self.region = region
        self._config = config or SimulatorConfig()
        self._port = port
        self._process: subprocess.Popen[bytes] | None = None

    # Life cycle

    def __enter__(self) -> StoreSimulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> StoreSimulator:
        """Start the server (on the last port used, after the first start) and wait until it accepts."""
        if self.is_running:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            SERVER_PACKAGE,
            "--root",
            str(self.root),
            "--port",
            str(self._port),
            "--region",
            self.region,
            "--config",
            json.dumps(self._config.to_json()),
            "--exit-with-stdin",
        ]
        # A session of its own keeps a terminal's Ctrl-C for the caller, which then stops the
        # server in order; the closed stdin pipe ends it if the caller dies instead.
        self._process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_environment(), start_new_session=True
        )
        announcement = self._read_announcement(self._process)
        self._port = int(announcement["port"])
        return self

    def stop(self) -> None:
        """Stop the server: connections are refused until ``start()``."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, stay down for ``down_s`` seconds, start on the same port with the same data and
        settings (fault counters and stats start again)."""
        self.stop()
        if down_s > 0:
            time.sleep(down_s)
        self.start()

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    # Addresses

    @property
    def port(self) -> int:
        if self._port == 0:
            raise StoreSimulatorError("the store simulator has not been started yet")
        return self._port

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def s3_storage_options(self) -> dict[str, Any]:
        """Storage options for ``fsspec``/s3fs: dummy credentials, this endpoint, path-style."""
        return {
            "key": "simulator",
            "secret": "simulator",
            "endpoint_url": self.endpoint,
            "client_kwargs": {"region_name": self.region},
            "config_kwargs": {"s3": {"addressing_style": "path"}},
        }

    def s3_url(self, bucket: str, key: str = "") -> str:
        return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"

    def http_url(self, bucket: str, key: str = "") -> str:
        """The plain-HTTP URL of an object (or, with a key ending in ``/`` or none, a folder page)."""
        path = f"{HTTP_PREFIX}/{bucket}/{key}"
        return self.endpoint + urllib.parse.quote(path, safe="/~")

    def bucket_path(self, bucket: str) -> Path:
        """The folder holding ``bucket`` (created if missing): write fixtures here directly."""
        path = self.root / bucket
        path.mkdir(parents=True, exist_ok=True)
        return path

    # Settings and counters

    @property
    def config(self) -> SimulatorConfig:
        return self._config

    def configure(self, config: SimulatorConfig) -> None:
        """Replace throttle and fault settings now; fault rule counters start from zero."""
        self._admin("POST", "/config", config.to_json())
        self._config = config

    def stats(self) -> SimulatorStats:
        return SimulatorStats.from_json(self._admin("GET", "/stats"))

    def reset_stats(self) -> None:
        self._admin("POST", "/stats/reset", {})

    def _admin(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            self.endpoint + ADMIN_PREFIX + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=ADMIN_TIMEOUT_S) as response:
                answer: dict[str, Any] = json.loads(response.read())
                return answer
        except urllib.error.HTTPError as exc:
            raise StoreSimulatorError(f"{method} {path}: {exc.code} {exc.read().decode(errors='replace')}") from None
        except OSError as exc:
            raise StoreSimulatorError(f"{method} {path}: the store simulator did not answer ({exc})") from None

    @staticmethod
    def _read_announcement(process: subprocess.Popen[bytes]) -> dict[str, Any]:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], STARTUP_TIMEOUT_S)
        line = process.stdout.readline() if ready else b""
        if not line:
            process.kill()
            code = process.wait()
            raise StoreSimulatorError(
                f"the store simulator exited (code {code}) or hung before announcing its endpoint"
            )
        announcement: dict[str, Any] = json.loads(line)
        return announcement


def _environment() -> dict[str, str]:
    """The caller's environment, with this package importable as the top-level ``SERVER_PACKAGE``."""
    package_parent = str(Path(__file__).resolve().parent.parent)
    paths = [package_parent, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
