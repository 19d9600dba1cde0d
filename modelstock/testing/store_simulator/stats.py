"""Counters of what the server saw, kept on its event loop and read through ``/_sim/stats``."""

from __future__ import annotations

from collections import Counter

from .config import FaultKind, SimulatorStats


class StatsRecorder:
    """Mutable counters; ``snapshot`` turns them into the typed ``SimulatorStats``."""

    def __init__(self) -> None:
        self.open_connections = 0
        self.requests_in_flight = 0
        self.reset()

    def reset(self) -> None:
        self.requests_by_operation: Counter[str] = Counter()
        self.responses_by_status: Counter[int] = Counter()
        self.bytes_sent_by_method: Counter[str] = Counter()
        self.faults_injected: Counter[FaultKind] = Counter()
        self.bytes_received = 0
        # Maxima restart from what is open now, not from zero, so a reset mid-run stays truthful.
        self.max_concurrent_connections = self.open_connections
        self.max_concurrent_requests = self.requests_in_flight

    def connection_opened(self) -> None:
        self.open_connections += 1
        self.max_concurrent_connections = max(self.max_concurrent_connections, self.open_connections)

    def connection_closed(self) -> None:
        self.open_connections -= 1

    def request_started(self, operation: str) -> None:
        self.requests_by_operation[operation] += 1
        self.requests_in_flight += 1
        self.max_concurrent_requests = max(self.max_concurrent_requests, self.requests_in_flight)

    def request_finished(self, status: int) -> None:
        self.requests_in_flight -= 1
        self.responses_by_status[status] += 1

    def bytes_sent(self, method: str, n_bytes: int) -> None:
        self.bytes_sent_by_method[method] += n_bytes

    def bytes_arrived(self, n_bytes: int) -> None:
        self.bytes_received += n_bytes

    def fault_injected(self, kind: FaultKind) -> None:
        self.faults_injected[kind] += 1

    def snapshot(self) -> SimulatorStats:
        return SimulatorStats(
            requests_by_operation=dict(self.requests_by_operation),
            responses_by_status=dict(self.responses_by_status),
            bytes_sent_by_method=dict(self.bytes_sent_by_method),
            bytes_received=self.bytes_received,
            max_concurrent_connections=self.max_concurrent_connections,
            max_concurrent_requests=self.max_concurrent_requests,
            faults_injected=dict(self.faults_injected),
        )
