"""The recipe search against Model Stock and the soups, on the LLM demo's family.

Trains the demo's tiny Llama family (``modelstock demo --llm``: w_0 and six seeded fine-tunes,
merged as Model Stock, uniform and greedy soup, every model evaluated with the held-out set),
then searches per-model weights and per-layer-group ``t`` (task arithmetic with normalized
weights: w_0 + t(layer) * sum_i w_i tau_i / sum_i w_i, Model Stock's form with t searched) on
the held-out set with Ray Tune + Optuna TPE, merges the best recipe and evaluates it. Prints
the search's wall time, the machine's load, and the searched merge's held-out, ID and OOD figures
beside the baselines'.

    ./dev bench --search [--out DIR] [--trials 24] [--concurrency 2] [--halving]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BASELINES = ("model stock (6)", "uniform soup (6)", "greedy soup")


def spec_data(models: Path, trials: int, concurrency: int, layer_groups: int, halving: bool) -> dict:
    weight = {"min": 0.0, "max": 1.0}
    return {
        "recipe": {
            "merge_method": "task_arithmetic",
            "base_model": str(models / "base"),
            "models": [{"model": str(folder), "parameters": {"weight": weight}}
                       for folder in sorted(models.glob("ft-*"))],
            "parameters": {"normalize": True, "lambda": [{"min": 0.0, "max": 2.0}] * layer_groups},
        },
        "trials": trials, "concurrency": concurrency, "seed": 0, "sampler": "tpe",
        **({"halving": {"rungs": 3, "reduction_factor": 2}} if halving else {}),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-search", help="working folder (demo family, search, results)")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--layer-groups", type=int, default=3, help="searched knots of t over the layers")
    parser.add_argument("--halving", action="store_true", help="successive halving (ASHA) on the held-out set")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the embedded Ray")
    args = parser.parse_args()

    import yaml

    from cluster.session import ray_session
    from modelstock.evaluation.datasets import load_suite
    from modelstock.evaluation.scoring import ModelSource
    from modelstock.evaluation.text_table import TextEvalTable
    from modelstock.recipe_search import parse_search_spec
    from pipeline.demo.llm.config import LlmDemoConfig
    from pipeline.demo.llm.run import run_llm_demo
    from pipeline.evaluate import RayEvaluator
    from pipeline.search import SearchRequest, run_search

    root = Path(args.out).resolve()
    with ray_session(None, num_cpus=args.cpus, quiet=True) as session:
        print(f"[bench --search] Ray: {session.cpus:g} CPUs; machine: {os.cpu_count()} cores, "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        family = run_llm_demo(LlmDemoConfig(out_dir=str(root / "demo")), progress=False)
        table = family.table
        names = {name: next(m for m in table.models if m.startswith(name)) for name in BASELINES}
        suite = load_suite(root / "demo" / "suite.yml")
        held = suite.held_out.name if suite.held_out else ""
        spec_dict = spec_data(root / "demo" / "models", args.trials, args.concurrency, args.layer_groups, args.halving)
        (root / "search.yml").write_text(yaml.safe_dump(spec_dict, sort_keys=False))
        spec = parse_search_spec(spec_dict, "search.yml")

        load_before = os.getloadavg()
        started = time.monotonic()
        result = run_search(SearchRequest(spec=spec, suite=suite, out_url=str(root / "searched"), overwrite=True,
                                          progress=False),
                            baselines={names[n]: table.value(names[n], held) for n in BASELINES})
        seconds = time.monotonic() - started
        load_after = os.getloadavg()
        with RayEvaluator(progress=False) as evaluator:
            searched = evaluator.evaluate([ModelSource("searched", (result.out_url,))], suite, include_held_out=True)
        assert isinstance(searched, TextEvalTable)

    def figures(t: TextEvalTable, model: str) -> dict[str, float | None]:
        return {"held_out_ppl": t.value(model, held), "id_ppl": t.id_value(model),
                "ood_ppl": t.ood_mean_perplexity(model), "ood_acc": t.ood_mean_accuracy(model)}

    rows = {names[n]: figures(table, names[n]) for n in BASELINES}
    rows["searched"] = figures(searched, "searched")
    best_baseline = min(rows[names[n]]["held_out_ppl"] or float("inf") for n in BASELINES)
    wins = (rows["searched"]["held_out_ppl"] or float("inf")) <= best_baseline
    print()
    print(f"search: {len(result.records)} trials, concurrency {args.concurrency}, "
          f"{'in-memory' if result.in_memory else 'cluster'} merges, {seconds:.0f} s (with the final merge); "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after (1 min), {os.cpu_count()} cores")
    print(f"{'model':<20}{held + ' ppl':>14}{'ID ppl':>10}{'OOD ppl':>10}{'OOD acc%':>10}")
    for model, values in rows.items():
        acc = values["ood_acc"]
        print(f"{model:<20}{values['held_out_ppl']:>14.3f}{values['id_ppl']:>10.3f}{values['ood_ppl'] or 0:>10.3f}"
              f"{100 * acc if acc is not None else float('nan'):>10.2f}")
    print(f"searched held-out perplexity <= best of Model Stock, uniform and greedy soup: {'yes' if wins else 'NO'}; "
          f"under 10 minutes: {'yes' if seconds < 600 else 'NO'}")
    record = {"seconds": seconds, "trials": len(result.records), "concurrency": args.concurrency,
              "load_before": load_before, "load_after": load_after, "cores": os.cpu_count(), "rows": rows,
              "best_point": result.best.point, "held_out_wins": wins}
    (root / "bench-search.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {root / 'bench-search.json'}; trials table and plot in {result.out_url}")
    return 0 if wins and seconds < 600 else 1


if __name__ == "__main__":
    sys.exit(main())
