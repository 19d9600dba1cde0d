"""What an S3 request addresses, which operation it is, and the helpers its handlers share."""

from __future__ import annotations

import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from multidict import MultiMapping

from .config import FaultRule
from .disk_store import ObjectAttributes, WriteCondition
from .request_bodies import CHECKSUM_HEADER_PREFIX
from .s3_xml import S3Error
from .state import SimulatorState

# Bucket and object sub-resources outside the subset: answered 501, never mistaken for data.
_UNSUPPORTED_SUBRESOURCES = frozenset(
    {
        "acl",
        "tagging",
        "versioning",
        "versions",
        "policy",
        "cors",
        "lifecycle",
        "website",
        "encryption",
        "logging",
        "notification",
        "replication",
        "attributes",
        "retention",
        "legal-hold",
        "torrent",
        "restore",
        "select",
        "object-lock",
        "ownershipControls",
        "publicAccessBlock",
        "accelerate",
        "requestPayment",
        "analytics",
        "inventory",
        "metrics",
        "intelligent-tiering",
    }
)


@dataclass(frozen=True)
class S3Target:
    """The operation a path-style request names, with its bucket and key."""

    operation: str
    bucket: str | None
    key: str | None

    @classmethod
    def of(cls, request: web.Request) -> S3Target:
        raw_path = request.rel_url.raw_path.lstrip("/")
        bucket_part, _, key_part = raw_path.partition("/")
        bucket = urllib.parse.unquote(bucket_part) or None
        key = urllib.parse.unquote(key_part) or None
        return cls(_operation(request, bucket, key), bucket, key)

    @property
    def bucket_name(self) -> str:
        assert self.bucket is not None, "bucket operations are only routed when the path names a bucket"
        return self.bucket

    @property
    def key_name(self) -> str:
        assert self.key is not None, "object operations are only routed when the path names a key"
        return self.key


Handler = Callable[[SimulatorState, web.Request, S3Target, FaultRule | None], Awaitable[web.StreamResponse]]


def _operation(request: web.Request, bucket: str | None, key: str | None) -> str:
    method, query, headers = request.method, request.query, request.headers
    if _UNSUPPORTED_SUBRESOURCES & set(query):
        return "Unsupported"
    if bucket is None:
        return "ListBuckets" if method == "GET" else "Unsupported"
    if key is None:
        return _bucket_operation(method, query)
    if method == "GET":
        return "ListParts" if "uploadId" in query else "GetObject"
    if method == "PUT":
        if "uploadId" in query:  # UploadPartCopy is outside the subset
            return "Unsupported" if "x-amz-copy-source" in headers else "UploadPart"
        return "CopyObject" if "x-amz-copy-source" in headers else "PutObject"
    if method == "POST":
        if "uploads" in query:
            return "CreateMultipartUpload"
        return "CompleteMultipartUpload" if "uploadId" in query else "Unsupported"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in query else "DeleteObject"
    return "HeadObject" if method == "HEAD" else "Unsupported"


def _bucket_operation(method: str, query: MultiMapping[str]) -> str:
    if method == "GET":
        if query.get("list-type") == "2":
            return "ListObjectsV2"
        if "uploads" in query:
            return "ListMultipartUploads"
        return "GetBucketLocation" if "location" in query else "ListObjects"
    if method == "POST":
        return "DeleteObjects" if "delete" in query else "Unsupported"
    return {"PUT": "CreateBucket", "HEAD": "HeadBucket", "DELETE": "DeleteBucket"}.get(method, "Unsupported")


def xml_response(body: bytes, status: int = 200) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/xml")


def write_condition(request: web.Request) -> WriteCondition:
    """S3's conditional writes: ``If-None-Match: *`` (create only) and ``If-Match: <etag>``."""
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match is not None and if_none_match.strip() != "*":
        raise S3Error(501, "NotImplemented", "If-None-Match on writes only supports '*'")
    return WriteCondition(if_none_match_any=if_none_match is not None, if_match=request.headers.get("If-Match"))


def object_attributes(request: web.Request, checksums: dict[str, str] | None = None) -> ObjectAttributes:
    """Content type and ``x-amz-meta-*`` user metadata sent with a write."""
    metadata = {
        name[len("x-amz-meta-") :].lower(): value
        for name, value in request.headers.items()
        if name.lower().startswith("x-amz-meta-")
    }
    content_type = request.headers.get("Content-Type", "binary/octet-stream")
    return ObjectAttributes(content_type, metadata, checksums or {})


def checksum_headers(checksums: dict[str, str]) -> dict[str, str]:
    return {CHECKSUM_HEADER_PREFIX + name: value for name, value in checksums.items()}
