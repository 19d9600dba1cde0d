"""The one adapter between the merge code and fsspec: URL resolution, pinned ranged reads, the
retry policy, error mapping, and how objects are written.

Everything above this module talks to ``Location`` and the functions here, never to a backend.
What fsspec's interface cannot express (conditional ranged GETs, concurrent multipart uploads,
bounded client timeouts) lives in ``modelstock.backends``, which only this module calls.
botocore/aiohttp network errors are not ``OSError`` subclasses, so they are recognised by the
module that defines them rather than imported. Retry policy and bounds: docs/ARCHITECTURE.md,
"Storage I/O".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath
import random
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

import fsspec
from fsspec.asyn import AsyncFileSystem, sync
from fsspec.core import url_to_fs
from fsspec.utils import get_protocol

from modelstock import backends
from modelstock.errors import InputError, ModelStockError, StorageAccessError, StorageError

log = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT_MODULE_PREFIXES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "google", "azure", "s3fs")
# Block size of fsspec's buffered writer (gcs, az, memory...): memory per open shard there.
BUFFERED_WRITE_BLOCK_SIZE = 64 * 1024 * 1024


class InputChanged(InputError):
    """An input object was replaced or rewritten after the merge planned from its headers."""


@dataclass(frozen=True)
class ObjectVersion:
    """The version of an input object a merge planned from; every ranged read is held to it.

    ``etag`` as the store sends it (quotes included; S3, HTTP, GCS); local files have none and
    are pinned by size, mtime and inode instead."""

    size: int
    etag: str | None = None
    mtime: float | None = None
    inode: int | None = None

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> ObjectVersion:
        etag = info.get("ETag") or info.get("etag")
        mtime, inode = info.get("mtime"), info.get("ino")
        return cls(
            size=int(info.get("size") or 0),
            etag=str(etag) if etag else None,
            mtime=float(mtime) if isinstance(mtime, (int, float)) and not etag else None,
            inode=int(inode) if isinstance(inode, int) and not etag else None,
        )

    def matches(self, other: ObjectVersion) -> bool:
        if self.etag is not None or other.etag is not None:
            return self.etag == other.etag and self.size == other.size
        return (self.size, self.mtime, self.inode) == (other.size, other.mtime, other.inode)

    @property
    def if_match(self) -> str | None:
        """The ``If-Match`` value for a conditional read; None for a weak ETag (never matches)."""
        if self.etag is None or self.etag.startswith("W/"):
            return None
        return self.etag if self.etag.startswith('"') else f'"{self.etag}"'

    def describe(self) -> str:
        if self.etag is not None:
            return f"ETag {self.etag}, {self.size} bytes"
        return f"{self.size} bytes, mtime {self.mtime}"


@dataclass(frozen=True)
class Location:
    """A resolved URL: the filesystem, the backend-native path inside it, and (for an input read
    by a merge) the object version every read of it is held to."""

    url: str
    fs: fsspec.AbstractFileSystem = field(compare=False, repr=False)
    path: str
    version: ObjectVersion | None = field(default=None, compare=False, repr=False)

    def join(self, *parts: str) -> Location:
        path = posixpath.join(self.path, *parts)
        return Location(url=_join_url(self.url, *parts), fs=self.fs, path=path)

    def pinned(self, version: ObjectVersion) -> Location:
        return replace(self, version=version)

    @property
    def is_local(self) -> bool:
        protocol = self.fs.protocol
        protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
        return "file" in protocols or "local" in protocols

    @property
    def is_async(self) -> bool:
        """Reads run as coroutines on the filesystem's event loop (s3, gs, az, http)."""
        return isinstance(self.fs, AsyncFileSystem)


def _join_url(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def options_for(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The fsspec options for ``url`` from one storage-options document.

    Keys that are URL prefixes (``"s3://"``, ``"s3://bucket-a/"``, ``"hf://"``) hold options for
    the URLs they begin; the longest matching prefix is merged over the document's other keys,
    which apply to every URL. A document without prefix keys applies to every URL as it is."""
    document = dict(storage_options or {})
    prefixes = {key: value for key, value in document.items() if "://" in key}
    options = {key: value for key, value in document.items() if key not in prefixes}
    matching = [prefix for prefix in prefixes if url.startswith(prefix)]
    if matching:
        chosen = prefixes[max(matching, key=len)]
        if not isinstance(chosen, Mapping):
            raise StorageAccessError(f"{url}: storage options for {max(matching, key=len)!r} must be a JSON object")
        options.update(chosen)
    return options


def resolve(url: str, storage_options: Mapping[str, Any] | None = None) -> Location:
    """Resolve a local path or fsspec URL (s3://, gs://, az://, hf://, http(s)://, memory://, file://).

    ``storage_options`` may give options per URL prefix (:func:`options_for`). Object-store clients
    get bounded timeouts and no retries of their own (ours apply, once) unless the options set them."""
    try:
        options = backends.client_defaults(get_protocol(url), options_for(url, storage_options))
        fs, path = url_to_fs(url, **options)
    except (ImportError, ValueError) as exc:
        raise StorageAccessError(f"{url}: cannot open this location ({describe(exc)})") from None
    return Location(url=url.rstrip("/") if len(url) > 1 else url, fs=fs, path=path.rstrip("/") or path)


# ------------------------------------------------------------------------------ errors, retries


def describe(exc: BaseException) -> str:
    """A one-line description of a storage exception."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def http_status(exc: BaseException) -> int | None:
    """The HTTP status behind a client library's exception, when it carries one (s3fs's
    translated errors carry botocore's response on their ``__cause__``)."""
    for candidate in (exc, exc.__cause__):
        response = getattr(candidate, "response", None)
        if isinstance(response, Mapping):  # botocore's ClientError
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int):
                return status
    response = getattr(exc, "response", None)
    for value in (getattr(response, "status_code", None), getattr(exc, "status", None), getattr(exc, "code", None)):
        if isinstance(value, int) and 100 <= value < 600:
            return value
    return None


def is_transient(exc: BaseException) -> bool:
    """Network and server faults worth retrying (timeouts, resets, 5xx, throttling, truncated bodies)."""
    if isinstance(exc, (ModelStockError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
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


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded in attempts and in total time.

    The delay before attempt k+1 is drawn from [c/2, c] with c = min(max_delay_s, first_delay_s
    * 2**k) ("equal jitter": the many parts that fail together do not retry in lockstep). No
    attempt starts later than ``deadline_s`` after the first one, so an operation fails within
    ``deadline_s`` plus one attempt's own timeouts (docs/ARCHITECTURE.md, "Storage I/O")."""

    first_delay_s: float = 0.25
    max_delay_s: float = 8.0
    max_attempts: int = 10
    deadline_s: float = 20.0

    def delay_after(self, attempt: int, elapsed_s: float) -> float | None:
        """Seconds to wait after failed attempt ``attempt`` (from 0); None: give up."""
        if attempt + 1 >= self.max_attempts:
            return None
        ceiling = min(self.max_delay_s, self.first_delay_s * 2**attempt)
        delay = ceiling * (0.5 + random.random() / 2)
        return None if elapsed_s + delay > self.deadline_s else delay


@dataclass(frozen=True)
class FixedDelays:
    """Exactly these delays between attempts (tests, tools)."""

    delays: tuple[float, ...]

    def delay_after(self, attempt: int, elapsed_s: float) -> float | None:
        return self.delays[attempt] if attempt < len(self.delays) else None


RETRY_POLICY = RetryPolicy()


def _policy(retries: Sequence[float] | None) -> RetryPolicy | FixedDelays:
    return RETRY_POLICY if retries is None else FixedDelays(tuple(retries))


def _after_failure(what: str, exc: Exception, attempt: int, started: float, policy: RetryPolicy | FixedDelays,
                   version: ObjectVersion | None = None) -> float:
    """The delay before the next attempt, or raise the error this failure ends in."""
    if isinstance(exc, ModelStockError):
        raise exc
    if isinstance(exc, FileNotFoundError):
        raise StorageAccessError(f"{what}: not found ({describe(exc)})") from None
    if isinstance(exc, PermissionError):
        raise StorageAccessError(f"{what}: access denied ({describe(exc)})") from None
    status = http_status(exc)
    if status == 412 and version is not None:
        raise InputChanged(
            f"{what}: changed since the merge was planned (planned: {version.describe()}); "
            "re-run the merge to plan against the new version"
        ) from None
    if status in (404, 410):
        raise StorageAccessError(f"{what}: not found (HTTP {status})") from None
    if status in (401, 403):
        raise StorageAccessError(f"{what}: access denied (HTTP {status})") from None
    if not is_transient(exc):
        raise exc
    elapsed = time.monotonic() - started
    delay = policy.delay_after(attempt, elapsed)
    if delay is None:
        raise StorageError(
            f"{what}: storage failed after {attempt + 1} attempts in {elapsed:.1f} s ({describe(exc)})"
        ) from None
    log.info("%s: transient storage fault (%s); retrying in %.2fs", what, describe(exc), delay)
    return delay


def storage_call(what: str, call: Callable[[], T], *, retries: Sequence[float] | None = None,
                 version: ObjectVersion | None = None) -> T:
    """Run one storage operation, retrying transient faults, mapping failures to our errors.

    ``what`` names the object (URL) for the error message; ``retries`` are explicit delays
    between attempts (default: ``RETRY_POLICY``, read at call time)."""
    policy, started, attempt = _policy(retries), time.monotonic(), 0
    while True:
        try:
            return call()
        except Exception as exc:  # classified right here, never swallowed
            delay = _after_failure(what, exc, attempt, started, policy, version)
        time.sleep(delay)
        attempt += 1


async def storage_call_async(what: str, call: Callable[[], Awaitable[T]], *,
                             version: ObjectVersion | None = None) -> T:
    """``storage_call`` for a coroutine on an event loop: backoff sleeps hold no thread."""
    policy, started, attempt = RETRY_POLICY, time.monotonic(), 0
    while True:
        try:
            return await call()
        except Exception as exc:  # classified right here, never swallowed
            delay = _after_failure(what, exc, attempt, started, policy, version)
        await asyncio.sleep(delay)
        attempt += 1


# ---------------------------------------------------------------------------------- reads


def _changed(location: Location, version: ObjectVersion, now: ObjectVersion) -> InputChanged:
    return InputChanged(
        f"{location.url}: changed since the merge was planned (planned: {version.describe()}, now: "
        f"{now.describe()}); re-run the merge to plan against the new version"
    )


def _short_read(location: Location, start: int, asked: int, got: int, info: Mapping[str, Any] | None) -> BaseException:
    """A short answer: the object changed (its pinned version differs from ``info``), or it really ends early."""
    version = location.version
    if version is not None and info is not None and not version.matches(now := ObjectVersion.from_info(info)):
        return _changed(location, version, now)
    return StorageError(
        f"{location.url}: asked for bytes [{start}, {start + asked}) but got {got} bytes (object changed?)"
    )


def _check_local_version(location: Location, status: os.stat_result) -> None:
    version = location.version
    if version is None:
        return
    now = ObjectVersion(status.st_size, None, status.st_mtime, status.st_ino if version.inode is not None else None)
    if not version.matches(now):
        raise _changed(location, version, now)


def _read_local_into(location: Location, start: int, view: memoryview) -> None:
    """Local files: ``preadv`` straight into the buffer; the open file is checked against the pin
    after the read, so a file replaced or rewritten meanwhile is refused, never mixed in."""
    with open(location.path, "rb", buffering=0) as handle:
        filled = 0
        while filled < len(view):
            count = os.preadv(handle.fileno(), [view[filled:]], start + filled)
            if not count:
                break
            filled += count
        _check_local_version(location, os.fstat(handle.fileno()))
    if filled != len(view):
        raise StorageError(
            f"{location.url}: asked for bytes [{start}, {start + len(view)}) but the file ends early (changed?)"
        )


def _generic_cat_file(fs: fsspec.AbstractFileSystem) -> bool:
    """True when the backend reads ranges through fsspec's buffered file (e.g. HfFileSystem),
    whose default read-ahead cache would fetch a block past every range asked for.

    Async backends (s3fs, gcsfs, adlfs) implement ranged reads natively in ``_cat_file``; their
    sync ``cat_file`` is bound per instance, so the class attribute alone would misclassify them."""
    if isinstance(fs, AsyncFileSystem):
        return False
    return type(fs).cat_file is fsspec.AbstractFileSystem.cat_file


def _read_sync_remote_into(location: Location, start: int, view: memoryview) -> None:
    extra = {"cache_type": "none"} if _generic_cat_file(location.fs) else {}
    data = location.fs.cat_file(location.path, start=start, end=start + len(view), **extra)
    if len(data) != len(view):
        info = location.fs.info(location.path) if location.version is not None else None
        raise _short_read(location, start, len(view), len(data), info)
    view[:] = data


async def read_into_async(location: Location, start: int, view: memoryview) -> None:
    """Fill ``view`` with bytes ``[start, start + len(view))`` of one object on an async backend:
    one ranged GET (retried), conditioned on the pinned version where the store supports it."""
    if not len(view):
        return
    if_match = location.version.if_match if location.version is not None else None

    async def read() -> None:
        got = await backends.read_range_into(location.fs, location.path, start, view, if_match)
        if got != len(view):  # only stores read without If-Match get here (S3/HTTP check the body)
            info = await location.fs._info(location.path) if location.version is not None else None
            raise _short_read(location, start, len(view), got, info)

    await storage_call_async(location.url, read, version=location.version)


def read_into(location: Location, start: int, view: memoryview) -> None:
    """Fill ``view`` with bytes ``[start, start + len(view))`` of one object (one ranged request,
    retried; held to the location's pinned version)."""
    if not len(view):
        return
    if location.is_local:
        storage_call(location.url, lambda: _read_local_into(location, start, view))
    elif location.is_async:
        sync(location.fs.loop, read_into_async, location, start, view)
    else:
        storage_call(location.url, lambda: _read_sync_remote_into(location, start, view), version=location.version)


def read_range(location: Location, start: int, end: int) -> bytes | bytearray:
    """Bytes ``[start, end)`` of one object, as a single ranged request."""
    if end <= start:
        return b""
    buffer = bytearray(end - start)
    read_into(location, start, memoryview(buffer))
    return buffer


def reads_are_conditional(location: Location) -> bool:
    """Whether every ranged read of ``location`` is itself checked against its pinned version
    (local files: the open file's stat; S3 and HTTP: ``If-Match``). Other stores are checked by
    ``verify_version`` around their reads."""
    version = location.version
    if version is None or location.is_local:
        return True
    return version.if_match is not None and backends.supports_if_match(location.fs)


def verify_version(location: Location) -> None:
    """Raise ``InputChanged`` unless the object still has its pinned version (one metadata request)."""
    version = location.version
    if version is None:
        return
    location.fs.invalidate_cache(location.path)
    info = storage_call(location.url, lambda: location.fs.info(location.path))
    now = ObjectVersion.from_info(info)
    if not version.matches(now):
        raise _changed(location, version, now)


# ---------------------------------------------------------------------------------- writes


class ObjectWriter(Protocol):
    """A whole object written as a stream: invisible until ``commit``, gone after ``abort``."""

    def write(self, data: memoryview) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class LocalFileWriter:
    """A temporary ``.partial-*`` name beside the target, renamed into place on commit."""

    def __init__(self, location: Location) -> None:
        self.location = location
        os.makedirs(posixpath.dirname(location.path) or ".", exist_ok=True)
        self.temporary = f"{location.path}.partial-{uuid.uuid4().hex[:12]}"
        self._handle = open(self.temporary, "wb")  # noqa: SIM115 - closed by commit or abort

    def write(self, data: memoryview) -> None:
        self._handle.write(data)

    def commit(self) -> None:
        self._handle.close()
        os.replace(self.temporary, self.location.path)

    def abort(self) -> None:
        self._handle.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temporary)


class BufferedFileWriter:
    """fsspec's buffered file, for stores without a dedicated writer (gcs, az, memory...): their
    object appears when the file is closed; abort discards the upload where fsspec can."""

    def __init__(self, location: Location) -> None:
        self.location = location
        self._handle = location.fs.open(location.path, "wb", block_size=BUFFERED_WRITE_BLOCK_SIZE)

    def write(self, data: memoryview) -> None:
        self._handle.write(data)

    def commit(self) -> None:
        self._handle.close()

    def abort(self) -> None:
        discard = getattr(self._handle, "discard", None)
        if callable(discard):
            discard()
        else:  # stores that publish on open or close (e.g. memory://): remove what appeared
            self._handle.close()
            remove_file(self.location)


def open_object_writer(location: Location, size: int) -> ObjectWriter:
    """A writer for the object at ``location``, about ``size`` bytes long: concurrent multipart
    parts on S3, a temporary name + rename locally, fsspec's buffered file elsewhere."""
    try:
        if location.is_local:
            return LocalFileWriter(location)
        multipart = backends.multipart_writer(location.fs, location.path, location.url, size, _retry_on_loop)
        return multipart if multipart is not None else BufferedFileWriter(location)
    except OSError as exc:
        raise StorageError(f"{location.url}: cannot open for writing ({describe(exc)})") from None


def _retry_on_loop(what: str, call: Callable[[], Awaitable[T]]) -> Awaitable[T]:
    return storage_call_async(what, call)


# ------------------------------------------------------------------------- small operations


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
        except Exception as exc:  # a failed precondition means: it exists
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
