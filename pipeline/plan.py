"""The shard plan: which output tensors go into which output file.

Tensors are packed in natural name order into shards of about ``shard_size`` bytes. The plan and
its digests depend only on the recipe and the inputs (headers, sizes, ETags), never on how many
workers run it, so the output is the same on 1 worker or 100.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from modelstock.checkpoint.reader import Checkpoint
from modelstock.output import canonical, shard_file_name
from modelstock.shard import ShardTensor

# Part of every digest: a new version means new bytes for the same recipe (e.g. the fixed blocks
# of the numerics contract changed), so a resume never mixes shards of two versions.
PLAN_FORMAT = "modelstock-plan/3"


@dataclass(frozen=True)
class ShardPlan:
    """One output file: its tensors in write order, and a digest of everything that makes it."""

    file: str
    tensors: tuple[ShardTensor, ...]
    digest: str

    @property
    def nbytes(self) -> int:
        return sum(tensor.out_nbytes for tensor in self.tensors)

    @property
    def input_bytes(self) -> int:
        return sum(tensor.input_nbytes for tensor in self.tensors)


@dataclass(frozen=True)
class MergePlan:
    shards: tuple[ShardPlan, ...]
    digest: str

    @property
    def total_size(self) -> int:
        return sum(shard.nbytes for shard in self.shards)

    @property
    def input_bytes(self) -> int:
        return sum(shard.input_bytes for shard in self.shards)


def _job_description(tensor: ShardTensor, fingerprints: dict[str, dict[str, object]]) -> dict[str, object]:
    job = tensor.job
    params = None
    if job.params is not None:
        params = {
            "method": dataclasses.asdict(job.params.method),
            "models": [dataclasses.asdict(p) for p in job.params.models],
        }
    vocabulary = None
    if job.vocabulary is not None:
        mapped = job.vocabulary
        digest = hashlib.sha256()
        for part in (mapped.rows, mapped.default_source, mapped.default_row, mapped.forced.to(torch.int64)):
            digest.update(part.contiguous().numpy().tobytes())
        vocabulary = {"tokens": mapped.vocabulary, "sha256": digest.hexdigest()}
    return {
        "name": job.name,
        "shape": list(job.shape),
        "out_dtype": job.out_dtype,
        "method": job.method,
        "params": params,
        "flags": list(job.flags),
        "vocabulary": vocabulary,
        "inputs": [
            {"file": loc.file.url, "start": loc.entry.start, "end": loc.entry.end, "dtype": loc.entry.dtype,
             "fingerprint": fingerprints[loc.file.url]}
            for loc in (*tensor.locations, *tensor.scales)
        ],
    }


def input_fingerprints(checkpoints: Sequence[Checkpoint]) -> dict[str, dict[str, object]]:
    return {
        fp.url: {"size": fp.size, "etag": fp.etag, "header_sha256": fp.header_sha256}
        for checkpoint in checkpoints
        for fp in checkpoint.files
    }


def _split(tensors: Sequence[ShardTensor], count: int) -> list[list[ShardTensor]]:
    """Consecutive tensors in ``count`` parts of about equal bytes (a tensor goes where its middle falls)."""
    total = sum(tensor.out_nbytes for tensor in tensors)
    target = total / count
    groups: list[list[ShardTensor]] = [[] for _ in range(count)]
    position = 0
    for tensor in tensors:
        middle = position + tensor.out_nbytes / 2
        groups[min(count - 1, int(middle // target) if target else 0)].append(tensor)
        position += tensor.out_nbytes
    return [group for group in groups if group]


def balanced_groups(tensors: Sequence[ShardTensor], shard_size: int) -> list[list[ShardTensor]]:
    """The fewest shards of at most ``shard_size`` bytes (a bigger tensor alone), about equal in size.

    Each shard is one worker's task, so equal sizes keep every worker busy until the end (a
    greedy fill would leave a small last shard: 2.2 GB at 2 GB shards is 2.0 + 0.2 GB).
    """
    total = sum(tensor.out_nbytes for tensor in tensors)
    count = max(1, math.ceil(total / max(shard_size, 1)))
    while True:
        groups = _split(tensors, count)
        if all(len(g) == 1 or sum(t.out_nbytes for t in g) <= shard_size for g in groups) or count >= len(tensors):
            return groups
        count += 1


def plan_shards(tensors: Sequence[ShardTensor], shard_size: int, checkpoints: Sequence[Checkpoint]) -> MergePlan:
    """Pack tensors into shards. Digests cover the resolved per-tensor work, so two recipes that
    differ only in spelling (e.g. a default written out) plan the same merge and can resume it."""
    groups = balanced_groups(tensors, shard_size)
    fingerprints = input_fingerprints(checkpoints)
    shards = []
    for index, group in enumerate(groups, start=1):
        file = shard_file_name(index, len(groups))
        description = {"format": PLAN_FORMAT, "file": file, "tensors": [_job_description(t, fingerprints) for t in group]}
        shards.append(ShardPlan(file=file, tensors=tuple(group), digest=hashlib.sha256(canonical(description)).hexdigest()))
    plan_description = {"format": PLAN_FORMAT, "shards": [s.digest for s in shards]}
    return MergePlan(shards=tuple(shards), digest=hashlib.sha256(canonical(plan_description)).hexdigest())
