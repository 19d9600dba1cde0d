"""The shard worker: a Ray task that fetches its own tensors, merges them and writes one shard.

It returns only small results (per-tensor statistics, the shard's size and sha256); no tensor goes
through the driver or the object store. A shard already completed by an earlier run (progress
record with the same digest, file present with the recorded sha256) is not recomputed.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray
import torch

from modelstock import storage
from modelstock.errors import StorageError
from modelstock.methods.base import TensorStats
from modelstock.output import ShardRecord, file_sha256, read_shard_record, write_shard_record
from modelstock.shard import merge_into_shard
from pipeline.plan import ShardPlan

log = logging.getLogger(__name__)

TASK_MAX_RETRIES = 3
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc mallopt parameters


@dataclass(frozen=True)
class ShardTask:
    out_url: str
    storage_options: Mapping[str, Any]
    shard: ShardPlan
    memory_budget: int
    io_concurrency: int | None = None


@dataclass(frozen=True)
class ShardOutcome:
    file: str
    size: int
    sha256: str
    tensors: list[TensorStats]
    resumed: bool
    attempt: str
    node_id: str = ""
    device: str = "cpu"
    bytes_read: int = 0


def _verified_record(task: ShardTask) -> ShardRecord | None:
    out = storage.resolve(task.out_url, task.storage_options)
    record = read_shard_record(out, task.shard.file)
    if record is None or record.shard_digest != task.shard.digest:
        return None
    shard = out.join(task.shard.file)
    if not storage.exists(shard):
        return None
    size, sha256 = file_sha256(shard)
    if (size, sha256) != (record.size, record.sha256):
        log.warning("%s: progress record does not match the file; recomputing", shard.url)
        return None
    return record


@functools.cache
def keep_large_buffers_in_heap() -> None:
    """Stop glibc from returning every large buffer to the kernel.

    Tensor blocks are tens of MB; by default glibc serves them with mmap and unmaps them on free,
    so every block pays its page faults again (measured: 19 ms instead of 5 ms for a 2M-element
    float64 task-vector block). Keeping them in the heap bounds memory by the peak, not the sum.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to tune
    # Few arenas: with one per thread (reader, writer, Ray's own), freed blocks of one thread are
    # not reused by another and the heap grows well past the budget (measured +60%).
    libc.mallopt(M_ARENA_MAX, 2)
    libc.mallopt(M_MMAP_THRESHOLD, 48 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 128 << 20)


def tasks_per_node(device: torch.device, threads: int) -> int:
    """About how many shard tasks share this node (and its network): one per GPU, or as many as
    its cores hold at ``threads`` each. Sizes the default number of reads in flight."""
    if device.type == "cuda":
        return max(1, torch.cuda.device_count())
    return max(1, (os.cpu_count() or 1) // max(1, threads))


def produce_shard(task: ShardTask, node_id: str = "", threads: int = 1) -> ShardOutcome:
    """Resume or compute one shard; the body of the Ray task (usable without Ray)."""
    keep_large_buffers_in_heap()
    record = _verified_record(task)
    if record is not None:
        return ShardOutcome(
            task.shard.file, record.size, record.sha256, record.tensor_stats(), True, record.attempt, node_id
        )
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    # Parallelism comes from the block runner's threads; nested intra-op threads would oversubscribe.
    torch.set_num_threads(1)
    out = storage.resolve(task.out_url, task.storage_options)
    merged = merge_into_shard(
        out.join(task.shard.file), task.shard.tensors, task.memory_budget, device,
        threads=1 if device.type == "cuda" else threads, io_concurrency=task.io_concurrency,
        tasks_per_node=tasks_per_node(device, threads),
    )
    attempt = uuid.uuid4().hex
    write_shard_record(
        out,
        ShardRecord(
            file=task.shard.file,
            shard_digest=task.shard.digest,
            size=merged.written.size,
            sha256=merged.written.sha256,
            attempt=attempt,
            tensors=[s.to_json() for s in merged.tensors],
        ),
    )
    return ShardOutcome(
        task.shard.file, merged.written.size, merged.written.sha256, merged.tensors, False, attempt, node_id,
        device.type, merged.bytes_read,
    )


@ray.remote(max_retries=TASK_MAX_RETRIES, retry_exceptions=[StorageError], scheduling_strategy="SPREAD")  # type: ignore[call-overload]
def merge_shard_task(task: ShardTask) -> ShardOutcome:
    context = ray.get_runtime_context()
    cpus = context.get_assigned_resources().get("CPU", 1.0)
    return produce_shard(task, context.get_node_id(), threads=max(1, math.floor(cpus)))
