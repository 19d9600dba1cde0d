"""Receiving object bytes from clients: plain bodies and the aws-chunked encoding.

Recent botocore sends PutObject and UploadPart bodies as ``Content-Encoding: aws-chunked``
(``x-amz-content-sha256: STREAMING-UNSIGNED-PAYLOAD-TRAILER``): hex-sized chunks followed by
trailing headers that carry the checksum (CRC32 by default). A server that stored the body as
sent would store the framing too, so bodies are decoded here, and checksums this module can
compute (MD5, CRC32, SHA-1, SHA-256) are verified as real S3 would.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from aiohttp import StreamReader, web

from .s3_xml import S3Error
from .throttle import BodyPacer

READ_PIECE_BYTES = 1024 * 1024
CHECKSUM_HEADER_PREFIX = "x-amz-checksum-"
_MAX_FRAMING_LINE_BYTES = 8192
_NOT_CHECKSUMS = {"algorithm", "type", "mode"}  # x-amz-checksum-* headers that carry no value


class _Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def digest(self) -> bytes: ...


class _Crc32:
    def __init__(self) -> None:
        self._value = 0

    def update(self, data: bytes) -> None:
        self._value = zlib.crc32(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(4, "big")


_VERIFIABLE: dict[str, Callable[[], _Digest]] = {"crc32": _Crc32, "sha1": hashlib.sha1, "sha256": hashlib.sha256}


@dataclass(frozen=True)
class ReceivedBody:
    size: int
    md5_hex: str
    checksums: dict[str, str]  # algorithm -> base64 value as the client sent it


class _BodySink:
    """Writes decoded bytes to the staged file and keeps the digests up to date."""

    def __init__(self, target: BinaryIO, algorithms: set[str], pacer: BodyPacer, count_bytes: Callable[[int], None]):
        self._target = target
        self._md5 = hashlib.md5()
        self._digests = {name: _VERIFIABLE[name]() for name in algorithms if name in _VERIFIABLE}
        self._pacer = pacer
        self._count_bytes = count_bytes
        self.size = 0

    async def write(self, data: bytes) -> None:
        await self._pacer.pace(len(data))
        self._target.write(data)
        self._md5.update(data)
        for digest in self._digests.values():
            digest.update(data)
        self.size += len(data)
        self._count_bytes(len(data))

    def verify(self, claimed: dict[str, str], content_md5: str | None) -> str:
        """Check the claimed checksums this sink computed; return the MD5 in hex."""
        md5 = self._md5.digest()
        if content_md5 is not None and base64.b64encode(md5).decode() != content_md5.strip():
            raise S3Error(400, "BadDigest", "The Content-MD5 you specified did not match what we received.")
        for name, value in claimed.items():
            digest = self._digests.get(name)
            if digest is not None and base64.b64encode(digest.digest()).decode() != value.strip():
                raise S3Error(
                    400, "BadDigest", f"The {name.upper()} you specified did not match the calculated checksum."
                )
        return md5.hex()


async def receive_body(
    request: web.Request, staged: Path, pacer: BodyPacer, count_bytes: Callable[[int], None]
) -> ReceivedBody:
    """Store the request's decoded body at ``staged`` (removed again if anything fails)."""
    claimed = {
        name[len(CHECKSUM_HEADER_PREFIX) :]: value
        for name, value in _lower_headers(request).items()
        if name.startswith(CHECKSUM_HEADER_PREFIX) and name[len(CHECKSUM_HEADER_PREFIX) :] not in _NOT_CHECKSUMS
    }
    try:
        with open(staged, "wb") as target:
            sink = _BodySink(target, _announced_algorithms(request) | set(claimed), pacer, count_bytes)
            if _is_aws_chunked(request):
                claimed.update(await _read_aws_chunked(request, sink))
                _check_decoded_length(request, sink.size)
            else:
                while piece := await request.content.read(READ_PIECE_BYTES):
                    await sink.write(piece)
        md5_hex = sink.verify(claimed, request.headers.get("Content-MD5"))
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return ReceivedBody(sink.size, md5_hex, claimed)


def _is_aws_chunked(request: web.Request) -> bool:
    encodings = [part.strip().lower() for part in request.headers.get("Content-Encoding", "").split(",")]
    return "aws-chunked" in encodings or request.headers.get("x-amz-content-sha256", "").startswith("STREAMING-")


def _announced_algorithms(request: web.Request) -> set[str]:
    """Checksums the client will send in trailers, so their digests are computed on the way in."""
    names = {
        name.strip().lower().removeprefix(CHECKSUM_HEADER_PREFIX)
        for name in request.headers.get("x-amz-trailer", "").split(",")
        if name.strip()
    }
    sdk_algorithm = request.headers.get("x-amz-sdk-checksum-algorithm")
    return names | ({sdk_algorithm.lower()} if sdk_algorithm else set())


async def _read_aws_chunked(request: web.Request, sink: _BodySink) -> dict[str, str]:
    """Decode ``<hex size>[;chunk-signature=...]\\r\\n<data>\\r\\n`` ... ``0\\r\\n<trailers>\\r\\n``."""
    content = request.content
    while True:
        header = await _read_line(content)
        try:
            size = int(header.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise S3Error(400, "IncompleteBody", f"Bad aws-chunked chunk header {header[:40]!r}") from None
        if size == 0:
            break
        remaining = size
        while remaining:
            piece = await content.readexactly(min(remaining, READ_PIECE_BYTES))
            await sink.write(piece)
            remaining -= len(piece)
        if await content.readexactly(2) != b"\r\n":
            raise S3Error(400, "IncompleteBody", "aws-chunked chunk not followed by CRLF")
    trailers: dict[str, str] = {}
    while line := await _read_line(content):
        name, _, value = line.decode("latin-1").partition(":")
        name = name.strip().lower()
        if name.startswith(CHECKSUM_HEADER_PREFIX):
            trailers[name[len(CHECKSUM_HEADER_PREFIX) :]] = value.strip()
    return trailers


async def _read_line(content: StreamReader) -> bytes:
    """One CRLF-terminated framing line without its CRLF; b"" at the blank line or body end."""
    line = await content.readuntil(b"\n") if not content.at_eof() else b""
    if len(line) > _MAX_FRAMING_LINE_BYTES:
        raise S3Error(400, "IncompleteBody", "aws-chunked framing line too long")
    return line.rstrip(b"\r\n")


def _check_decoded_length(request: web.Request, size: int) -> None:
    declared = request.headers.get("x-amz-decoded-content-length")
    if declared is not None and int(declared) != size:
        raise S3Error(
            400, "IncompleteBody", f"Decoded body has {size} bytes, x-amz-decoded-content-length says {declared}"
        )


def _lower_headers(request: web.Request) -> dict[str, str]:
    return {name.lower(): value for name, value in request.headers.items()}
