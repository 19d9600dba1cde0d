"""A loopback object store for tests and benchmarks: S3 and plain HTTP over a local folder,
with configurable latency, bandwidth caps and deterministic faults.

Start it from Python with ``StoreSimulator(root)`` (a context manager that runs the server as a
subprocess) or from a shell with ``python -m modelstock.testing.store_simulator --root DIR``.
Bucket = sub-folder of the root, key = file path inside it.
"""

from .config import (
    FaultKind,
    FaultRule,
    SimulatorConfig,
    SimulatorStats,
    ThrottleConfig,
)
from .handle import StoreSimulator, StoreSimulatorError

__all__ = [
    "FaultKind",
    "FaultRule",
    "SimulatorConfig",
    "SimulatorStats",
    "StoreSimulator",
    "StoreSimulatorError",
    "ThrottleConfig",
]
