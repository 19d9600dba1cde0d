"""S3's XML: error bodies, and the documents that list buckets, objects, uploads and parts."""

from __future__ import annotations

import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

S3_NAMESPACE = "http://s3.amazonaws.com/doc/2006-03-01/"
OWNER_ID = "75aa57f09aa0c8caeab4f8c24e99d10f8e7faeebf76c078efc7c6caea54ba06a"


class S3Error(Exception):
    """An S3 error response: status, S3 error code, message and optional extra fields."""

    def __init__(self, status: int, code: str, message: str, **fields: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields


def no_such_bucket(bucket: str) -> S3Error:
    return S3Error(404, "NoSuchBucket", "The specified bucket does not exist", BucketName=bucket)


def no_such_key(key: str) -> S3Error:
    return S3Error(404, "NoSuchKey", "The specified key does not exist.", Key=key)


def precondition_failed(condition: str) -> S3Error:
    # s3fs maps PreconditionFailed with Condition If-None-Match to FileExistsError.
    return S3Error(
        412, "PreconditionFailed", "At least one of the pre-conditions you specified did not hold", Condition=condition
    )


def invalid_argument(message: str) -> S3Error:
    return S3Error(400, "InvalidArgument", message)


def error_document(error: S3Error, resource: str, request_id: str) -> bytes:
    root = ET.Element("Error")
    _add(root, "Code", error.code)
    _add(root, "Message", error.message)
    for name, value in error.fields.items():
        _add(root, name, value)
    _add(root, "Resource", resource)
    _add(root, "RequestId", request_id)
    return _serialise(root)


@dataclass(frozen=True)
class ListedObject:
    key: str
    size: int
    etag: str
    last_modified: float


@dataclass(frozen=True)
class ObjectListing:
    """One page of a bucket listing, before it becomes V1 or V2 XML."""

    bucket: str
    prefix: str
    delimiter: str | None
    max_keys: int
    objects: Sequence[ListedObject]
    common_prefixes: Sequence[str]
    is_truncated: bool
    url_encoded: bool  # botocore asks for encoding-type=url and decodes what comes back


def list_objects_v2_document(
    listing: ObjectListing, continuation_token: str | None, next_token: str | None, start_after: str | None
) -> bytes:
    root = _listing_root(listing)
    _add(root, "KeyCount", str(len(listing.objects) + len(listing.common_prefixes)))
    if continuation_token:
        _add(root, "ContinuationToken", continuation_token)
    if next_token:
        _add(root, "NextContinuationToken", next_token)
    if start_after:
        _add(root, "StartAfter", _encoded(start_after, listing.url_encoded))
    _add_entries(root, listing)
    return _serialise(root)


def list_objects_v1_document(listing: ObjectListing, marker: str, next_marker: str | None) -> bytes:
    root = _listing_root(listing)
    _add(root, "Marker", _encoded(marker, listing.url_encoded))
    if next_marker:
        _add(root, "NextMarker", _encoded(next_marker, listing.url_encoded))
    _add_entries(root, listing)
    return _serialise(root)


def _listing_root(listing: ObjectListing) -> ET.Element:
    root = ET.Element("ListBucketResult", xmlns=S3_NAMESPACE)
    _add(root, "Name", listing.bucket)
    _add(root, "Prefix", _encoded(listing.prefix, listing.url_encoded))
    if listing.delimiter:
        _add(root, "Delimiter", _encoded(listing.delimiter, listing.url_encoded))
    _add(root, "MaxKeys", str(listing.max_keys))
    if listing.url_encoded:
        _add(root, "EncodingType", "url")
    _add(root, "IsTruncated", _bool(listing.is_truncated))
    return root


def _add_entries(root: ET.Element, listing: ObjectListing) -> None:
    for listed in listing.objects:
        entry = ET.SubElement(root, "Contents")
        _add(entry, "Key", _encoded(listed.key, listing.url_encoded))
        _add(entry, "LastModified", iso_time(listed.last_modified))
        _add(entry, "ETag", listed.etag)
        _add(entry, "Size", str(listed.size))
        _add(entry, "StorageClass", "STANDARD")
    for prefix in listing.common_prefixes:
        _add(ET.SubElement(root, "CommonPrefixes"), "Prefix", _encoded(prefix, listing.url_encoded))


def list_buckets_document(buckets: Iterable[tuple[str, float]]) -> bytes:
    root = ET.Element("ListAllMyBucketsResult", xmlns=S3_NAMESPACE)
    owner = ET.SubElement(root, "Owner")
    _add(owner, "ID", OWNER_ID)
    _add(owner, "DisplayName", "simulator")
    container = ET.SubElement(root, "Buckets")
    for name, created in buckets:
        entry = ET.SubElement(container, "Bucket")
        _add(entry, "Name", name)
        _add(entry, "CreationDate", iso_time(created))
    return _serialise(root)


def location_document(region: str) -> bytes:
    root = ET.Element("LocationConstraint", xmlns=S3_NAMESPACE)
    root.text = region
    return _serialise(root)


def simple_document(tag: str, fields: dict[str, str]) -> bytes:
    """A flat result document (InitiateMultipartUploadResult, CopyObjectResult, ...)."""
    root = ET.Element(tag, xmlns=S3_NAMESPACE)
    for name, value in fields.items():
        _add(root, name, value)
    return _serialise(root)


def delete_result_document(deleted: Sequence[str], errors: Sequence[tuple[str, S3Error]], quiet: bool) -> bytes:
    root = ET.Element("DeleteResult", xmlns=S3_NAMESPACE)
    if not quiet:
        for key in deleted:
            _add(ET.SubElement(root, "Deleted"), "Key", key)
    for key, error in errors:
        entry = ET.SubElement(root, "Error")
        _add(entry, "Key", key)
        _add(entry, "Code", error.code)
        _add(entry, "Message", error.message)
    return _serialise(root)


@dataclass(frozen=True)
class ListedUpload:
    key: str
    upload_id: str
    initiated: float


def list_uploads_document(bucket: str, prefix: str, uploads: Sequence[ListedUpload], url_encoded: bool) -> bytes:
    root = ET.Element("ListMultipartUploadsResult", xmlns=S3_NAMESPACE)
    _add(root, "Bucket", bucket)
    _add(root, "KeyMarker", "")
    _add(root, "UploadIdMarker", "")
    _add(root, "Prefix", _encoded(prefix, url_encoded))
    _add(root, "MaxUploads", "1000")
    if url_encoded:
        _add(root, "EncodingType", "url")
    _add(root, "IsTruncated", "false")
    for upload in uploads:
        entry = ET.SubElement(root, "Upload")
        _add(entry, "Key", _encoded(upload.key, url_encoded))
        _add(entry, "UploadId", upload.upload_id)
        _add(entry, "StorageClass", "STANDARD")
        _add(entry, "Initiated", iso_time(upload.initiated))
    return _serialise(root)


@dataclass(frozen=True)
class ListedPart:
    number: int
    etag: str
    size: int
    last_modified: float


def list_parts_document(bucket: str, key: str, upload_id: str, parts: Sequence[ListedPart]) -> bytes:
    root = ET.Element("ListPartsResult", xmlns=S3_NAMESPACE)
    for name, value in (("Bucket", bucket), ("Key", key), ("UploadId", upload_id)):
        _add(root, name, value)
    _add(root, "PartNumberMarker", "0")
    _add(root, "MaxParts", "1000")
    _add(root, "IsTruncated", "false")
    _add(root, "StorageClass", "STANDARD")
    for part in parts:
        entry = ET.SubElement(root, "Part")
        _add(entry, "PartNumber", str(part.number))
        _add(entry, "LastModified", iso_time(part.last_modified))
        _add(entry, "ETag", part.etag)
        _add(entry, "Size", str(part.size))
    return _serialise(root)


def parse_completed_parts(body: bytes) -> list[tuple[int, str]]:
    """(part number, ETag) pairs of a CompleteMultipartUpload request, in document order."""
    parts = []
    for part in _parse(body).iter():
        if _local_name(part.tag) != "Part":
            continue
        fields = {_local_name(child.tag): (child.text or "") for child in part}
        parts.append((int(fields.get("PartNumber", "0")), fields.get("ETag", "")))
    return parts


def parse_delete_request(body: bytes) -> tuple[list[str], bool]:
    """The keys of a DeleteObjects request and whether it asked for a quiet answer."""
    root = _parse(body)
    keys: list[str] = []
    quiet = False
    for element in root:
        name = _local_name(element.tag)
        if name == "Object":
            keys += [child.text or "" for child in element if _local_name(child.tag) == "Key"]
        elif name == "Quiet":
            quiet = (element.text or "").strip().lower() == "true"
    return keys, quiet


def iso_time(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_s)) + f".{int(epoch_s * 1000) % 1000:03d}Z"


def _parse(body: bytes) -> ET.Element:
    try:
        return ET.fromstring(body)
    except ET.ParseError as exc:
        raise S3Error(400, "MalformedXML", f"The XML you provided was not well-formed: {exc}") from None


def _local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _encoded(text: str, url_encoded: bool) -> str:
    return urllib.parse.quote(text, safe="/~") if url_encoded else text


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _add(parent: ET.Element, tag: str, text: str) -> ET.Element:
    child = ET.SubElement(parent, tag)
    child.text = text
    return child


def _serialise(root: ET.Element) -> bytes:
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True))
