"""Merging one tensor within a memory budget: the compute every worker runs.

A merge of one tensor is a few small steps around its chunk plan (``modelstock.chunks``):
``copy_tensor`` for tensors taken as they are; otherwise ``reduce_tensor`` (the first pass of a
two-pass method: partial sums per fixed block, in block order), ``finalize_tensor`` (coefficients
and report values) and ``blend_tensor`` (merged rows, block by block, lazily, so the caller can
stream them). Reading is the caller's: a :data:`ChunkReader` returns the rows of every input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from modelstock.chunks import ChunkPlan, RowRange, plan_chunks
from modelstock.dtypes import to_torch
from modelstock.errors import InvalidCheckpoint
from modelstock.jobs import TensorJob
from modelstock.methods.base import (
    BaseBlock,
    Coefficients,
    Finalized,
    MergeMethod,
    ModelsBlock,
    TensorStats,
    compute_dtype_for,
)
from modelstock.methods.registry import get_method

T = TypeVar("T")


@dataclass
class LoadedChunk:
    """Rows of every input of a job (each viewed as (rows, cols)), and how to give their memory back."""

    row_start: int
    row_stop: int
    tensors: Sequence[torch.Tensor]
    on_release: Callable[[], None] | None = field(default=None, repr=False)

    def release(self) -> None:
        self.tensors = ()
        if self.on_release is not None:
            self.on_release()
            self.on_release = None


ChunkReader = Callable[[int, int], LoadedChunk]


class BlockRunner:
    """Runs per-block work on ``threads`` threads (torch kernels release the GIL), results in order."""

    def __init__(self, threads: int = 1) -> None:
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="blocks") if self.threads > 1 else None

    def map(self, work: Callable[[RowRange], T], blocks: Iterable[RowRange]) -> Iterator[T]:
        if self._pool is None:
            return (work(b) for b in blocks)
        return self._pool.map(work, blocks)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> BlockRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


INLINE = BlockRunner(1)


def chunk_plan_for(job: TensorJob, memory_budget: int) -> ChunkPlan:
    """The chunk plan the engine follows for ``job``: the reader must serve ``plan.reads`` in order."""
    if job.method is None:
        return plan_chunks(job, memory_budget, two_pass=False)
    method = get_method(job.method)
    return plan_chunks(job, memory_budget, two_pass=method.reduction is not None, whole_tensor=method.whole_tensor)


def make_block(job: TensorJob, chunk: LoadedChunk, start: int, stop: int) -> ModelsBlock:
    """Rows ``[start, stop)`` (absolute) of a loaded chunk as the block type the method expects."""
    lo, hi = start - chunk.row_start, stop - chunk.row_start
    rows = [tensor[lo:hi] for tensor in chunk.tensors]
    if job.has_base:
        return BaseBlock(job.name, job.shape, start, stop, models=rows[1:], base=rows[0])
    return ModelsBlock(job.name, job.shape, start, stop, models=rows)


def _on_device(chunk: LoadedChunk, device: torch.device | None) -> LoadedChunk:
    if device is None or device.type == "cpu":
        return chunk
    # Pinned read buffers make these copies asynchronous: the next chunk's reads go on meanwhile.
    moved = [t.to(device, non_blocking=True) for t in chunk.tensors]
    return LoadedChunk(chunk.row_start, chunk.row_stop, moved, chunk.on_release)


def _find_non_finite_input(job: TensorJob, plan: ChunkPlan, read: ChunkReader) -> None:
    """Raise naming the input with NaN/Inf, reading chunk by chunk within the budget."""
    for start, stop in plan.chunks:
        chunk = read(start, stop)
        try:
            for source, tensor in zip(job.inputs, chunk.tensors):
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise InvalidCheckpoint(f"{source.label}: tensor {source.tensor!r}: contains NaN or Inf values")
        finally:
            chunk.release()


def _raise_non_finite(job: TensorJob, plan: ChunkPlan, read: ChunkReader, what: str) -> None:
    _find_non_finite_input(job, plan, read)
    raise InvalidCheckpoint(
        f"{job.inputs[0].label}: tensor {job.name!r}: {what} is not finite in {job.out_dtype} "
        "(the merge overflows the output dtype)"
    )


def copy_tensor(job: TensorJob, plan: ChunkPlan, read: ChunkReader) -> Iterator[torch.Tensor]:
    """The single input's rows in the output dtype (a tensor the recipe excludes or cannot merge)."""
    out = to_torch(job.out_dtype)
    for start, stop in plan.chunks:
        chunk = read(start, stop)
        source = chunk.tensors[0]
        copied = source.to(out)
        if copied.is_floating_point() and not bool(torch.isfinite(copied).all()):
            chunk.release()
            _raise_non_finite(job, plan, read, "the copied tensor")
        chunk.release()
        yield copied


def reduce_tensor(
    job: TensorJob,
    method: MergeMethod[Any, Any],
    plan: ChunkPlan,
    read: ChunkReader,
    compute: torch.dtype,
    device: torch.device | None = None,
    runner: BlockRunner = INLINE,
) -> tuple[torch.Tensor, list[LoadedChunk]]:
    """The first pass: partial sums of every fixed block, combined in block order.

    Returns the reductions (on the CPU) and the leading chunks the plan keeps for the blend.
    """
    assert method.reduction is not None and job.params is not None
    reduction, params = method.reduction, job.params
    per_row = reduction.scope(params, job.shape) == "rows"
    total: torch.Tensor | None = None
    partials: list[torch.Tensor] = []
    kept: list[LoadedChunk] = []
    for index, (start, stop) in enumerate(plan.chunks):
        chunk = _on_device(read(start, stop), device)

        def reduce_block(rows: RowRange, chunk: LoadedChunk = chunk) -> torch.Tensor:
            partial = reduction.reduce(make_block(job, chunk, *rows), params, compute)
            return partial if per_row else partial.sum(dim=0, keepdim=True)

        for partial in runner.map(reduce_block, plan.blocks(start, stop)):
            if per_row:
                partials.append(partial)
            else:
                total = partial if total is None else total + partial  # a left fold in block order
        if index < plan.kept:
            kept.append(chunk)
        else:
            chunk.release()
    reductions = torch.cat(partials) if per_row else total
    assert reductions is not None
    return reductions.cpu(), kept


def finalize_tensor(
    job: TensorJob, method: MergeMethod[Any, Any], plan: ChunkPlan, read: ChunkReader, reductions: torch.Tensor
) -> Finalized:
    assert method.reduction is not None and job.params is not None
    if not bool(torch.isfinite(reductions).all()):
        _find_non_finite_input(job, plan, read)
        raise InvalidCheckpoint(f"{job.inputs[0].label}: tensor {job.name!r}: task vector norms overflow float64")
    return method.reduction.finalize(reductions, job.params, len(job.inputs) - int(job.has_base))


def blend_tensor(
    job: TensorJob,
    method: MergeMethod[Any, Any],
    plan: ChunkPlan,
    read: ChunkReader,
    coefficients: Coefficients,
    kept: list[LoadedChunk],
    compute: torch.dtype,
    check_finite: bool,
    device: torch.device | None = None,
    runner: BlockRunner = INLINE,
) -> Iterator[torch.Tensor]:
    """The merged rows, block by block in order, in the output dtype (on the CPU)."""
    assert job.params is not None
    params, out = job.params, to_torch(job.out_dtype)
    per_row = {k for k, v in coefficients.items() if v.shape[0] > 1}
    resident = {(c.row_start, c.row_stop): c for c in kept}
    for start, stop in plan.chunks:
        held = resident.pop((start, stop), None)
        chunk = held if held is not None else _on_device(read(start, stop), device)

        def blend_block(rows: RowRange, chunk: LoadedChunk = chunk) -> torch.Tensor | None:
            local = {k: (v[rows[0] : rows[1]] if k in per_row else v) for k, v in coefficients.items()}
            merged = method.blend(make_block(job, chunk, *rows), local, params, compute).to(out)
            if check_finite and not bool(torch.isfinite(merged).all()):
                return None  # reported below, in block order
            return merged.cpu()

        for merged in runner.map(blend_block, plan.blocks(start, stop)):
            if merged is None:
                chunk.release()
                _raise_non_finite(job, plan, read, "the merged tensor")
                return
            yield merged
        chunk.release()


def merge_tensor(
    job: TensorJob,
    plan: ChunkPlan,
    read: ChunkReader,
    device: torch.device | None = None,
    runner: BlockRunner = INLINE,
) -> tuple[TensorStats, Iterator[torch.Tensor]]:
    """Statistics of one output tensor, and its merged rows as blocks in the output dtype.

    ``read(start, stop)`` must be called by nobody else while this runs; it is called with the
    plan's ``reads`` in order. Stats are complete on return; the blocks are produced lazily.
    """
    stats = TensorStats(job.name, job.method or "copy", job.shape, job.out_dtype, flags=list(job.flags))
    if plan.reread_bytes:
        stats.values["reread_bytes"] = plan.reread_bytes
        stats.flags.append("reread")
    if job.method is None:
        return stats, copy_tensor(job, plan, read)
    method = get_method(job.method)
    compute = compute_dtype_for(to_torch(job.out_dtype))
    coefficients: Coefficients = {}
    kept: list[LoadedChunk] = []
    check_finite = True
    if method.reduction is not None:
        reductions, kept = reduce_tensor(job, method, plan, read, compute, device, runner)
        if compute == torch.float32 and not bool(torch.isfinite(reductions).all()):
            # float32 block sums overflow for weights beyond ~1e19: redo this tensor in float64.
            for chunk in kept:
                chunk.release()
            compute = torch.float64
            plan = ChunkPlan(plan.rows, plan.block_rows, plan.chunks, 0, plan.two_pass, plan.bytes_per_row)
            reductions, kept = reduce_tensor(job, method, plan, read, compute, device, runner)
        finalized = finalize_tensor(job, method, plan, read, reductions)
        coefficients = {k: v.to(device) if device is not None else v for k, v in finalized.coefficients.items()}
        stats.values.update(finalized.values)
        stats.flags.extend(finalized.flags)
        # Finite reductions over every input, blended convexly, cannot give NaN/Inf: skip a pass.
        check_finite = not finalized.convex
    return stats, blend_tensor(job, method, plan, read, coefficients, kept, compute, check_finite, device, runner)


def merge_in_memory(
    job: TensorJob, inputs: Sequence[torch.Tensor], memory_budget: int = 1 << 62
) -> tuple[torch.Tensor, TensorStats]:
    """Merge one tensor whose inputs (in ``job.inputs`` order) are in memory: the Python API's path."""
    rows, cols = job.rows, job.cols
    views = [tensor.detach().reshape(rows, cols) for tensor in inputs]

    def read(start: int, stop: int) -> LoadedChunk:
        return LoadedChunk(start, stop, [view[start:stop] for view in views])

    plan = chunk_plan_for(job, memory_budget)
    stats, blocks = merge_tensor(job, plan, read)
    merged = torch.cat([b.reshape(-1) for b in blocks]) if rows else torch.empty(0, dtype=to_torch(job.out_dtype))
    return merged.reshape(job.shape), stats
