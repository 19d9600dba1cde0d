"""Run the store simulator: ``python -m modelstock.testing.store_simulator --root DIR --port 0``.

Prints one JSON line (``{"endpoint": ..., "port": ..., "pid": ...}``) on stdout once it
accepts connections, then serves until SIGTERM/SIGINT (or, with ``--exit-with-stdin``, until
its standard input closes, so it cannot outlive the process that started it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from .config import DEFAULT_REGION, SimulatorConfig, ThrottleConfig
from .server import LOOPBACK, serve


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m modelstock.testing.store_simulator", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--root", type=Path, required=True, help="folder whose sub-folders are the buckets")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--region", default=DEFAULT_REGION)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="first-byte latency of every request")
    parser.add_argument("--connection-mib-s", type=float, default=None, help="cap per connection, MiB/s")
    parser.add_argument("--aggregate-mib-s", type=float, default=None, help="cap over all connections, MiB/s")
    parser.add_argument("--throttle-uploads", action="store_true", help="apply the caps to request bodies too")
    parser.add_argument("--config", default=None, help="a full SimulatorConfig as JSON (overrides the flags above)")
    parser.add_argument("--exit-with-stdin", action="store_true", help="stop when standard input reaches EOF")
    parser.add_argument("--log-level", default="WARNING")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    if args.config is not None:
        return SimulatorConfig.from_json(json.loads(args.config))
    throttle = ThrottleConfig(
        first_byte_latency_ms=args.latency_ms,
        connection_mib_s=args.connection_mib_s,
        aggregate_mib_s=args.aggregate_mib_s,
        throttle_uploads=args.throttle_uploads,
    )
    return SimulatorConfig(throttle=throttle)


async def run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
    if args.exit_with_stdin:
        _stop_at_stdin_eof(loop, stop)

    def announce(port: int) -> None:
        print(json.dumps({"endpoint": f"http://{LOOPBACK}:{port}", "port": port, "pid": os.getpid()}), flush=True)

    await serve(args.root, args.port, config_from_args(args), args.region, announce, stop)


def _stop_at_stdin_eof(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    stdin = sys.stdin.fileno()

    def on_readable() -> None:
        if not os.read(stdin, 4096):
            loop.remove_reader(stdin)
            stop.set()

    loop.add_reader(stdin, on_readable)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="store-simulator %(levelname)s %(name)s: %(message)s"
    )
    args.root.mkdir(parents=True, exist_ok=True)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
