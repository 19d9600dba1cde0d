"""Benchmark a Model Stock merge: modelstock vs mergekit vs the I/O floor, side by side.

Generates (or reuses) a Llama-shaped base model and fine-tunes, warms the page cache, then runs
each contender as its own subprocess, measured from outside: wall time of the whole process
(modelstock's includes starting and stopping its embedded Ray) and the peak memory of every
process of its tree. Prints a table with ratios against the floor and mergekit (bf16), and
writes everything as JSON with ``--json``. See bench/README.md for how to read the figures.

    python bench/bench_merge.py                      # TinyLlama-shaped, ~1.1B parameters
    python bench/bench_merge.py --params 5e7 --shard-size 40MB
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from proctree import TreeRun, run_measured  # noqa: E402

from cluster.testing import LocalCluster, start_head, stop  # noqa: E402
from modelstock.testing.synthetic import LLAMA_PRESETS, LlamaShape, write_model  # noqa: E402
from pipeline.cli.options import parse_size  # noqa: E402

PRESETS = LLAMA_PRESETS
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CONTENDERS = ("floor", "ray-overhead", "modelstock", "modelstock-attached", "mergekit-bf16", "mergekit-fp32")
# Contenders that join a Ray head the bench starts beforehand (not timed): what a merge costs on a
# running cluster (`--address`, `ray job submit`).
ATTACHED = frozenset({"modelstock-attached"})
FAMILY_FORMAT = 1  # bump when modelstock.testing.synthetic changes what it writes
COMPLETE_MARKER = ".bench-complete"
WARM_READ_BYTES = 16 * 1024 * 1024


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Family:
    base: Path
    finetunes: list[Path]

    @property
    def folders(self) -> list[Path]:
        return [self.base, *self.finetunes]

    def files(self) -> list[Path]:
        return sorted(f for folder in self.folders for f in folder.glob("*.safetensors"))


def family_key(shape: LlamaShape, dtype: str, seed: int) -> str:
    spec = json.dumps({"shape": dataclasses.asdict(shape), "dtype": dtype, "seed": seed, "format": FAMILY_FORMAT}, sort_keys=True)
    digest = hashlib.sha256(spec.encode()).hexdigest()[:10]
    return f"llama-h{shape.hidden}-l{shape.layers}-{dtype}-seed{seed}-{digest}"


def ensure_family(workdir: Path, shape: LlamaShape, dtype: str, seed: int, finetunes: int, input_shard_size: int) -> Family:
    """Base and fine-tunes under ``workdir/inputs/<key>``, written only where not already complete.

    A model is written under a temporary name and renamed when whole, so an interrupted run never
    leaves a half-written model that a later run would trust.
    """
    root = workdir / "inputs" / family_key(shape, dtype, seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "family.json").write_text(json.dumps({"shape": dataclasses.asdict(shape), "dtype": dtype, "seed": seed}, indent=1))
    folders = [root / "base"] + [root / f"finetune-{v}" for v in range(1, finetunes + 1)]
    for variant, folder in enumerate(folders):
        if (folder / COMPLETE_MARKER).exists():
            continue
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
        started = time.monotonic()
        write_model(str(partial), shape, DTYPES[dtype], seed, variant, shard_size=input_shard_size)
        (partial / COMPLETE_MARKER).write_text("")
        partial.rename(folder)
        print(f"  wrote {folder.relative_to(workdir)} in {time.monotonic() - started:.1f} s", flush=True)
    return Family(folders[0], folders[1:])


def warm_page_cache(files: Sequence[Path]) -> tuple[int, float]:
    """Read every input byte once, so every contender starts from the same (warm) cache."""
    started = time.monotonic()
    total = 0
    buffer = bytearray(WARM_READ_BYTES)
    for file in files:
        with open(file, "rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                total += count
    return total, time.monotonic() - started


# --------------------------------------------------------------------------- contenders


def recipe_yaml(family: Family, dtype: str, out_dtype: str) -> str:
    models = "".join(f"  - model: {folder}\n" for folder in family.finetunes)
    return (
        "merge_method: model_stock\n"
        f"base_model: {family.base}\n"
        f"models:\n{models}"
        f"dtype: {dtype}\n"
        f"out_dtype: {out_dtype}\n"
    )


def tool(name: str) -> str:
    """A console script of this interpreter's environment (the venv), else from PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"bench: {name} not found (is the venv active?)")
    return found


def contender_commands(
    args: argparse.Namespace, family: Family, recipes: dict[str, Path], out: Callable[[str], Path]
) -> dict[str, list[str]]:
    workers = ["--workers", str(args.workers)] if args.workers else []
    merge = ["merge", str(recipes["model_stock"]), "--quiet", "--shard-size", str(args.shard_size),
             "--memory-budget", str(args.memory_budget), "--device", args.device, *workers]
    mergekit = [
        tool("mergekit-yaml"), "--no-cuda", "--no-lazy-unpickle", "--no-copy-tokenizer", "--no-write-model-card",
        "--quiet", *(["-j", str(args.mergekit_threads)] if args.mergekit_threads else []), *args.mergekit_arg,
    ]
    return {
        "floor": [sys.executable, str(REPO / "bench" / "io_floor.py"), str(out("floor")),
                  "--out-dtype", args.out_dtype, "--shard-size", str(args.shard_size), *map(str, family.folders)],
        "ray-overhead": [sys.executable, str(REPO / "bench" / "ray_overhead.py"), *workers],
        "modelstock": [tool("modelstock"), *merge, str(out("modelstock"))],
        # The head's address is appended when it is up.
        "modelstock-attached": [tool("modelstock"), *merge, str(out("modelstock-attached")), "--address"],
        "mergekit-bf16": [*mergekit, str(recipes["bfloat16"]), str(out("mergekit-bf16"))],
        "mergekit-fp32": [*mergekit, str(recipes["float32"]), str(out("mergekit-fp32"))],
    }


def run_contender(name: str, command: list[str], log: Path, env: dict[str, str], timeout_s: float) -> TreeRun:
    """One measured run; an attached contender joins a Ray head started (untimed) just before,
    whose processes (raylet, workers) are measured with it and stopped after."""
    if name not in ATTACHED:
        return run_measured(command, log, env=env, cwd=str(REPO), timeout_s=timeout_s)
    head: LocalCluster = start_head(num_cpus=os.cpu_count() or 1)
    try:
        return run_measured([*command, head.gcs_address], log, env=head.client_env(token=False, base=env),
                            cwd=str(REPO), timeout_s=timeout_s, watch=[head.process.pid])
    finally:
        stop(head)


def contender_env() -> dict[str, str]:
    env = dict(os.environ)
    # A stray RAY_ADDRESS would make modelstock join someone else's cluster instead of embedding.
    env.pop("RAY_ADDRESS", None)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


# --------------------------------------------------------------------------- output checks


def output_tensors(folder: Path) -> dict[str, Path]:
    located: dict[str, Path] = {}
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as opened:
            for name in opened.keys():
                located[name] = file
    return located


def compare_outputs(reference: Path, other: Path, names: Sequence[str]) -> dict[str, object]:
    """Max |difference| (in float32) and the share of differing elements over ``names``."""
    from safetensors import safe_open

    ours, theirs = output_tensors(reference), output_tensors(other)
    if set(ours) != set(theirs):
        return {"error": f"tensor names differ: {sorted(set(ours) ^ set(theirs))[:5]}"}
    per_tensor = {}
    for name in names:
        with safe_open(str(ours[name]), "pt") as a, safe_open(str(theirs[name]), "pt") as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
            if x.shape != y.shape or x.dtype != y.dtype:
                per_tensor[name] = {"error": f"{tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}"}
                continue
            diff = (x.float() - y.float()).abs()
            per_tensor[name] = {
                "max_abs_diff": float(diff.max()),
                "max_abs_value": float(x.float().abs().max()),
                "differing_fraction": float((diff > 0).float().mean()),
            }
    clean = [v for v in per_tensor.values() if "error" not in v]
    return {
        "tensors": per_tensor,
        "max_abs_diff": max((v["max_abs_diff"] for v in clean), default=None),
        "max_differing_fraction": max((v["differing_fraction"] for v in clean), default=None),
    }


def sample_names(shape: LlamaShape, count: int) -> list[str]:
    names = list(shape.tensors())
    if count >= len(names):
        return names
    step = (len(names) - 1) / max(count - 1, 1)
    return list(dict.fromkeys(names[round(i * step)] for i in range(count)))


# --------------------------------------------------------------------------- report


def human_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}" if unit == "GB" else f"{value / scale:.0f} {unit}"
    return f"{value / 1e3:.0f} kB"


def ratio(value: float, reference: float | None) -> str:
    return f"{value / reference:.2f}x" if reference else "-"


def summarize(runs: list[TreeRun]) -> dict[str, object]:
    """Median wall time over repeats; memory peaks are the max over repeats."""
    ok = [r for r in runs if r.returncode == 0] or runs
    summaries = [r.to_json()["summary"] for r in ok]

    def most(key: str) -> int | None:
        values = [s[key] for s in summaries if s[key] is not None]
        return max(values) if values else None

    return {
        "ok": all(r.returncode == 0 and not r.timed_out for r in runs),
        "wall_s": statistics.median(r.wall_s for r in ok),
        "wall_s_all": [round(r.wall_s, 3) for r in runs],
        "tree_exit_s": statistics.median(r.tree_exit_s for r in ok),
        "cpu_s": statistics.median(r.cpu_s for r in ok),
        "processes": max(len(r.processes) for r in ok),
        "lingering": sorted({p for r in runs for p in r.lingering}),
        **{key: most(key) for key in (
            "driver_rss", "driver_anon", "largest_worker_rss", "largest_worker_anon", "sum_of_peaks_rss",
            "sum_of_peaks_anon", "peak_total_rss", "peak_total_anon",
        )},
        "workers": max(s["workers"] for s in summaries),
    }


def print_table(results: dict[str, dict[str, object]]) -> None:
    floor = results.get("floor", {}).get("wall_s")
    mergekit = results.get("mergekit-bf16", {}).get("wall_s")
    headers = ["contender", "wall s", "vs floor", "vs mk-bf16", "cpu s", "procs",
               "driver RSS", "(anon)", "max worker RSS", "(anon)", "sum of peaks RSS", "(anon)", "peak tree anon"]
    rows = []
    for name, r in results.items():
        rows.append([
            name + ("" if r["ok"] else " FAILED"),
            f"{r['wall_s']:.1f}", ratio(r["wall_s"], floor), ratio(r["wall_s"], mergekit), f"{r['cpu_s']:.1f}",
            str(r["processes"]),
            human_bytes(r["driver_rss"]), human_bytes(r["driver_anon"]),
            human_bytes(r["largest_worker_rss"]), human_bytes(r["largest_worker_anon"]),
            human_bytes(r["sum_of_peaks_rss"]), human_bytes(r["sum_of_peaks_anon"]), human_bytes(r["peak_total_anon"]),
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    print(line(headers))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))
    if "modelstock-attached" in results and floor:
        attached = results["modelstock-attached"]["wall_s"]
        print(f"modelstock attached to a running Ray: {attached:.1f} s = {attached / floor:.2f}x floor")
    if "modelstock" in results and mergekit:
        print(f"modelstock embedded, whole process: {results['modelstock']['wall_s'] / mergekit:.2f}x mergekit-yaml bf16")
    if "modelstock" in results and "ray-overhead" in results:
        merge_s = results["modelstock"]["wall_s"] - results["ray-overhead"]["wall_s"]
        print(f"modelstock minus ray-overhead (the merge itself, roughly): {merge_s:.1f} s"
              + (f" = {merge_s / floor:.2f}x floor" if floor else ""))
    for name, r in results.items():
        if r["lingering"]:
            print(f"WARNING: {name} left processes running after it exited (stopped by the bench): {r['lingering']}")


# --------------------------------------------------------------------------- main


def build_shape(args: argparse.Namespace) -> LlamaShape:
    if args.params is not None:
        shape = LlamaShape.with_parameters(int(args.params), layers=args.layers)
    else:
        shape = PRESETS[args.preset]
    overrides = {field: getattr(args, field) for field in ("hidden", "intermediate", "layers", "vocab", "heads", "kv_heads")
                 if getattr(args, field) is not None}
    return dataclasses.replace(shape, **overrides)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_argument_group("model family")
    size.add_argument("--preset", choices=sorted(PRESETS), default="tinyllama", help="named shape (default tinyllama, ~1.1B)")
    size.add_argument("--params", type=float,
                      help="instead of a preset: a Llama-like shape of about this many parameters, e.g. 5e7")
    for field in ("hidden", "intermediate", "layers", "vocab", "heads", "kv_heads"):
        size.add_argument(f"--{field.replace('_', '-')}", type=int, help=f"override the shape's {field}")
    size.add_argument("--finetunes", type=int, default=2, help="fine-tuned models besides the base (default 2)")
    size.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="storage dtype of the inputs")
    size.add_argument("--out-dtype", choices=sorted(DTYPES), default="bfloat16", help="output dtype of every contender")
    size.add_argument("--seed", type=int, default=0)
    size.add_argument("--input-shard-size", type=parse_size, default="2GB", help="shard size of the generated inputs")
    run = parser.add_argument_group("run")
    run.add_argument("--workdir", type=Path, default=Path(os.environ.get("MODELSTOCK_BENCH_DIR", "/tmp/modelstock-bench")),
                     help="inputs cache and outputs (default /tmp/modelstock-bench or $MODELSTOCK_BENCH_DIR)")
    run.add_argument("--keep", action="store_true", help="keep the merged outputs (inputs are always kept as a cache)")
    run.add_argument("--only", default=",".join(CONTENDERS), help=f"comma-separated contenders (default: {','.join(CONTENDERS)})")
    run.add_argument("--skip-mergekit", action="store_true", help="leave out both mergekit runs")
    run.add_argument("--repeat", type=int, default=1, help="rounds of all contenders; wall time is the median")
    run.add_argument("--timeout", type=float, default=3600.0, help="seconds per contender run")
    run.add_argument("--check", type=int, default=6, help="tensors compared across outputs (0: no check)")
    run.add_argument("--json", type=Path, help="write the results here as JSON")
    ms = parser.add_argument_group("modelstock")
    ms.add_argument("--shard-size", type=parse_size, default="2GB", help="output shard size (floor and modelstock)")
    ms.add_argument("--memory-budget", type=parse_size, default="512MiB", help="modelstock's per-worker budget")
    ms.add_argument("--workers", type=int, help="modelstock --workers (default: as many as Ray schedules)")
    ms.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto", help="modelstock --device")
    mk = parser.add_argument_group("mergekit")
    mk.add_argument("--mergekit-threads", type=int, help="mergekit-yaml -j")
    mk.add_argument("--mergekit-arg", action="append", default=[], help="extra mergekit-yaml flag (repeatable)")
    args = parser.parse_args(argv)
    chosen = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = set(chosen) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders: {', '.join(sorted(unknown))}")
    if args.skip_mergekit:
        chosen = [c for c in chosen if not c.startswith("mergekit")]
    args.contenders = [c for c in CONTENDERS if c in chosen]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    shape = build_shape(args)
    params = shape.parameters()
    in_element = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    out_element = torch.empty((), dtype=DTYPES[args.out_dtype]).element_size()
    bytes_in, bytes_out = (args.finetunes + 1) * params * in_element, params * out_element
    workdir = args.workdir.resolve()
    print(f"shape {shape}: {params / 1e6:.1f}M parameters; base + {args.finetunes} fine-tunes, {args.dtype}: "
          f"{human_bytes(bytes_in)} in, {human_bytes(bytes_out)} out ({args.out_dtype})", flush=True)
    available = psutil.virtual_memory().available
    if bytes_in + 3 * bytes_out > available:
        print(f"WARNING: inputs + outputs ({human_bytes(bytes_in + 3 * bytes_out)}) exceed available memory "
              f"({human_bytes(available)}): the page cache cannot stay warm, runs will read from disk", flush=True)

    family = ensure_family(workdir, shape, args.dtype, args.seed, args.finetunes, args.input_shard_size)
    runs_dir = workdir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    recipes = {}
    for key, dtype in (("model_stock", args.out_dtype), ("bfloat16", "bfloat16"), ("float32", "float32")):
        recipes[key] = runs_dir / f"recipe-{key}.yml"
        recipes[key].write_text(recipe_yaml(family, dtype, args.out_dtype))
    out = lambda name: runs_dir / name  # noqa: E731
    commands = contender_commands(args, family, recipes, out)
    env = contender_env()

    host = {
        "python": platform.python_version(), "cpus": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
        "loadavg_start": os.getloadavg(), "torch": torch.__version__,
    }
    all_runs: dict[str, list[TreeRun]] = {name: [] for name in args.contenders}
    warm_times = []
    for round_number in range(1, args.repeat + 1):
        for name in args.contenders:
            shutil.rmtree(out(name), ignore_errors=True)
            os.sync()  # the previous run's dirty pages are flushed before, not during, this run
            warmed, warm_s = warm_page_cache(family.files())
            warm_times.append(warm_s)
            print(f"[round {round_number}/{args.repeat}] {name}: page cache warmed ({human_bytes(warmed)} "
                  f"in {warm_s:.1f} s); running", flush=True)
            run = run_contender(name, commands[name], runs_dir / f"{name}.log", env, args.timeout)
            all_runs[name].append(run)
            failure = f"FAILED (exit {run.returncode}{', timed out' if run.timed_out else ''}); log: {run.log}"
            status = "ok" if run.returncode == 0 else failure
            print(f"    {run.wall_s:.1f} s, {len(run.processes)} processes, {status}", flush=True)
            tail = Path(run.log).read_text(errors="replace").strip().splitlines()[-15:]
            if run.returncode != 0 and tail:
                print("    " + "\n    ".join(tail), flush=True)
            if run.lingering:
                print(f"    WARNING: lingering processes after exit, stopped: {run.lingering}", flush=True)
            if name == "floor" and not args.keep:
                shutil.rmtree(out(name), ignore_errors=True)

    results = {name: summarize(runs) for name, runs in all_runs.items()}
    print()
    print(f"{params / 1e6:.1f}M parameters, base + {args.finetunes} fine-tunes ({args.dtype} in, {args.out_dtype} out), "
          f"{human_bytes(bytes_in)} read, {human_bytes(bytes_out)} written; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print_table(results)

    checks = {}
    if args.check and "modelstock" in results and results["modelstock"]["ok"]:
        names = sample_names(shape, args.check)
        for other in ("mergekit-fp32", "mergekit-bf16"):
            if other in results and results[other]["ok"]:
                checks[f"modelstock vs {other}"] = compare_outputs(out("modelstock"), out(other), names)
        for label, check in checks.items():
            if "error" in check:
                print(f"{label}: {check['error']}")
            else:
                print(f"{label}: max |diff| {check['max_abs_diff']:.3g}, at most {100 * check['max_differing_fraction']:.2f} % "
                      f"of elements differ ({len(names)} tensors)")
    if not args.keep:
        for name in args.contenders:
            shutil.rmtree(out(name), ignore_errors=True)

    if args.json:
        report = {
            "shape": dataclasses.asdict(shape), "parameters": params, "finetunes": args.finetunes,
            "dtype": args.dtype, "out_dtype": args.out_dtype, "bytes_in": bytes_in, "bytes_out": bytes_out,
            "shard_size": args.shard_size, "memory_budget": args.memory_budget, "workers": args.workers,
            "host": {**host, "loadavg_end": os.getloadavg()}, "page_cache_warm_s": warm_times,
            "commands": commands, "results": results, "checks": checks,
            "runs": {name: [r.to_json() for r in runs] for name, runs in all_runs.items()},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"results: {args.json}")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
