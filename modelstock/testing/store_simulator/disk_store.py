"""Buckets and objects as folders and files under one root directory.

A bucket is a sub-folder of the root and a key is a file path inside it, so test fixtures and
benchmark inputs can be written with plain file I/O and served without copying. What S3 keeps
beside the bytes (ETag, content type, user metadata) lives in a small JSON sidecar under
``<root>/.store-simulator/``, with multipart uploads in progress and staged writes; that
folder is hidden from bucket listings.

ETags: objects written through the S3 API get S3's (MD5 of the content, or
``md5-of-part-md5s-N`` for multipart uploads). A file placed on disk directly gets an ETag
derived from its size, mtime and inode instead of an MD5, so that serving a multi-gigabyte
checkpoint never costs a full read; replacing such a file still changes its ETag.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .config import MIB
from .s3_xml import (
    ListedPart,
    ListedUpload,
    S3Error,
    invalid_argument,
    no_such_bucket,
    no_such_key,
    precondition_failed,
)

STATE_DIR_NAME = ".store-simulator"
MIN_PART_BYTES = 5 * MIB  # S3 refuses smaller parts except the last
COPY_BUFFER_BYTES = 4 * MIB
_NOT_KEY_SEGMENTS = ("", ".", "..")  # keys are file paths: a//b, ./ and ../ have no file
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class ObjectAttributes:
    """What a writer may attach to an object besides its bytes."""

    content_type: str = "binary/octet-stream"
    user_metadata: dict[str, str] = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)  # full-object, e.g. {"crc32": "..."}


@dataclass(frozen=True)
class StoredObject:
    bucket: str
    key: str
    path: Path
    size: int
    etag: str  # quoted, as S3 sends it
    last_modified: float
    attributes: ObjectAttributes


@dataclass(frozen=True)
class WriteCondition:
    """S3's conditional writes: ``If-None-Match: *`` and ``If-Match: <etag>``."""

    if_none_match_any: bool = False
    if_match: str | None = None


@dataclass(frozen=True)
class ListingPage:
    keys: list[str]
    common_prefixes: list[str]
    is_truncated: bool
    last_entry: str | None  # the last key or common prefix returned, for the next page


class ObjectStore:
    """Buckets, objects and multipart uploads on disk.

    Methods are synchronous. The server calls the commit-like ones (``commit``, ``delete``) on
    its event loop, between two awaits, so a conditional write checks and replaces atomically;
    the ones that copy many bytes (``assemble_upload``, ``copy_to_staging``) run in threads.
    """

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._state = self.root / STATE_DIR_NAME
        self._staging = self._state / "staging"
        self._sidecars = self._state / "objects"
        self._uploads = self._state / "uploads"
        shutil.rmtree(self._staging, ignore_errors=True)  # writes interrupted by a restart
        for folder in (self._staging, self._sidecars, self._uploads):
            folder.mkdir(parents=True, exist_ok=True)

    # Buckets

    def buckets(self) -> list[tuple[str, float]]:
        entries = [e for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith(".")]
        return [(entry.name, entry.stat().st_ctime) for entry in sorted(entries, key=lambda e: e.name)]

    def create_bucket(self, bucket: str) -> None:
        if not _BUCKET_NAME.match(bucket):
            raise S3Error(400, "InvalidBucketName", "The specified bucket is not valid.", BucketName=bucket)
        try:
            (self.root / bucket).mkdir()
        except FileExistsError:
            raise S3Error(
                409,
                "BucketAlreadyOwnedByYou",
                "Your previous request to create the named bucket succeeded and you already own it.",
                BucketName=bucket,
            ) from None

    def require_bucket(self, bucket: str) -> Path:
        folder = self.root / bucket
        if bucket.startswith(".") or "/" in bucket or not folder.is_dir():
            raise no_such_bucket(bucket)
        return folder

    def delete_bucket(self, bucket: str) -> None:
        folder = self.require_bucket(bucket)
        if any(folder.iterdir()):
            raise S3Error(409, "BucketNotEmpty", "The bucket you tried to delete is not empty", BucketName=bucket)
        folder.rmdir()

    # Objects

    def head(self, bucket: str, key: str) -> StoredObject:
        path = self._object_path(bucket, key)
        try:
            status = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise no_such_key(key) from None
        if not stat.S_ISREG(status.st_mode):
            raise no_such_key(key)
        return self._describe(bucket, key, path, status)

    def open_object(self, bucket: str, key: str) -> tuple[BinaryIO, StoredObject]:
        """Open an object and describe the very file opened.

        Described from the open descriptor, so a concurrent overwrite (a rename onto the path)
        can never pair the new bytes with the old ETag: readers keep the version they opened.
        """
        path = self._object_path(bucket, key)
        try:
            source = open(path, "rb")  # noqa: SIM115 - the caller owns and closes it
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise no_such_key(key) from None
        status = os.fstat(source.fileno())
        if not stat.S_ISREG(status.st_mode):
            source.close()
            raise no_such_key(key)
        return source, self._describe(bucket, key, path, status)

    def _describe(self, bucket: str, key: str, path: Path, status: os.stat_result) -> StoredObject:
        signature = [status.st_size, status.st_mtime_ns, status.st_ino]
        sidecar = self._read_sidecar(bucket, key)
        if sidecar is not None and sidecar["signature"] == signature:
            etag = sidecar["etag"]
            attributes = ObjectAttributes(sidecar["content_type"], sidecar["user_metadata"], sidecar["checksums"])
        else:  # placed (or replaced) on disk by someone other than this server
            etag = '"' + hashlib.md5(":".join(map(str, signature)).encode()).hexdigest() + '"'
            attributes = ObjectAttributes()
        return StoredObject(bucket, key, path, status.st_size, etag, status.st_mtime, attributes)

    def staging_path(self) -> Path:
        """A fresh path on the root's filesystem, so a finished write is renamed into place."""
        return self._staging / uuid.uuid4().hex

    def commit(
        self, bucket: str, key: str, staged: Path, etag: str, attributes: ObjectAttributes, condition: WriteCondition
    ) -> StoredObject:
        """Check ``condition`` and move ``staged`` into place as ``bucket/key`` atomically."""
        path = self._object_path(bucket, key)
        self.check_write_condition(bucket, key, condition)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, path)
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            staged.unlink(missing_ok=True)
            raise _key_conflict(key) from None
        status = path.stat()
        self._write_sidecar(
            bucket,
            key,
            {
                "signature": [status.st_size, status.st_mtime_ns, status.st_ino],
                "etag": etag,
                "content_type": attributes.content_type,
                "user_metadata": attributes.user_metadata,
                "checksums": attributes.checksums,
            },
        )
        return StoredObject(bucket, key, path, status.st_size, etag, status.st_mtime, attributes)

    def delete(self, bucket: str, key: str) -> None:
        """Delete an object; like S3, deleting a missing key succeeds."""
        bucket_folder = self.require_bucket(bucket)
        path = self._object_path(bucket, key)
        if path.is_file():
            path.unlink()
        self._sidecar_path(bucket, key).unlink(missing_ok=True)
        # S3 has no folders: drop the ones this key needed, or they would block a key of that name.
        parent = path.parent
        while parent != bucket_folder and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent

    def copy_to_staging(self, source: StoredObject) -> Path:
        staged = self.staging_path()
        shutil.copyfile(source.path, staged)
        return staged

    def list_keys(
        self, bucket: str, prefix: str, delimiter: str | None, after: str | None, max_keys: int
    ) -> ListingPage:
        """One page of keys and common prefixes in S3's (UTF-8 byte) order, after ``after``."""
        keys: list[str] = []
        common_prefixes: list[str] = []
        last_entry: str | None = None
        for key in sorted(self._keys_with_prefix(bucket, prefix)):
            if after is not None and (
                key <= after or (delimiter and after.endswith(delimiter) and key.startswith(after))
            ):
                continue
            entry = key
            if delimiter:
                end = key.find(delimiter, len(prefix))
                entry = key if end < 0 else key[: end + len(delimiter)]
                if entry == last_entry:
                    continue
            if len(keys) + len(common_prefixes) >= max_keys:
                return ListingPage(keys, common_prefixes, True, last_entry)
            (keys if entry == key else common_prefixes).append(entry)
            last_entry = entry
        return ListingPage(keys, common_prefixes, False, last_entry)

    # Multipart uploads

    def create_upload(self, bucket: str, key: str, attributes: ObjectAttributes) -> str:
        self.require_bucket(bucket)
        self._object_path(bucket, key)
        upload_id = uuid.uuid4().hex
        folder = self._uploads / upload_id
        folder.mkdir()
        description = {
            "bucket": bucket,
            "key": key,
            "initiated": time.time(),
            "content_type": attributes.content_type,
            "user_metadata": attributes.user_metadata,
        }
        (folder / "upload.json").write_text(json.dumps(description))
        return upload_id

    def upload_target(self, upload_id: str, bucket: str, key: str) -> ObjectAttributes:
        """The attributes of an upload in progress; NoSuchUpload unless it belongs to bucket/key."""
        try:
            description = json.loads((self._uploads / _safe_id(upload_id) / "upload.json").read_text())
        except FileNotFoundError:
            raise _no_such_upload(upload_id) from None
        if (description["bucket"], description["key"]) != (bucket, key):
            raise _no_such_upload(upload_id)
        return ObjectAttributes(description["content_type"], description["user_metadata"])

    def commit_part(self, upload_id: str, number: int, staged: Path, md5_hex: str) -> None:
        if not 1 <= number <= 10_000:
            staged.unlink(missing_ok=True)
            raise invalid_argument("Part number must be an integer between 1 and 10000, inclusive")
        folder = self._uploads / _safe_id(upload_id)
        if not folder.is_dir():  # aborted while the part was arriving
            staged.unlink(missing_ok=True)
            raise _no_such_upload(upload_id)
        os.replace(staged, folder / f"{number:05d}.part")
        (folder / f"{number:05d}.json").write_text(json.dumps({"md5": md5_hex, "time": time.time()}))

    def list_parts(self, upload_id: str) -> list[ListedPart]:
        folder = self._uploads / _safe_id(upload_id)
        parts = []
        for description in sorted(folder.glob("*.json")):
            if description.name == "upload.json":
                continue
            recorded = json.loads(description.read_text())
            size = description.with_suffix(".part").stat().st_size
            parts.append(ListedPart(int(description.stem), f'"{recorded["md5"]}"', size, recorded["time"]))
        return parts

    def list_uploads(self, bucket: str, prefix: str) -> list[ListedUpload]:
        uploads = []
        for description in self._uploads.glob("*/upload.json"):
            recorded = json.loads(description.read_text())
            if recorded["bucket"] == bucket and recorded["key"].startswith(prefix):
                uploads.append(ListedUpload(recorded["key"], description.parent.name, recorded["initiated"]))
        return sorted(uploads, key=lambda upload: (upload.key, upload.initiated))

    def assemble_upload(self, upload_id: str, requested: Sequence[tuple[int, str]]) -> tuple[Path, str]:
        """Concatenate the requested parts into a staged file; return it and its S3 ETag."""
        if not requested:
            raise S3Error(
                400,
                "MalformedXML",
                "The XML you provided was not well-formed or did not validate against our published schema",
            )
        available = {part.number: part for part in self.list_parts(upload_id)}
        numbers = [number for number, _ in requested]
        if numbers != sorted(set(numbers)):
            raise S3Error(400, "InvalidPartOrder", "The list of parts was not in ascending order.")
        for index, (number, etag) in enumerate(requested):
            part = available.get(number)
            if part is None or part.etag.strip('"') != etag.strip('"'):
                raise S3Error(400, "InvalidPart", "One or more of the specified parts could not be found.")
            if index < len(requested) - 1 and part.size < MIN_PART_BYTES:
                raise S3Error(400, "EntityTooSmall", "Your proposed upload is smaller than the minimum allowed size")
        staged = self.staging_path()
        folder = self._uploads / _safe_id(upload_id)
        with open(staged, "wb") as target:
            for number, _ in requested:
                with open(folder / f"{number:05d}.part", "rb") as source:
                    shutil.copyfileobj(source, target, COPY_BUFFER_BYTES)
        digests = b"".join(bytes.fromhex(available[number].etag.strip('"')) for number in numbers)
        return staged, f'"{hashlib.md5(digests).hexdigest()}-{len(numbers)}"'

    def discard_upload(self, upload_id: str) -> None:
        folder = self._uploads / _safe_id(upload_id)
        if not folder.is_dir():
            raise _no_such_upload(upload_id)
        shutil.rmtree(folder)

    # Paths and sidecars

    def _object_path(self, bucket: str, key: str) -> Path:
        folder = self.require_bucket(bucket)
        parts = key.split("/")
        if not key or len(key.encode()) > 1024 or any(part in _NOT_KEY_SEGMENTS for part in parts):
            # Keys become file paths: empty segments (a//b, trailing /) and dot segments have no file.
            raise invalid_argument(f"The simulator stores keys as file paths and cannot hold key {key!r}")
        return folder.joinpath(*parts)

    def is_folder(self, bucket: str, key_prefix: str) -> bool:
        """Whether ``key_prefix`` names a folder of keys (``a/b`` when ``a/b/c`` exists)."""
        parts = key_prefix.rstrip("/").split("/")
        if any(part in _NOT_KEY_SEGMENTS for part in parts):
            return False
        return self.require_bucket(bucket).joinpath(*parts).is_dir()

    def _keys_with_prefix(self, bucket: str, prefix: str) -> list[str]:
        folder = self.require_bucket(bucket)
        folder_parts = prefix.split("/")[:-1]
        if any(part in _NOT_KEY_SEGMENTS for part in folder_parts):
            return []  # no key has such a segment; and the walk must never leave the bucket
        start = folder.joinpath(*folder_parts)
        keys = []
        for directory, _, files in os.walk(start):
            relative = Path(directory).relative_to(folder).as_posix()
            base = "" if relative == "." else relative + "/"
            keys += [base + name for name in files if (base + name).startswith(prefix)]
        return keys

    def check_write_condition(self, bucket: str, key: str, condition: WriteCondition) -> None:
        """Raise S3's error when ``condition`` does not hold for the current object."""
        if not condition.if_none_match_any and condition.if_match is None:
            return
        try:
            current: StoredObject | None = self.head(bucket, key)
        except S3Error:
            current = None
        if condition.if_none_match_any and current is not None:
            raise precondition_failed("If-None-Match")
        if condition.if_match is not None:
            if current is None:
                raise no_such_key(key)
            if not etag_matches(condition.if_match, current.etag):
                raise precondition_failed("If-Match")

    def _sidecar_path(self, bucket: str, key: str) -> Path:
        digest = hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest()
        return self._sidecars / digest[:2] / f"{digest}.json"

    def _read_sidecar(self, bucket: str, key: str) -> dict[str, Any] | None:
        try:
            recorded: dict[str, Any] = json.loads(self._sidecar_path(bucket, key).read_text())
            return recorded
        except FileNotFoundError:
            return None

    def _write_sidecar(self, bucket: str, key: str, recorded: dict[str, Any]) -> None:
        path = self._sidecar_path(bucket, key)
        path.parent.mkdir(exist_ok=True)
        staged = self.staging_path()
        staged.write_text(json.dumps(recorded))
        os.replace(staged, path)


def etag_matches(header: str, etag: str) -> bool:
    """Whether an If-Match / If-None-Match header value names ``etag`` (or is ``*``)."""
    candidates = [candidate.strip() for candidate in header.split(",")]
    return "*" in candidates or etag.strip('"') in (c.removeprefix("W/").strip('"') for c in candidates)


def _safe_id(upload_id: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{32}", upload_id):
        raise _no_such_upload(upload_id)
    return upload_id


def _no_such_upload(upload_id: str) -> S3Error:
    return S3Error(404, "NoSuchUpload", "The specified upload does not exist.", UploadId=upload_id)


def _key_conflict(key: str) -> S3Error:
    return invalid_argument(f"Key {key!r} and another key would need the same path as file and folder")
