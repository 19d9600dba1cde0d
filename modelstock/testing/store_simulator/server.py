"""The aiohttp application: S3 at ``/``, plain HTTP at ``/_http/``, administration at ``/_sim/``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .config import SimulatorConfig
from .http_handlers import HTTP_PREFIX, handle_http_request
from .s3_api import REQUEST_ID_KEY, handle_s3_request
from .state import STATE_KEY, SimulatorState

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
ADMIN_PREFIX = "/_sim"
SHUTDOWN_TIMEOUT_S = 0.1


def build_app(state: SimulatorState) -> web.Application:
    # Bodies are streamed by the handlers; this limit only bounds the XML bodies read whole.
    app = web.Application(client_max_size=64 * 2**20)
    app[STATE_KEY] = state
    app.router.add_get(f"{ADMIN_PREFIX}/config", _get_config)
    app.router.add_post(f"{ADMIN_PREFIX}/config", _post_config)
    app.router.add_get(f"{ADMIN_PREFIX}/stats", _get_stats)
    app.router.add_post(f"{ADMIN_PREFIX}/stats/reset", _reset_stats)
    app.router.add_get(HTTP_PREFIX + "/{path:.+}", handle_http_request)  # add_get answers HEAD too
    app.router.add_route("*", "/{tail:.*}", handle_s3_request)
    app.on_response_prepare.append(_add_server_headers)
    return app


async def _add_server_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = "modelstock-store-simulator"
    if REQUEST_ID_KEY in request:
        response.headers["x-amz-request-id"] = request[REQUEST_ID_KEY]


async def _get_config(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE_KEY].config.to_json())


async def _post_config(request: web.Request) -> web.Response:
    try:
        config = SimulatorConfig.from_json(await request.json())
    except (TypeError, ValueError, KeyError) as exc:
        return web.json_response({"error": f"{type(exc).__name__}: {exc}"}, status=400)
    request.app[STATE_KEY].configure(config)
    return web.json_response(config.to_json())


async def _get_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE_KEY].stats.snapshot().to_json())


async def _reset_stats(request: web.Request) -> web.Response:
    request.app[STATE_KEY].stats.reset()
    return web.json_response({})


async def serve(
    root: Path, port: int, config: SimulatorConfig, region: str, on_ready: Callable[[int], None], stop: asyncio.Event
) -> None:
    """Serve on 127.0.0.1:``port`` (0: any free port) until ``stop`` is set."""
    state = SimulatorState(root, config, region)
    # A stopped store should look like a dead one: responses in flight are cut, not drained.
    runner = web.AppRunner(build_app(state), access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    _count_connections(runner, state)
    site = web.TCPSite(runner, LOOPBACK, port, reuse_address=True, backlog=1024)
    await site.start()
    sockets = runner.addresses
    on_ready(sockets[0][1])
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _count_connections(runner: web.AppRunner, state: SimulatorState) -> None:
    """Count TCP connections by wrapping the two callbacks aiohttp's server makes per connection."""
    server = runner.server
    assert server is not None
    opened, closed = server.connection_made, server.connection_lost

    def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
        state.stats.connection_opened()
        opened(handler, transport)

    def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
        state.stats.connection_closed()
        closed(handler, exc)

    server.connection_made = connection_made  # type: ignore[method-assign]
    server.connection_lost = connection_lost  # type: ignore[method-assign]
