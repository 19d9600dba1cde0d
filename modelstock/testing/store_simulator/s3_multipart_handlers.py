"""S3 multipart uploads: create, upload part, complete, abort, list uploads and parts.

Parts wait in the store's state folder; the object appears only when Complete renames the
assembled file into place, and Abort removes every part.
"""

from __future__ import annotations

import asyncio
import urllib.parse

from aiohttp import web

from . import s3_xml
from .config import FaultRule
from .request_bodies import receive_body
from .s3_request import S3Target, checksum_headers, object_attributes, write_condition, xml_response
from .s3_xml import S3Error
from .state import SimulatorState


async def create_upload(
    state: SimulatorState, request: web.Request, target: S3Target, fault: FaultRule | None
) -> web.StreamResponse:
    upload_id = state.store.create_upload(target.bucket_name, target.key_name, object_attributes(request))
    headers = {}
    if "x-amz-checksum-algorithm" in request.headers:
        headers["x-amz-checksum-algorithm"] = request.headers["x-amz-checksum-algorithm"]
    result = {"Bucket": target.bucket_name, "Key": target.key_name, "UploadId": upload_id}
    body = s3_xml.simple_document("InitiateMultipartUploadResult", result)
    return web.Response(body=body, content_type="application/xml", headers=headers)


async def upload_part(
    state: SimulatorState, request: web.Request, target: S3Target, fault: FaultRule | None
) -> web.StreamResponse:
    upload_id = request.query["uploadId"]
    state.store.upload_target(upload_id, target.bucket_name, target.key_name)
    try:
        number = int(request.query["partNumber"])
    except (KeyError, ValueError):
        raise s3_xml.invalid_argument("Part number must be an integer between 1 and 10000, inclusive") from None
    staged = state.store.staging_path()
    body = await receive_body(request, staged, state.throttle.pacer(upload=True), state.stats.bytes_arrived)
    state.store.commit_part(upload_id, number, staged, body.md5_hex)
    return web.Response(headers={"ETag": f'"{body.md5_hex}"', **checksum_headers(body.checksums)})


async def complete_upload(
    state: SimulatorState, request: web.Request, target: S3Target, fault: FaultRule | None
) -> web.StreamResponse:
    bucket, key, upload_id = target.bucket_name, target.key_name, request.query["uploadId"]
    attributes = state.store.upload_target(upload_id, bucket, key)
    requested = s3_xml.parse_completed_parts(await request.read())
    condition = write_condition(request)
    state.store.check_write_condition(bucket, key, condition)  # before copying gigabytes for nothing
    loop = asyncio.get_running_loop()
    staged, etag = await loop.run_in_executor(None, state.store.assemble_upload, upload_id, requested)
    try:
        stored = state.store.commit(bucket, key, staged, etag, attributes, condition)
    except S3Error:
        staged.unlink(missing_ok=True)
        raise
    state.store.discard_upload(upload_id)
    location = f"{request.scheme}://{request.host}/{bucket}/{urllib.parse.quote(key)}"
    result = {"Location": location, "Bucket": bucket, "Key": key, "ETag": stored.etag}
    return xml_response(s3_xml.simple_document("CompleteMultipartUploadResult", result))


async def abort_upload(
    state: SimulatorState, request: web.Request, target: S3Target, fault: FaultRule | None
) -> web.StreamResponse:
    upload_id = request.query["uploadId"]
    state.store.upload_target(upload_id, target.bucket_name, target.key_name)
    state.store.discard_upload(upload_id)
    return web.Response(status=204)


async def list_uploads(
    state: SimulatorState, request: web.Request, target: S3Target, fault: FaultRule | None
) -> web.StreamResponse:
    bucket = target.bucket_name
    state.store.require_bucket(bucket)
    prefix = request.query.get("prefix", "")
    uploads = state.store.list_uploads(bucket, prefix)
    url_encoded = request.query.get("encoding-type") == "url"
    return xml_response(s3_xml.list_uploads_document(bucket, prefix, uploads, url_encoded))


async def list_parts(
    state: SimulatorState, request: web.Request, target: S3Target, fault: FaultRule | None
) -> web.StreamResponse:
    upload_id = request.query["uploadId"]
    state.store.upload_target(upload_id, target.bucket_name, target.key_name)
    parts = state.store.list_parts(upload_id)
    return xml_response(s3_xml.list_parts_document(target.bucket_name, target.key_name, upload_id, parts))
