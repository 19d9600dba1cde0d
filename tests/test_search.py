"""The recipe search: spec validation and expansion, Tune driving a seeded Optuna sampler to a known
optimum, resume after a SIGKILLed driver, and candidates merged to scratch storage that is removed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import yaml
from text_fixtures import TextFamily, one_torch_thread_fixture, suite_yaml, text_family_fixture, write_text_sets  # noqa: F401

from modelstock.errors import InvalidRecipe
from modelstock.evaluation.datasets import parse_suite, plan_dataset_shards
from modelstock.recipe import load_recipe
from modelstock.recipe_search import Range, parse_search_spec
from pipeline.search import (
    SCRATCH_DIR,
    TABLE_FILE,
    CandidateObjective,
    SearchRequest,
    TrialSettings,
    best_record,
    run_search,
    run_trials,
    trial_records,
)

REPO = Path(__file__).resolve().parent.parent


def spec_for(family: TextFamily, **extra: object) -> dict:
    return {
        "recipe": {
            "merge_method": "task_arithmetic",
            "base_model": str(family.base),
            "models": [{"model": str(ft), "parameters": {"weight": {"min": 0, "max": 1}}} for ft in family.finetunes[:2]],
            "parameters": {"normalize": True, "lambda": [{"min": 0, "max": 1.5}, {"min": 0, "max": 1.5}]},
        },
        **extra,
    }


# --- the spec ------------------------------------------------------------------------------------


def test_expansion_is_a_plain_recipe_with_gradients_written_out(text_family: TextFamily) -> None:
    spec = parse_search_spec(spec_for(text_family))
    assert set(spec.space) == {"models[0].parameters.weight", "models[1].parameters.weight",
                               "parameters.lambda[0]", "parameters.lambda[1]"}
    assert spec.space["parameters.lambda[1]"] == Range(0.0, 1.5)
    point = {"models[0].parameters.weight": 0.25, "models[1].parameters.weight": 0.75,
             "parameters.lambda[0]": 0.5, "parameters.lambda[1]": 1.25}
    recipe = spec.expand(point)
    assert recipe.parameters["lambda"] == [0.5, 1.25]
    assert [m.parameters["weight"] for m in recipe.models or []] == [0.25, 0.75]
    # The gradient resolves per layer as any recipe's does: the first layer gets the first knot.
    assert recipe.tensor_parameters("model.layers.0.mlp.up_proj.weight", 0.0).method.lambda_ == 0.5


BAD_SPECS = [
    ({"trials": 3}, "recipe"),
    ({"recipe": {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]}}, "no range or choice"),
    ({"recipe": {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": {"min": 1, "max": 0}}},
                                                      {"model": "b"}]}}, "must be below max"),
    ({"recipe": {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": {"min": 0}}},
                                                      {"model": "b"}]}}, "a range is"),
    ({"recipe": {"merge_method": "linear", "models": [{"model": "a", "parameters": {"wieght": {"min": 0, "max": 1}}},
                                                      {"model": "b"}]}}, "unknown parameter 'wieght'"),
    ({"recipe": {"merge_method": "linear", "models": [{"model": "a"}],
                 "parameters": {"normalize": {"choice": [True]}}}}, "at least two options"),
    ({"recipe": {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": {"min": 0, "max": 1,
                                                                                              "log": True}}}]}},
     "log range needs min > 0"),
    ({"recipe": {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": {"min": 0, "max": 1}}}]},
      "sampler": "grid"}, "sampler"),
    ({"recipe": {"merge_method": {"choice": ["linear", "slerp"]},
                 "models": [{"model": "a", "parameters": {"weight": {"min": 0, "max": 1}}}]}}, "slerp"),
]


@pytest.mark.parametrize(("data", "message"), BAD_SPECS)
def test_bad_specs_are_refused_in_one_line(data: dict, message: str) -> None:
    with pytest.raises(InvalidRecipe) as error:
        parse_search_spec(data, "search.yml")
    assert message in str(error.value) and "\n" not in str(error.value)
    assert str(error.value).startswith("search.yml")


def test_cli_refuses_a_bad_spec_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import main

    (tmp_path / "search.yml").write_text("recipe: {merge_method: linear, models: [{model: a}]}\n")
    (tmp_path / "suite.yml").write_text(suite_yaml(str(tmp_path)))
    code = main(["search", str(tmp_path / "search.yml"), str(tmp_path / "out"), "--eval", str(tmp_path / "suite.yml")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no range or choice" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_suite_without_held_out_is_refused(text_family: TextFamily, tmp_path: Path) -> None:
    data = yaml.safe_load(suite_yaml(str(tmp_path)))
    del data["held_out"]
    request = SearchRequest(spec=parse_search_spec(spec_for(text_family)), suite=parse_suite(data),
                            out_url=str(tmp_path / "out"))
    with pytest.raises(InvalidRecipe, match="held_out"):
        run_search(request)
    assert not (tmp_path / "out").exists()


# --- Tune and Optuna on a synthetic objective ---------------------------------------------------------


def _run_synthetic(folder: Path, trials: int, seed: int, concurrency: int = 2) -> list:
    def objective(config: dict, report) -> None:
        report({"loss": (config["x"] - 0.3) ** 2, "fraction": 1.0, "rows": 1})

    settings = TrialSettings("loss", "min", trials=trials, concurrency=concurrency, seed=seed)
    grid = run_trials(objective, {"x": Range(0.0, 1.0)}, settings, str(folder))
    return trial_records(grid, {"x": Range(0.0, 1.0)}, "loss")


def test_one_parameter_search_finds_the_optimum_and_is_reproducible(ray_local: None, tmp_path: Path) -> None:
    records = _run_synthetic(tmp_path / "a", trials=16, seed=7)
    assert len(records) == 16 and all(r.state == "complete" for r in records)
    best = best_record(records, "min")
    assert abs(best.point["x"] - 0.3) < 0.05, best
    # TPE beats its own random start-up phase (Optuna's first 10 trials are random).
    assert best.score is not None and best.score < min(r.score or 1.0 for r in records[:10])
    # Sequential trials are reproducible from the seed (at concurrency > 1 Tune may interleave
    # suggestions and results differently from run to run).
    once = _run_synthetic(tmp_path / "b", trials=6, seed=5, concurrency=1)
    again = _run_synthetic(tmp_path / "c", trials=6, seed=5, concurrency=1)
    assert [r.point for r in again] == [r.point for r in once]
    assert [r.point for r in once[:4]] != [r.point for r in records[:4]]  # another seed, other points


DRIVER = textwrap.dedent("""
    import sys, time
    import ray
    from modelstock.recipe_search import Range
    from pipeline.search import TrialSettings, run_trials, trial_records

    address, folder, log, phase = sys.argv[1:5]
    ray.init(address=address, log_to_driver=False)

    def objective(config, report):
        x = round(config["x"], 12)
        with open(log, "a") as f:
            f.write(f"{phase} start {x}\\n")
        time.sleep(0.6)
        with open(log, "a") as f:
            f.write(f"{phase} done {x}\\n")
        report({"loss": (x - 0.5) ** 2, "fraction": 1.0, "rows": 1})

    space = {"x": Range(0.0, 1.0)}
    grid = run_trials(objective, space, TrialSettings("loss", "min", trials=6, concurrency=1, seed=3), folder)
    records = trial_records(grid, space, "loss")
    print("RESULT", [(r.number, round(r.point["x"], 12), r.state) for r in records], flush=True)
""")


def test_a_killed_driver_resumes_without_rerunning_finished_trials(ray_local: None, tmp_path: Path) -> None:
    script, log, folder = tmp_path / "driver.py", tmp_path / "trials.log", tmp_path / "experiment"
    script.write_text(DRIVER)
    address = ray.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(REPO), "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    command = [sys.executable, str(script), address, str(folder), str(log)]
    first = subprocess.Popen([*command, "first"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines() if log.exists() else []
        if sum(" done " in line for line in lines) >= 3:
            break
        assert first.poll() is None, first.stdout.read().decode() if first.stdout else ""
        time.sleep(0.2)
    time.sleep(1.5)  # Tune records the finished trial in its experiment state
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL
    before = log.read_text().splitlines()
    finished_before = {line.split()[2] for line in before if " done " in line}
    assert 3 <= len(finished_before) < 6

    second = subprocess.run([*command, "second"], env=env, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stdout + second.stderr
    result = eval(next(line for line in second.stdout.splitlines() if line.startswith("RESULT"))[len("RESULT "):])
    assert len(result) == 6 and all(state == "complete" for _, _, state in result)
    rerun = {line.split()[2] for line in log.read_text().splitlines()[len(before):] if " start " in line}
    final = {str(x) for _, x, _ in result}
    kept = (finished_before & final) - rerun
    assert len(kept) >= 3, (finished_before, rerun)  # finished trials came back from the state, not re-run
    assert not (finished_before & final & rerun)


# --- the merge-and-score objective on a real family ---------------------------------------------------


def test_scratch_merges_are_scored_and_removed(ray_local: None, text_family: TextFamily, tmp_path: Path,
                                               one_torch_thread: None) -> None:
    write_text_sets(tmp_path / "data")
    suite = parse_suite(yaml.safe_load(suite_yaml(str(tmp_path / "data"))))
    spec = parse_search_spec(spec_for(text_family, trials=2, merge="scratch", seed=1))
    out = tmp_path / "out"
    result = run_search(SearchRequest(spec=spec, suite=suite, out_url=str(out), progress=False))
    assert not result.in_memory
    assert not (out / SCRATCH_DIR).exists()
    assert (out / "modelstock-manifest.json").exists()
    table = pq.read_table(out / TABLE_FILE).to_pylist()
    assert len(table) == 2 and min(row["perplexity"] for row in table) == result.best.score
    assert json.loads((out / "modelstock-search.json").read_text())["best_trial"] == result.best.number
    written = load_recipe(out / "modelstock-recipe.yml")
    assert all(isinstance(v, float) for v in written.parameters["lambda"])  # a plain recipe, gradients written out

    # The same point merged in memory scores the same: the two merge paths agree.
    scores: list[float] = []
    held = suite.held_out
    assert held is not None
    objective = CandidateObjective(spec, suite, tuple(plan_dataset_shards(held, suite.rows_per_shard)), 1, True,
                                   str(tmp_path / "unused"), "perplexity")
    objective(dict(result.best.point), lambda metrics: scores.append(metrics["perplexity"]))
    assert scores == [pytest.approx(result.best.score, rel=1e-5)]
