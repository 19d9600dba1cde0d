"""Fault drills: the S3 server restarting mid-merge, a worker killed mid-merge, the output store
gone for good. Each either completes bit-identical to a clean merge or fails clearly with no
half-written (manifest-bearing) output. (Driver kill + resume and racing merges: test_pipeline.)"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from modelstock import storage
from modelstock.errors import StorageError
from modelstock.output import MANIFEST_FILE, PROGRESS_DIR, STATE_DIR
from modelstock.recipe import parse_recipe
from modelstock.testing.synthetic import LlamaShape, write_family
from pipeline.cli import main
from pipeline.driver import MergeRequest, run_merge

SHAPE = LlamaShape(hidden=32, intermediate=64, layers=2, vocab=128, heads=4, kv_heads=2)
SHARD_SIZE = 8_000
# Make s3fs/botocore give up at once so faults reach storage.py's own retry and classification.
FAST_FAIL = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 20}}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    return write_family(tmp_path_factory.mktemp("family"), SHAPE, finetunes=2, dtype=torch.bfloat16, seed=9)


def recipe_for(base: str, tuned: list[str]):
    return parse_recipe({"merge_method": "model_stock", "base_model": base, "models": [{"model": t} for t in tuned]})


def local_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def reference(family, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Shard hashes of a clean local merge (local and s3 merges are byte-identical: test_s3)."""
    import ray
    from conftest import start_local_ray

    if not ray.is_initialized():
        start_local_ray()
    out = tmp_path_factory.mktemp("reference") / "out"
    run_merge(MergeRequest(recipe=recipe_for(*family), out_url=str(out), shard_size=SHARD_SIZE, progress=False))
    hashes = local_hashes(out)
    assert len(hashes) >= 4
    return hashes


# -- (a) the S3 server restarts mid-merge ------------------------------------------------------------


def test_storage_faults_of_a_dead_endpoint_are_classified_transient(s3) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(**{**s3.options, **FAST_FAIL})
    fs.pipe_file(f"{s3.name}/x", b"hello")
    s3.server.stop()
    try:
        with pytest.raises(StorageError, match="EndpointConnectionError"):
            storage.storage_call("x", lambda: fs.cat_file(f"{s3.name}/x"), retries=())
        # With retries, an outage shorter than the backoff is ridden out.
        threading.Timer(0.8, s3.server.start).start()
        assert storage.storage_call("x", lambda: fs.cat_file(f"{s3.name}/x"), retries=(0.5, 1.0, 2.0)) == b"hello"
    finally:
        if s3.server._server is None:
            time.sleep(1)
            if s3.server._server is None:
                s3.server.start()


def test_truncated_body_is_transient() -> None:
    """A server that promises more bytes than it sends: aiohttp's payload error is retried."""
    import s3fs

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nETag: \"e\"\r\n\r\nonly-a-little")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        fs = s3fs.S3FileSystem(key="k", secret="s", endpoint_url=f"http://127.0.0.1:{listener.getsockname()[1]}",
                               skip_instance_cache=True, **FAST_FAIL)
        caught: list[BaseException] = []
        try:
            fs.cat_file("bucket/object", start=0, end=1000)
        except Exception as exc:
            caught.append(exc)
        assert caught, "the truncated body was accepted"
        assert storage.is_transient(caught[0]), repr(caught[0])
    finally:
        stop.set()
        thread.join()
        listener.close()


def test_s3_server_restarted_mid_merge_completes_bit_identical(s3, family, reference, tmp_path: Path, ray_local) -> None:
    base, tuned = family
    base_url = s3.upload(Path(base), "in/base")
    tuned_urls = [s3.upload(Path(t), f"in/{Path(t).name}") for t in tuned]
    options = {**s3.options, **FAST_FAIL}
    request = MergeRequest(recipe=recipe_for(base_url, tuned_urls), out_url=s3.url("out"), storage_options=options,
                           shard_size=SHARD_SIZE, workers=2, progress=False)
    s3.server.clear()
    results, errors = [], []

    def run() -> None:
        try:
            results.append(run_merge(request))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
        r.method == "PUT" and r.path.endswith(".safetensors") for r in list(s3.server.requests)
    ):
        time.sleep(0.02)
    assert thread.is_alive(), "the merge finished before the outage"
    s3.server.stop()
    time.sleep(1.5)  # workers' reads and writes fail meanwhile
    s3.server.start()
    thread.join(timeout=150)
    assert not thread.is_alive() and not errors, errors

    manifest = json.loads(s3.fs.cat_file(f"{s3.name}/out/{MANIFEST_FILE}"))
    got = {s["file"]: hashlib.sha256(s3.fs.cat_file(f"{s3.name}/out/{s['file']}")).hexdigest() for s in manifest["shards"]}
    assert got == reference
    assert {s["file"]: s["sha256"] for s in manifest["shards"]} == reference
    keys = [k.rsplit("/out/", 1)[1] for k in s3.fs.find(f"{s3.name}/out")]
    assert not [k for k in keys if ".partial" in k or k.endswith("lock.json")], keys
    assert sorted(k for k in keys if k.endswith(".safetensors")) == sorted(reference)


# -- (b) a worker process killed mid-merge ------------------------------------------------------------


def my_shard_workers() -> list[psutil.Process]:
    """Ray workers of this process's own local Ray (other users' Rays are not our children)."""
    found = []
    for child in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "ray::merge_shard_task" in " ".join(child.cmdline()):
                found.append(child)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_worker_killed_mid_merge_is_retried_bit_identical(family, reference, tmp_path: Path, ray_local) -> None:
    out = tmp_path / "out"
    request = MergeRequest(recipe=recipe_for(*family), out_url=str(out), shard_size=SHARD_SIZE, workers=1,
                           memory_budget=1, progress=False)
    results, errors = [], []

    def run() -> None:
        try:
            results.append(run_merge(request))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    progress = out / STATE_DIR / PROGRESS_DIR
    killed = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and killed is None and thread.is_alive():
        if progress.exists() and any(progress.iterdir()):
            for worker in my_shard_workers():
                worker.send_signal(signal.SIGKILL)
                killed = worker.pid
                break
        time.sleep(0.01)
    assert killed, "no running merge_shard_task worker found to kill"
    thread.join(timeout=150)
    assert not thread.is_alive() and not errors, errors
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == psutil.STATUS_ZOMBIE
    assert local_hashes(out) == reference
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert {s["file"]: s["sha256"] for s in manifest["shards"]} == reference
    assert not list(out.rglob("*.partial*"))


# -- (c) the output store fails for good ---------------------------------------------------------


def test_output_store_gone_for_good_fails_with_exit_1_and_no_manifest(
    s3, family, tmp_path: Path, ray_local, capsys, monkeypatch
) -> None:
    """Every shard is written, then the store dies before the commit: exit code 1, one line naming
    the output, no manifest (the folder is not a finished merge) once the store is back."""
    import pipeline.driver as driver

    base, tuned = family
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: model_stock\nbase_model: {base}\nmodels:\n" + "".join(f"  - model: {t}\n" for t in tuned))
    monkeypatch.setattr(storage, "RETRY_POLICY", storage.RetryPolicy(first_delay_s=0.05, max_attempts=3, deadline_s=1))
    real_commit = driver.commit

    def commit_after_outage(*args, **kwargs):
        s3.server.stop()
        return real_commit(*args, **kwargs)

    monkeypatch.setattr(driver, "commit", commit_after_outage)
    try:
        code = main(["merge", str(recipe), s3.url("out"), "--quiet", "--shard-size", str(SHARD_SIZE),
                     "--storage-options", json.dumps({**s3.options, **FAST_FAIL})])
    finally:
        if s3.server._server is None:
            s3.server.start()
    err = capsys.readouterr().err.splitlines()
    assert code == 1, err
    assert len(err) == 1 and err[0].startswith("modelstock: failed: ") and s3.url("out") in err[0], err
    assert "storage failed" in err[0], err
    keys = [k.rsplit("/out/", 1)[1] for k in s3.fs.find(f"{s3.name}/out")]
    assert MANIFEST_FILE not in keys and any(k.endswith(".safetensors") for k in keys), keys
