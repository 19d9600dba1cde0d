"""A worker's read scheduler: the chunks a shard will need, read ahead in order, within a budget.

The shard knows in advance every chunk the engine will ask for (each tensor's chunk plan), so
reads are issued in that order as soon as the byte budget allows: while one tensor is merged the
next ones are already arriving. Each chunk is one byte range per input; a range is split into
parts of at most ``PART_BYTES`` read concurrently, each straight into its place in one
preallocated buffer per range.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from types import TracebackType

import torch

from modelstock import storage
from modelstock.checkpoint.reader import TensorLocation
from modelstock.dtypes import row_view, to_torch
from modelstock.engine import LoadedChunk
from modelstock.storage import Location

PART_BYTES = 16 * 1024 * 1024
DEFAULT_IO_CONCURRENCY = 16
LOCAL_IO_CONCURRENCY = 4  # local reads are memory copies: more threads only contend for the cores

ChunkKey = tuple[int, int, int]  # (tensor index in the shard, first row, row after the last)
Allocator = Callable[[int], memoryview]


@dataclass(frozen=True)
class RangeRead:
    """Bytes ``[start, end)`` of one object, to be viewed as a (rows, cols) tensor of ``dtype``."""

    location: Location
    start: int
    end: int
    dtype: str
    rows: int
    cols: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ChunkRead:
    """What the engine's chunk ``key`` (rows ``key[1]:key[2]`` of one output tensor) reads: rows
    ``rows[i]`` of input tensor ``locations[i]``, in the job's input order. The rows are the
    chunk's own unless an input maps them (e.g. the scales of a block-quantized weight)."""

    key: ChunkKey
    locations: tuple[TensorLocation, ...]
    rows: tuple[tuple[int, int], ...]

    @classmethod
    def same_rows(cls, key: ChunkKey, locations: tuple[TensorLocation, ...]) -> ChunkRead:
        return cls(key, locations, ((key[1], key[2]),) * len(locations))

    @functools.cached_property
    def ranges(self) -> tuple[RangeRead, ...]:
        return tuple(rows_of(location, *rows) for location, rows in zip(self.locations, self.rows))

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.ranges)


def heap_buffer(nbytes: int) -> memoryview:
    """Uninitialised memory (``bytearray`` would zero it first: a wasted pass over every input byte)."""
    return memoryview(torch.empty(nbytes, dtype=torch.uint8).numpy())  # type: ignore[arg-type]


def pinned_buffer(nbytes: int) -> memoryview:
    """Page-locked host memory: host-to-GPU copies from it run asynchronously."""
    return memoryview(torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy())  # type: ignore[arg-type]


def as_tensor(buffer: memoryview, read: RangeRead) -> torch.Tensor:
    """A (rows, cols) tensor over the buffer's bytes, without copying."""
    if read.rows * read.cols == 0:
        return torch.empty((read.rows, read.cols), dtype=to_torch(read.dtype))
    with warnings.catch_warnings():
        # The buffer belongs to this chunk alone and every consumer treats it as read-only.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buffer, dtype=to_torch(read.dtype)).reshape(read.rows, read.cols)


def _parts(read: RangeRead, part_bytes: int) -> list[tuple[int, int]]:
    """(offset in the range, length) of each part."""
    return [(offset, min(part_bytes, read.nbytes - offset)) for offset in range(0, read.nbytes, part_bytes)]


class _Pending:
    """One chunk being read: its buffers and the futures of its parts."""

    def __init__(self, chunk: ChunkRead, buffers: list[memoryview], parts: list[Future[None]]) -> None:
        self.chunk = chunk
        self.buffers = buffers
        self.parts = parts


class ChunkFetcher:
    """Reads ``schedule`` ahead of use; ``read`` hands out chunks in schedule order.

    At most ``budget`` bytes are held at once (being read, or handed out and not yet released),
    except that one chunk is always allowed when nothing else is held. A chunk asked for out of
    schedule order (error paths, fallbacks) is read directly, outside the budget.
    """

    def __init__(
        self,
        schedule: Sequence[ChunkRead],
        describe: Callable[[ChunkKey], ChunkRead],
        budget: int,
        concurrency: int = DEFAULT_IO_CONCURRENCY,
        part_bytes: int = PART_BYTES,
        allocate: Allocator = heap_buffer,
    ) -> None:
        """``describe(key)`` says what any chunk reads (for chunks asked out of schedule order)."""
        self.schedule = list(schedule)
        self.describe = describe
        self.budget = budget
        self.part_bytes = part_bytes
        self.allocate = allocate
        self._pool = ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="fetch")
        self._lock = threading.Lock()
        self._held = 0
        self._next_start = 0  # index of the next chunk of the schedule to start reading
        self._next_use = 0  # index of the next chunk of the schedule to hand out
        self._pending: dict[int, _Pending] = {}
        self.bytes_read = 0

    def __enter__(self) -> ChunkFetcher:
        self._top_up()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for pending in self._pending.values():
            for part in pending.parts:
                part.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _start(self, index: int) -> None:
        chunk = self.schedule[index]
        buffers = [self.allocate(r.nbytes) for r in chunk.ranges]
        parts = [
            self._pool.submit(storage.read_into, r.location, r.start + offset, buffer[offset : offset + length])
            for r, buffer in zip(chunk.ranges, buffers)
            for offset, length in _parts(r, self.part_bytes)
        ]
        self._pending[index] = _Pending(chunk, buffers, parts)
        self.bytes_read += chunk.nbytes

    def _top_up(self) -> None:
        with self._lock:
            while self._next_start < len(self.schedule):
                size = self.schedule[self._next_start].nbytes
                if self._held and self._held + size > self.budget:
                    return
                self._held += size
                self._start(self._next_start)
                self._next_start += 1

    def _release(self, size: int) -> None:
        with self._lock:
            self._held -= size
        self._top_up()

    def read(self, key: ChunkKey) -> LoadedChunk:
        """The chunk ``key``: the next one in the schedule, or (out of order) a direct read."""
        index = self._next_use
        if index >= len(self.schedule) or self.schedule[index].key != key:
            return self.read_directly(key)
        self._next_use += 1
        self._top_up()
        pending = self._pending.pop(index)
        done, _ = wait(pending.parts)
        for part in done:
            part.result()  # raises the part's storage error
        size = pending.chunk.nbytes
        tensors = [as_tensor(buffer, r) for buffer, r in zip(pending.buffers, pending.chunk.ranges)]
        return LoadedChunk(key[1], key[2], tensors, on_release=lambda: self._release(size))

    def read_directly(self, key: ChunkKey) -> LoadedChunk:
        chunk = self.describe(key)
        self.bytes_read += chunk.nbytes
        return LoadedChunk(key[1], key[2], read_now(chunk.ranges))


def rows_of(location: TensorLocation, row_start: int, row_stop: int) -> RangeRead:
    """The byte range of rows ``[row_start, row_stop)`` of a tensor's (rows, cols) view."""
    rows, cols = row_view(location.entry.shape)
    row_bytes = location.entry.nbytes // rows if rows else 0
    start = location.entry.start + row_start * row_bytes
    return RangeRead(location.file, start, start + (row_stop - row_start) * row_bytes, location.entry.dtype,
                     row_stop - row_start, cols)


def read_now(ranges: Sequence[RangeRead]) -> list[torch.Tensor]:
    """Read ranges one after the other, outside any schedule (error paths, tools, tests)."""
    tensors = []
    for read in ranges:
        buffer = heap_buffer(read.nbytes)
        storage.read_into(read.location, read.start, buffer)
        tensors.append(as_tensor(buffer, read))
    return tensors


def read_rows(locations: Sequence[TensorLocation], row_start: int, row_stop: int) -> list[torch.Tensor]:
    """Rows ``[row_start, row_stop)`` of the same tensor in several checkpoints, each (rows, cols)."""
    return read_now([rows_of(location, row_start, row_stop) for location in locations])
