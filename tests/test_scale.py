"""Scale without the bytes (``procedural://`` checkpoints): a 405B-shaped base + 3 fine-tunes
opened and planned by the driver in well under 1 GiB, and tensors of 70B width merged in chunks
within a worker's budget. (Bigger slices: bench/bench_scale.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import psutil

from modelstock import storage
from modelstock.recipe import parse_recipe
from modelstock.shard import merge_into_shard
from pipeline.driver import WORKER_OVERHEAD_BYTES, MergeRequest, prepare_merge

GIB = 2**30
MIB = 2**20

PLAN_405B = textwrap.dedent("""
    import json, sys, time
    started = time.perf_counter()
    from modelstock.recipe import parse_recipe
    from pipeline.driver import WORKER_OVERHEAD_BYTES, MergeRequest, prepare_merge
    imported = time.perf_counter()
    recipe = parse_recipe({"merge_method": "model_stock", "base_model": "procedural://llama3-405b/base",
                           "models": [{"model": f"procedural://llama3-405b/ft-{k}"} for k in (1, 2, 3)]})
    prepared = prepare_merge(MergeRequest(recipe=recipe, out_url=sys.argv[1], progress=False))
    planned = time.perf_counter()
    # VmHWM: this process's peak resident memory since exec (ru_maxrss would include the parent's).
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(json.dumps({"import_s": imported - started, "plan_s": planned - imported, "peak_rss": peak,
                      "shards": len(prepared.plan.shards), "input_bytes": prepared.plan.input_bytes,
                      "output_bytes": prepared.plan.total_size,
                      "files": sum(len(c.files) for c in prepared.checkpoints)}))
""")


def test_405b_base_and_three_finetunes_plan_with_the_driver_under_1_gib(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", PLAN_405B, str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\n405B base + 3: {figures['files']} files, {figures['input_bytes'] / 1e12:.2f} TB in, "
          f"{figures['shards']} shards out; planned in {figures['plan_s']:.1f} s "
          f"(imports {figures['import_s']:.1f} s), "
          f"driver peak RSS {figures['peak_rss'] / MIB:.0f} MiB")
    assert figures["files"] == 4 * 191
    assert 3.2e12 < figures["input_bytes"] < 3.3e12 and figures["shards"] > 400
    assert figures["peak_rss"] < GIB
    assert not (tmp_path / "out").exists()  # planning writes nothing


class PeakRss:
    """This process's peak resident memory while the block runs, sampled on a thread."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self.start = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.start


def test_tensors_of_70b_width_merge_in_chunks_within_the_budget(tmp_path: Path) -> None:
    """Embeddings and lm_head at Llama-3-70B's hidden size (8192), a short vocabulary: each tensor's
    inputs are 3x the budget, so every one is read in chunks (and re-read for the second pass)."""
    family = "llama3-70b,layers=0,vocab=2048"
    urls = [f"procedural://{family}/{model}" for model in ("base", "ft-1", "ft-2")]
    recipe = parse_recipe({"merge_method": "model_stock", "base_model": urls[0],
                           "models": [{"model": u} for u in urls[1:]]})
    prepared = prepare_merge(MergeRequest(recipe=recipe, out_url=str(tmp_path / "out"), progress=False))
    (shard,) = prepared.plan.shards
    budget = 16 * MIB
    assert all(t.input_nbytes == 6 * budget for t in shard.tensors if len(t.job.shape) == 2)
    out = storage.resolve(str(tmp_path / "out" / shard.file))
    with PeakRss() as rss:
        merged = merge_into_shard(out, shard.tensors, memory_budget=budget, io_concurrency=4)
    reread = sum(s.values.get("reread_bytes", 0) for s in merged.tensors)
    print(f"\n70B-wide tensors: {merged.bytes_read / MIB:.0f} MiB read ({reread / MIB:.0f} MiB re-read) in "
          f"{merged.read_requests} requests; at most {merged.peak_input_bytes_held / MIB:.0f} MiB of inputs held; "
          f"peak RSS growth {rss.growth / MIB:.0f} MiB for a {budget // MIB} MiB budget")
    assert merged.bytes_read == shard.input_bytes + reread and reread > 0
    assert merged.peak_input_bytes_held <= budget
    # What the driver declares to Ray per worker: the budget plus the measured overhead (the
    # generator's parts in flight and block cache, the writer's queue, allocator slack).
    assert rss.growth < budget + WORKER_OVERHEAD_BYTES
    # Chunked and re-read, the bytes are those of the same merge with every tensor read whole.
    whole = merge_into_shard(storage.resolve(str(tmp_path / "whole" / shard.file)), shard.tensors,
                             memory_budget=8 * budget)
    assert whole.written.sha256 == merged.written.sha256
    assert all("reread_bytes" not in s.values for s in whole.tensors)
