"""Backend specifics that fsspec's interface does not express, behind ``modelstock.storage``
(the only caller): bounded client settings, conditional ranged GETs straight into a buffer (S3,
plain HTTP), and concurrent multipart uploads (S3).

Backends are recognised by their fsspec protocol and the methods they offer, never imported:
s3fs's botocore client (``get_s3``, on s3fs's event loop) and fsspec's HTTP filesystem's
aiohttp session. Nothing outside this module knows about either. Retries are the caller's
(``storage``'s policy), passed in where this module needs them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import fsspec

from modelstock.errors import StorageError

log = logging.getLogger(__name__)

T = TypeVar("T")
Retry = Callable[[str, Callable[[], Awaitable[Any]]], Awaitable[Any]]

# Client bounds, so that one dead endpoint costs one of our retry policy's attempts, not minutes
# of botocore's retries inside each of ours (docs/ARCHITECTURE.md, "Storage I/O").
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 20.0  # silence on an open connection, not a whole transfer
# Connections per client: more than the requests one worker keeps in flight (fetch.py).
MAX_POOL_CONNECTIONS = 256
MIB = 1024 * 1024
MIN_UPLOAD_PART_BYTES = 8 * MIB  # S3's minimum is 5 MiB (but for the last part)
MAX_UPLOAD_PARTS = 9000  # S3 allows 10,000: headroom for a size estimate that falls short
UPLOAD_PARTS_IN_FLIGHT = 6  # memory per open shard: (in flight + 1 filling) x part size


class TruncatedBody(ConnectionError):
    """The response body ended before the bytes its range promised (a transient fault)."""


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    return bool({"s3", "s3a"} & set(_protocols(fs))) and hasattr(fs, "_call_s3")


def _is_http(fs: fsspec.AbstractFileSystem) -> bool:
    return bool({"http", "https"} & set(_protocols(fs))) and hasattr(fs, "set_session") and hasattr(fs, "encode_url")


def supports_if_match(fs: fsspec.AbstractFileSystem) -> bool:
    return _is_s3(fs) or _is_http(fs)


def client_defaults(protocol: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with our client bounds added where the user set none."""
    merged = dict(options)
    if protocol in ("s3", "s3a"):
        config = dict(merged.get("config_kwargs") or {})
        config.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
        config.setdefault("read_timeout", READ_TIMEOUT_S)
        config.setdefault("max_pool_connections", MAX_POOL_CONNECTIONS)
        config.setdefault("retries", {"total_max_attempts": 1})  # our policy retries, once
        merged["config_kwargs"] = config
    elif protocol in ("http", "https"):
        import aiohttp  # fsspec's HTTP filesystem needs it anyway

        client = dict(merged.get("client_kwargs") or {})
        client.setdefault("timeout", aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S,
                                                           sock_read=READ_TIMEOUT_S))
        merged["client_kwargs"] = client
    return merged


# --------------------------------------------------------------------------------- reads


async def _fill(view: memoryview, read_some: Callable[[memoryview], Awaitable[int]]) -> int:
    filled = 0
    while filled < len(view):
        count = await read_some(view[filled:])
        if not count:
            raise TruncatedBody(f"the body ended after {filled} of {len(view)} bytes")
        filled += count
    return filled


async def _s3_call(fs: Any, method: str, **request: Any) -> Any:
    """One botocore operation on s3fs's client (its credentials, region and request defaults),
    without s3fs's own retry loop: the caller's policy is the one that applies."""
    await fs.set_session()
    client = await fs.get_s3(request.get("Bucket"))
    operation = getattr(client, method)
    return await operation(**fs._get_s3_method_kwargs(operation, **request))


async def _s3_read_into(fs: Any, path: str, start: int, view: memoryview, if_match: str | None) -> int:
    bucket, key, version_id = fs.split_path(path)
    request: dict[str, Any] = {"Bucket": bucket, "Key": key, "Range": f"bytes={start}-{start + len(view) - 1}"}
    if version_id:
        request["VersionId"] = version_id
    if if_match:
        request["IfMatch"] = if_match
    response = await _s3_call(fs, "get_object", **request)
    body = response["Body"]
    try:
        if int(response.get("ContentLength", len(view))) != len(view):
            raise StorageError(f"s3://{path}: asked for {len(view)} bytes from {start}, "
                               f"the store answers with {response.get('ContentLength')}")
        return await _fill(view, body.readinto)
    finally:
        body.close()


async def _http_read_into(fs: Any, url: str, start: int, view: memoryview, if_match: str | None) -> int:
    request = dict(fs.kwargs)
    headers = {**request.pop("headers", {}), "Range": f"bytes={start}-{start + len(view) - 1}"}
    if if_match:
        headers["If-Match"] = if_match
    session = await fs.set_session()
    async with session.get(fs.encode_url(url), headers=headers, **request) as response:
        if response.status == 404:
            raise FileNotFoundError(url)
        response.raise_for_status()
        if response.status != 206 and not (start == 0 and response.content_length == len(view)):
            raise StorageError(f"{url}: the server ignored the Range header (HTTP {response.status})")

        async def read_some(target: memoryview) -> int:
            chunk = await response.content.read(len(target))
            target[: len(chunk)] = chunk
            return len(chunk)

        return await _fill(view, read_some)


async def read_range_into(fs: Any, path: str, start: int, view: memoryview, if_match: str | None) -> int:
    """One ranged GET of ``[start, start + len(view))`` into ``view``; the bytes received.

    With ``if_match`` (S3 and HTTP) the store answers 412 if the object is no longer that version.
    Other async stores (gcs, az) read through fsspec's ``_cat_file`` and one copy."""
    if _is_s3(fs):
        return await _s3_read_into(fs, path, start, view, if_match)
    if _is_http(fs):
        return await _http_read_into(fs, path, start, view, if_match)
    data = await fs._cat_file(path, start=start, end=start + len(view))
    count = min(len(data), len(view))
    view[:count] = data[:count]
    return len(data)


# --------------------------------------------------------------------------------- writes


class S3MultipartWriter:
    """One S3 object written as a multipart upload: parts uploaded concurrently on s3fs's event
    loop (at most ``UPLOAD_PARTS_IN_FLIGHT``; a writer that gets ahead waits), the object
    appearing only at CompleteMultipartUpload. An object smaller than one part is one PUT at
    commit. ``abort`` waits for the parts in flight, then aborts the upload, which leaves nothing."""

    def __init__(self, fs: Any, path: str, url: str, size: int, retry: Retry,
                 parts_in_flight: int = UPLOAD_PARTS_IN_FLIGHT) -> None:
        self.fs, self.url, self.retry = fs, url, retry
        self.bucket, self.key, _ = fs.split_path(path)
        self.part_bytes = max(MIN_UPLOAD_PART_BYTES, math.ceil(size / MAX_UPLOAD_PARTS / MIB) * MIB)
        self.parts_in_flight = max(1, parts_in_flight)
        self._buffer = bytearray(self.part_bytes)
        self._filled = 0
        self._upload_id: str | None = None
        self._parts: list[concurrent.futures.Future[str]] = []

    def _on_loop(self, coroutine: Awaitable[T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.fs.loop)  # type: ignore[arg-type]

    def _call(self, method: str, **request: Any) -> Awaitable[Any]:
        return self.retry(self.url, lambda: _s3_call(self.fs, method, Bucket=self.bucket, Key=self.key, **request))

    def write(self, data: memoryview) -> None:
        while len(data):
            count = min(len(data), self.part_bytes - self._filled)
            self._buffer[self._filled : self._filled + count] = data[:count]
            self._filled += count
            data = data[count:]
            if self._filled == self.part_bytes:
                self._send_part()

    def _send_part(self) -> None:
        if self._upload_id is None:
            created = self._on_loop(self._call("create_multipart_upload")).result()
            self._upload_id = str(created["UploadId"])
        body = self._buffer if self._filled == len(self._buffer) else self._buffer[: self._filled]
        self._buffer, self._filled = bytearray(self.part_bytes), 0  # the old one travels with the upload
        self._parts.append(self._on_loop(self._upload_part(len(self._parts) + 1, body)))
        while sum(not part.done() for part in self._parts) >= self.parts_in_flight:
            concurrent.futures.wait([p for p in self._parts if not p.done()],
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        for part in self._parts:
            if part.done() and part.exception() is not None:
                part.result()  # a part failed for good: stop producing

    async def _upload_part(self, number: int, body: bytearray) -> str:
        answer = await self._call("upload_part", UploadId=self._upload_id, PartNumber=number, Body=body)
        return str(answer["ETag"])

    def commit(self) -> None:
        if self._upload_id is None:  # smaller than one part: a single PUT, atomic as well
            body = bytes(self._buffer[: self._filled])
            self._on_loop(self._call("put_object", Body=body)).result()
            return
        if self._filled:
            self._send_part()
        etags = [part.result() for part in self._parts]
        parts = [{"PartNumber": number, "ETag": etag} for number, etag in enumerate(etags, start=1)]
        self._on_loop(self._call("complete_multipart_upload", UploadId=self._upload_id,
                                 MultipartUpload={"Parts": parts})).result()

    def abort(self) -> None:
        # Parts in flight are let finish (or fail), not cancelled: a part still uploading when
        # the abort lands could be stored after it, leaving an upload behind.
        concurrent.futures.wait(self._parts)
        if self._upload_id is None:
            return
        try:
            self._on_loop(self._call("abort_multipart_upload", UploadId=self._upload_id)).result()
        except Exception as exc:  # the original error matters more; say what is left
            log.warning("%s: could not abort multipart upload %s (%s); a bucket lifecycle rule for "
                        "incomplete uploads removes it", self.url, self._upload_id, exc)


def multipart_writer(fs: fsspec.AbstractFileSystem, path: str, url: str, size: int,
                     retry: Retry) -> S3MultipartWriter | None:
    """A concurrent multipart writer where the backend has one (S3); None elsewhere."""
    return S3MultipartWriter(fs, path, url, size, retry) if _is_s3(fs) else None
