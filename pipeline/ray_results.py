"""Getting a Ray task's result with our own errors intact.

Ray wraps an exception raised in a task in ``RayTaskError``; ours (bad input, storage failures)
are re-raised as themselves so the CLI's error contract (one line, exit 2 for bad input) holds
across the process boundary.
"""

from __future__ import annotations

from typing import Any

import ray

from modelstock.errors import ModelStockError


def result_of(ref: ray.ObjectRef) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, ModelStockError):
            raise exc.cause from None
        raise
