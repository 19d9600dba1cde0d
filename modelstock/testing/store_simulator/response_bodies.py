"""Sending object bytes: byte ranges, pacing, and the body faults (reset, truncation).

Bytes go from the page cache to the socket with ``sendfile``, one chunk per call, so a whole
16 MiB range costs a handful of system calls and no copies through Python; pacing sleeps
between chunks.
"""

from __future__ import annotations

import asyncio
import email.utils
import re
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from aiohttp import web

from .config import FaultKind, FaultRule
from .disk_store import StoredObject
from .s3_xml import S3Error
from .throttle import Throttle

_SINGLE_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive, as in HTTP

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The single byte range a ``Range`` header asks for; None for the whole object.

    Like S3: a malformed or multi-range header is ignored, a range starting past the end is 416.
    """
    match = _SINGLE_RANGE.match(header.strip()) if header else None
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":  # suffix range: the last N bytes
        suffix = int(last)
        if suffix == 0:
            raise _invalid_range(size)
        return ByteRange(max(0, size - suffix), size - 1) if size else None
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size:
        if size == 0:
            return None
        raise _invalid_range(size)
    if end < start:
        return None
    return ByteRange(start, end)


def object_headers(stored: StoredObject) -> dict[str, str]:
    """The headers that describe an object in S3 and plain-HTTP responses alike."""
    headers = {
        "ETag": stored.etag,
        "Last-Modified": email.utils.formatdate(stored.last_modified, usegmt=True),
        "Content-Type": stored.attributes.content_type,
        "Accept-Ranges": "bytes",
    }
    headers.update({f"x-amz-meta-{name}": value for name, value in stored.attributes.user_metadata.items()})
    return headers


def _invalid_range(size: int) -> S3Error:
    return S3Error(416, "InvalidRange", "The requested range is not satisfiable", ActualObjectSize=str(size))


async def send_object_bytes(
    request: web.Request,
    response: web.StreamResponse,
    source: BinaryIO,
    byte_range: ByteRange,
    throttle: Throttle,
    fault: FaultRule | None,
    count_sent: Callable[[int], None],
) -> web.StreamResponse:
    """Send ``byte_range`` of ``source`` as the body of the prepared-to-be ``response``.

    With a body fault, only ``fault.body_fraction`` of the body goes out before the connection
    is reset or closed; aiohttp then finds the transport gone and drops the response quietly.
    """
    response.content_length = byte_range.length
    await response.prepare(request)
    transport = request.transport
    if transport is None:  # the client left while the headers were going out
        return response
    to_send = byte_range.length if fault is None else int(byte_range.length * fault.body_fraction)
    pacer = throttle.pacer()
    loop = asyncio.get_running_loop()
    offset = byte_range.start
    while to_send > 0:
        chunk = min(throttle.chunk_bytes, to_send)
        await pacer.pace(chunk)
        if transport.is_closing():
            return response  # the client went away; nothing left to send to
        try:
            await loop.sendfile(transport, source, offset, chunk)
        except ConnectionError:
            return response
        count_sent(chunk)
        offset += chunk
        to_send -= chunk
    if fault is not None and fault.kind is FaultKind.RESET_MID_BODY:
        _reset(transport)
    elif fault is not None and fault.kind is FaultKind.TRUNCATED_BODY:
        transport.close()  # a clean FIN with fewer bytes than Content-Length promised
    else:
        await response.write_eof()
    return response


def _reset(transport: asyncio.Transport) -> None:
    """Close with SO_LINGER 0, which makes the kernel send a TCP RST instead of a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
