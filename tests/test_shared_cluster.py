"""Several merges at once on one cluster that lets no one else in (issue #14): a simulated 3-node
cluster on loopback with Ray token authentication, four `modelstock merge --address` runs started
together (two pairs merging the same inputs to different outputs), each bit-identical, shard by
shard, to the same merge run alone; every shard task bounded by the resources it declares; and a
client without the cluster's token refused in one line."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.testing import LocalCluster, start_simulated_cluster, stop, write_token
from modelstock.testing.synthetic import LlamaShape, write_family

pytestmark = pytest.mark.slow

MODELSTOCK = Path(sys.executable).parent / "modelstock"
MERGE_FLAGS = ["--quiet", "--shard-size", "200KB"]
MERGE_TIMEOUT_S = 240
QUICK_REFUSAL = {"RAY_gcs_server_port_wait_time_s": "2"}  # Ray's own retry window for a refused connection


@dataclass(frozen=True)
class Merges:
    together: list[dict[str, str]]  # sha256 of every shard, per merge, all four run at once
    alone: list[dict[str, str]]  # the same merges, one at a time, in the same order as together
    shards_computed: int  # by all runs, together and alone


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = start_simulated_cluster(nodes=3, cpus_per_node=1,
                                      token_file=write_token(tmp_path_factory.mktemp("ray-token")))
    yield cluster
    stop(cluster)


@pytest.fixture(scope="module")
def recipes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Model Stock recipes over two different tiny Llama families."""
    root = tmp_path_factory.mktemp("families")
    made = []
    for seed in (0, 1):
        base, tuned = write_family(root / f"family-{seed}", LlamaShape(), finetunes=2, seed=seed)
        recipe = root / f"stock-{seed}.yml"
        recipe.write_text(f"merge_method: model_stock\nbase_model: {base}\nmodels:\n"
                          + "".join(f"  - model: {path}\n" for path in tuned))
        made.append(recipe)
    return made


def _merge(recipe: Path, out: Path, address: str) -> list[str]:
    return [str(MODELSTOCK), "merge", str(recipe), str(out), "--address", address, *MERGE_FLAGS]


def _shard_digests(out: Path) -> dict[str, str]:
    assert (out / "modelstock-manifest.json").is_file(), f"{out}: no manifest, the merge did not finish"
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(out.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def merges(shared_cluster: LocalCluster, recipes: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Merges:
    root = tmp_path_factory.mktemp("outputs")
    runs = [recipes[0], recipes[0], recipes[1], recipes[1]]
    env = shared_cluster.client_env()
    started = [subprocess.Popen(_merge(recipe, root / f"together-{i}", shared_cluster.gcs_address), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i, recipe in enumerate(runs)]
    finished = [(process, *process.communicate(timeout=MERGE_TIMEOUT_S)) for process in started]
    for process, out, err in finished:
        assert process.returncode == 0, f"stdout:\n{out}\nstderr:\n{err[-3000:]}"
    # Alone: each distinct merge once, on the cluster left idle.
    alone = {}
    for i, recipe in enumerate(recipes):
        result = subprocess.run(_merge(recipe, root / f"alone-{i}", shared_cluster.gcs_address), env=env,
                                capture_output=True, text=True, timeout=MERGE_TIMEOUT_S)
        assert result.returncode == 0, result.stderr[-3000:]
        alone[recipe] = _shard_digests(root / f"alone-{i}")
    together = [_shard_digests(root / f"together-{i}") for i in range(len(runs))]
    shards = sum(len(digests) for digests in [*together, *alone.values()])
    return Merges(together=together, alone=[alone[recipe] for recipe in runs], shards_computed=shards)


def test_four_merges_at_once_match_each_merge_alone(merges: Merges) -> None:
    for together, alone in zip(merges.together, merges.alone):
        assert len(together) > 1, "each merge should have several shard tasks to interleave"
        assert together == alone
    # Same inputs, different outputs, at the same time: neither disturbed the other.
    assert merges.together[0] == merges.together[1] and merges.together[2] == merges.together[3]
    assert merges.together[0] != merges.together[2]


def _shard_tasks(cluster: LocalCluster) -> list[dict]:
    """Every shard task the cluster ran, from Ray's state API (which wants the token too)."""
    assert cluster.token_file is not None
    query = urllib.parse.urlencode({"detail": "1", "limit": "10000", "filter_keys": "name",
                                    "filter_predicates": "=", "filter_values": "merge_shard_task"})
    request = urllib.request.Request(f"{cluster.dashboard_url}/api/v0/tasks?{query}",
                                     headers={"Authorization": f"Bearer {cluster.token_file.read_text().strip()}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["data"]["result"]["result"]


def test_every_shard_task_declares_its_cpus_or_gpu_and_its_memory(shared_cluster: LocalCluster,
                                                                   merges: Merges) -> None:
    tasks = _shard_tasks(shared_cluster)
    assert len(tasks) == merges.shards_computed
    for task in tasks:
        resources = task["required_resources"]
        assert resources.get("CPU", 0) >= 1 or resources.get("GPU", 0) >= 1, resources
        assert resources.get("memory", 0) > 0, f"a shard task must declare the memory it holds: {resources}"
        assert task["state"] == "FINISHED"
    assert len({task["node_id"] for task in tasks}) > 1, "the shards spread over the cluster's nodes"


@pytest.mark.parametrize(("token", "says"), [
    (False, "the cluster requires a Ray token and RAY_AUTH_MODE is unset; set RAY_AUTH_MODE=token"),
    ("not-the-token", "refused the Ray token from RAY_AUTH_TOKEN: it is not this cluster's token"),
])
def test_merge_without_the_token_is_refused_in_one_line(shared_cluster: LocalCluster, recipes: list[Path],
                                                        tmp_path: Path, token: bool | str, says: str) -> None:
    out = tmp_path / "merged"
    env = {**shared_cluster.client_env(token=token), **QUICK_REFUSAL}
    result = subprocess.run(_merge(recipes[0], out, shared_cluster.gcs_address), env=env, capture_output=True,
                            text=True, timeout=MERGE_TIMEOUT_S)
    assert result.returncode == 2, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"modelstock: error: {shared_cluster.gcs_address} ") and says in last_line
    assert not (out / "modelstock-manifest.json").exists()
