"""Produce one output shard: read each tensor's inputs by byte ranges, merge, stream out.

This is the body of a pipeline worker, free of Ray so it can be run and tested anywhere. Every
chunk the engine will ask for is known in advance from the tensors' chunk plans, so a read
scheduler (``modelstock.fetch``) fetches them in order ahead of use, within the memory budget,
while the engine merges and the writer hashes and writes on their own threads.

Inputs are held to the versions the plan was made from: reads on local files, S3 and HTTP are
conditional themselves; on other stores each input file's version is checked before the first
read and again after the last one, before the shard is committed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from modelstock import storage
from modelstock.checkpoint.reader import Checkpoint, TensorLocation
from modelstock.checkpoint.writer import ShardWriter, TensorSpec, WrittenShard
from modelstock.dtypes import tensor_nbytes
from modelstock.engine import BlockRunner, LoadedChunk, chunk_plan_for, merge_tensor
from modelstock.fetch import (
    ChunkFetcher,
    ChunkKey,
    ChunkRead,
    default_io_concurrency,
    heap_buffer,
    mapped_buffer,
    pinned_buffer,
)
from modelstock.jobs import TensorJob
from modelstock.methods.base import TensorStats
from modelstock.storage import Location


@dataclass(frozen=True)
class ShardTensor:
    """A tensor job with the locations of its inputs (same order as ``job.inputs``), and of the
    block scales of its block-quantized inputs (in the same order)."""

    job: TensorJob
    locations: tuple[TensorLocation, ...]
    scales: tuple[TensorLocation, ...] = ()

    @property
    def out_nbytes(self) -> int:
        return tensor_nbytes(self.job.out_dtype, self.job.shape)

    @property
    def input_nbytes(self) -> int:
        return sum(loc.entry.nbytes for loc in (*self.locations, *self.scales))


def shard_tensor(job: TensorJob, checkpoints: Sequence[Checkpoint]) -> ShardTensor:
    """The job with its inputs located in the opened checkpoints (indexed as ``job.inputs`` says)."""
    return ShardTensor(
        job,
        tuple(checkpoints[source.model].tensors[source.tensor] for source in job.inputs),
        tuple(checkpoints[source.model].tensors[source.scale] for source in job.inputs if source.scale is not None),
    )


@dataclass(frozen=True)
class MergedShard:
    written: WrittenShard
    tensors: list[TensorStats]
    bytes_read: int
    read_requests: int = 0
    peak_input_bytes_held: int = 0


def chunk_read(tensor: ShardTensor, key: ChunkKey) -> ChunkRead:
    """What rows ``key[1]:key[2]`` of ``tensor`` read from its inputs: the same rows of each, and for
    block-quantized inputs the rows of scales that cover them."""
    if tensor.job.vocabulary is not None:
        spans = tuple(tensor.job.vocabulary.span(i, key[1], key[2]) for i in range(len(tensor.locations)))
        return ChunkRead(key, tensor.locations, spans)
    if not tensor.scales:
        return ChunkRead.same_rows(key, tensor.locations)
    start, stop = key[1], key[2]
    scale_rows = []
    for index in tensor.job.scaled_inputs:
        block = tensor.job.inputs[index].block
        assert block is not None
        scale_rows.append((start // block[0], -(-stop // block[0])))
    rows = ((start, stop),) * len(tensor.locations) + tuple(scale_rows)
    return ChunkRead(key, (*tensor.locations, *tensor.scales), rows)


def input_files(tensors: Sequence[ShardTensor]) -> list[Location]:
    """Each input file the shard reads, once."""
    files: dict[str, Location] = {}
    for tensor in tensors:
        for location in (*tensor.locations, *tensor.scales):
            files.setdefault(location.file.url, location.file)
    return list(files.values())


def merge_into_shard(
    location: Location,
    tensors: Sequence[ShardTensor],
    memory_budget: int,
    device: torch.device | None = None,
    threads: int = 1,
    io_concurrency: int | None = None,
    tasks_per_node: int = 1,
) -> MergedShard:
    """Merge ``tensors`` in order into the safetensors file at ``location``.

    ``io_concurrency`` is the number of reads in flight (default: by backend, sized for
    ``tasks_per_node`` shard tasks sharing a 100 Gb/s node; see ``fetch.default_io_concurrency``)."""
    plans = [chunk_plan_for(t.job, memory_budget) for t in tensors]
    schedule = [
        chunk_read(tensor, (index, start, stop))
        for index, (tensor, plan) in enumerate(zip(tensors, plans))
        for start, stop in plan.reads
    ]
    files = input_files(tensors)
    concurrency = io_concurrency or default_io_concurrency(files, tasks_per_node)
    unconditioned = [file for file in files if not storage.reads_are_conditional(file)]
    for file in unconditioned:
        storage.verify_version(file)
    on_gpu = device is not None and device.type == "cuda"
    specs = [TensorSpec(t.job.name, t.job.out_dtype, t.job.shape) for t in tensors]
    stats: list[TensorStats] = []
    writer = ShardWriter(location, specs)
    # Page-locked buffers for GPUs; otherwise the heap for local files, fresh pages for the network.
    allocate = pinned_buffer if on_gpu else heap_buffer if all(f.is_local for f in files) else mapped_buffer
    fetcher = ChunkFetcher(schedule, lambda key: chunk_read(tensors[key[0]], key), memory_budget, concurrency,
                           allocate=allocate)
    with fetcher, BlockRunner(threads) as runner, writer:
        for index, (tensor, plan) in enumerate(zip(tensors, plans)):

            def read(start: int, stop: int, index: int = index) -> LoadedChunk:
                return fetcher.read((index, start, stop))

            tensor_stats, blocks = merge_tensor(tensor.job, plan, read, device, runner)
            for block in blocks:
                writer.write_block(tensor.job.name, block)
            stats.append(tensor_stats)
        for file in unconditioned:  # every read is done; the shard is not committed yet
            storage.verify_version(file)
    return MergedShard(written=writer.result, tensors=stats, bytes_read=fetcher.bytes_read,
                       read_requests=fetcher.requests, peak_input_bytes_held=fetcher.peak_held)
