"""`ray job submit -- modelstock merge …` against real Ray heads on loopback: an open
head, and one with Ray token authentication (issue #14), which must refuse a submitter without its
token, in one line, and accept one with it, without the token showing up anywhere a job's viewers
or logs can see it.

The heads run as their own process groups with their own temp dirs and ports (cluster.testing), so
they are stopped by PID without touching anyone else's Ray (never `ray stop`).
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray.job_submission import JobStatus
from safetensors.torch import load_file

from cluster.errors import ClusterAccessDenied
from cluster.jobs import RECIPE_NAME, connect, submit_merge, wait_for_job
from cluster.jobs import main as jobs_main
from cluster.testing import LocalCluster, start_head, stop, write_token
from modelstock.errors import InputError

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 120
MERGE_FLAGS = ["--quiet", "--shard-size", "20KB"]


@pytest.fixture(scope="module")
def ray_head() -> Iterator[LocalCluster]:
    head = start_head()
    yield head
    stop(head)


@pytest.fixture(scope="module")
def token_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    head = start_head(token_file=write_token(tmp_path_factory.mktemp("ray-token")))
    yield head
    stop(head)


@pytest.fixture
def with_token(token_head: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> str:
    """This process sends the token head's token, as a submitter who has it would; the token."""
    assert token_head.token_file is not None
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_head.token_file))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    return token_head.token_file.read_text().strip()


def _write_recipe(folder: Path, family, out_name: str = RECIPE_NAME) -> Path:
    # Absolute model paths: the job runs in Ray's copy of the working dir, not here.
    folder.mkdir(parents=True, exist_ok=True)
    recipe = folder / out_name
    recipe.write_text(
        f"merge_method: model_stock\nbase_model: {family.base}\nmodels:\n"
        + "".join(f"  - model: {path}\n" for path in family.finetunes[:2])
    )
    return recipe


def _assert_merged(out: Path, family) -> None:
    assert (out / "modelstock-manifest.json").is_file()
    shards = sorted(out.glob("*.safetensors"))
    assert shards, f"no shards in {out}"
    merged: dict = {}
    for shard in shards:
        merged.update(load_file(shard))
    base = load_file(family.base / "model.safetensors")
    assert set(merged) == set(base)
    assert all(merged[name].shape == base[name].shape for name in base)
    # A merge of distinct fine-tunes moves the weights off the base.
    assert any(not merged[name].equal(base[name]) for name in base)


def _ray_job_submit(head: LocalCluster, job_dir: Path, out: Path, token: bool,
                    submission_id: str) -> subprocess.CompletedProcess:
    command = [
        str(VENV_BIN / "ray"), "job", "submit", "--address", head.dashboard_url,
        "--submission-id", submission_id, "--working-dir", str(job_dir),
        "--", "modelstock", "merge", RECIPE_NAME, str(out), *MERGE_FLAGS,
    ]
    return subprocess.run(command, env=head.client_env(token=token), capture_output=True, text=True,
                          timeout=JOB_TIMEOUT_S)


def test_ray_job_submit_cli_runs_merge(ray_head: LocalCluster, tiny_family, tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    _write_recipe(job_dir, tiny_family)
    out = tmp_path / "merged"
    submission_id = f"modelstock-test-{uuid.uuid4().hex[:8]}"
    result = _ray_job_submit(ray_head, job_dir, out, token=False, submission_id=submission_id)
    logs = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, logs

    client = connect(ray_head.dashboard_url)
    assert client.get_job_status(submission_id) == JobStatus.SUCCEEDED, logs
    assert "merged" in client.get_job_logs(submission_id)
    _assert_merged(out, tiny_family)


def test_submit_merge_helper_stages_recipe_and_reports_failure(ray_head: LocalCluster, tiny_family,
                                                               tmp_path: Path) -> None:
    recipe = _write_recipe(tmp_path / "recipes", tiny_family, out_name="stock.yml")
    out = tmp_path / "merged"
    client = connect(ray_head.dashboard_url)
    job = submit_merge(client, recipe, str(out), merge_args=MERGE_FLAGS)
    assert wait_for_job(client, job, timeout_s=JOB_TIMEOUT_S) == JobStatus.SUCCEEDED, client.get_job_logs(job)
    _assert_merged(out, tiny_family)

    # The same output at a different shard size is refused by the merge (exit 2): the job FAILED.
    failed = submit_merge(ray_head.dashboard_url, recipe, str(out), merge_args=["--quiet", "--shard-size", "1MB"])
    assert wait_for_job(client, failed, timeout_s=JOB_TIMEOUT_S) == JobStatus.FAILED
    assert "--overwrite" in client.get_job_logs(failed)


# --- a head with Ray token authentication ----------------------------------------------------------


def test_ray_job_submit_cli_needs_the_token(token_head: LocalCluster, tiny_family, tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    _write_recipe(job_dir, tiny_family)
    out = tmp_path / "merged"

    refused = _ray_job_submit(token_head, job_dir, out, token=False, submission_id=f"refused-{uuid.uuid4().hex[:8]}")
    assert refused.returncode != 0
    assert "Unauthorized" in refused.stdout + refused.stderr
    assert not out.exists()

    result = _ray_job_submit(token_head, job_dir, out, token=True, submission_id=f"ok-{uuid.uuid4().hex[:8]}")
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    _assert_merged(out, tiny_family)  # the job's own driver joined the cluster: it inherits the token


def test_jobs_helper_refuses_without_the_token_in_one_line(
    token_head: LocalCluster, tiny_family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    recipe = _write_recipe(tmp_path / "recipes", tiny_family)
    out = str(tmp_path / "merged")
    for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(ClusterAccessDenied, match="requires a Ray token and RAY_AUTH_MODE is disabled") as refused:
        submit_merge(token_head.dashboard_url, recipe, out, merge_args=MERGE_FLAGS)
    assert isinstance(refused.value, InputError) and "\n" not in str(refused.value)
    assert jobs_main(["--address", token_head.dashboard_url, str(recipe), out, "--", *MERGE_FLAGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cluster.jobs: error: ") and "RAY_AUTH_MODE=token" in err[-1]

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    with pytest.raises(ClusterAccessDenied, match="refused the Ray token from RAY_AUTH_TOKEN"):
        connect(token_head.dashboard_url)

    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing-token"))
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    with pytest.raises(ClusterAccessDenied, match="cannot be read"):  # checked before connecting
        connect(token_head.dashboard_url)
    assert not Path(out).exists()


def test_jobs_helper_with_the_token_runs_merge_and_shows_it_nowhere(
    token_head: LocalCluster, with_token: str, tiny_family, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    recipe = _write_recipe(tmp_path / "recipes", tiny_family)
    out = tmp_path / "merged"
    code = jobs_main(["--address", token_head.dashboard_url, "--wait", "--timeout", str(JOB_TIMEOUT_S),
                      str(recipe), str(out), "--", *MERGE_FLAGS])
    printed = capsys.readouterr()
    assert code == 0, printed.out + printed.err
    _assert_merged(out, tiny_family)

    # Everything anyone who reaches the dashboard, or reads the cluster's logs, can see.
    client = connect(token_head.dashboard_url)
    seen = [printed.out, printed.err]
    for job in client.list_jobs():
        seen += [str(job.entrypoint), str(job.runtime_env), str(job.metadata), client.get_job_logs(job.submission_id)]
    for path in token_head.temp_dir.rglob("*"):
        if path.is_file() and path.suffix in {".log", ".out", ".err", ".json", ".txt", ""}:
            seen.append(path.read_text(errors="replace"))
    leaks = [text[:200] for text in seen if with_token in text]
    assert not leaks, leaks
