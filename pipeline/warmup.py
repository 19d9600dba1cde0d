"""Warming Ray's workers while the driver is still planning: a fresh worker's first shard task
would spend seconds importing torch and the merge code; a warm-up task does it earlier, on the
same worker processes (Ray reuses a job's idle workers), so the import overlaps header reads."""

from __future__ import annotations

import ray


@ray.remote(num_cpus=1)
def _import_the_merge_code() -> None:
    import pipeline.worker  # noqa: F401  (the import is the warm-up)


def warm_workers(count: int) -> list[ray.ObjectRef]:
    """Start ``count`` warm-up tasks without waiting for them."""
    return [_import_the_merge_code.remote() for _ in range(max(0, count))]
