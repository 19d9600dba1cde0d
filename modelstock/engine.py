"""Merging one tensor within a memory budget: the compute every worker runs.

A merge of one tensor is a few small steps around its chunk plan (``modelstock.chunks``):
``copy_tensor`` for tensors taken as they are; otherwise, for each of the method's reductions,
``reduce_tensor`` (partial sums per fixed block, in block order) and ``finalize_tensor``
(coefficients and report values), then ``blend_tensor`` (merged rows, block by block, lazily, so
the caller can stream them). Reading is the caller's: a :data:`ChunkReader` returns the rows of
every input; :class:`TensorChunks` keeps what the plan keeps between passes.
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
    Reduction,
    TensorStats,
    compute_dtype_for,
)
from modelstock.methods.registry import get_method
from modelstock.quantization import all_finite, dequantize

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
    if job.method is None or job.params is None:
        return plan_chunks(job, memory_budget, passes=1)
    return plan_chunks(job, memory_budget, passes=1 + len(get_method(job.method).passes(job.params)))


def input_rows(job: TensorJob, chunk: LoadedChunk, start: int, stop: int, compute: torch.dtype) -> list[torch.Tensor]:
    """Rows ``[start, stop)`` (absolute) of every input of a loaded chunk; block-quantized inputs
    dequantized to ``compute`` with their scales (which follow the inputs in the chunk)."""
    lo, hi = start - chunk.row_start, stop - chunk.row_start
    count = len(job.inputs)
    rows = [tensor[lo:hi] for tensor in chunk.tensors[:count]]
    for scales, index in zip(chunk.tensors[count:], job.scaled_inputs):
        block = job.inputs[index].block
        assert block is not None
        first = start // block[0] - chunk.row_start // block[0]
        rows[index] = dequantize(rows[index], scales[first:], block, start, compute)
    return rows


def make_block(job: TensorJob, chunk: LoadedChunk, start: int, stop: int, compute: torch.dtype) -> ModelsBlock:
    """Rows ``[start, stop)`` (absolute) of a loaded chunk as the block type the method expects."""
    rows = input_rows(job, chunk, start, stop, compute)
    if job.has_base:
        return BaseBlock(job.name, job.shape, start, stop, models=rows[1:], base=rows[0])
    return ModelsBlock(job.name, job.shape, start, stop, models=rows)


class TokenRows:
    """Reads a token-indexed tensor onto the output vocabulary (``job.vocabulary``): the wrapped
    reader returns, for each input, the rows ``VocabularyMap.span`` names; this one returns the output's rows.

    Padding rows are each input's mean vocabulary row. Vocabulary rows come before them, so the
    first pass over the chunks (in order) sums them, block by block in block order (the same
    arithmetic whatever the chunking), before it reaches the padding."""

    def __init__(self, job: TensorJob, read: ChunkReader, block_rows: int, dtype: torch.dtype) -> None:
        assert job.vocabulary is not None
        self.map, self.read, self.block_rows, self.dtype = job.vocabulary, read, block_rows, dtype
        self.count = len(job.inputs)
        self._sums: torch.Tensor | None = None
        self._summed_to = 0
        self._pad: torch.Tensor | None = None

    def __call__(self, start: int, stop: int) -> LoadedChunk:
        gathered = self.read(start, stop)
        spans = [self.map.span(i, start, stop) for i in range(self.count)]
        rows = torch.stack(self.map.assemble(gathered.tensors, spans, start, stop, self.dtype, self._pad))
        gathered.release()
        vocabulary = self.map.vocabulary
        for block in range(start, min(stop, vocabulary), self.block_rows):
            if block != self._summed_to:
                continue  # a later pass, or out of order: summed already
            end = min(block + self.block_rows, vocabulary)
            part = rows[:, block - start : end - start].sum(dim=1, dtype=torch.float64)
            self._sums = part if self._sums is None else self._sums + part
            self._summed_to = end
        if stop > vocabulary and self._pad is None:
            if self._summed_to < vocabulary or self._sums is None:
                raise RuntimeError("padding rows read before every vocabulary row was summed")
            self._pad = self._sums / vocabulary
            rows[:, max(vocabulary, start) - start :] = self._pad.to(self.dtype).unsqueeze(1)
        return LoadedChunk(start, stop, list(rows))


def _on_device(chunk: LoadedChunk, device: torch.device | None) -> LoadedChunk:
    if device is None or device.type == "cpu":
        return chunk
    # Pinned read buffers make these copies asynchronous: the next chunk's reads go on meanwhile.
    moved = [t.to(device, non_blocking=True) for t in chunk.tensors]
    return LoadedChunk(chunk.row_start, chunk.row_stop, moved, chunk.on_release)


def _find_non_finite_input(job: TensorJob, plan: ChunkPlan, read: ChunkReader) -> None:
    """Raise naming the input with NaN/Inf, reading chunk by chunk within the budget: each input's own
    rows (not those assembled onto a vocabulary, where one input's row may stand in for another's), and
    the codes and block scales of FP8 inputs (float8 has no isfinite kernel: ``all_finite``)."""
    read = read.read if isinstance(read, TokenRows) else read
    for start, stop in plan.chunks:
        chunk = read(start, stop)
        try:
            named = [(s.label, s.tensor) for s in job.inputs]
            named += [(job.inputs[i].label, str(job.inputs[i].scale)) for i in job.scaled_inputs]
            for (label, tensor_name), tensor in zip(named, chunk.tensors):
                if not all_finite(tensor):
                    raise InvalidCheckpoint(f"{label}: tensor {tensor_name!r}: contains NaN or Inf values")
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
        source = input_rows(job, chunk, start, stop, compute_dtype_for(out))[0]
        copied = source.to(out)
        if copied.is_floating_point() and not bool(torch.isfinite(copied).all()):
            chunk.release()
            _raise_non_finite(job, plan, read, "the copied tensor")
        chunk.release()
        yield copied


class TensorChunks:
    """A tensor's chunks over its passes: the plan's leading ``kept`` chunks are read once and stay
    in memory until the last pass uses them; the others are read again on every pass."""

    def __init__(self, plan: ChunkPlan, read: ChunkReader, device: torch.device | None) -> None:
        self.plan, self.read, self.device = plan, read, device
        self._kept: dict[int, LoadedChunk] = {}

    def each(self, last_pass: bool) -> Iterator[LoadedChunk]:
        """Every chunk in order; each is released (or kept) once the caller moves to the next."""
        for index, (start, stop) in enumerate(self.plan.chunks):
            chunk = self._kept.pop(index, None) or _on_device(self.read(start, stop), self.device)
            yield chunk
            if index < self.plan.kept and not last_pass:
                self._kept[index] = chunk
            else:
                chunk.release()

    def release(self) -> None:
        for chunk in self._kept.values():
            chunk.release()
        self._kept.clear()


def per_block(coefficients: Coefficients, per_row: set[str], rows: RowRange) -> Coefficients:
    """The coefficients for rows ``[start, stop)``: per-row ones sliced, the others as they are."""
    return {k: (v[rows[0] : rows[1]] if k in per_row else v) for k, v in coefficients.items()}


def reduce_tensor(
    job: TensorJob,
    reduction: Reduction,
    chunks: TensorChunks,
    coefficients: Coefficients,
    per_row: set[str],
    compute: torch.dtype,
    runner: BlockRunner = INLINE,
) -> torch.Tensor:
    """One reduction pass: partial sums of every fixed block, combined in block order (on the CPU)."""
    assert job.params is not None
    params = job.params
    rows_scope = reduction.scope(params, job.shape) == "rows"
    total: torch.Tensor | None = None
    partials: list[torch.Tensor] = []
    for chunk in chunks.each(last_pass=False):

        def reduce_block(rows: RowRange, chunk: LoadedChunk = chunk) -> torch.Tensor:
            block = make_block(job, chunk, *rows, compute)
            partial = reduction.reduce(block, per_block(coefficients, per_row, rows), params, compute)
            return partial if rows_scope else partial.sum(dim=0, keepdim=True)

        for partial in runner.map(reduce_block, chunks.plan.blocks(chunk.row_start, chunk.row_stop)):
            if rows_scope:
                partials.append(partial)
            else:
                total = partial if total is None else total + partial  # a left fold in block order
    reductions = torch.cat(partials) if rows_scope else total
    assert reductions is not None
    return reductions.cpu()


def finalize_tensor(
    job: TensorJob, reduction: Reduction, chunks: TensorChunks, reductions: torch.Tensor, coefficients: Coefficients
) -> Finalized:
    assert job.params is not None
    if reductions.is_floating_point() and not bool(torch.isfinite(reductions).all()):
        chunks.release()
        _find_non_finite_input(job, chunks.plan, chunks.read)
        raise InvalidCheckpoint(f"{job.inputs[0].label}: tensor {job.name!r}: task vector norms overflow float64")
    return reduction.finalize(reductions, coefficients, job.params, len(job.inputs) - int(job.has_base))


def blend_tensor(
    job: TensorJob,
    method: MergeMethod[Any, Any],
    chunks: TensorChunks,
    coefficients: Coefficients,
    per_row: set[str],
    compute: torch.dtype,
    check_finite: bool,
    runner: BlockRunner = INLINE,
) -> Iterator[torch.Tensor]:
    """The merged rows, block by block in order, in the output dtype (on the CPU)."""
    assert job.params is not None
    params, out = job.params, to_torch(job.out_dtype)
    for chunk in chunks.each(last_pass=True):

        def blend_block(rows: RowRange, chunk: LoadedChunk = chunk) -> torch.Tensor | None:
            block = make_block(job, chunk, *rows, compute)
            merged = method.blend(block, per_block(coefficients, per_row, rows), params, compute).to(out)
            if check_finite and not bool(torch.isfinite(merged).all()):
                return None  # reported below, in block order
            return merged.cpu()

        for merged in runner.map(blend_block, chunks.plan.blocks(chunk.row_start, chunk.row_stop)):
            if merged is None:
                chunks.release()
                _raise_non_finite(job, chunks.plan, chunks.read, "the merged tensor")
            else:
                yield merged


def merge_tensor(
    job: TensorJob,
    plan: ChunkPlan,
    read: ChunkReader,
    device: torch.device | None = None,
    runner: BlockRunner = INLINE,
) -> tuple[TensorStats, Iterator[torch.Tensor]]:
    """Statistics of one output tensor, and its merged rows as blocks in the output dtype.

    ``read(start, stop)`` is called with the plan's ``reads`` in order (and, on error paths only,
    out of order). Stats are complete on return; the blocks are produced lazily.
    """
    stats = TensorStats(job.name, job.method or "copy", job.shape, job.out_dtype, flags=list(job.flags))
    if plan.reread_bytes:
        stats.values["reread_bytes"] = plan.reread_bytes
        stats.flags.append("reread")
    compute = compute_dtype_for(to_torch(job.out_dtype))
    if job.vocabulary is not None:
        stats.values["vocabulary"] = {"tokens": job.vocabulary.vocabulary, "rows": job.rows}
        read = TokenRows(job, read, plan.block_rows, compute)
    if job.method is None or job.params is None:
        return stats, copy_tensor(job, plan, read)
    method = get_method(job.method)
    chunks = TensorChunks(plan, read, device)
    coefficients: Coefficients = {}
    per_row: set[str] = set()
    check_finite = True
    for reduction in method.passes(job.params):
        reductions = reduce_tensor(job, reduction, chunks, coefficients, per_row, compute, runner)
        finalized = finalize_tensor(job, reduction, chunks, reductions, coefficients)
        coefficients.update({k: v.to(device) if device is not None else v for k, v in finalized.coefficients.items()})
        per_row |= finalized.per_row
        stats.values.update(finalized.values)
        stats.flags.extend(finalized.flags)
        # Finite reductions over every input, blended convexly, cannot give NaN/Inf: skip a pass.
        check_finite = not finalized.convex
    return stats, blend_tensor(job, method, chunks, coefficients, per_row, compute, check_finite, runner)


def merge_in_memory(
    job: TensorJob, inputs: Sequence[torch.Tensor], memory_budget: int = 1 << 62
) -> tuple[torch.Tensor, TensorStats]:
    """Merge one tensor whose inputs (in ``job.inputs`` order, then the scales of its block-quantized
    inputs) are in memory: the Python API's path."""
    rows, cols = job.rows, job.cols
    count = len(job.inputs)
    views = [] if job.vocabulary is not None else [tensor.detach().reshape(rows, cols) for tensor in inputs[:count]]
    scales = [(tensor.detach(), job.inputs[i].block) for tensor, i in zip(inputs[count:], job.scaled_inputs)]

    def read(start: int, stop: int) -> LoadedChunk:
        if job.vocabulary is not None:  # each input's rows that the output rows use
            spans = [job.vocabulary.span(i, start, stop) for i in range(count)]
            return LoadedChunk(start, stop, [tensor.detach()[a:b] for tensor, (a, b) in zip(inputs, spans)])
        scale_rows = [s[start // b[0] : -(-stop // b[0])] for s, b in scales if b is not None]
        return LoadedChunk(start, stop, [view[start:stop] for view in views] + scale_rows)

    plan = chunk_plan_for(job, memory_budget)
    stats, blocks = merge_tensor(job, plan, read)
    merged = torch.cat([b.reshape(-1) for b in blocks]) if rows else torch.empty(0, dtype=to_torch(job.out_dtype))
    return merged.reshape(job.shape), stats
