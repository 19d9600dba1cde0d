"""Getting a Ray connection: join the cluster named by ``--address`` / ``RAY_ADDRESS`` (which is
how ``ray job submit`` entrypoints find their cluster), else start an embedded local instance
sized for a laptop. Only this module calls ``ray.init``."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from cluster.ray_env import apply_ray_defaults

apply_ray_defaults()

import ray  # noqa: E402

log = logging.getLogger(__name__)

EMBEDDED_OBJECT_STORE_BYTES = 256 * 1024 * 1024  # tensors never go through the object store


@dataclass(frozen=True)
class RaySession:
    address: str
    embedded: bool
    cpus: float
    gpus: float
    nodes: int


def _describe(embedded: bool) -> RaySession:
    resources = ray.cluster_resources()
    return RaySession(
        address=ray.get_runtime_context().gcs_address,
        embedded=embedded,
        cpus=resources.get("CPU", 0.0),
        gpus=resources.get("GPU", 0.0),
        nodes=sum(1 for node in ray.nodes() if node.get("Alive")),
    )


@contextmanager
def ray_session(
    address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = False, quiet: bool = False
) -> Iterator[RaySession]:
    """A connected Ray for the duration of the block.

    An already initialised Ray (e.g. a test's cluster or a user's notebook) is used as is and
    left running; one started here is shut down on exit.
    """
    if ray.is_initialized():
        yield _describe(embedded=False)
        return
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        log.info("joining Ray cluster at %s", target)
        ray.init(address=target, log_to_driver=log_to_driver, logging_level=logging.WARNING if quiet else logging.INFO)
        embedded = False
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            object_store_memory=EMBEDDED_OBJECT_STORE_BYTES,
            log_to_driver=log_to_driver,
            logging_level=logging.WARNING if quiet else logging.INFO,
        )
        embedded = True
    try:
        session = _describe(embedded)
        log.info("Ray: %s nodes, %s CPUs, %s GPUs (%s)", session.nodes, session.cpus, session.gpus,
                 "embedded" if embedded else session.address)
        yield session
    finally:
        ray.shutdown()
