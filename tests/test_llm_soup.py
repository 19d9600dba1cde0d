"""Causal LMs end to end from the loopback S3 server: ``merge --eval`` and ``soup --greedy`` through
the CLI, against plain transformers on the same weights (downloaded, or averaged in float64 here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from text_fixtures import (  # noqa: F401  (fixtures: text_family, one_torch_thread)
    llama_config,
    load_reference,
    one_torch_thread_fixture,
    reference_perplexity,
    suite_yaml,
    text_family_fixture,
    write_text_sets,
)

from modelstock.evaluation.causal_lm import model_footprint
from modelstock.evaluation.datasets import load_suite
from modelstock.evaluation.soup import greedy_soup
from modelstock.recipe import load_recipe
from pipeline.cli import main
from pipeline.evaluate import RayEvaluator
from pipeline.soup import SOUP_FILE, CandidateScorer, SoupRequest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_LENGTH = 48


@pytest.fixture
def bucket(s3, text_family, tmp_path: Path):
    """The family and the eval sets uploaded to a fresh bucket; the suite YAML naming them."""
    urls = {path.name: s3.upload(path, f"models/{path.name}") for path in text_family.all}
    sets = write_text_sets(tmp_path / "sets")
    s3.upload(sets.root, "eval")
    suite = tmp_path / "suite.yml"
    suite.write_text(suite_yaml(s3.url("eval"), MAX_LENGTH))
    return urls, sets, suite


def download(s3, url: str, local: Path) -> Path:
    local.mkdir(parents=True)
    for key in s3.fs.ls(url.removeprefix("s3://")):
        if not s3.fs.isdir(key):
            s3.fs.get_file(key, str(local / Path(key).name))
    return local


def test_merge_with_eval_on_causal_lms_from_s3(s3, bucket, tmp_path: Path, ray_local, capsys) -> None:
    urls, sets, suite = bucket
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "model_stock", "base_model": urls["base"],
                                      "models": [{"model": urls["ft-1"]}, {"model": urls["ft-2"]}]}))
    merged = s3.url("merged")
    assert main(["merge", str(recipe), merged, "--eval", str(suite), "--storage-options", json.dumps(s3.options),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "docs ppl" in printed and "OOD ppl" in printed and "lower is better" in printed
    results = json.loads(s3.fs.cat_file(f"{s3.name}/merged/eval/eval.json"))
    assert results["kind"] == "text" and results["better"] == {"perplexity": "lower", "accuracy": "higher"}
    (model,) = results["models"]
    assert model["model"] == "merged"
    assert s3.fs.exists(f"{s3.name}/merged/eval/eval.png") and s3.fs.exists(f"{s3.name}/merged/eval/eval.parquet")

    # Plain transformers on the merged folder (tokenizer files copied from the base by the merge).
    reference, tokenizer = load_reference(download(s3, merged, tmp_path / "merged"))
    for name in ("docs", "docs-shifted"):
        expected, tokens = reference_perplexity(reference, tokenizer, sets.texts[name], MAX_LENGTH)
        assert model["datasets"][name]["tokens"] == tokens
        assert model["datasets"][name]["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert model["id_perplexity"] == model["datasets"]["docs"]["perplexity"]
    assert model["ood_mean_perplexity"] == model["datasets"]["docs-shifted"]["perplexity"]
    assert model["datasets"]["next-line"]["total"] == len(sets.choices["next-line"])
    assert model["ood_mean_accuracy"] == model["datasets"]["next-line"]["accuracy"]


def held_out_perplexity(state: dict[str, torch.Tensor], tokenizer, texts: list[str]) -> float:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config()).eval()
    model.load_state_dict(state)
    return reference_perplexity(model, tokenizer, texts, MAX_LENGTH)[0]


def test_greedy_soup_of_causal_lms_selects_on_held_out_perplexity(s3, bucket, text_family, tmp_path: Path,
                                                                   ray_local, capsys) -> None:
    urls, sets, suite = bucket
    finetunes = [urls[p.name] for p in text_family.finetunes]
    recipe = tmp_path / "soup.yml"
    models = [{"model": u, "init": urls["base"]} for u in finetunes]
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": models}))
    options = ["--storage-options", json.dumps(s3.options), "--quiet"]
    assert main(["soup", str(recipe), s3.url("soup"), "--greedy", "--eval", str(suite), *options]) == 0
    assert "perplexity, lower is better" in capsys.readouterr().out
    record = json.loads(s3.fs.cat_file(f"{s3.name}/soup/{SOUP_FILE}"))
    assert record["selection_set"] == "docs-val" and record["selection_metric"] == "perplexity"

    # Replay the rule in process: float64 averages of the safetensors, plain transformers, lower is better.
    states = {url: load_file(str(path / "model.safetensors")) for url, path in zip(finetunes, text_family.finetunes)}
    _, tokenizer = load_reference(text_family.base)
    texts = sets.texts["docs-val"]

    def soup_perplexity(ingredients: list[str]) -> float:
        names = states[finetunes[0]]
        average = {k: (sum(states[u][k].double() for u in ingredients) / len(ingredients)).float() for k in names}
        return held_out_perplexity(average, tokenizer, texts)

    held = {url: held_out_perplexity(states[url], tokenizer, texts) for url in finetunes}
    replay = greedy_soup(finetunes, held, soup_perplexity, higher_is_better=False)
    assert [a["model"] for a in record["accepted"]] == replay.accepted
    assert [s["score"] for s in record["steps"]] == pytest.approx([s.score for s in replay.steps], rel=1e-5)
    ingredients = [i["held_out_perplexity"] for i in record["ingredients"]]
    assert ingredients == pytest.approx([held[u] for u in finetunes], rel=1e-5)
    assert len(replay.steps) == 3 and s3.fs.exists(f"{s3.name}/soup/eval/eval.json")

    # An actor that holds one model but not a soup with its ingredients: the candidate soup is merged on
    # the cluster to a scratch folder under the output, evaluated from there like any checkpoint, and removed.
    pair = finetunes[:2]
    single = model_footprint(pair[0], s3.options, 256, MAX_LENGTH)
    text_suite = load_suite(suite)
    request = SoupRequest(recipe=load_recipe(str(recipe)), out_url=s3.url("soup-scratch"), greedy=True,
                          suite=text_suite, storage_options=s3.options, progress=False)
    # One model fits; a soup of two in memory (+3 x weights: two ingredients and their average) does not.
    with RayEvaluator(s3.options, progress=False, actor_memory=single.total + single.weights) as evaluator:
        assert not evaluator.soup_fits_in_memory(pair, text_suite)
        scorer = CandidateScorer(request, text_suite, evaluator)
        assert scorer(pair) == pytest.approx(soup_perplexity(pair), rel=1e-5)
    assert scorer.scratch_merges == 1
    assert not [k for k in s3.fs.find(f"{s3.name}/soup-scratch") if "/scratch/" in k]
