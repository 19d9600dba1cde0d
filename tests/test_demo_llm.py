"""`modelstock demo --llm --quick` end to end on the local Ray."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.cli import main


def test_llm_demo_quick_runs_end_to_end(tmp_path: Path, ray_local, capsys) -> None:
    out = tmp_path / "demo-llm"
    assert main(["demo", "--llm", "--quick", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "code ppl" in printed and "OOD ppl" in printed and "greedy soup kept:" in printed
    assert "the papers' claims on this run" in printed and "perplexity (lower is better): " in printed
    results = json.loads((out / "results" / "eval.json").read_text())
    assert results["kind"] == "text" and results["id"] == "code" and results["held_out"] == "code-val"
    assert results["ood_choice_sets"] == ["docs-next-line"] and len(results["ood_perplexity_sets"]) >= 2
    names = [m["model"] for m in results["models"]]
    for expected in ("model stock (2)", "model stock (6)", "uniform soup (6)", "w_0 (pretrained)",
                     *(f"ft-{i}" for i in range(1, 7))):
        assert expected in names
    assert any(name.startswith("greedy soup (") for name in names)
    for model in results["models"]:
        assert 1.0 < model["id_perplexity"] < 600 and 0.0 <= model["ood_mean_accuracy"] <= 1.0
        assert model["datasets"]["docs-next-line"]["total"] == 24
    by_name = {m["model"]: m for m in results["models"]}
    # Fine-tuning on code lowers code perplexity below w_0's: the fine-tunes learned something.
    assert all(by_name[f"ft-{i}"]["id_perplexity"] < by_name["w_0 (pretrained)"]["id_perplexity"] for i in range(1, 7))
    for merged in ("model-stock-2", "uniform-soup", "greedy-soup"):
        assert (out / "merged" / merged / "modelstock-manifest.json").exists()
        assert (out / "merged" / merged / "tokenizer.json").exists()
    assert (out / "results" / "eval.png").stat().st_size > 1000 and (out / "results" / "eval.parquet").exists()
    config = json.loads((out / "models" / "ft-1" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    soup = json.loads((out / "merged" / "greedy-soup" / "modelstock-soup.json").read_text())
    assert soup["selection_metric"] == "perplexity" and soup["selection_set"] == "code-val"
