"""How one tensor is read and computed within a memory budget: its chunk plan.

Two layers of row ranges over the tensor's (rows, cols) view (docs/ARCHITECTURE.md, "Numerics"):

- **blocks**: the fixed units of arithmetic. Reductions are computed per block and summed in block
  order; blends are computed per block. Block boundaries depend only on the tensor's shape, so the
  bytes of a merge never depend on the memory budget, the chunking or the number of workers. A
  block is about ``BLOCK_ELEMENTS`` elements: small enough that its float32 temporaries stay in
  cache, large enough that per-operation overheads vanish.
- **chunks**: the row ranges read from storage at once, whole numbers of blocks. A tensor whose
  inputs fit the budget is one chunk, read once (*resident*). A bigger one is read in chunks; a
  method with several passes (reductions, then the blend) keeps the leading chunks that fit in
  memory across its passes and reads only the others again on each pass (the report records
  those re-read bytes).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from modelstock.jobs import TensorJob

BLOCK_ELEMENTS = 1 << 18
# A chunk of a tensor too big for the budget: a quarter of the budget, so that three chunks can
# stay in memory between the passes while a fourth streams.
CHUNKS_PER_BUDGET = 4
MIN_CHUNK_BYTES = 8 * 1024 * 1024

RowRange = tuple[int, int]


def block_rows(cols: int, multiple: int = 1) -> int:
    """Rows per block: about ``BLOCK_ELEMENTS`` elements, a multiple of ``multiple`` rows."""
    rows = max(1, BLOCK_ELEMENTS // max(cols, 1))
    return max(multiple, rows // multiple * multiple)


@dataclass(frozen=True)
class ChunkPlan:
    rows: int
    block_rows: int
    chunks: tuple[RowRange, ...]
    kept: int  # chunks[:kept] stay in memory from the first pass to the blend
    passes: int  # reductions + the blend (1 for a copy or a blend-only method)
    bytes_per_row: int

    @property
    def resident(self) -> bool:
        return len(self.chunks) == 1

    @property
    def reread(self) -> tuple[RowRange, ...]:
        """Chunks every pass after the first reads again."""
        return self.chunks[self.kept :] if self.passes > 1 else ()

    @property
    def reads(self) -> list[RowRange]:
        """Every chunk read, in the order the engine asks for them."""
        return [*self.chunks, *(self.reread * (self.passes - 1))]

    @property
    def reread_bytes(self) -> int:
        return (self.passes - 1) * sum(stop - start for start, stop in self.reread) * self.bytes_per_row

    def blocks(self, start: int, stop: int) -> Iterator[RowRange]:
        """The fixed blocks inside rows ``[start, stop)`` of a chunk."""
        for first in range(start, stop, self.block_rows):
            yield first, min(first + self.block_rows, stop)


def plan_chunks(job: TensorJob, memory_budget: int, *, passes: int) -> ChunkPlan:
    """The chunk plan of ``job`` when its inputs may hold ``memory_budget`` bytes at once."""
    rows, per_row = job.rows, job.input_bytes_per_row
    step = block_rows(job.cols, job.row_multiple)
    if rows * per_row <= memory_budget or rows <= step:
        return ChunkPlan(rows, step, ((0, rows),), 1, passes, per_row)
    chunk_bytes = max(MIN_CHUNK_BYTES, memory_budget // CHUNKS_PER_BUDGET)
    chunk_rows = max(step, chunk_bytes // per_row // step * step)
    chunks = tuple((start, min(start + chunk_rows, rows)) for start in range(0, rows, chunk_rows))
    # Keep what fits beside the chunk being streamed.
    kept = max(0, min(len(chunks), memory_budget // (chunk_rows * per_row) - 1))
    return ChunkPlan(rows, step, chunks, kept, passes, per_row)
