"""Latency and bandwidth caps: token buckets that pace bodies sent (or received) in small chunks."""

from __future__ import annotations

import asyncio
import time

from .config import MIB, ThrottleConfig

# Paced bodies go out in pieces of about 5 ms at the cap (64 KiB to 1 MiB), so a cap reads as a
# smooth rate, not as bursts of whole ranges, without a system call per few microseconds at
# high caps; unpaced bodies go out in 8 MiB pieces.
MIN_PACED_CHUNK_BYTES = 64 * 1024
MAX_PACED_CHUNK_BYTES = MIB
PACED_CHUNK_SECONDS = 0.005
UNPACED_CHUNK_BYTES = 8 * MIB
# A bucket holds 20 ms of its rate: enough that event-loop jitter on a busy machine does not
# waste capacity, small enough that a cap holds over any interval longer than a few tens of ms.
BURST_SECONDS = 0.02


class TokenBucket:
    """A rate in bytes per second with a burst of ``BURST_SECONDS`` (at least one chunk).

    A reservation takes its tokens at once and may drive the bucket into debt; the caller then
    sleeps until the debt is paid. Concurrent senders are therefore served in the order they
    asked, and the total never exceeds the rate by more than one burst.
    """

    def __init__(self, bytes_per_s: float | None) -> None:
        self._bytes_per_s = bytes_per_s
        self._burst_bytes = max(MIN_PACED_CHUNK_BYTES, (bytes_per_s or 0.0) * BURST_SECONDS)
        self._tokens = self._burst_bytes
        self._refilled_at = time.monotonic()

    def reserve(self, n_bytes: int, bytes_per_s: float | None = None) -> float:
        """Take ``n_bytes``; return the seconds to wait before sending them.

        ``bytes_per_s`` overrides the bucket's own rate for this reservation (a throttle burst).
        """
        rate = bytes_per_s if bytes_per_s is not None else self._bytes_per_s
        if rate is None:
            return 0.0
        now = time.monotonic()
        self._tokens = min(self._burst_bytes, self._tokens + (now - self._refilled_at) * rate)
        self._refilled_at = now
        self._tokens -= n_bytes
        return max(0.0, -self._tokens / rate)


class Throttle:
    """The store's latency and caps: one aggregate bucket per direction, one bucket per body."""

    def __init__(self, config: ThrottleConfig) -> None:
        self.config = config
        self._aggregate_out = TokenBucket(_bytes_per_s(config.aggregate_mib_s))
        self._aggregate_in = TokenBucket(_bytes_per_s(config.aggregate_mib_s))
        self._burst_bytes_per_s: float | None = None
        self._burst_ends_at = 0.0

    @property
    def chunk_bytes(self) -> int:
        caps = [cap for cap in (_bytes_per_s(self.config.connection_mib_s), self.aggregate_bytes_per_s()) if cap]
        if not caps:
            return UNPACED_CHUNK_BYTES
        return int(min(MAX_PACED_CHUNK_BYTES, max(MIN_PACED_CHUNK_BYTES, min(caps) * PACED_CHUNK_SECONDS)))

    async def wait_first_byte(self) -> None:
        if self.config.first_byte_latency_ms > 0:
            await asyncio.sleep(self.config.first_byte_latency_ms / 1000.0)

    def start_burst(self, mib_s: float, seconds: float) -> None:
        """Lower the aggregate cap of sent bodies to ``mib_s`` for the next ``seconds``."""
        self._burst_bytes_per_s = mib_s * MIB
        self._burst_ends_at = time.monotonic() + seconds

    def pacer(self, upload: bool = False) -> BodyPacer:
        """A pacer for one body. HTTP/1.1 carries one body at a time on a connection, so a
        bucket per body is a bucket per connection."""
        if upload and not self.config.throttle_uploads:
            return BodyPacer(None, None, None)
        connection = TokenBucket(_bytes_per_s(self.config.connection_mib_s))
        return BodyPacer(connection, self._aggregate_in if upload else self._aggregate_out, None if upload else self)

    def aggregate_bytes_per_s(self) -> float | None:
        """The aggregate cap now: the burst rate while a burst lasts, never above the configured cap."""
        cap = _bytes_per_s(self.config.aggregate_mib_s)
        if self._burst_bytes_per_s is None or time.monotonic() >= self._burst_ends_at:
            return cap
        return self._burst_bytes_per_s if cap is None else min(cap, self._burst_bytes_per_s)


class BodyPacer:
    """Sleeps before each chunk of one body as long as its buckets require."""

    def __init__(self, connection: TokenBucket | None, aggregate: TokenBucket | None, throttle: Throttle | None):
        self._connection = connection
        self._aggregate = aggregate
        self._throttle = throttle  # present for sent bodies, which bursts slow down

    async def pace(self, n_bytes: int) -> None:
        if self._connection is None or self._aggregate is None:
            return
        aggregate_rate = self._throttle.aggregate_bytes_per_s() if self._throttle is not None else None
        delay = max(self._connection.reserve(n_bytes), self._aggregate.reserve(n_bytes, aggregate_rate))
        if delay > 0:
            await asyncio.sleep(delay)


def _bytes_per_s(mib_s: float | None) -> float | None:
    return None if mib_s is None else mib_s * MIB
