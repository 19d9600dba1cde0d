"""Getting a Ray connection: join the cluster named by ``--address`` / ``RAY_ADDRESS`` (which is
how ``ray job submit`` entrypoints find their cluster), else start an embedded local instance sized
for the machine. Only this module calls ``ray.init``.

``start_session`` begins ``ray.init`` and returns at once, so the caller can plan (read checkpoint
headers) while Ray starts; ``wait()`` gives the session, ``close()`` (or leaving the ``with``
block) stops what was started. ``ray_session`` is the same as one ``with`` block.

``ray.init`` runs on a thread of the session's own that lives until ``close()``, not on a
short-lived one: Ray starts its processes with ``PR_SET_PDEATHSIG`` (fate sharing), which Linux
fires when the *thread* that started a child exits, so a ``ray.init`` on a thread that then ends
takes the GCS and raylet down under the driver (observed: the driver's next call waits 60 s for a
GCS that is gone). Nothing else in ``ray.init`` needs the main thread; its SIGTERM handler (exit,
so the session still closes) is installed here from the main thread instead.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import cached_property
from types import FrameType, TracebackType
from urllib.parse import urlsplit

import ray

from cluster.auth import (
    ClientCredentials,
    access_denied,
    check_before_connecting,
    client_credentials,
    use_current_credentials,
)
from cluster.ray_env import EMBEDDED_ENV, LOOPBACK_ENV, ray_environment

log = logging.getLogger(__name__)

EMBEDDED_OBJECT_STORE_BYTES = 256 * 1024 * 1024  # tensors never go through the object store
MONITOR_EXIT_WAIT_S = 5
CREDENTIALS_PROBE_TIMEOUT_MS = 5000


@dataclass(frozen=True)
class ClusterResources:
    cpus: float
    gpus: float
    nodes: int


@dataclass(frozen=True)
class RaySession:
    """A connected Ray: where it is, whether this process started it, and (asked for on first use
    only, so joining a cluster costs no extra round trip) what it has."""

    address: str
    embedded: bool

    @cached_property
    def resources(self) -> ClusterResources:
        totals = ray.cluster_resources()
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        return ClusterResources(cpus=totals.get("CPU", 0.0), gpus=totals.get("GPU", 0.0), nodes=nodes)

    @property
    def cpus(self) -> float:
        return self.resources.cpus

    @property
    def gpus(self) -> float:
        return self.resources.gpus

    @property
    def nodes(self) -> int:
        return self.resources.nodes


def is_loopback(address: str) -> bool:
    """Whether a Ray address (``HOST:PORT``, ``ray://HOST:PORT``) names this machine's loopback."""
    host = urlsplit(address if "://" in address else f"ray://{address}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cluster_address(address: str | None) -> str | None:
    """The cluster a session joins: ``address``, else ``RAY_ADDRESS`` (what ``ray job submit`` sets
    for its entrypoint), else none (an embedded local instance)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def _logging_level(quiet: bool) -> int:
    return logging.WARNING if quiet else logging.INFO


def _start_embedded(num_cpus: int | None, log_to_driver: bool, quiet: bool) -> RaySession:
    # As lean as ray.init allows (Ray 2.60): no dashboard. The raylet's two agents, the autoscaler
    # monitor, the log monitor and a minimal API server start regardless; no ray.init option or
    # system config skips them, and disabling worker prestart measured no faster.
    ray.init(
        address="local",  # never whatever /tmp/ray/ray_current_cluster names
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=False,
        object_store_memory=EMBEDDED_OBJECT_STORE_BYTES,
        log_to_driver=log_to_driver,
        logging_level=_logging_level(quiet),
    )
    return RaySession(address=ray.get_runtime_context().gcs_address, embedded=True)


def _refuses_credentials(address: str) -> bool:
    """Ask the GCS once whether it refuses this client's credentials. Only after ``ray.init`` gave
    up: it retries UNAUTHENTICATED answers as if the cluster were down, then says only that. A
    refusal answers at once; nothing answering costs at most ``CREDENTIALS_PROBE_TIMEOUT_MS``."""
    if "://" in address:  # a Ray Client address has no GCS to ask
        return False
    from ray._raylet import InnerGcsClient  # type: ignore[attr-defined]

    try:
        InnerGcsClient.standalone(address, None, CREDENTIALS_PROBE_TIMEOUT_MS)
    except ray.exceptions.AuthenticationError:
        return True
    except (ConnectionError, RuntimeError, ray.exceptions.RayError):
        return False
    return False


def _join(address: str, credentials: ClientCredentials, log_to_driver: bool, quiet: bool) -> RaySession:
    try:
        ray.init(address=address, log_to_driver=log_to_driver, logging_level=_logging_level(quiet))
    except ray.exceptions.AuthenticationError:
        raise access_denied(address, credentials) from None
    except ConnectionError:
        if _refuses_credentials(address):
            raise access_denied(address, credentials) from None
        from cluster.errors import ClusterUnreachable  # loads torch through modelstock: failures only

        raise ClusterUnreachable(f"{address}: no Ray cluster answered there (expected the head's GCS, "
                                 "HOST:6379, or ray://HOST:10001)") from None
    return RaySession(address=ray.get_runtime_context().gcs_address or address, embedded=False)


def _end_autoscaler_monitor() -> None:
    """End the embedded instance's autoscaler monitor outright. ``ray.shutdown`` stops the raylet
    and the GCS, then SIGTERMs the monitor, whose handler reports its own end to the GCS that is
    gone and so never exits within Ray's 1 s grace: Ray SIGKILLs it a second later. A fixed-size
    local instance has nothing for it to scale or flush, so kill it first and save that second."""
    node = getattr(ray._private.worker, "_global_node", None)
    monitors = getattr(node, "all_processes", {}).get(ray._private.ray_constants.PROCESS_TYPE_MONITOR, [])
    for info in monitors:
        info.process.kill()
        info.process.wait(timeout=MONITOR_EXIT_WAIT_S)


class _HideNotMainThreadWarning(logging.Filter):
    """Ray warns that it cannot set its SIGTERM handler off the main thread; ours is set instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


_NOT_MAIN_THREAD_WARNING = _HideNotMainThreadWarning()


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    sys.exit(128 + signum)  # SystemExit unwinds through the session's close()


class RaySessionStarter:
    """A Ray session being started on its own thread while the caller works. Use as a context
    manager: leaving the block closes the session (after waiting for a start under way)."""

    def __init__(self, address: str | None, num_cpus: int | None, log_to_driver: bool, quiet: bool) -> None:
        self._session: RaySession | None = None
        self._failure: BaseException | None = None
        self._ready = threading.Event()
        self._closed = threading.Event()
        self._cleanup = ExitStack()
        self._owner: threading.Thread | None = None
        if ray.is_initialized():  # a test's cluster or a notebook's Ray: used as is, left running
            self._session = RaySession(address=ray.get_runtime_context().gcs_address, embedded=False)
            self._owns_ray = False
            self._ready.set()
            return
        self._owns_ray = True
        target = cluster_address(address)
        credentials = client_credentials()
        if target:
            check_before_connecting(target, credentials)
        try:
            self._cleanup.enter_context(ray_environment(
                EMBEDDED_ENV if target is None else LOOPBACK_ENV if is_loopback(target) else {}))
            use_current_credentials()
            self._install_sigterm_handler()
            self._owner = threading.Thread(
                target=self._own, args=(target, credentials, num_cpus, log_to_driver, quiet),
                name="ray-session", daemon=True,
            )
            self._owner.start()
        except BaseException:
            self._cleanup.close()
            raise

    def _install_sigterm_handler(self) -> None:
        worker_logger = logging.getLogger(ray._private.worker.__name__)
        worker_logger.addFilter(_NOT_MAIN_THREAD_WARNING)
        self._cleanup.callback(worker_logger.removeFilter, _NOT_MAIN_THREAD_WARNING)
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
            self._cleanup.callback(signal.signal, signal.SIGTERM, signal.SIG_DFL)

    def _own(self, target: str | None, credentials: ClientCredentials, num_cpus: int | None,
             log_to_driver: bool, quiet: bool) -> None:
        try:
            if target is None:
                self._session = _start_embedded(num_cpus, log_to_driver, quiet)
                log.info("Ray: embedded, %d CPUs", num_cpus or os.cpu_count() or 1)
            else:
                log.info("joining Ray cluster at %s", target)
                self._session = _join(target, credentials, log_to_driver, quiet)
        except BaseException as exc:  # handed to the caller's thread by wait()
            self._failure = exc
        finally:
            self._ready.set()
        # Ray's processes die with the thread that started them (see the module docstring).
        self._closed.wait()

    def wait(self) -> RaySession:
        """The session, once started; raises what the start raised (e.g. ClusterAccessDenied)."""
        self._ready.wait()
        if self._failure is not None:
            raise self._failure
        assert self._session is not None
        return self._session

    def close(self) -> None:
        """Stop what this session started (nothing, for a Ray that was already running). A start
        under way is waited for: Ray cannot be stopped half-started."""
        if self._closed.is_set():
            return
        self._ready.wait()
        try:
            if self._owns_ray and ray.is_initialized():
                if self._session is not None and self._session.embedded:
                    _end_autoscaler_monitor()
                ray.shutdown()
        finally:
            self._closed.set()
            if self._owner is not None:
                self._owner.join()
            self._cleanup.close()

    def __enter__(self) -> RaySessionStarter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


def start_session(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = False,
                  quiet: bool = False) -> RaySessionStarter:
    """Begin connecting to Ray and return at once: join ``address`` (else ``RAY_ADDRESS``), else
    start an embedded local instance with ``num_cpus`` CPUs (default: this machine's).

    Raises ClusterAccessDenied at once when ``RAY_AUTH_MODE=token`` but no token can be sent; the
    cluster's own refusal comes from ``wait()``.
    """
    return RaySessionStarter(address, num_cpus, log_to_driver, quiet)


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = False,
                quiet: bool = False) -> Iterator[RaySession]:
    """A connected Ray for the duration of the block (``start_session`` then ``wait``).

    An already initialised Ray (e.g. a test's cluster or a user's notebook) is used as is and
    left running; one started here is shut down on exit.
    """
    with start_session(address, num_cpus=num_cpus, log_to_driver=log_to_driver, quiet=quiet) as starting:
        yield starting.wait()


__all__ = [
    "ClusterResources", "RaySession", "RaySessionStarter", "cluster_address", "is_loopback", "ray_session",
    "start_session",
]
