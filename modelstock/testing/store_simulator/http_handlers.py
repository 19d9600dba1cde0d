"""The same objects as plain HTTP under ``/_http/<bucket>/<key>``, for fsspec's ``http://``.

fsspec's HTTP filesystem needs HEAD with Content-Length (``info``), GET with Range
(``cat_file``, ``cat_ranges``) and folder pages of links (``ls``). The prefix starts with an
underscore, which no bucket name may, so it can never shadow a bucket.
"""

from __future__ import annotations

import html
import urllib.parse

from aiohttp import web

from .config import FaultRule
from .disk_store import etag_matches
from .response_bodies import ByteRange, object_headers, parse_range, send_object_bytes
from .s3_xml import S3Error
from .state import STATE_KEY, SimulatorState

HTTP_PREFIX = "/_http"
LISTING_LIMIT = 100_000


async def handle_http_request(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    bucket, _, key = request.match_info["path"].partition("/")
    is_folder = key == "" or key.endswith("/") or _is_folder(state, bucket, key)
    operation = "HttpList" if is_folder else "HttpHead" if request.method == "HEAD" else "HttpGet"

    async def serve() -> web.StreamResponse:
        try:
            fault = await state.admit(request.method, key or None, operation == "HttpGet")
            if is_folder:
                return _folder_page(state, bucket, key)
            return await _serve_object(state, request, bucket, key, fault)
        except S3Error as error:
            return web.Response(status=error.status, text=f"{error.code}: {error.message}\n")

    return await state.serve_counted(operation, serve)


def _is_folder(state: SimulatorState, bucket: str, key: str) -> bool:
    try:
        return state.store.is_folder(bucket, key)
    except S3Error:
        return False


async def _serve_object(
    state: SimulatorState, request: web.Request, bucket: str, key: str, fault: FaultRule | None
) -> web.StreamResponse:
    source, stored = state.store.open_object(bucket, key)
    with source:
        if_match = request.headers.get("If-Match")
        if if_match is not None and not etag_matches(if_match, stored.etag):
            return web.Response(status=412, text="Precondition Failed: If-Match\n")
        if_none_match = request.headers.get("If-None-Match")
        if if_none_match is not None and etag_matches(if_none_match, stored.etag):
            return web.Response(status=304, headers={"ETag": stored.etag})
        headers = object_headers(stored)
        if request.method == "HEAD":
            response = web.StreamResponse(headers=headers)
            response.content_length = stored.size
            return response
        byte_range = parse_range(request.headers.get("Range"), stored.size)
        if byte_range is not None:
            headers["Content-Range"] = byte_range.content_range(stored.size)
        response = web.StreamResponse(status=206 if byte_range else 200, headers=headers)
        body_range = byte_range or ByteRange(0, stored.size - 1)

        def count_sent(n_bytes: int) -> None:
            state.stats.bytes_sent(request.method, n_bytes)

        return await send_object_bytes(request, response, source, body_range, state.throttle, fault, count_sent)


def _folder_page(state: SimulatorState, bucket: str, folder_key: str) -> web.Response:
    prefix = folder_key if folder_key == "" or folder_key.endswith("/") else folder_key + "/"
    page = state.store.list_keys(bucket, prefix, "/", None, LISTING_LIMIT)
    if not page.keys and not page.common_prefixes and prefix:
        raise S3Error(404, "NoSuchKey", "No such folder")
    links = [
        f'<li><a href="{html.escape(_href(bucket, entry))}">{html.escape(entry[len(prefix) :])}</a></li>'
        for entry in sorted(page.common_prefixes + page.keys)
    ]
    title = html.escape(f"{bucket}/{prefix}")
    body = (
        f"<!DOCTYPE html>\n<html><head><title>{title}</title></head><body><ul>\n"
        + "\n".join(links)
        + "\n</ul></body></html>\n"
    )
    return web.Response(text=body, content_type="text/html")


def _href(bucket: str, key: str) -> str:
    return urllib.parse.quote(f"{HTTP_PREFIX}/{bucket}/{key}", safe="/~")
