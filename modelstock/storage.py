"""The one adapter between the merge code and fsspec: URL resolution, ranged reads, error mapping.

Everything above this module talks to ``fsspec.AbstractFileSystem`` and never imports a backend.
Backend quirks live here: s3fs's ``cat_file`` takes ``start``/``end`` only as keywords, and
botocore/aiohttp network errors are not ``OSError`` subclasses, so they are recognised by the
module that defines them rather than imported.
"""

from __future__ import annotations

import logging
import os
import posixpath
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fsspec
from fsspec.asyn import AsyncFileSystem
from fsspec.core import url_to_fs

from modelstock.errors import StorageAccessError, StorageError

log = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT_MODULE_PREFIXES = ("botocore", "aiohttp", "urllib3", "requests", "google", "azure", "s3fs")
RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class Location:
    """A resolved URL: the filesystem and the backend-native path inside it."""

    url: str
    fs: fsspec.AbstractFileSystem = field(compare=False, repr=False)
    path: str

    def join(self, *parts: str) -> "Location":
        path = posixpath.join(self.path, *parts)
        return Location(url=_join_url(self.url, *parts), fs=self.fs, path=path)

    @property
    def is_local(self) -> bool:
        protocol = self.fs.protocol
        protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
        return "file" in protocols or "local" in protocols


def _join_url(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def resolve(url: str, storage_options: Mapping[str, Any] | None = None) -> Location:
    """Resolve a local path or fsspec URL (s3://, gs://, az://, hf://, memory://, file://)."""
    try:
        fs, path = url_to_fs(url, **dict(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise StorageAccessError(f"{url}: cannot open this location ({describe(exc)})") from None
    return Location(url=url.rstrip("/") if len(url) > 1 else url, fs=fs, path=path.rstrip("/") or path)


def describe(exc: BaseException) -> str:
    """A one-line description of a storage exception."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def http_status(exc: BaseException) -> int | None:
    """The HTTP status behind a client library's exception, when it carries one."""
    response = getattr(exc, "response", None)
    for candidate in (getattr(response, "status_code", None), getattr(exc, "status", None), getattr(exc, "code", None)):
        if isinstance(candidate, int) and 100 <= candidate < 600:
            return candidate
    return None


def is_transient(exc: BaseException) -> bool:
    """Network and server faults worth retrying (timeouts, resets, 5xx, truncated bodies)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    status = http_status(exc)
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return False  # the request itself is wrong: retrying cannot help
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    module = type(exc).__module__ or ""
    if module.startswith(_TRANSIENT_MODULE_PREFIXES):
        return True
    return isinstance(exc, OSError) and not isinstance(exc, FileExistsError)


def storage_call(what: str, call: Callable[[], T], *, retries: Sequence[float] | None = None) -> T:
    """Run one storage operation, retrying transient faults, mapping failures to our errors.

    ``what`` names the object (URL) for the error message; ``retries`` are the delays between
    attempts (default ``RETRY_DELAYS_S``, read at call time).
    """
    retries = RETRY_DELAYS_S if retries is None else retries
    for attempt in range(len(retries) + 1):
        try:
            return call()
        except FileNotFoundError as exc:
            raise StorageAccessError(f"{what}: not found ({describe(exc)})") from None
        except PermissionError as exc:
            raise StorageAccessError(f"{what}: access denied ({describe(exc)})") from None
        except Exception as exc:  # noqa: BLE001 - classified right here, never swallowed
            status = http_status(exc)
            if status in (404, 410):
                raise StorageAccessError(f"{what}: not found (HTTP {status})") from None
            if status in (401, 403):
                raise StorageAccessError(f"{what}: access denied (HTTP {status})") from None
            if not is_transient(exc):
                raise
            if attempt == len(retries):
                raise StorageError(f"{what}: storage failed after {attempt + 1} attempts ({describe(exc)})") from None
            log.warning("%s: transient storage fault (%s); retrying in %.1fs", what, describe(exc), retries[attempt])
            time.sleep(retries[attempt])
    raise AssertionError("unreachable")


def _generic_cat_file(fs: fsspec.AbstractFileSystem) -> bool:
    """True when the backend reads ranges through fsspec's buffered file (e.g. HfFileSystem),
    whose default read-ahead cache would fetch a block past every range asked for.

    Async backends (s3fs, gcsfs, adlfs) implement ranged reads natively in ``_cat_file``; their
    sync ``cat_file`` is bound per instance, so the class attribute alone would misclassify them."""
    if isinstance(fs, AsyncFileSystem):
        return False
    return type(fs).cat_file is fsspec.AbstractFileSystem.cat_file


def _read_local_range(location: Location, start: int, end: int) -> bytearray:
    """Local files: read straight into one buffer (no intermediate bytes object to copy)."""
    buffer = bytearray(end - start)
    with open(location.path, "rb", buffering=0) as handle:
        handle.seek(start)
        view = memoryview(buffer)
        filled = 0
        while filled < len(buffer):
            count = handle.readinto(view[filled:])
            if not count:
                break
            filled += count
    if filled != len(buffer):
        raise StorageError(f"{location.url}: asked for bytes [{start}, {end}) but the file ends early (changed?)")
    return buffer


def _read_local_into(location: Location, start: int, view: memoryview) -> None:
    with open(location.path, "rb", buffering=0) as handle:
        filled = 0
        while filled < len(view):
            count = os.preadv(handle.fileno(), [view[filled:]], start + filled)
            if not count:
                raise StorageError(
                    f"{location.url}: asked for bytes [{start}, {start + len(view)}) but the file ends early (changed?)"
                )
            filled += count


def read_into(location: Location, start: int, view: memoryview) -> None:
    """Fill ``view`` with bytes ``[start, start + len(view))`` of one object (one ranged request)."""
    if not len(view):
        return
    if location.is_local:
        storage_call(location.url, lambda: _read_local_into(location, start, view))
        return
    view[:] = read_range(location, start, start + len(view))


def read_range(location: Location, start: int, end: int) -> bytes | bytearray:
    """Bytes ``[start, end)`` of one object, as a single ranged request."""
    if end <= start:
        return b""
    if location.is_local:
        return storage_call(location.url, lambda: _read_local_range(location, start, end))
    extra = {"cache_type": "none"} if _generic_cat_file(location.fs) else {}
    data = storage_call(
        location.url, lambda: location.fs.cat_file(location.path, start=start, end=end, **extra)
    )
    if len(data) != end - start:
        raise StorageError(
            f"{location.url}: asked for bytes [{start}, {end}) but got {len(data)} bytes (object changed?)"
        )
    return data


def object_info(location: Location) -> dict[str, Any]:
    return storage_call(location.url, lambda: location.fs.info(location.path))


def exists(location: Location) -> bool:
    return storage_call(location.url, lambda: location.fs.exists(location.path))


def list_names(location: Location) -> list[str]:
    """Base names of the entries directly inside a directory (empty if it does not exist)."""
    if not exists(location):
        return []
    entries = storage_call(location.url, lambda: location.fs.ls(location.path, detail=False, refresh=True))
    prefix = location.path.rstrip("/")
    names = []
    for entry in entries:
        entry = entry.rstrip("/")
        if entry == prefix:
            continue
        names.append(posixpath.basename(entry))
    return sorted(names)


def read_bytes(location: Location) -> bytes:
    return storage_call(location.url, lambda: location.fs.cat_file(location.path))


def write_bytes(location: Location, data: bytes) -> None:
    """Write a small object whole; local files go through a temporary name and a rename."""
    def write() -> None:
        if location.is_local:
            location.fs.makedirs(posixpath.dirname(location.path), exist_ok=True)
            temporary = location.path + ".partial"
            with location.fs.open(temporary, "wb") as handle:
                handle.write(data)
            location.fs.mv(temporary, location.path)
        else:
            location.fs.pipe_file(location.path, data)

    storage_call(location.url, write)


def create_exclusive(location: Location, data: bytes) -> bool:
    """Create an object only if it does not exist yet (atomically); False if it already exists.

    Local files are hard-linked into place; object stores use a conditional put (S3 ``If-None-Match: *`` through
    fsspec's ``mode="create"``).
    """
    def create() -> bool:
        try:
            if location.is_local:
                # Write a private file, then hard-link it into place: the name appears atomically
                # with its full content (O_EXCL alone would expose an empty file to readers).
                location.fs.makedirs(posixpath.dirname(location.path), exist_ok=True)
                temporary = f"{location.path}.partial-{os.getpid()}-{threading.get_ident()}"
                with open(temporary, "wb") as handle:
                    handle.write(data)
                try:
                    os.link(temporary, location.path)
                finally:
                    os.unlink(temporary)
            else:
                location.fs.pipe_file(location.path, data, mode="create")
        except FileExistsError:
            return False
        except Exception as exc:  # noqa: BLE001 - a failed precondition means: it exists
            if "PreconditionFailed" in describe(exc) or "412" in describe(exc):
                return False
            raise
        return True

    return storage_call(location.url, create)


def remove_tree(location: Location) -> None:
    def remove() -> None:
        if location.fs.exists(location.path):
            location.fs.rm(location.path, recursive=True)

    storage_call(location.url, remove)


def remove_file(location: Location) -> None:
    def remove() -> None:
        if location.fs.exists(location.path):
            location.fs.rm_file(location.path)

    storage_call(location.url, remove)
