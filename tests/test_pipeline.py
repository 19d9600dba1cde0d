"""The Ray pipeline: bit-identical output whatever the workers or nodes, resume, faults."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from modelstock.output import MANIFEST_FILE, PROGRESS_DIR, STATE_DIR
from modelstock.recipe import parse_recipe
from modelstock.testing.synthetic import LlamaShape, write_family
from pipeline.driver import MergeRequest, run_merge

SHAPE = LlamaShape(hidden=64, intermediate=160, layers=4, vocab=512, heads=4, kv_heads=2)
SHARD_SIZE = 40_000  # ~10 shards for SHAPE in bf16


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    return write_family(tmp_path_factory.mktemp("family"), SHAPE, finetunes=3, dtype=torch.bfloat16, seed=3)


def recipe_for(family: tuple[str, list[str]], filter_wise: bool = False):
    base, tuned = family
    return parse_recipe({
        "merge_method": "model_stock",
        "base_model": base,
        "models": [{"model": m} for m in tuned],
        "parameters": {"filter_wise": filter_wise},
    })


def shard_hashes(out: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.glob("*.safetensors"))
    }


def merge(family, out: Path, **options) -> object:
    request = MergeRequest(recipe=recipe_for(family), out_url=str(out), shard_size=SHARD_SIZE, progress=False, **options)
    return run_merge(request)


def test_output_is_bit_identical_with_1_2_and_4_workers(family, tmp_path: Path, ray_local) -> None:
    hashes = []
    for workers in (1, 2, 4):
        out = tmp_path / f"w{workers}"
        result = merge(family, out, workers=workers)
        assert len(result.shards) >= 8
        manifest = json.loads((out / MANIFEST_FILE).read_text())
        assert {s["file"]: s["sha256"] for s in manifest["shards"]} == shard_hashes(out)
        hashes.append(shard_hashes(out))
    assert hashes[0] == hashes[1] == hashes[2]


def test_chunked_merge_equals_unchunked(family, tmp_path: Path, ray_local) -> None:
    whole = merge(family, tmp_path / "whole", memory_budget=1 << 30)
    # A budget far below one tensor's inputs forces the two-pass chunked path everywhere.
    chunked = merge(family, tmp_path / "chunked", memory_budget=1)
    assert shard_hashes(tmp_path / "whole") == shard_hashes(tmp_path / "chunked")
    assert [s.sha256 for s in whole.shards] == [s.sha256 for s in chunked.shards]


def test_rerun_is_a_no_op_and_other_recipe_is_refused(family, tmp_path: Path, ray_local) -> None:
    from modelstock.errors import OutputConflict

    out = tmp_path / "out"
    merge(family, out)
    again = merge(family, out)
    assert again.already_complete
    other = MergeRequest(recipe=recipe_for(family, filter_wise=True), out_url=str(out), shard_size=SHARD_SIZE, progress=False)
    with pytest.raises(OutputConflict, match="--overwrite"):
        run_merge(other)
    replaced = run_merge(MergeRequest(**{**other.__dict__, "overwrite": True}))
    assert len(replaced.computed) == len(replaced.shards)


@pytest.fixture
def three_node_cluster():
    """Head + 2 worker nodes on loopback, 1 CPU each (the session's local Ray is stopped first)."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
    cluster.wait_for_nodes()
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_multi_node_spreads_shards_and_survives_a_node_removal(family, tmp_path: Path, three_node_cluster) -> None:
    cluster, workers = three_node_cluster
    reference = tmp_path / "reference"
    outcome = merge(family, reference)
    nodes = {s.node_id for s in outcome.shards}
    assert len(nodes) >= 2, f"shards ran on {nodes}"

    # Second merge: remove a worker node as soon as the first shard is reported done.
    out = tmp_path / "node-lost"
    progress = out / STATE_DIR / PROGRESS_DIR
    errors: list[BaseException] = []
    results = []

    def run() -> None:
        try:
            results.append(merge(family, out, memory_budget=1))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (progress.exists() and any(progress.iterdir())):
        time.sleep(0.05)
    cluster.remove_node(workers[0])
    thread.join(timeout=180)
    assert not thread.is_alive()
    assert not errors, errors
    assert shard_hashes(out) == shard_hashes(reference)
    assert not list(out.glob("*.partial*"))


DRIVER = """
import sys
from pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_driver_killed_mid_merge_resumes_without_recomputing(family, tmp_path: Path, ray_local) -> None:
    base, tuned = family
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"merge_method: model_stock\nbase_model: {base}\nmodels:\n" + "".join(f"  - model: {m}\n" for m in tuned)
    )
    reference = tmp_path / "reference"
    merge(family, reference)

    out = tmp_path / "out"
    progress = out / STATE_DIR / PROGRESS_DIR
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    process = subprocess.Popen(
        [sys.executable, "-c", DRIVER, "merge", str(recipe), str(out), "--quiet", "--workers", "1",
         "--shard-size", str(SHARD_SIZE), "--memory-budget", "1"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(progress.glob("*.json")) if progress.exists() else []) < 2:
        assert process.poll() is None, "the merge finished before it could be killed"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and its embedded Ray
    process.wait()
    assert not (out / MANIFEST_FILE).exists()
    finished = {p.name: json.loads(p.read_text())["attempt"] for p in progress.glob("*.json")}
    assert finished

    result = merge(family, out, workers=1)
    assert set(result.resumed) >= {name.removesuffix(".json") for name in finished}
    after = {p.name: json.loads(p.read_text())["attempt"] for p in progress.glob("*.json")}
    assert all(after[name] == attempt for name, attempt in finished.items())
    assert shard_hashes(out) == shard_hashes(reference)
    assert (out / MANIFEST_FILE).exists()
    assert not list(out.glob("*.partial*"))
    assert len(result.computed) + len(result.resumed) == len(result.shards)


def test_two_merges_racing_to_one_output_never_mix(family, tmp_path: Path, ray_local) -> None:
    from modelstock.errors import OutputConflict

    out = tmp_path / "raced"
    requests = [
        MergeRequest(recipe=recipe_for(family, filter_wise=fw), out_url=str(out), shard_size=SHARD_SIZE, progress=False)
        for fw in (False, True)
    ]
    outcomes: dict[int, object] = {}
    start = threading.Barrier(2)

    def run(index: int) -> None:
        start.wait()
        try:
            outcomes[index] = run_merge(requests[index])
        except OutputConflict as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    refused = [i for i, o in outcomes.items() if isinstance(o, OutputConflict)]
    assert len(refused) == 1, outcomes
    winner = outcomes[1 - refused[0]]
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["plan_sha256"] == winner.plan_digest
    assert {s["file"]: s["sha256"] for s in manifest["shards"]} == shard_hashes(out)
    assert not (out / STATE_DIR / "lock.json").exists()
