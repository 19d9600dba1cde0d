"""A worker's read scheduler: the chunks a shard will need, read ahead in order, within a budget.

The shard knows in advance every chunk the engine will ask for (each tensor's chunk plan), so
reads are issued in that order as soon as the byte budget allows: while one tensor is merged the
next ones are already arriving. Each chunk is one byte range per input, and each range one
preallocated buffer, read as parts of at most ``PART_BYTES`` with many parts in flight, each
straight into its place. Small ranges that lie next to each other in one file (norms, biases of
consecutive layers) share one buffer and one request, and are sliced after.

Parts on async backends (s3, gs, az, http) run as coroutines on the filesystem's own event loop,
so 64 requests in flight cost no threads; sync backends (local files, hf, procedural) use a few
threads. Every read is held to the input's pinned version (``modelstock.storage``).
docs/ARCHITECTURE.md, "Storage I/O".
"""

from __future__ import annotations

import asyncio
import functools
import math
import mmap
import threading
import warnings
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from types import TracebackType

import torch

from modelstock import storage
from modelstock.checkpoint.reader import TensorLocation
from modelstock.dtypes import row_view, to_torch
from modelstock.engine import LoadedChunk
from modelstock.storage import Location

MIB = 1024 * 1024
# AWS's guidance for S3 is 8-16 MB per ranged GET: big enough that the first-byte latency is
# a few percent of a part, small enough that many parts fit in the budget at once.
PART_BYTES = 8 * MIB
# Ranges below this may share a request with their neighbours in the file, up to the second size.
COALESCE_BELOW_BYTES = 1 * MIB
COALESCED_REQUEST_BYTES = 8 * MIB
MAPPED_BUFFER_MIN_BYTES = 1 * MIB  # smaller read buffers come from the heap (see mapped_buffer)
LOCAL_IO_CONCURRENCY = 4  # local reads are memory copies: more threads only contend for the cores
SYNC_IO_CONCURRENCY = 16  # threads for sync remote backends (hf, procedural)
# One request streams ~85-90 MB/s from a cloud object store, so a 100 Gb/s node needs ~150 in
# flight, shared by the shard tasks on it; a task keeps at least 16, and at most 128 (one event
# loop thread moves every byte of a worker's requests).
NODE_REQUESTS_IN_FLIGHT = 160
MIN_ASYNC_IO_CONCURRENCY = 16
MAX_ASYNC_IO_CONCURRENCY = 128

ChunkKey = tuple[int, int, int]  # (tensor index in the shard, first row, row after the last)
Allocator = Callable[[int], memoryview]
RangeKey = tuple[str, int, int]  # (object URL, start, end)


def default_io_concurrency(locations: Iterable[Location], tasks_per_node: int = 1) -> int:
    """Requests in flight per worker: enough for a 100 Gb/s node shared by ``tasks_per_node``
    shard tasks on object stores; a few threads for local files; more for sync remote stores."""
    found = list(locations)
    if any(location.is_async for location in found):
        share = math.ceil(NODE_REQUESTS_IN_FLIGHT / max(1, tasks_per_node))
        return max(MIN_ASYNC_IO_CONCURRENCY, min(MAX_ASYNC_IO_CONCURRENCY, share))
    if all(location.is_local for location in found):
        return LOCAL_IO_CONCURRENCY
    return SYNC_IO_CONCURRENCY


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

    @property
    def key(self) -> RangeKey:
        return (self.location.url, self.start, self.end)


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


def mapped_buffer(nbytes: int) -> memoryview:
    """Fresh anonymous pages, returned to the system as soon as the last view of them goes.

    For reads from the network: their first-touch page faults cost little next to the transfer,
    and they never fragment the heap (measured: chunks of 70B-wide tensors left a worker's heap
    ~600 MiB above its 512 MiB budget; with mapped buffers it stays under it). Local reads, which
    are memory copies, keep ``heap_buffer`` (page faults there would halve their speed)."""
    if nbytes < MAPPED_BUFFER_MIN_BYTES:
        return heap_buffer(nbytes)
    return memoryview(mmap.mmap(-1, nbytes))


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


class CoalescedRange:
    """Small ranges next to each other in one object, read by one request: ``[start, end)``,
    needed by ``users`` chunk reads (its buffer is freed when the last one releases it)."""

    def __init__(self, location: Location, start: int, end: int, users: int) -> None:
        self.location, self.start, self.end, self.users = location, start, end, users


def coalesce_small_ranges(ranges: Iterable[RangeRead], below: int = COALESCE_BELOW_BYTES,
                          limit: int = COALESCED_REQUEST_BYTES) -> dict[RangeKey, tuple[CoalescedRange, int]]:
    """For each small range that shares a request: the request, and the range's offset in it.

    Only ranges read once qualify (a range read again on a later pass keeps its own request),
    and only exact neighbours (no gap is read: every byte fetched is a byte needed)."""
    ranges = list(ranges)
    uses = Counter(r.key for r in ranges)
    by_file: dict[str, list[RangeRead]] = defaultdict(list)
    for r in ranges:
        if 0 < r.nbytes < below and uses[r.key] == 1:
            by_file[r.location.url].append(r)
    shared: dict[RangeKey, tuple[CoalescedRange, int]] = {}

    def close_run(run: list[RangeRead]) -> None:
        if len(run) > 1:
            request = CoalescedRange(run[0].location, run[0].start, run[-1].end, len(run))
            shared.update({r.key: (request, r.start - request.start) for r in run})

    for small in by_file.values():
        small.sort(key=lambda r: r.start)
        run = [small[0]]
        for r in small[1:]:
            if r.start == run[-1].end and r.end - run[0].start <= limit:
                run.append(r)
            else:
                close_run(run)
                run = [r]
        close_run(run)
    return shared


class _Buffer:
    """One request's bytes (``[start, end)`` of one object) in one buffer, read as parts."""

    def __init__(self, nbytes: int, view: memoryview, users: int) -> None:
        self.nbytes, self.view, self.users = nbytes, view, users
        self.parts: list[Future[None]] = []


_NO_BYTES = memoryview(b"")


@dataclass(eq=False)
class _Part:
    """One ranged GET of a buffer's bytes: ``done`` completes when it is in (or failed for good)."""

    location: Location
    start: int
    view: memoryview
    done: Future[None]
    running: Future[None] | None = None


class _Pending:
    """One chunk started: a view of each input's rows, and the buffers they live in."""

    def __init__(self, chunk: ChunkRead, views: list[memoryview], buffers: list[_Buffer]) -> None:
        self.chunk, self.views, self.buffers = chunk, views, buffers

    @property
    def parts(self) -> list[Future[None]]:
        return [part for buffer in self.buffers for part in buffer.parts]


class ChunkFetcher:
    """Reads ``schedule`` ahead of use; ``read`` hands out chunks in schedule order.

    At most ``budget`` bytes are held at once (being read, or handed out and not yet released),
    except that the chunk the engine asks for next is always started; at most ``concurrency``
    parts are in flight. A chunk asked for out of schedule order (error paths, fallbacks) is read
    directly, outside the budget.
    """

    def __init__(
        self,
        schedule: Sequence[ChunkRead],
        describe: Callable[[ChunkKey], ChunkRead],
        budget: int,
        concurrency: int | None = None,
        part_bytes: int = PART_BYTES,
        allocate: Allocator = heap_buffer,
        coalesce_below: int = COALESCE_BELOW_BYTES,
    ) -> None:
        """``describe(key)`` says what any chunk reads (for chunks asked out of schedule order);
        ``concurrency`` defaults by backend (``default_io_concurrency``)."""
        self.schedule = list(schedule)
        self.describe = describe
        self.budget = budget
        self.part_bytes = max(1, part_bytes)
        self.allocate = allocate
        all_ranges = [r for chunk in self.schedule for r in chunk.ranges]
        self.concurrency = max(1, concurrency or default_io_concurrency(r.location for r in all_ranges))
        self._coalesced = coalesce_small_ranges(all_ranges, below=coalesce_below) if coalesce_below else {}
        self._coalesced_buffers: dict[int, _Buffer] = {}  # id(CoalescedRange) -> its buffer, while used
        self._lock = threading.Lock()
        self._held = 0
        self._next_start = 0  # index of the next chunk of the schedule to start reading
        self._next_use = 0  # index of the next chunk of the schedule to hand out
        self._pending: dict[int, _Pending] = {}
        self._queue: deque[_Part] = deque()
        self._running: set[_Part] = set()
        self._threads: ThreadPoolExecutor | None = None
        self._closed = False
        self.bytes_read = 0
        self.requests = 0
        self.peak_held = 0  # the most input bytes held at once (read, being read, or handed out)

    def __enter__(self) -> ChunkFetcher:
        self._top_up()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            queued, running = list(self._queue), list(self._running)
            self._queue.clear()
            self._pending.clear()
        for part in queued:
            part.done.cancel()
        for part in running:
            in_flight = part.running  # read once: a completing part clears it meanwhile
            if in_flight is not None:
                in_flight.cancel()
        if self._threads is not None:
            self._threads.shutdown(wait=True, cancel_futures=True)

    # Starting chunks (under the lock)

    def _new_bytes(self, index: int) -> int:
        """Bytes starting chunk ``index`` would add to what is held."""
        total, counted = 0, set()
        for r in self.schedule[index].ranges:
            shared = self._coalesced.get(r.key)
            if shared is None:
                total += r.nbytes
            elif id(shared[0]) not in self._coalesced_buffers and id(shared[0]) not in counted:
                counted.add(id(shared[0]))
                total += shared[0].end - shared[0].start
        return total

    def _open(self, location: Location, start: int, end: int, users: int) -> _Buffer:
        """A buffer for ``[start, end)`` of one object, its parts queued."""
        nbytes = end - start
        buffer = _Buffer(nbytes, self.allocate(nbytes), users)
        for offset in range(0, nbytes, self.part_bytes):
            length = min(self.part_bytes, nbytes - offset)
            part = _Part(location, start + offset, buffer.view[offset : offset + length], Future())
            buffer.parts.append(part.done)
            self._queue.append(part)
        self._held += nbytes
        self.peak_held = max(self.peak_held, self._held)
        self.bytes_read += nbytes
        self.requests += len(buffer.parts)
        return buffer

    def _start(self, index: int) -> None:
        chunk = self.schedule[index]
        views: list[memoryview] = []
        buffers: list[_Buffer] = []
        for r in chunk.ranges:
            shared = self._coalesced.get(r.key)
            if shared is None:
                buffer = self._open(r.location, r.start, r.end, users=1)
                views.append(buffer.view)
            else:
                request, offset = shared
                opened = self._coalesced_buffers.get(id(request))
                if opened is None:
                    opened = self._open(request.location, request.start, request.end, request.users)
                    self._coalesced_buffers[id(request)] = opened
                buffer = opened
                views.append(buffer.view[offset : offset + r.nbytes])
            buffers.append(buffer)
        self._pending[index] = _Pending(chunk, views, buffers)

    def _take_parts(self) -> list[_Part]:
        """Parts to send now: the queue's head, up to ``concurrency`` in flight."""
        taken = []
        while self._queue and len(self._running) < self.concurrency and not self._closed:
            part = self._queue.popleft()
            self._running.add(part)
            taken.append(part)
        return taken

    def _top_up(self) -> None:
        with self._lock:
            while self._next_start < len(self.schedule) and not self._closed:
                size = self._new_bytes(self._next_start)
                waited_for = self._next_start == self._next_use  # the engine needs it next: always start
                if not waited_for and self._held and self._held + size > self.budget:
                    break
                self._start(self._next_start)
                self._next_start += 1
            parts = self._take_parts()
        self._send(parts)

    # Parts in flight (outside the lock)

    def _send(self, parts: list[_Part]) -> None:
        for part in parts:
            location = part.location
            if self._closed:  # taken just before close: nobody waits for it any more
                part.done.cancel()
                continue
            running: Future[None]
            if location.is_async:
                coroutine = storage.read_into_async(location, part.start, part.view)
                running = asyncio.run_coroutine_threadsafe(coroutine, location.fs.loop)
            else:
                if self._threads is None:
                    self._threads = ThreadPoolExecutor(self.concurrency, thread_name_prefix="fetch")
                running = self._threads.submit(storage.read_into, location, part.start, part.view)
            part.running = running
            running.add_done_callback(functools.partial(self._part_done, part))

    def _part_done(self, part: _Part, running: Future[None]) -> None:
        # Break the part <-> future cycle now: the buffer must go when its chunk is released, not
        # whenever the garbage collector next runs.
        part.running, part.view = None, _NO_BYTES
        if running.cancelled():
            part.done.cancel()
        elif (error := running.exception()) is not None:
            part.done.set_exception(error)
        else:
            part.done.set_result(None)
        with self._lock:
            self._running.discard(part)
            parts = self._take_parts()
        self._send(parts)

    # Handing chunks out

    def read(self, key: ChunkKey) -> LoadedChunk:
        """The chunk ``key``: the next one in the schedule, or (out of order) a direct read."""
        index = self._next_use
        if index >= len(self.schedule) or self.schedule[index].key != key:
            return self.read_directly(key)
        self._top_up()  # starts it if the budget held it back
        with self._lock:
            pending = self._pending.pop(index)
            self._next_use += 1
        parts = pending.parts
        wait(parts, return_when=FIRST_EXCEPTION)
        for part in parts:
            if part.done() and part.exception() is not None:
                raise part.exception()  # type: ignore[misc]  # the part's storage error, as raised
        tensors = [as_tensor(view, r) for view, r in zip(pending.views, pending.chunk.ranges)]
        return LoadedChunk(key[1], key[2], tensors, on_release=lambda: self._release(pending.buffers))

    def _release(self, buffers: list[_Buffer]) -> None:
        with self._lock:
            for buffer in buffers:
                buffer.users -= 1
                if buffer.users == 0:
                    self._held -= buffer.nbytes
            self._coalesced_buffers = {k: b for k, b in self._coalesced_buffers.items() if b.users > 0}
        self._top_up()

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
