"""The simulator's typed settings and counters, and their JSON form on the admin endpoint.

Settings travel as JSON twice (CLI ``--config`` and ``POST /_sim/config``), so each type knows
how to turn itself into plain JSON values and back; nothing else in the package sees a dict.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

MIB = 2**20
DEFAULT_REGION = "eu-west-1"  # s3fs mkdir fails with us-east-1's location constraint


class FaultKind(str, enum.Enum):
    """What goes wrong with a request that a fault rule picks."""

    SLOW_DOWN = "slow_down"  # 503 with S3's SlowDown error body
    INTERNAL_ERROR = "internal_error"  # 500 with S3's InternalError error body
    RESET_MID_BODY = "reset_mid_body"  # TCP reset after part of the response body
    TRUNCATED_BODY = "truncated_body"  # fewer bytes than Content-Length, then a clean close
    THROTTLE_BURST = "throttle_burst"  # aggregate cap lowered for a while, request served

    @property
    def needs_body(self) -> bool:
        """Body faults only make sense for responses that carry object bytes."""
        return self in (FaultKind.RESET_MID_BODY, FaultKind.TRUNCATED_BODY)


@dataclass(frozen=True)
class ThrottleConfig:
    """Bandwidth and latency of the simulated store; ``None`` means unlimited.

    Caps are in MiB/s and apply to response bodies; ``throttle_uploads`` applies the same caps
    to request bodies as well (with their own buckets: a link is full duplex).
    """

    first_byte_latency_ms: float = 0.0
    connection_mib_s: float | None = None
    aggregate_mib_s: float | None = None
    throttle_uploads: bool = False

    def __post_init__(self) -> None:
        if self.first_byte_latency_ms < 0:
            raise ValueError("first_byte_latency_ms must be >= 0")
        for name in ("connection_mib_s", "aggregate_mib_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 or None (unlimited)")


@dataclass(frozen=True)
class FaultRule:
    """Inject ``kind`` into matching requests, deterministically.

    A request matches when its HTTP method is in ``methods`` (empty: any), its key contains
    ``key_contains`` (None: any key) and, for body faults, it returns object bytes. Of the
    matching requests, every ``every_nth``-th one is faulted, or each one with ``probability``
    drawn from a generator seeded by ``SimulatorConfig.seed``; at most ``max_count`` in all.
    """

    kind: FaultKind
    every_nth: int | None = None
    probability: float | None = None
    methods: tuple[str, ...] = ()
    key_contains: str | None = None
    max_count: int | None = None
    body_fraction: float = 0.5  # share of the body sent before a reset or truncation
    burst_mib_s: float = 1.0  # aggregate cap during a throttle burst
    burst_seconds: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", FaultKind(self.kind))
        object.__setattr__(self, "methods", tuple(m.upper() for m in self.methods))
        if (self.every_nth is None) == (self.probability is None):
            raise ValueError("a FaultRule needs exactly one of every_nth and probability")
        if self.every_nth is not None and self.every_nth < 1:
            raise ValueError("every_nth must be >= 1")
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise ValueError("probability must lie in [0, 1]")
        if not 0.0 <= self.body_fraction < 1.0:
            raise ValueError("body_fraction must lie in [0, 1)")
        if self.burst_mib_s <= 0 or self.burst_seconds <= 0:
            raise ValueError("burst_mib_s and burst_seconds must be > 0")


@dataclass(frozen=True)
class SimulatorConfig:
    """Everything that can change while the server runs. Default: a fast, faultless store."""

    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)
    faults: tuple[FaultRule, ...] = ()
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "throttle": asdict(self.throttle),
            "faults": [{**asdict(rule), "kind": rule.kind.value} for rule in self.faults],
            "seed": self.seed,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> SimulatorConfig:
        faults = tuple(
            FaultRule(**{**rule, "methods": tuple(rule.get("methods", ()))}) for rule in value.get("faults", ())
        )
        return cls(throttle=ThrottleConfig(**value.get("throttle", {})), faults=faults, seed=int(value.get("seed", 0)))


@dataclass(frozen=True)
class SimulatorStats:
    """What the server saw since it started or since the last reset.

    Operations are S3 names (``GetObject``, ``UploadPart``...) or ``HttpGet``/``HttpHead``/
    ``HttpList`` for the plain-HTTP view. Byte counts are object payload bytes: response bodies
    sent by HTTP method, and decoded upload bodies received.
    """

    requests_by_operation: dict[str, int]
    responses_by_status: dict[int, int]
    bytes_sent_by_method: dict[str, int]
    bytes_received: int
    max_concurrent_connections: int
    max_concurrent_requests: int
    faults_injected: dict[FaultKind, int]

    @property
    def precondition_failures(self) -> int:
        """Responses with status 412."""
        return self.responses_by_status.get(412, 0)

    @property
    def total_requests(self) -> int:
        return sum(self.requests_by_operation.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "requests_by_operation": self.requests_by_operation,
            "responses_by_status": {str(status): n for status, n in self.responses_by_status.items()},
            "bytes_sent_by_method": self.bytes_sent_by_method,
            "bytes_received": self.bytes_received,
            "max_concurrent_connections": self.max_concurrent_connections,
            "max_concurrent_requests": self.max_concurrent_requests,
            "faults_injected": {kind.value: n for kind, n in self.faults_injected.items()},
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> SimulatorStats:
        return cls(
            requests_by_operation=dict(value["requests_by_operation"]),
            responses_by_status={int(status): n for status, n in value["responses_by_status"].items()},
            bytes_sent_by_method=dict(value["bytes_sent_by_method"]),
            bytes_received=int(value["bytes_received"]),
            max_concurrent_connections=int(value["max_concurrent_connections"]),
            max_concurrent_requests=int(value["max_concurrent_requests"]),
            faults_injected={FaultKind(kind): n for kind, n in value["faults_injected"].items()},
        )
