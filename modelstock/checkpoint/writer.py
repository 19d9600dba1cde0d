"""Streaming safetensors writer: the header first (every shape is known from the plan), then
tensor bytes in order, hashed on the way. Memory stays at one block, never a whole shard.

Local files are written under a temporary name and renamed when complete; object stores only
make an object visible when its (multipart) upload completes, so either way a shard is whole
or absent.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import queue
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import torch

from modelstock import storage
from modelstock.checkpoint.header import LENGTH_PREFIX_BYTES
from modelstock.dtypes import tensor_nbytes
from modelstock.errors import StorageError
from modelstock.storage import Location

HEADER_ALIGNMENT = 8
WRITE_BLOCK_SIZE = 64 * 1024 * 1024  # s3fs multipart part size: memory per open shard
QUEUED_BLOCKS = 4  # blocks handed to the writer thread ahead of the disk/network


@dataclass(frozen=True)
class TensorSpec:
    """What will be written for one tensor: name, safetensors dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


@dataclass(frozen=True)
class WrittenShard:
    url: str
    size: int
    sha256: str


def encode_header(specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """Length prefix + JSON header, padded with spaces to 8 bytes as the reference writer does."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(len(raw) + LENGTH_PREFIX_BYTES) % HEADER_ALIGNMENT)
    return len(raw).to_bytes(LENGTH_PREFIX_BYTES, "little") + raw


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without copying a contiguous CPU tensor."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")  # type: ignore[arg-type]


class ShardWriter:
    """Writes one safetensors file, tensor by tensor and block by block, in the declared order."""

    def __init__(self, location: Location, specs: Sequence[TensorSpec]) -> None:
        self.location = location
        self.specs = list(specs)
        self._header = encode_header(self.specs)
        self._expected_size = len(self._header) + sum(spec.nbytes for spec in self.specs)
        self._spec_index = 0
        self._written_in_tensor = 0
        self._size = 0
        self._hash = hashlib.sha256()
        self._temporary = (
            f"{location.path}.partial-{uuid.uuid4().hex[:12]}" if location.is_local else location.path
        )
        self._handle = None
        # Hashing and writing run on a thread (both release the GIL) so they overlap the merge.
        self._queue: queue.Queue[memoryview | None] = queue.Queue(maxsize=QUEUED_BLOCKS)
        self._sink: threading.Thread | None = None
        self._sink_error: BaseException | None = None

    def _drain(self) -> None:
        while (data := self._queue.get()) is not None:
            if self._sink_error is not None:
                continue
            try:
                assert self._handle is not None
                self._handle.write(data)
                self._hash.update(data)
            except BaseException as exc:  # noqa: BLE001 - handed to the producing thread
                self._sink_error = exc

    def _raise_sink_error(self) -> None:
        if self._sink_error is not None:
            exc = self._sink_error
            raise StorageError(f"{self.location.url}: write failed ({storage.describe(exc)})") from None

    def _stop_sink(self) -> None:
        if self._sink is not None:
            self._queue.put(None)
            self._sink.join()
            self._sink = None

    def __enter__(self) -> "ShardWriter":
        try:
            if self.location.is_local:
                self.location.fs.makedirs(posixpath.dirname(self.location.path), exist_ok=True)
            self._handle = self.location.fs.open(self._temporary, "wb", block_size=WRITE_BLOCK_SIZE)
        except OSError as exc:
            raise StorageError(f"{self.location.url}: cannot open for writing ({storage.describe(exc)})") from None
        self._sink = threading.Thread(target=self._drain, name="shard-writer", daemon=True)
        self._sink.start()
        self._write(memoryview(self._header))
        return self

    def _write(self, data: memoryview) -> None:
        assert self._handle is not None
        self._raise_sink_error()
        self._queue.put(data)
        self._size += len(data)

    def write_block(self, name: str, block: torch.Tensor) -> None:
        """Append (part of) tensor ``name``; blocks must arrive in order and fill it exactly."""
        spec = self.specs[self._spec_index]
        if spec.name != name:
            raise ValueError(f"{self.location.url}: expected tensor {spec.name!r} next, got {name!r}")
        data = tensor_bytes(block)
        if self._written_in_tensor + len(data) > spec.nbytes:
            raise ValueError(f"{self.location.url}: tensor {name!r} receives more than {spec.nbytes} bytes")
        self._write(data)
        self._written_in_tensor += len(data)
        if self._written_in_tensor == spec.nbytes:
            self._spec_index += 1
            self._written_in_tensor = 0
            while self._spec_index < len(self.specs) and self.specs[self._spec_index].nbytes == 0:
                self._spec_index += 1

    def _finish(self) -> WrittenShard:
        assert self._handle is not None
        self._stop_sink()
        self._raise_sink_error()
        if self._size != self._expected_size:
            raise ValueError(
                f"{self.location.url}: wrote {self._size} of {self._expected_size} bytes; the shard is incomplete"
            )
        try:
            self._handle.close()
            if self.location.is_local:
                self.location.fs.mv(self._temporary, self.location.path)
        except Exception as exc:  # noqa: BLE001 - re-raised as our storage error with the URL
            raise StorageError(f"{self.location.url}: completing the write failed ({storage.describe(exc)})") from None
        return WrittenShard(url=self.location.url, size=self._size, sha256=self._hash.hexdigest())

    def _abort(self) -> None:
        if self._handle is None:
            return
        self._stop_sink()
        try:
            if self.location.is_local:
                # fsspec refuses discard() on local (autocommit) files and would mask the original
                # error: close the temporary file, removed below.
                self._handle.close()
            elif callable(getattr(self._handle, "discard", None)):
                self._handle.discard()  # fsspec buffered files: abandon the multipart upload
            else:
                # Stores that publish on open or close (e.g. memory://): removed below.
                self._handle.close()
        finally:
            if self.location.is_local:
                storage.remove_file(Location(self.location.url, self.location.fs, self._temporary))
            elif not callable(getattr(self._handle, "discard", None)):
                storage.remove_file(self.location)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.result = self._finish()
        else:
            self._abort()
