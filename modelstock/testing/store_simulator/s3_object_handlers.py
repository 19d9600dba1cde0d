"""S3 object operations: head, get (ranges, conditions), put, copy, delete."""

from __future__ import annotations

import asyncio
import urllib.parse

from aiohttp import web

from . import s3_xml
from .config import FaultRule
from .disk_store import StoredObject, etag_matches
from .request_bodies import receive_body
from .response_bodies import ByteRange, object_headers, parse_range, send_object_bytes
from .s3_request import S3Target, checksum_headers, object_attributes, write_condition, xml_response
from .state import SimulatorState


async def head_object(
    state: SimulatorState, request: web.Request, target: S3Target, fault: FaultRule | None
) -> web.StreamResponse:
    stored = state.store.head(target.bucket_name, target.key_name)
    if _not_modified(request, stored):
        return web.Response(status=304, headers={"ETag": stored.etag})
    response = web.StreamResponse(headers=object_headers(stored))
    response.content_length = stored.size
    return response


async def get_object(
    state: SimulatorState, request: web.Request, target: S3Target, fault: FaultRule | None
) -> web.StreamResponse:
    source, stored = state.store.open_object(target.bucket_name, target.key_name)
    with source:
        if _not_modified(request, stored):
            return web.Response(status=304, headers={"ETag": stored.etag})
        byte_range = parse_range(request.headers.get("Range"), stored.size)
        headers = object_headers(stored)
        if byte_range is not None:
            headers["Content-Range"] = byte_range.content_range(stored.size)
        elif request.headers.get("x-amz-checksum-mode", "").upper() == "ENABLED" and stored.attributes.checksums:
            # As S3 does for whole-object reads of objects put with a checksum; botocore verifies it.
            headers.update(checksum_headers(stored.attributes.checksums))
            headers["x-amz-checksum-type"] = "FULL_OBJECT"
        response = web.StreamResponse(status=206 if byte_range else 200, headers=headers)
        body_range = byte_range or ByteRange(0, stored.size - 1)

        def count_sent(n_bytes: int) -> None:
            state.stats.bytes_sent(request.method, n_bytes)

        return await send_object_bytes(request, response, source, body_range, state.throttle, fault, count_sent)


def _not_modified(request: web.Request, stored: StoredObject) -> bool:
    """Raise 412 for a failed If-Match; True when If-None-Match names the object (S3: 304)."""
    if_match = request.headers.get("If-Match")
    if if_match is not None and not etag_matches(if_match, stored.etag):
        raise s3_xml.precondition_failed("If-Match")
    if_none_match = request.headers.get("If-None-Match")
    return if_none_match is not None and etag_matches(if_none_match, stored.etag)


async def put_object(
    state: SimulatorState, request: web.Request, target: S3Target, fault: FaultRule | None
) -> web.StreamResponse:
    bucket, key = target.bucket_name, target.key_name
    condition = write_condition(request)
    state.store.check_write_condition(bucket, key, condition)  # refuse before the body, as S3 does
    staged = state.store.staging_path()
    body = await receive_body(request, staged, state.throttle.pacer(upload=True), state.stats.bytes_arrived)
    attributes = object_attributes(request, checksums=body.checksums)
    stored = state.store.commit(bucket, key, staged, f'"{body.md5_hex}"', attributes, condition)
    return web.Response(headers={"ETag": stored.etag, **checksum_headers(body.checksums)})


async def copy_object(
    state: SimulatorState, request: web.Request, target: S3Target, fault: FaultRule | None
) -> web.StreamResponse:
    source_bucket, source_key = _copy_source(request.headers["x-amz-copy-source"])
    source = state.store.head(source_bucket, source_key)
    copy_if_match = request.headers.get("x-amz-copy-source-if-match")
    if copy_if_match is not None and not etag_matches(copy_if_match, source.etag):
        raise s3_xml.precondition_failed("x-amz-copy-source-If-Match")
    staged = await asyncio.get_running_loop().run_in_executor(None, state.store.copy_to_staging, source)
    replace = request.headers.get("x-amz-metadata-directive", "COPY").upper() == "REPLACE"
    attributes = object_attributes(request) if replace else source.attributes
    condition = write_condition(request)
    stored = state.store.commit(target.bucket_name, target.key_name, staged, source.etag, attributes, condition)
    result = {"LastModified": s3_xml.iso_time(stored.last_modified), "ETag": stored.etag}
    return xml_response(s3_xml.simple_document("CopyObjectResult", result))


def _copy_source(header: str) -> tuple[str, str]:
    path = urllib.parse.unquote(header.split("?", 1)[0]).lstrip("/")
    bucket, _, key = path.partition("/")
    if not bucket or not key:
        raise s3_xml.invalid_argument("Copy Source must mention the source bucket and key: sourcebucket/sourcekey")
    return bucket, key


async def delete_object(
    state: SimulatorState, request: web.Request, target: S3Target, fault: FaultRule | None
) -> web.StreamResponse:
    state.store.delete(target.bucket_name, target.key_name)
    return web.Response(status=204)
