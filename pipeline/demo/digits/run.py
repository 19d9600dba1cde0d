"""The image demo on a connected Ray: data and training here, then the pipeline does the rest.

Pretrain a small CNN on augmented digits (the robust w_0), fine-tune several runs on clean
digits with one recipe and different seeds (the papers' protocol), store models as safetensors
folders and data as Parquet, then merge on Ray (Model Stock of 2 and of all, uniform soup,
greedy soup, periodic Model Stock) and evaluate every model with the Ray evaluator into one
table and one ID-vs-OOD plot; then say which of the papers' claims hold on this run
(``pipeline.demo.claims``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from modelstock.evaluation.datasets import EvalSuite
from modelstock.evaluation.scoring import ModelSource
from modelstock.recipe import parse_recipe
from pipeline.demo.claims import DemoModels, format_claims, paper_claims
from pipeline.demo.digits.config import DemoConfig
from pipeline.demo.digits.data import load_digits_splits, write_datasets
from pipeline.demo.digits.training import fine_tune, periodic_model_stock, pretrain, save_checkpoint
from pipeline.driver import MergeRequest, run_merge
from pipeline.evaluate import EvalTable, RayEvaluator
from pipeline.soup import SoupRequest, run_soup

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    table: EvalTable
    greedy_accepted: list[str]
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def run_demo(config: DemoConfig, progress: bool = True) -> DemoResult:
    """The whole image demo; expects a connected Ray (``cluster.session.ray_session``)."""
    started = time.monotonic()
    root = Path(config.out_dir).resolve()
    models_dir, merged_dir = root / "models", root / "merged"
    splits = load_digits_splits(config.seed)
    train_images, train_labels = splits["train"]
    suite = write_datasets(root / "data", splits, config.shifts, config.seed, config.rows_per_group, config.rows_per_shard)
    (root / "suite.yml").write_text(suite_yaml(suite))

    say(f"pretraining w_0 ({config.pretrain_epochs} epochs, augmented digits)")
    base = pretrain(config, train_images, train_labels)
    base_url = save_checkpoint(models_dir / "base", base.state_dict(), config, "pretrained w_0")
    finetuned: dict[str, str] = {}
    for run in config.finetunes:
        say(f"fine-tuning {run.name}: seed {run.seed}, lr {run.lr}, {run.epochs} epochs"
            + (f", label smoothing {run.label_smoothing}" if run.label_smoothing else "")
            + (f", weight decay {run.weight_decay}" if run.weight_decay else ""))
        model = fine_tune(config, base, run, train_images, train_labels)
        finetuned[run.name] = save_checkpoint(models_dir / run.name, model.state_dict(), config, f"fine-tuned: {run}")
    pair = config.finetunes[:2]
    say(f"periodic Model Stock: {pair[0].name}/{pair[1].name} settings with other seeds, merged every "
        f"{config.periodic_every} epoch(s)")
    periodic_runs = (replace(pair[0], seed=pair[0].seed + 100), replace(pair[1], seed=pair[1].seed + 100))
    periodic_state, merger = periodic_model_stock(config, base, periodic_runs, train_images, train_labels)
    periodic_url = save_checkpoint(models_dir / "periodic-model-stock", periodic_state, config, "periodic Model Stock")
    log.info("periodic merges: %s", [round(e.mean_t, 3) for e in merger.events])

    all_ft = list(finetuned.values())

    def merge(name: str, recipe: dict[str, Any]) -> str:
        url = str(merged_dir / name)
        run_merge(MergeRequest(recipe=parse_recipe(recipe, name), out_url=url, overwrite=True, progress=progress))
        return url

    model_stock_2 = merge("model-stock-2", {"merge_method": "model_stock", "base_model": base_url,
                                            "models": [{"model": finetuned[r.name]} for r in pair]})
    model_stock_all = merge(f"model-stock-{len(all_ft)}", {"merge_method": "model_stock", "base_model": base_url,
                                                          "models": [{"model": u} for u in all_ft]})
    uniform = merge("uniform-soup", {"merge_method": "linear", "models": [{"model": u, "init": base_url} for u in all_ft]})
    names = {url: name for name, url in finetuned.items()}
    with RayEvaluator(batch_size=suite.batch_size, progress=progress) as evaluator:
        say(f"greedy soup over {len(all_ft)} fine-tunes, selected on {suite.selection_set.name}")
        soup_recipe = parse_recipe({"merge_method": "linear", "models": [{"model": u, "init": base_url} for u in all_ft]})
        greedy = run_soup(SoupRequest(recipe=soup_recipe, out_url=str(merged_dir / "greedy-soup"), greedy=True,
                                      suite=suite, overwrite=True, progress=progress), evaluator)
        sources = [
            ModelSource("model stock (2)", (model_stock_2,)),
            ModelSource(f"model stock ({len(all_ft)})", (model_stock_all,)),
            ModelSource(f"uniform soup ({len(all_ft)})", (uniform,)),
            ModelSource(f"greedy soup ({len(greedy.accepted)})", (greedy.out_url,)),
            ModelSource("periodic model stock", (periodic_url,)),
            ModelSource("w_0 (pretrained)", (base_url,)),
            *[ModelSource(name, (url,)) for name, url in finetuned.items()],
        ]
        kinds = {s.name: ("fine-tuned" if s.urls[0] in names else "pretrained" if s.urls[0] == base_url else "merged")
                 for s in sources}
        say(f"evaluating {len(sources)} models on {len(suite.datasets) + 1} sets (with the held-out set)")
        table = evaluator.evaluate(sources, suite, kinds, include_held_out=True)
        assert isinstance(table, EvalTable)
    files = table.write(str(root / "results"))
    accepted = [names[url] for url in greedy.accepted]
    print()
    print(table.format())
    print()
    print(f"greedy soup kept: {', '.join(accepted)}")
    print(f"best single fine-tune (ID): {max(finetuned, key=table.id_accuracy)}")
    print(format_claims(paper_claims(table, DemoModels(
        finetunes=list(finetuned), pair=[r.name for r in pair], model_stock_2="model stock (2)",
        uniform_soup=f"uniform soup ({len(all_ft)})", greedy_soup=f"greedy soup ({len(greedy.accepted)})"))))
    for url in files:
        print(f"wrote {url}")
    seconds = time.monotonic() - started
    say(f"done in {seconds:.0f} s")
    return DemoResult(table=table, greedy_accepted=accepted, files=files, seconds=seconds)


def suite_yaml(suite: EvalSuite) -> str:
    return yaml.safe_dump(suite.model_dump(mode="json", exclude_none=True), sort_keys=False)
