"""Scale without the bytes: plan a 405B-shaped merge, and merge a slice of a 70B-shaped one end to end,
with ``procedural://`` checkpoints (bytes generated on read; nothing on disk but the output).

1. **Plan**: a subprocess opens a ``llama3-405b`` base + 3 fine-tunes (764 files, 3.25 TB of
   tensors) from their headers and plans the merge (``pipeline.driver.prepare_merge``): wall time
   and the process's peak resident memory (VmHWM).
2. **Merge**: ``modelstock merge`` (embedded Ray) on a ``llama3-70b,layers=N`` base + fine-tunes
   (full-width embeddings, lm_head and N decoder layers), output to local disk, measured from
   outside (bench/proctree.py): wall time, bytes, and each worker's peak memory against its
   ``--memory-budget``. Generating the inputs costs CPU (~100-400 MiB/s per thread): on a small
   machine this is a test of memory and of the read scheduler, not of throughput.

    ./dev bench --scale                        # plan 405B; merge llama3-70b,layers=2 (base + 2: 23 GB in)
    python bench/bench_scale.py --layers 1 --skip-plan
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_merge import contender_env, human_bytes, tool  # noqa: E402
from bench_store import ray_workers  # noqa: E402
from proctree import run_measured  # noqa: E402

from pipeline.cli.options import parse_size  # noqa: E402

PLAN = textwrap.dedent("""
    import json, sys, time
    started = time.perf_counter()
    from modelstock.recipe import parse_recipe
    from pipeline.driver import MergeRequest, prepare_merge
    imported = time.perf_counter()
    family, finetunes, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    recipe = parse_recipe({"merge_method": "model_stock", "base_model": f"procedural://{family}/base",
                           "models": [{"model": f"procedural://{family}/ft-{k}"} for k in range(1, finetunes + 1)]})
    prepared = prepare_merge(MergeRequest(recipe=recipe, out_url=out, progress=False))
    planned = time.perf_counter()
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(json.dumps({"import_s": imported - started, "plan_s": planned - imported, "peak_rss": peak,
                      "files": sum(len(c.files) for c in prepared.checkpoints), "shards": len(prepared.plan.shards),
                      "input_bytes": prepared.plan.input_bytes, "output_bytes": prepared.plan.total_size}))
""")


def plan_figures(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", PLAN, args.plan_family, str(args.plan_finetunes),
                           str(workdir / "plan-out")], capture_output=True, text=True, cwd=str(REPO),
                          env=contender_env(), timeout=args.timeout)
    if done.returncode != 0:
        raise SystemExit(f"planning failed:\n{done.stderr[-3000:]}")
    figures: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def merge_figures(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    family = f"llama3-70b,layers={args.layers}"
    recipe = workdir / "recipe-70b-slice.yml"
    recipe.write_text(f"merge_method: model_stock\nbase_model: procedural://{family}/base\nmodels:\n"
                      + "".join(f"  - model: procedural://{family}/ft-{k}\n" for k in range(1, args.finetunes + 1)))
    out = workdir / "out-70b-slice"
    shutil.rmtree(out, ignore_errors=True)
    command = [tool("modelstock"), "merge", str(recipe), str(out), "--quiet",
               "--memory-budget", str(args.memory_budget), "--shard-size", str(args.shard_size),
               *(["--workers", str(args.workers)] if args.workers else [])]
    run = run_measured(command, workdir / "merge-70b-slice.log", env=contender_env(), cwd=str(REPO),
                       timeout_s=args.timeout)
    written = sum(f.stat().st_size for f in out.glob("*.safetensors")) if out.exists() else 0
    workers = ray_workers(run)
    figures = {
        "family": family, "ok": run.returncode == 0, "wall_s": run.wall_s, "output_bytes": written,
        "workers": len(workers), "memory_budget": args.memory_budget,
        "largest_worker_rss": max((w.rss for w in workers), default=None),
        "largest_worker_anon": max((w.anon for w in workers), default=None),
        "driver_rss": run.driver.rss, "log": run.log,
    }
    if run.returncode != 0:
        print(Path(run.log).read_text(errors="replace")[-3000:], flush=True)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return figures


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan-family", default="llama3-405b", help="procedural family to plan (default llama3-405b)")
    parser.add_argument("--plan-finetunes", type=int, default=3)
    parser.add_argument("--skip-plan", action="store_true")
    parser.add_argument("--skip-merge", action="store_true")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the llama3-70b slice (default 2)")
    parser.add_argument("--finetunes", type=int, default=2)
    parser.add_argument("--memory-budget", type=parse_size, default="512MiB")
    parser.add_argument("--shard-size", type=parse_size, default="2GB")
    parser.add_argument("--workers", type=int)
    bench_dir = Path(os.environ.get("MODELSTOCK_BENCH_DIR", "/tmp/modelstock-bench"))
    parser.add_argument("--workdir", type=Path, default=bench_dir / "scale")
    parser.add_argument("--timeout", type=float, default=7200.0)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {"loadavg_start": os.getloadavg(), "cpus": os.cpu_count()}
    ok = True
    if not args.skip_plan:
        plan = plan_figures(args, workdir)
        report["plan"] = plan
        print(f"plan {args.plan_family} base + {args.plan_finetunes}: {plan['files']} files, "
              f"{human_bytes(plan['input_bytes'])} in, {plan['shards']} shards; planned in {plan['plan_s']:.1f} s "
              f"(+ {plan['import_s']:.1f} s imports); driver peak RSS {human_bytes(plan['peak_rss'])}", flush=True)
    if not args.skip_merge:
        print(f"merging llama3-70b,layers={args.layers} base + {args.finetunes} ...", flush=True)
        merge = merge_figures(args, workdir)
        report["merge"] = merge
        ok = bool(merge["ok"])
        print(f"    {'ok' if ok else 'FAILED'} in {merge['wall_s']:.0f} s, "
              f"{human_bytes(merge['output_bytes'])} written; "
              f"{merge['workers']} workers, largest {human_bytes(merge['largest_worker_rss'])} RSS "
              f"({human_bytes(merge['largest_worker_anon'])} anon) for a {human_bytes(args.memory_budget)} budget; "
              f"driver {human_bytes(merge['driver_rss'])}", flush=True)
    report["loadavg_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
