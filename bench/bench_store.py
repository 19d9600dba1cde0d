"""Benchmark merges against a bandwidth-limited object store: the share of the store's aggregate
cap a merge reaches, and the bytes it fetches per byte it needs.

The inputs (a Llama-shaped base + fine-tunes, cached like bench_merge.py's) are served by the
store simulator (``modelstock.testing.store_simulator``, its own process) with a first-byte
latency and a per-connection cap of 1/16 of its aggregate cap, as a cloud object store behaves
toward one node. ``modelstock merge`` (embedded Ray, its own process tree) reads them over S3
(output to the simulator's S3: multipart uploads) and over plain HTTP (fsspec ``http://``,
output to local disk). While it runs, the simulator's counters are sampled to find the read
window. See bench/README.md, "bench_store.py".

    ./dev bench --store                                   # TinyLlama shape (~1.1B), base + 2, bf16
    python bench/bench_store.py --params 5e7 --aggregate-mib-s 64      # a quick run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_merge import DTYPES, PRESETS, Family, contender_env, ensure_family, human_bytes, tool  # noqa: E402
from proctree import ProcessPeak, TreeRun, run_measured  # noqa: E402

from modelstock.checkpoint.reader import open_checkpoint  # noqa: E402
from modelstock.testing.store_simulator import SimulatorConfig, StoreSimulator, ThrottleConfig  # noqa: E402
from modelstock.testing.synthetic import LlamaShape  # noqa: E402
from pipeline.cli.options import parse_size  # noqa: E402

BUCKET = "bench"
PROTOCOLS = ("s3", "http")
SAMPLE_INTERVAL_S = 0.2
# The read window: from the sample where this share of the bytes had arrived to the one where
# all but this share had (ramp-up and the last tensors' tail are not the store's throughput).
WINDOW_EDGE_SHARE = 0.01


@dataclass
class Samples:
    """(seconds since the run started, GET payload bytes the store has sent) every interval."""

    points: list[tuple[float, int]]

    def time_reaching(self, target: float) -> float:
        return next(t for t, sent in self.points if sent >= target)


def sample_stats(sim: StoreSimulator, started: float, stop: threading.Event, into: list[tuple[float, int]]) -> None:
    while not stop.wait(SAMPLE_INTERVAL_S):
        try:
            sent = sim.stats().bytes_sent_by_method.get("GET", 0)
        except Exception:  # a missed sample only widens the window's error
            continue
        into.append((time.monotonic() - started, sent))


def ray_workers(run: TreeRun) -> list[ProcessPeak]:
    """The run's Ray worker processes. proctree re-reads roles at every sample, and an exiting
    worker's empty command line makes it "other": the command line first seen tells as well."""
    def is_worker(peak: ProcessPeak) -> bool:
        first = peak.cmdline.split(" ", 1)[0]
        return (peak.role == "worker" or "default_worker.py" in peak.cmdline
                or (first.startswith("ray::") and not first.endswith("Agent")))

    return [peak for peak in run.processes if peak.role != "driver" and is_worker(peak)]


def place_inputs(family: Family, bucket_root: Path, prefix: str) -> list[str]:
    """Hard-link the family's files into the bucket (same filesystem: no copy, no extra disk)."""
    names = []
    for folder in family.folders:
        target = bucket_root / prefix / folder.name
        target.mkdir(parents=True, exist_ok=True)
        for file in folder.iterdir():
            if file.name.startswith("."):
                continue
            placed = target / file.name
            if placed.exists() and placed.stat().st_ino == file.stat().st_ino:
                continue
            placed.unlink(missing_ok=True)
            try:
                os.link(file, placed)
            except OSError:
                shutil.copyfile(file, placed)
        names.append(f"{prefix}/{folder.name}")
    return names


def recipe_text(urls: Sequence[str]) -> str:
    base, *tuned = urls
    models = "".join(f"  - model: {url}\n" for url in tuned)
    return f"merge_method: model_stock\nbase_model: {base}\nmodels:\n{models}dtype: bfloat16\nout_dtype: bfloat16\n"


def run_protocol(args: argparse.Namespace, sim: StoreSimulator, protocol: str, keys: list[str], runs: Path,
                 needed: int, cap_bytes_s: float) -> dict[str, object]:
    if protocol == "s3":
        urls = [sim.s3_url(BUCKET, key) for key in keys]
        out = sim.s3_url(BUCKET, "out-s3")
        shutil.rmtree(sim.bucket_path(BUCKET) / "out-s3", ignore_errors=True)
        options = ["--storage-options", json.dumps(sim.s3_storage_options())]
    else:
        urls = [sim.http_url(BUCKET, key) for key in keys]
        out = str(runs / "store-http-out")
        shutil.rmtree(out, ignore_errors=True)
        options = []
    recipe = runs / f"recipe-store-{protocol}.yml"
    recipe.write_text(recipe_text(urls))
    command = [tool("modelstock"), "merge", str(recipe), out, "--quiet", "--overwrite",
               "--shard-size", str(args.shard_size), "--memory-budget", str(args.memory_budget), *options,
               *(["--workers", str(args.workers)] if args.workers else []),
               *(["--io-concurrency", str(args.io_concurrency)] if args.io_concurrency else [])]
    sim.reset_stats()
    points: list[tuple[float, int]] = []
    stop = threading.Event()
    started = time.monotonic()
    sampler = threading.Thread(target=sample_stats, args=(sim, started, stop, points), daemon=True)
    sampler.start()
    run: TreeRun = run_measured(command, runs / f"store-{protocol}.log", env=contender_env(), cwd=str(REPO),
                                timeout_s=args.timeout)
    stop.set()
    sampler.join()
    stats = sim.stats()
    sent = stats.bytes_sent_by_method.get("GET", 0)
    points.append((run.wall_s, sent))
    samples = Samples(points)
    first = samples.time_reaching(WINDOW_EDGE_SHARE * sent) if sent else 0.0
    last = samples.time_reaching((1 - WINDOW_EDGE_SHARE) * sent) if sent else 0.0
    window_s = max(last - first, 1e-9)
    share = (1 - 2 * WINDOW_EDGE_SHARE) * sent / window_s / cap_bytes_s
    worker = max(ray_workers(run), key=lambda peak: peak.rss, default=None)
    result = {
        "protocol": protocol, "ok": run.returncode == 0, "wall_s": run.wall_s, "read_window_s": window_s,
        "share_of_cap": share, "share_of_cap_whole_run": sent / run.wall_s / cap_bytes_s,
        "bytes_fetched": sent, "bytes_needed": needed, "fetched_per_needed": sent / needed,
        "get_requests": stats.requests_by_operation.get("GetObject", 0) + stats.requests_by_operation.get("HttpGet", 0),
        "max_concurrent_requests": stats.max_concurrent_requests,
        "requests_by_operation": stats.requests_by_operation,
        "largest_worker_rss": worker.rss if worker else None, "largest_worker_anon": worker.anon if worker else None,
        "driver_rss": run.driver.rss, "log": run.log, "samples": points,
    }
    if run.returncode != 0:
        tail = Path(run.log).read_text(errors="replace").strip().splitlines()[-10:]
        print("    FAILED:\n    " + "\n    ".join(tail), flush=True)
    if not args.keep and protocol == "http":
        shutil.rmtree(out, ignore_errors=True)
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_argument_group("model family (cached as bench_merge.py's)")
    size.add_argument("--preset", choices=sorted(PRESETS), default="tinyllama")
    size.add_argument("--params", type=float,
                      help="instead of the preset: a Llama-like shape of about this many parameters")
    size.add_argument("--finetunes", type=int, default=2)
    size.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    size.add_argument("--seed", type=int, default=0)
    size.add_argument("--input-shard-size", type=parse_size, default="2GB")
    store = parser.add_argument_group("store")
    store.add_argument("--aggregate-mib-s", type=float, default=128.0, help="the store's aggregate cap (default 128)")
    store.add_argument("--connections-per-cap", type=float, default=16.0,
                       help="per-connection cap = aggregate / this (default 16)")
    store.add_argument("--latency-ms", type=float, default=30.0, help="first-byte latency (default 30)")
    store.add_argument("--protocols", default=",".join(PROTOCOLS), help="s3,http (default both)")
    run = parser.add_argument_group("merge")
    run.add_argument("--shard-size", type=parse_size, default="2GB")
    run.add_argument("--memory-budget", type=parse_size, default="512MiB")
    run.add_argument("--workers", type=int)
    run.add_argument("--io-concurrency", type=int, help="modelstock --io-concurrency (default: by backend)")
    run.add_argument("--workdir", type=Path,
                     default=Path(os.environ.get("MODELSTOCK_BENCH_DIR", "/tmp/modelstock-bench")))
    run.add_argument("--timeout", type=float, default=3600.0)
    run.add_argument("--keep", action="store_true", help="keep the outputs")
    run.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    args.protocol_list = [p.strip() for p in args.protocols.split(",") if p.strip()]
    unknown = set(args.protocol_list) - set(PROTOCOLS)
    if unknown:
        parser.error(f"unknown protocols: {', '.join(sorted(unknown))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    shape = LlamaShape.with_parameters(int(args.params)) if args.params else PRESETS[args.preset]
    workdir = args.workdir.resolve()
    family = ensure_family(workdir, shape, args.dtype, args.seed, args.finetunes, args.input_shard_size)
    checkpoints = [open_checkpoint(str(folder)) for folder in family.folders]
    needed = sum(c.total_bytes for c in checkpoints)
    header_bytes = sum(f.size for c in checkpoints for f in c.files) - needed
    cap = args.aggregate_mib_s * 2**20
    throttle = ThrottleConfig(first_byte_latency_ms=args.latency_ms, aggregate_mib_s=args.aggregate_mib_s,
                              connection_mib_s=args.aggregate_mib_s / args.connections_per_cap)
    runs = workdir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    print(f"{shape.parameters() / 1e6:.0f}M parameters, base + {args.finetunes} ({args.dtype}): "
          f"{human_bytes(needed)} of tensors to read; store: {args.aggregate_mib_s:.0f} MiB/s aggregate, "
          f"{throttle.connection_mib_s:.1f} MiB/s per connection, {args.latency_ms:.0f} ms first byte; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    results = []
    with StoreSimulator(workdir / "store", config=SimulatorConfig(throttle=throttle)) as sim:
        keys = place_inputs(family, sim.bucket_path(BUCKET), f"inputs/{family.base.parent.name}")
        for protocol in args.protocol_list:
            print(f"{protocol}: merging ...", flush=True)
            result = run_protocol(args, sim, protocol, keys, runs, needed + header_bytes, cap)
            results.append(result)
            print(f"    {'ok' if result['ok'] else 'FAILED'} in {result['wall_s']:.1f} s; read window "
                  f"{result['read_window_s']:.1f} s at {100 * result['share_of_cap']:.0f} % of the aggregate cap "
                  f"({100 * result['share_of_cap_whole_run']:.0f} % over the whole run, Ray start included); "
                  f"fetched {result['fetched_per_needed']:.4f}x the bytes needed (tensors + headers) in "
                  f"{result['get_requests']} GETs, up to {result['max_concurrent_requests']} requests at once; "
                  f"largest worker {human_bytes(result['largest_worker_rss'])} RSS "
                  f"({human_bytes(result['largest_worker_anon'])} anon)", flush=True)
        if not args.keep:
            shutil.rmtree(sim.bucket_path(BUCKET) / "out-s3", ignore_errors=True)
    if args.json:
        report = {"shape": dataclasses.asdict(shape), "needed_tensor_bytes": needed, "header_bytes": header_bytes,
                  "throttle": dataclasses.asdict(throttle), "loadavg_end": os.getloadavg(), "results": results}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"results: {args.json}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
