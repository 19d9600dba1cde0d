"""The process environment Ray runs under: loopback only, no usage reporting and no token auth for
the embedded local instance; loopback only for a client joining a cluster on this machine. Applied
by ``cluster/session.py`` for one session and restored after, never at import, so a client that
joins a token-auth cluster keeps its ``RAY_AUTH_MODE`` and sends its token.

When Ray 2.60 reads each variable (its source, checked by experiment in tests/test_session.py):

- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``: once, at ``import ray``, into
  ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``. While that is on (Linux's default) Ray swaps
  127.0.0.1 for the machine's address: a local instance listens on every interface, and a client
  cannot join a cluster bound to loopback. Set after the import, only the constant counts, so
  both are set here (the variable for Ray's child processes).
- ``RAY_AUTH_MODE``: by each Ray process when it starts, and by the driver's config, which caches
  it (``cluster.auth.use_current_credentials`` re-reads it). Setting it before ``ray.init`` works.
- ``RAY_USAGE_STATS_ENABLED``: when usage would be reported. ``ray.init`` of a local instance turns
  reporting off itself (release wheels); the variable matters for ``ray start``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

LOOPBACK_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK_ENV = {LOOPBACK_VAR: "0"}
# Token auth off for the embedded instance only: it listens on loopback, lives as long as this
# process, and Ray would otherwise write a token to ~/.ray/auth_token on first use.
EMBEDDED_ENV = {**LOOPBACK_ENV, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def _wants_loopback() -> bool:
    # Ray's own reading of the variable (ray._common.utils.env_bool).
    return os.environ.get(LOOPBACK_VAR, "1").lower() not in {"1", "true"}


@contextmanager
def ray_environment(defaults: Mapping[str, str]) -> Iterator[None]:
    """``defaults`` in the environment for the duration, then the environment as it was. Values the
    user set win. The loopback setting also reaches ``import ray``'s constant, which is restored."""
    added = [key for key in defaults if key not in os.environ]
    for key in added:
        os.environ[key] = defaults[key]
    pin_loopback = LOOPBACK_VAR in defaults
    if pin_loopback:
        import ray._private.ray_constants as ray_constants

        enabled_before = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = not _wants_loopback()
    try:
        yield
    finally:
        if pin_loopback:
            ray_constants.ENABLE_RAY_CLUSTER = enabled_before
        for key in added:
            os.environ.pop(key, None)


def apply_to_process(defaults: Mapping[str, str] = EMBEDDED_ENV) -> None:
    """``defaults`` for the rest of this process (values already set win). For processes that only
    ever run local Ray and call ``ray.init`` themselves, e.g. a test run; call before ``import ray``."""
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
