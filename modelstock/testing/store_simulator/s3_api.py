"""The S3 REST API subset that s3fs and botocore use, path-style: ``/<bucket>/<key>``.

Each request is named by its S3 operation, admitted (first-byte latency, fault choice), then
served by one small function per operation; an ``S3Error`` becomes S3's XML error body.
Signatures are not checked.
"""

from __future__ import annotations

import itertools

from aiohttp import web

from . import s3_bucket_handlers as buckets
from . import s3_multipart_handlers as multipart
from . import s3_object_handlers as objects
from . import s3_xml
from .config import FaultRule
from .s3_request import Handler, S3Target
from .s3_xml import S3Error
from .state import STATE_KEY, SimulatorState

REQUEST_ID_KEY = "store_simulator_request_id"
_request_ids = itertools.count(1)


async def handle_s3_request(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    target = S3Target.of(request)
    request_id = f"{next(_request_ids):016X}"
    request[REQUEST_ID_KEY] = request_id

    async def serve() -> web.StreamResponse:
        try:
            fault = await state.admit(request.method, target.key, target.operation == "GetObject")
            return await _HANDLERS.get(target.operation, _unsupported)(state, request, target, fault)
        except S3Error as error:
            body = s3_xml.error_document(error, request.rel_url.raw_path, request_id)
            return web.Response(status=error.status, body=body, content_type="application/xml")

    return await state.serve_counted(target.operation, serve)


async def _unsupported(
    state: SimulatorState, request: web.Request, target: S3Target, fault: FaultRule | None
) -> web.StreamResponse:
    raise S3Error(501, "NotImplemented", f"The store simulator does not implement {request.method} {request.rel_url}")


_HANDLERS: dict[str, Handler] = {
    "ListBuckets": buckets.list_buckets,
    "CreateBucket": buckets.create_bucket,
    "HeadBucket": buckets.head_bucket,
    "DeleteBucket": buckets.delete_bucket,
    "GetBucketLocation": buckets.bucket_location,
    "ListObjectsV2": buckets.list_objects_v2,
    "ListObjects": buckets.list_objects_v1,
    "DeleteObjects": buckets.delete_objects,
    "HeadObject": objects.head_object,
    "GetObject": objects.get_object,
    "PutObject": objects.put_object,
    "CopyObject": objects.copy_object,
    "DeleteObject": objects.delete_object,
    "CreateMultipartUpload": multipart.create_upload,
    "UploadPart": multipart.upload_part,
    "CompleteMultipartUpload": multipart.complete_upload,
    "AbortMultipartUpload": multipart.abort_upload,
    "ListMultipartUploads": multipart.list_uploads,
    "ListParts": multipart.list_parts,
}
