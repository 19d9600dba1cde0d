"""Merging one tensor within a memory budget: the compute every worker runs.

The tensor is viewed as (rows, cols) with rows = the first dimension (1 for vectors and
scalars). Reductions always run over the same fixed row blocks (``REDUCE_BLOCK_ELEMENTS``), in
order, whatever the memory budget: reading the tensor in bigger or smaller chunks changes how
often bytes are fetched, never the arithmetic, so chunked and unchunked outputs are identical.
When the inputs of a tensor do not fit the budget, it is processed in two passes: reductions
over every chunk first, then the blend chunk by chunk (each chunk is read twice).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from modelstock.dtypes import dtype_bits, is_float, to_torch
from modelstock.errors import InvalidCheckpoint
from modelstock.methods import get_method
from modelstock.methods.base import LayerBlock, LayerParameters, LayerStats, compute_dtype_for

REDUCE_BLOCK_ELEMENTS = 1 << 21
MIN_INPUT_BUDGET = 8 * 1024 * 1024

BlockReader = Callable[[int, int], LayerBlock]


@dataclass(frozen=True)
class LayerJob:
    """One output tensor: how to produce it. Small and picklable: no tensors inside.

    ``method`` is None for tensors copied from the first input (excluded by the recipe, or not
    floating point). ``inputs`` labels the inputs (file URLs), base first when there is one, for
    error messages; ``input_dtypes`` are their storage dtypes.
    """

    name: str
    shape: tuple[int, ...]
    out_dtype: str
    method: str | None
    params: LayerParameters | None
    inputs: tuple[str, ...]
    input_dtypes: tuple[str, ...]
    has_base: bool = True
    flags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def rows(self) -> int:
        return self.shape[0] if len(self.shape) >= 2 else 1

    @property
    def cols(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel // self.rows if self.rows else 0

    @property
    def input_bytes_per_row(self) -> int:
        return max(1, self.cols * sum(dtype_bits(d) for d in self.input_dtypes) // 8)


def reduce_block_rows(job: LayerJob) -> int:
    return max(1, REDUCE_BLOCK_ELEMENTS // max(job.cols, 1))


def is_whole_tensor(job: LayerJob) -> bool:
    """Whether the job's method needs every row at once (e.g. TIES' top-k over the whole tensor)."""
    return job.method is not None and get_method(job.method).whole_tensor


def row_chunks(job: LayerJob, memory_budget: int) -> list[tuple[int, int]]:
    """Row ranges read at once: whole multiples of the reduce block, as many as the budget holds.

    A whole-tensor method gets one chunk with every row, whatever the budget.
    """
    if is_whole_tensor(job):
        return [(0, job.rows)]
    block_rows = reduce_block_rows(job)
    # Headroom for float64 reduction temporaries of one block: base + N task vectors, 8 bytes each.
    reserve = (len(job.inputs) + 1) * REDUCE_BLOCK_ELEMENTS * 8
    input_budget = max(MIN_INPUT_BUDGET, memory_budget - reserve)
    fit_rows = max(block_rows, (input_budget // job.input_bytes_per_row) // block_rows * block_rows)
    return [(start, min(start + fit_rows, job.rows)) for start in range(0, job.rows, fit_rows)] or [(0, 0)]


def _sub_blocks(job: LayerJob, block: LayerBlock) -> Iterator[LayerBlock]:
    if is_whole_tensor(job):
        yield block
        return
    step = reduce_block_rows(job)
    for start in range(block.row_start, block.row_stop, step):
        stop = min(start + step, block.row_stop)
        lo, hi = start - block.row_start, stop - block.row_start
        yield LayerBlock(
            name=block.name,
            shape=block.shape,
            row_start=start,
            row_stop=stop,
            base=None if block.base is None else block.base[lo:hi],
            models=[m[lo:hi] for m in block.models],
        )


def _inputs_of(block: LayerBlock) -> list[torch.Tensor]:
    return ([block.base] if block.base is not None else []) + list(block.models)


def _raise_non_finite(job: LayerJob, block: LayerBlock, what: str) -> None:
    for label, tensor in zip(job.inputs, _inputs_of(block)):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InvalidCheckpoint(f"{label}: tensor {job.name!r}: contains NaN or Inf values")
    raise InvalidCheckpoint(
        f"{job.inputs[0]}: tensor {job.name!r}: {what} is not finite in {job.out_dtype} "
        "(the merge overflows the output dtype)"
    )


def _check_finite(job: LayerJob, block: LayerBlock, values: torch.Tensor, what: str) -> None:
    if values.is_floating_point() and not bool(torch.isfinite(values).all()):
        _raise_non_finite(job, block, what)


def merge_layer(
    job: LayerJob, read: BlockReader, memory_budget: int, device: torch.device | None = None
) -> tuple[LayerStats, Iterator[torch.Tensor]]:
    """Statistics of one output tensor, and its merged rows as blocks in the output dtype.

    ``read(row_start, row_stop)`` returns those rows of every input. Stats are complete on
    return; the blocks are produced lazily so the caller can stream them to storage.
    """
    out_torch = to_torch(job.out_dtype)
    stats = LayerStats(job.name, job.method or "copy", job.shape, job.out_dtype, flags=list(job.flags))
    chunks = row_chunks(job, memory_budget)

    def to_device(block: LayerBlock) -> LayerBlock:
        if device is None or device.type == "cpu":
            return block
        return LayerBlock(
            block.name, block.shape, block.row_start, block.row_stop,
            None if block.base is None else block.base.to(device, non_blocking=True),
            [m.to(device, non_blocking=True) for m in block.models],
        )

    if job.method is None:
        def copied() -> Iterator[torch.Tensor]:
            for start, stop in chunks:
                block = read(start, stop)
                source = _inputs_of(block)[0]
                _check_finite(job, block, source, "the copied tensor")
                yield source.to(out_torch)
                block = source = None  # type: ignore[assignment]  # free before the next read

        return stats, copied()

    method = get_method(job.method)
    assert job.params is not None
    compute = compute_dtype_for(out_torch)
    coefficients: dict[str, torch.Tensor] = {}
    first_chunk: LayerBlock | None = None
    verified_finite = False
    if method.reduce is not None and method.finalize is not None:
        scope = method.reduction_scope(job.params, job.shape)
        partials: list[torch.Tensor] = []
        for start, stop in chunks:
            block = to_device(read(start, stop))
            for sub in _sub_blocks(job, block):
                partial = method.reduce(sub, job.params, compute)
                partials.append(partial if scope == "rows" else partial.sum(dim=0, keepdim=True))
            if len(chunks) == 1:
                first_chunk = block
            block = sub = None  # type: ignore[assignment]  # free before the next read: 1 chunk at a time
        if scope == "rows":
            reductions = torch.cat(partials)
        else:
            reductions = partials[0]
            for partial in partials[1:]:
                reductions = reductions + partial
        reductions = reductions.cpu()
        if not bool(torch.isfinite(reductions).all()):
            for start, stop in chunks:  # find the culprit chunk by chunk, within the budget
                block = read(start, stop)
                for label, tensor in zip(job.inputs, _inputs_of(block)):
                    if not bool(torch.isfinite(tensor).all()):
                        raise InvalidCheckpoint(f"{label}: tensor {job.name!r}: contains NaN or Inf values")
            raise InvalidCheckpoint(f"{job.inputs[0]}: tensor {job.name!r}: task vector norms overflow float64")
        finalized = method.finalize(reductions, job.params, len(job.inputs) - int(job.has_base))
        coefficients = {k: v.to(device) if device is not None else v for k, v in finalized.coefficients.items()}
        stats.values.update(finalized.values)
        stats.flags.extend(finalized.flags)
        # Finite reductions over every input, blended convexly, cannot give NaN/Inf: skip a pass.
        verified_finite = finalized.convex
    per_row = {k for k, v in coefficients.items() if v.shape[0] > 1}

    def blended() -> Iterator[torch.Tensor]:
        for start, stop in chunks:
            block = first_chunk if first_chunk is not None else to_device(read(start, stop))
            for sub in _sub_blocks(job, block):
                local = {
                    k: (v[sub.row_start : sub.row_stop] if k in per_row else v) for k, v in coefficients.items()
                }
                merged = method.blend(sub, local, job.params, compute)
                if not verified_finite:
                    _check_finite(job, sub, merged, "the merged tensor")
                yield merged.to(out_torch).cpu()
                merged = None  # type: ignore[assignment]
            block = sub = None  # type: ignore[assignment]  # free before the next read: 1 chunk at a time

    return stats, blended()


def merge_in_memory(
    job: LayerJob, base: torch.Tensor | None, models: Sequence[torch.Tensor], memory_budget: int = 1 << 62
) -> tuple[torch.Tensor, LayerStats]:
    """Merge one tensor held in memory (the Python API without storage or Ray)."""
    rows, cols = job.rows, job.cols

    def as_rows(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().reshape(rows, cols)

    def read(start: int, stop: int) -> LayerBlock:
        return LayerBlock(
            name=job.name,
            shape=job.shape,
            row_start=start,
            row_stop=stop,
            base=None if base is None else as_rows(base)[start:stop],
            models=[as_rows(m)[start:stop] for m in models],
        )

    stats, blocks = merge_layer(job, read, memory_budget)
    merged = torch.cat([b.reshape(-1) for b in blocks]) if rows else torch.empty(0, dtype=to_torch(job.out_dtype))
    return merged.reshape(job.shape), stats


def is_mergeable_dtype(dtype: str) -> bool:
    return is_float(dtype)
