"""The LLM demo on a connected Ray: text and training here, then the pipeline does the rest.

Train a BPE tokenizer and pretrain a tiny Llama on documentation prose and some code (w_0),
fine-tune it on Python source with one recipe and different seeds, store every model as a
Hugging Face folder and every evaluation set as Parquet, then merge on Ray (Model Stock of 2 and
of all, uniform soup, greedy soup selected on held-out code perplexity) and evaluate every model
with the Ray evaluator: perplexity on code (ID), documentation, scientific prose and a licence
(OOD), and a next-line multiple-choice set; one table, one plot, and the papers' claims.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
import yaml

from modelstock.evaluation.scoring import ModelSource
from modelstock.evaluation.text_table import TextEvalTable
from modelstock.recipe import parse_recipe
from pipeline.demo.claims import DemoModels, format_claims, paper_claims
from pipeline.demo.llm.config import LlmDemoConfig
from pipeline.demo.llm.data import build_text, write_suite
from pipeline.demo.llm.training import fine_tune, pretrain, save_model, token_stream, train_tokenizer
from pipeline.driver import MergeRequest, run_merge
from pipeline.evaluate import RayEvaluator
from pipeline.ray_results import result_of
from pipeline.soup import SoupRequest, run_soup


@ray.remote(num_cpus=1)
def fine_tune_task(config: LlmDemoConfig, base_state: dict[str, torch.Tensor], tokenizer_dir: str,
                   stream: torch.Tensor, seed: int, folder: str) -> str:
    """One fine-tune on a Ray worker (they are independent: the cluster runs them side by side)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = fine_tune(config, base_state, tokenizer, stream, seed)
    return save_model(model, Path(folder), Path(tokenizer_dir))


@dataclass
class LlmDemoResult:
    table: TextEvalTable
    greedy_accepted: list[str]
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0


def say(message: str) -> None:
    print(f"[demo --llm] {message}", flush=True)


def run_llm_demo(config: LlmDemoConfig, progress: bool = True) -> LlmDemoResult:
    """The whole LLM demo; expects a connected Ray (``cluster.session.ray_session``)."""
    started = time.monotonic()
    root = Path(config.out_dir).resolve()
    models_dir, merged_dir = root / "models", root / "merged"
    text = build_text(config)
    suite = write_suite(root / "data", text, config)
    (root / "suite.yml").write_text(yaml.safe_dump(suite.model_dump(mode="json", exclude_none=True), sort_keys=False))

    tokenizer = train_tokenizer(text.pretrain, config.vocab_size, root / "tokenizer")
    pretrain_stream, finetune_stream = token_stream(tokenizer, text.pretrain), token_stream(tokenizer, text.finetune)
    say(f"tokenizer: BPE, {len(tokenizer)} tokens; pretraining text {len(pretrain_stream):,} tokens, "
        f"fine-tuning text (Python source) {len(finetune_stream):,} tokens")
    base = pretrain(config, tokenizer, pretrain_stream)
    say(f"pretrained w_0: {sum(p.numel() for p in base.parameters()):,} parameters, {config.pretrain_steps} steps")
    base_url = save_model(base, models_dir / "base", root / "tokenizer")
    recipe = config.finetune
    say(f"fine-tuning {len(config.seeds)} runs on code on Ray, one recipe (lr {recipe.lr}, {recipe.steps} steps), "
        f"seeds {list(config.seeds)}")
    base_state, stream = ray.put(base.state_dict()), ray.put(finetune_stream)
    runs = {f"ft-{seed}": fine_tune_task.remote(config, base_state, str(root / "tokenizer"), stream, seed,
                                                str(models_dir / f"ft-{seed}")) for seed in config.seeds}
    finetuned: dict[str, str] = {name: result_of(ref) for name, ref in runs.items()}

    all_ft = list(finetuned.values())
    pair = list(finetuned)[:2]

    def merge(name: str, recipe_data: dict[str, Any]) -> str:
        url = str(merged_dir / name)
        run_merge(MergeRequest(recipe=parse_recipe(recipe_data, name), out_url=url, overwrite=True, progress=progress))
        return url

    model_stock_2 = merge("model-stock-2", {"merge_method": "model_stock", "base_model": base_url,
                                            "models": [{"model": finetuned[name]} for name in pair]})
    model_stock_all = merge(f"model-stock-{len(all_ft)}", {"merge_method": "model_stock", "base_model": base_url,
                                                          "models": [{"model": u} for u in all_ft]})
    soup_models = [{"model": u, "init": base_url} for u in all_ft]
    uniform = merge("uniform-soup", {"merge_method": "linear", "models": soup_models})
    names = {url: name for name, url in finetuned.items()}
    with RayEvaluator(progress=progress) as evaluator:
        say(f"greedy soup over {len(all_ft)} fine-tunes, selected on {suite.selection_set.name} perplexity "
            "(lower is better)")
        soup_recipe = parse_recipe({"merge_method": "linear", "models": soup_models})
        greedy = run_soup(SoupRequest(recipe=soup_recipe, out_url=str(merged_dir / "greedy-soup"), greedy=True,
                                      suite=suite, overwrite=True, progress=progress), evaluator)
        sources = [
            ModelSource("model stock (2)", (model_stock_2,)),
            ModelSource(f"model stock ({len(all_ft)})", (model_stock_all,)),
            ModelSource(f"uniform soup ({len(all_ft)})", (uniform,)),
            ModelSource(f"greedy soup ({len(greedy.accepted)})", (greedy.out_url,)),
            ModelSource("w_0 (pretrained)", (base_url,)),
            *[ModelSource(name, (url,)) for name, url in finetuned.items()],
        ]
        kinds = {s.name: ("fine-tuned" if s.urls[0] in names else "pretrained" if s.urls[0] == base_url else "merged")
                 for s in sources}
        say(f"evaluating {len(sources)} models on {len(suite.datasets) + 1} sets on Ray (with the held-out set)")
        table = evaluator.evaluate(sources, suite, kinds, include_held_out=True)
        assert isinstance(table, TextEvalTable)
    files = table.write(str(root / "results"))
    accepted = [names[url] for url in greedy.accepted]
    print()
    print(table.format())
    print()
    print(f"greedy soup kept: {', '.join(accepted)}")
    print(f"best single fine-tune (ID perplexity): {min(finetuned, key=table.id_value)}")
    print(format_claims(paper_claims(table, DemoModels(
        finetunes=list(finetuned), pair=pair, model_stock_2="model stock (2)",
        uniform_soup=f"uniform soup ({len(all_ft)})", greedy_soup=f"greedy soup ({len(greedy.accepted)})"))))
    for url in files:
        print(f"wrote {url}")
    seconds = time.monotonic() - started
    say(f"done in {seconds:.0f} s")
    return LlmDemoResult(table=table, greedy_accepted=accepted, files=files, seconds=seconds)
