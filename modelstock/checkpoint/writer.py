"""Streaming safetensors writer: the header first (every shape is known from the plan), then
tensor bytes in order, hashed on the way. Memory stays at a few blocks and upload parts, never a
whole shard.

Bytes go to a ``storage.ObjectWriter``: local files are written under a temporary name and
renamed when complete; on S3 the shard is a multipart upload with several parts in flight that
becomes visible only when completed (and an abort leaves no upload behind); other stores use
fsspec's buffered file. Either way a shard is whole or absent.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import torch

from modelstock import storage
from modelstock.checkpoint.header import LENGTH_PREFIX_BYTES
from modelstock.dtypes import tensor_nbytes
from modelstock.errors import ModelStockError, StorageError
from modelstock.storage import Location

HEADER_ALIGNMENT = 8
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
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
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
        self._sink: storage.ObjectWriter | None = None
        # Hashing and writing run on a thread (both release the GIL) so they overlap the merge.
        self._queue: queue.Queue[memoryview | None] = queue.Queue(maxsize=QUEUED_BLOCKS)
        self._drainer: threading.Thread | None = None
        self._sink_error: BaseException | None = None

    def _drain(self) -> None:
        while (data := self._queue.get()) is not None:
            if self._sink_error is not None:
                continue
            try:
                assert self._sink is not None
                self._sink.write(data)
                self._hash.update(data)
            except BaseException as exc:  # handed to the producing thread
                self._sink_error = exc

    def _raise_sink_error(self) -> None:
        if self._sink_error is not None:
            exc = self._sink_error
            if isinstance(exc, ModelStockError):
                raise exc
            raise StorageError(f"{self.location.url}: write failed ({storage.describe(exc)})") from None

    def _stop_drainer(self) -> None:
        if self._drainer is not None:
            self._queue.put(None)
            self._drainer.join()
            self._drainer = None

    def __enter__(self) -> ShardWriter:
        self._sink = storage.open_object_writer(self.location, self._expected_size)
        self._drainer = threading.Thread(target=self._drain, name="shard-writer", daemon=True)
        self._drainer.start()
        self._write(memoryview(self._header))
        return self

    def _write(self, data: memoryview) -> None:
        assert self._sink is not None
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
        assert self._sink is not None
        self._stop_drainer()
        self._raise_sink_error()
        if self._size != self._expected_size:
            raise ValueError(
                f"{self.location.url}: wrote {self._size} of {self._expected_size} bytes; the shard is incomplete"
            )
        try:
            self._sink.commit()
        except ModelStockError:
            raise
        except Exception as exc:  # re-raised as our storage error with the URL
            raise StorageError(f"{self.location.url}: completing the write failed ({storage.describe(exc)})") from None
        return WrittenShard(url=self.location.url, size=self._size, sha256=self._hash.hexdigest())

    def _abort(self) -> None:
        if self._sink is None:
            return
        self._stop_drainer()
        self._sink.abort()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            self.result = self._finish()
        except BaseException:
            self._abort()  # nothing half-written stays behind
            raise
