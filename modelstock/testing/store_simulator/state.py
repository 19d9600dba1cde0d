"""The running server's state: store, settings, counters, and what every request goes through."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from .config import FaultKind, FaultRule, SimulatorConfig
from .disk_store import ObjectStore
from .faults import FaultInjector, RequestFacts
from .s3_xml import S3Error
from .stats import StatsRecorder
from .throttle import Throttle


class SimulatorState:
    """Lives on the server's event loop; handlers reach it through the aiohttp application."""

    def __init__(self, root: Path, config: SimulatorConfig, region: str) -> None:
        self.store = ObjectStore(root)
        self.stats = StatsRecorder()
        self.region = region
        self.configure(config)

    def configure(self, config: SimulatorConfig) -> None:
        """Replace the settings; fault counters start again. Bodies in flight keep their pacing."""
        self.config = config
        self.throttle = Throttle(config.throttle)
        self.faults = FaultInjector(config.faults, config.seed)

    async def admit(self, method: str, key: str | None, returns_object_bytes: bool) -> FaultRule | None:
        """Wait out the first-byte latency and pick this request's fault.

        Status faults are raised as S3 errors, a throttle burst starts here, and body faults
        are returned for the body sender to apply.
        """
        await self.throttle.wait_first_byte()
        rule = self.faults.pick(RequestFacts(method, key, returns_object_bytes))
        if rule is None:
            return None
        self.stats.fault_injected(rule.kind)
        if rule.kind is FaultKind.SLOW_DOWN:
            raise S3Error(503, "SlowDown", "Please reduce your request rate.")
        if rule.kind is FaultKind.INTERNAL_ERROR:
            raise S3Error(500, "InternalError", "We encountered an internal error. Please try again.")
        if rule.kind is FaultKind.THROTTLE_BURST:
            self.throttle.start_burst(rule.burst_mib_s, rule.burst_seconds)
            return None
        return rule

    async def serve_counted(
        self, operation: str, serve: Callable[[], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Run one request's handler with its operation, concurrency and status counted."""
        self.stats.request_started(operation)
        status = 500
        try:
            response = await serve()
            status = response.status
            return response
        finally:
            self.stats.request_finished(status)


STATE_KEY = web.AppKey("store_simulator_state", SimulatorState)
