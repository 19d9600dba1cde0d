"""`modelstock demo --quick` end to end on the local Ray."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.cli import main
from pipeline.demo.digits.config import DemoConfig


def test_demo_quick_runs_end_to_end(tmp_path: Path, ray_local, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "OOD mean" in printed and "greedy soup kept:" in printed
    assert "the papers' claims on this run" in printed
    assert "Model Stock (2) at least as good as each of its ingredients on ID top-1 (higher is better): " in printed
    results = json.loads((out / "results" / "eval.json").read_text())
    names = [m["model"] for m in results["models"]]
    for expected in ("model stock (2)", "uniform soup (6)", "periodic model stock", "w_0 (pretrained)",
                     *(f"ft-{i}" for i in range(1, 7))):
        assert expected in names
    assert any(name.startswith("greedy soup (") for name in names)
    assert len(results["ood"]) >= 4
    for model in results["models"]:
        assert 0.0 <= model["id_accuracy"] <= 1.0 and 0.0 <= model["ood_mean"] <= 1.0
    for merged in ("model-stock-2", "uniform-soup", "greedy-soup"):
        assert (out / "merged" / merged / "modelstock-manifest.json").exists()
    assert (out / "results" / "eval.png").stat().st_size > 1000
    assert (out / "results" / "eval.parquet").exists()
    config = json.loads((out / "models" / "ft-1" / "config.json").read_text())
    assert config["modelstock_builder"] == "reference-cnn"
    assert results["held_out"] == "digits-val"


def test_demo_fine_tunes_share_one_recipe_and_differ_by_seed() -> None:
    for config in (DemoConfig(), DemoConfig.quick()):
        recipes = {(ft.lr, ft.epochs, ft.weight_decay, ft.label_smoothing) for ft in config.finetunes}
        assert len(recipes) == 1 and len({ft.seed for ft in config.finetunes}) == len(config.finetunes) >= 6
