"""Produce one output shard: read each layer's inputs by byte ranges, merge, stream out.

This is the body of a pipeline worker, free of Ray so it can be run and tested anywhere. While a
layer is being blended and written, the first chunk of the next layer is fetched in the
background (concurrent ranged reads of every input), so storage latency overlaps compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from modelstock.checkpoint.reader import read_rows
from modelstock.checkpoint.writer import ShardWriter, TensorSpec, WrittenShard
from modelstock.engine import merge_layer, row_chunks
from modelstock.layers import LayerSource
from modelstock.methods.base import LayerBlock, LayerStats
from modelstock.storage import Location


@dataclass(frozen=True)
class MergedShard:
    written: WrittenShard
    layers: list[LayerStats]


def _block_from(source: LayerSource, start: int, stop: int, tensors: Sequence[torch.Tensor]) -> LayerBlock:
    has_base = source.job.has_base
    return LayerBlock(
        name=source.job.name,
        shape=source.job.shape,
        row_start=start,
        row_stop=stop,
        base=tensors[0] if has_base else None,
        models=list(tensors[1:] if has_base else tensors),
    )


def merge_into_shard(
    location: Location,
    layers: Sequence[LayerSource],
    memory_budget: int,
    device: torch.device | None = None,
) -> MergedShard:
    """Merge ``layers`` in order into the safetensors file at ``location``."""
    specs = [TensorSpec(s.job.name, s.job.out_dtype, s.job.shape) for s in layers]
    # Half the budget for the chunk being merged, half for the one being prefetched.
    chunk_budget = memory_budget // 2
    prefetched: dict[tuple[int, int, int], Future[list[torch.Tensor]]] = {}
    stats: list[LayerStats] = []

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:

        def prefetch(index: int) -> None:
            if index >= len(layers):
                return
            source = layers[index]
            start, stop = row_chunks(source.job, chunk_budget)[0]
            prefetched[(index, start, stop)] = pool.submit(read_rows, source.locations, start, stop)

        def reader(index: int):
            source = layers[index]

            def read(start: int, stop: int) -> LayerBlock:
                future = prefetched.pop((index, start, stop), None)
                tensors = future.result() if future is not None else read_rows(source.locations, start, stop)
                return _block_from(source, start, stop, tensors)

            return read

        writer = ShardWriter(location, specs)
        with writer:
            prefetch(0)
            for index, source in enumerate(layers):
                layer_stats, blocks = merge_layer(source.job, reader(index), chunk_budget, device)
                # A layer read in one chunk is in memory now: fetch the next one while it blends.
                # A chunked layer re-reads its chunks to blend them: the next waits, so the worker
                # never holds more than two chunks.
                in_one_chunk = len(row_chunks(source.job, chunk_budget)) == 1
                if in_one_chunk:
                    prefetch(index + 1)
                for block in blocks:
                    writer.write_block(source.job.name, block)
                if not in_one_chunk:
                    prefetch(index + 1)
                stats.append(layer_stats)
        for future in prefetched.values():
            future.cancel()
    return MergedShard(written=writer.result, layers=stats)
