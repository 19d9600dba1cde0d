"""S3 bucket operations: create, head, delete, locate, list objects, delete objects."""

from __future__ import annotations

import base64

from aiohttp import web
from multidict import MultiMapping

from . import s3_xml
from .config import FaultRule
from .s3_request import S3Target, xml_response
from .s3_xml import S3Error
from .state import SimulatorState

MAX_KEYS = 1000


async def list_buckets(
    state: SimulatorState, request: web.Request, target: S3Target, fault: FaultRule | None
) -> web.StreamResponse:
    return xml_response(s3_xml.list_buckets_document(state.store.buckets()))


async def create_bucket(
    state: SimulatorState, request: web.Request, target: S3Target, fault: FaultRule | None
) -> web.StreamResponse:
    state.store.create_bucket(target.bucket_name)
    return web.Response(headers={"Location": f"/{target.bucket_name}"})


async def head_bucket(
    state: SimulatorState, request: web.Request, target: S3Target, fault: FaultRule | None
) -> web.StreamResponse:
    state.store.require_bucket(target.bucket_name)
    return web.Response(headers={"x-amz-bucket-region": state.region})


async def delete_bucket(
    state: SimulatorState, request: web.Request, target: S3Target, fault: FaultRule | None
) -> web.StreamResponse:
    state.store.delete_bucket(target.bucket_name)
    return web.Response(status=204)


async def bucket_location(
    state: SimulatorState, request: web.Request, target: S3Target, fault: FaultRule | None
) -> web.StreamResponse:
    state.store.require_bucket(target.bucket_name)
    return xml_response(s3_xml.location_document(state.region))


async def list_objects_v2(
    state: SimulatorState, request: web.Request, target: S3Target, fault: FaultRule | None
) -> web.StreamResponse:
    query = request.query
    token = query.get("continuation-token")
    after = _decode_token(token) if token else query.get("start-after")
    listing, last_entry = _listing(state, target.bucket_name, query, after)
    next_token = _encode_token(last_entry) if listing.is_truncated and last_entry else None
    return xml_response(s3_xml.list_objects_v2_document(listing, token, next_token, query.get("start-after")))


async def list_objects_v1(
    state: SimulatorState, request: web.Request, target: S3Target, fault: FaultRule | None
) -> web.StreamResponse:
    marker = request.query.get("marker", "")
    listing, last_entry = _listing(state, target.bucket_name, request.query, marker or None)
    next_marker = last_entry if listing.is_truncated else None
    return xml_response(s3_xml.list_objects_v1_document(listing, marker, next_marker))


def _listing(
    state: SimulatorState, bucket: str, query: MultiMapping[str], after: str | None
) -> tuple[s3_xml.ObjectListing, str | None]:
    prefix = query.get("prefix", "")
    delimiter = query.get("delimiter") or None
    try:
        max_keys = min(int(query.get("max-keys", MAX_KEYS)), MAX_KEYS)
    except ValueError:
        raise s3_xml.invalid_argument("max-keys must be an integer") from None
    page = state.store.list_keys(bucket, prefix, delimiter, after, max_keys)
    objects = []
    for key in page.keys:
        try:
            stored = state.store.head(bucket, key)
        except S3Error:
            continue  # deleted while the page was being built
        objects.append(s3_xml.ListedObject(key, stored.size, stored.etag, stored.last_modified))
    url_encoded = query.get("encoding-type") == "url"
    listing = s3_xml.ObjectListing(
        bucket, prefix, delimiter, max_keys, objects, page.common_prefixes, page.is_truncated, url_encoded
    )
    return listing, page.last_entry


def _encode_token(after: str) -> str:
    """Continuation tokens are opaque to clients; ours is the last key (or prefix) returned."""
    return base64.urlsafe_b64encode(after.encode()).decode()


def _decode_token(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        raise s3_xml.invalid_argument("The continuation token provided is incorrect") from None


async def delete_objects(
    state: SimulatorState, request: web.Request, target: S3Target, fault: FaultRule | None
) -> web.StreamResponse:
    keys, quiet = s3_xml.parse_delete_request(await request.read())
    deleted, errors = [], []
    for key in keys:
        try:
            state.store.delete(target.bucket_name, key)
            deleted.append(key)
        except S3Error as error:
            errors.append((key, error))
    return xml_response(s3_xml.delete_result_document(deleted, errors, quiet))
