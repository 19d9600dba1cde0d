"""Ray settings that must be in the environment before ``import ray``."""

from __future__ import annotations

import os

# Loopback-only, no usage reporting, no token auth for the embedded instance (Ray 2.60 turns
# token auth on by default and local clients do not send the token). Users' own values win.
RAY_DEFAULTS = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def apply_ray_defaults() -> None:
    for key, value in RAY_DEFAULTS.items():
        os.environ.setdefault(key, value)
