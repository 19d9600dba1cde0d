"""Bucket-scale I/O against the loopback store simulator (a real S3 + plain-HTTP server process):
merges that ride out injected store faults bit-identically, fetch only the bytes they need, refuse
an input replaced mid-merge, upload shards as concurrent multipart parts (or leave nothing), and a
dead endpoint that fails within the documented bound (docs/ARCHITECTURE.md, "Storage I/O")."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import torch
from botocore.config import Config

from modelstock import backends, storage
from modelstock.checkpoint.reader import open_checkpoint
from modelstock.checkpoint.writer import ShardWriter, TensorSpec
from modelstock.dtypes import row_view
from modelstock.errors import StorageError
from modelstock.fetch import ChunkFetcher, ChunkRead, coalesce_small_ranges
from modelstock.output import MANIFEST_FILE
from modelstock.recipe import parse_recipe
from modelstock.shard import merge_into_shard
from modelstock.testing.store_simulator import (
    FaultKind,
    FaultRule,
    SimulatorConfig,
    StoreSimulator,
    ThrottleConfig,
)
from modelstock.testing.synthetic import LlamaShape, write_family
from pipeline.cli import main
from pipeline.driver import MergeRequest, prepare_merge, run_merge

MIB = 2**20
# Wide enough that the big tensors (embeddings, MLP) are ranges of their own, split into parts,
# while norms and small projections are coalesced: both paths of the read scheduler run.
SHAPE = LlamaShape(hidden=512, intermediate=1536, layers=2, vocab=4096, heads=8, kv_heads=2)
SMALL = LlamaShape(hidden=256, intermediate=512, layers=2, vocab=1024, heads=4, kv_heads=2)
SHARD_SIZE = 12_000_000  # two shards, each larger than one upload part: multipart under faults
# The documented bound for a dead endpoint, before Ray starts (docs/ARCHITECTURE.md).
DEAD_ENDPOINT_BOUND_S = storage.RETRY_POLICY.deadline_s + backends.CONNECT_TIMEOUT_S


@pytest.fixture(scope="module")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSimulator]:
    with StoreSimulator(tmp_path_factory.mktemp("store")) as running:
        yield running


@pytest.fixture
def sim(simulator: StoreSimulator) -> Iterator[StoreSimulator]:
    simulator.start()
    simulator.configure(SimulatorConfig())
    simulator.reset_stats()
    yield simulator
    simulator.start()
    simulator.configure(SimulatorConfig())


@pytest.fixture(scope="module")
def family(simulator: StoreSimulator) -> tuple[str, list[str]]:
    """Base + 2 fine-tunes, bf16, placed in the store's ``inputs`` bucket (read-only for tests)."""
    return write_family(simulator.bucket_path("inputs") / "wide", SHAPE, finetunes=2, dtype=torch.bfloat16, seed=3)


@pytest.fixture(scope="module")
def reference(family, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Shard sha256 of a clean merge of the same files read locally."""
    import ray
    from conftest import start_local_ray

    if not ray.is_initialized():
        start_local_ray()
    out = tmp_path_factory.mktemp("reference") / "out"
    request = MergeRequest(recipe=recipe_for(*family), out_url=str(out), shard_size=SHARD_SIZE, progress=False)
    result = run_merge(request)
    assert len(result.shards) == 2
    return {s.file: s.sha256 for s in result.shards}


def recipe_for(base: str, tuned: list[str]):
    return parse_recipe({"merge_method": "model_stock", "base_model": base, "models": [{"model": t} for t in tuned]})


def keys_of(folder: str, store_root: Path) -> str:
    return Path(folder).relative_to(store_root / "inputs").as_posix()


def input_urls(sim: StoreSimulator, family: tuple[str, list[str]], protocol: str) -> tuple[str, list[str]]:
    base, tuned = family
    url = sim.s3_url if protocol == "s3" else sim.http_url
    return url("inputs", keys_of(base, sim.root)), [url("inputs", keys_of(t, sim.root)) for t in tuned]


def client_for(sim: StoreSimulator):
    options = sim.s3_storage_options()
    return boto3.client("s3", endpoint_url=sim.endpoint, region_name=sim.region, aws_access_key_id=options["key"],
                        aws_secret_access_key=options["secret"], config=Config(s3={"addressing_style": "path"}))


def bucket(sim: StoreSimulator) -> str:
    name = f"o-{uuid.uuid4().hex[:12]}"
    sim.bucket_path(name)
    return name


def shard_hashes(sim: StoreSimulator, bucket_name: str, prefix: str) -> dict[str, str]:
    folder = sim.bucket_path(bucket_name) / prefix
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def tensor_and_header_bytes(urls: list[str], options: dict) -> tuple[int, int]:
    checkpoints = [open_checkpoint(url, options) for url in urls]
    tensors = sum(c.total_bytes for c in checkpoints)
    return tensors, sum(f.size for c in checkpoints for f in c.files) - tensors


# -- the read scheduler -------------------------------------------------------------------------------


def test_small_neighbouring_tensors_share_one_request_and_big_ones_split_into_parts(family, sim) -> None:
    base, _ = family
    locations = list(open_checkpoint(base).tensors.values())
    schedule = [ChunkRead.same_rows((i, 0, row_view(loc.entry.shape)[0]), (loc,)) for i, loc in enumerate(locations)]
    ranges = [r for chunk in schedule for r in chunk.ranges]
    coalesced = coalesce_small_ranges(ranges)
    small = [r for r in ranges if r.nbytes < MIB]
    shared_requests = len({id(req) for req, _ in coalesced.values()})
    alone = len(small) - len(coalesced)  # between two big tensors in the file (e.g. the final norm)
    assert shared_requests + alone < len(small) // 2
    fetcher = ChunkFetcher(schedule, lambda key: schedule[key[0]], budget=64 * MIB, concurrency=8, part_bytes=MIB)
    with fetcher:
        for chunk in schedule:
            loaded = fetcher.read(chunk.key)
            expected = locations[chunk.key[0]]
            raw = Path(expected.file.path).read_bytes()[expected.entry.start : expected.entry.end]
            assert loaded.tensors[0].contiguous().view(torch.uint8).numpy().tobytes() == raw
            loaded.release()
    total = sum(r.nbytes for r in ranges)
    assert fetcher.bytes_read == total
    own = [r.nbytes for r in ranges if r.key not in coalesced]
    shared = [req.end - req.start for req in {id(req): req for req, _ in coalesced.values()}.values()]
    assert fetcher.requests == sum(-(-n // MIB) for n in own + shared)  # 1 MiB parts here


def test_clean_s3_merge_fetches_only_the_bytes_it_needs_with_many_requests_in_flight(
    sim: StoreSimulator, family, reference, ray_local
) -> None:
    base, tuned = input_urls(sim, family, "s3")
    options = sim.s3_storage_options()
    out_bucket = bucket(sim)
    request = MergeRequest(recipe=recipe_for(base, tuned), out_url=sim.s3_url(out_bucket, "merged"),
                           storage_options=options, shard_size=SHARD_SIZE, workers=1, progress=False)
    prepared = prepare_merge(request)  # the headers: one speculative ranged read per file
    tensors, headers = tensor_and_header_bytes([base, *tuned], options)
    # A per-connection cap, as a cloud store has: requests last long enough to overlap.
    sim.configure(SimulatorConfig(throttle=ThrottleConfig(connection_mib_s=16.0, first_byte_latency_ms=30)))
    sim.reset_stats()
    run_merge(request, prepared)
    stats = sim.stats()
    fetched = stats.bytes_sent_by_method["GET"]
    print(f"\nfetched {fetched} bytes for {tensors} tensor bytes ({fetched / tensors:.4f}x) in "
          f"{stats.requests_by_operation['GetObject']} GETs, up to {stats.max_concurrent_requests} requests at once")
    assert tensors <= fetched <= 1.05 * tensors + headers
    assert stats.max_concurrent_requests >= 16  # one worker, many parts in flight
    assert shard_hashes(sim, out_bucket, "merged") == reference


@pytest.mark.parametrize("protocol", ["s3", "http"])
def test_merge_rides_out_store_faults_bit_identical(
    protocol: str, sim: StoreSimulator, family, reference, tmp_path: Path, ray_local
) -> None:
    base, tuned = input_urls(sim, family, protocol)
    out_bucket = bucket(sim)
    if protocol == "s3":
        out_url, options = sim.s3_url(out_bucket, "merged"), sim.s3_storage_options()
    else:  # plain HTTP is read-only: the output goes to local disk
        out_url, options = str(tmp_path / "merged"), {}
    safetensors = ".safetensors"
    # About a third of the object GETs fail one way or another, and every other part upload.
    sim.configure(SimulatorConfig(seed=11, faults=(
        FaultRule(FaultKind.SLOW_DOWN, every_nth=7, methods=("GET",), key_contains=safetensors),
        FaultRule(FaultKind.RESET_MID_BODY, every_nth=9, methods=("GET",), key_contains=safetensors),
        FaultRule(FaultKind.TRUNCATED_BODY, every_nth=10, methods=("GET",), key_contains=safetensors),
        FaultRule(FaultKind.INTERNAL_ERROR, every_nth=11, methods=("GET", "HEAD")),
        FaultRule(FaultKind.THROTTLE_BURST, every_nth=10, max_count=2, burst_mib_s=8.0, burst_seconds=0.5),
        FaultRule(FaultKind.SLOW_DOWN, every_nth=2, methods=("PUT", "POST"), key_contains=safetensors),
    )))
    result = run_merge(MergeRequest(recipe=recipe_for(base, tuned), out_url=out_url, storage_options=options,
                                    shard_size=SHARD_SIZE, progress=False))
    injected = sim.stats().faults_injected
    print(f"\nfaults injected: {injected}")
    body_faults = {FaultKind.SLOW_DOWN, FaultKind.RESET_MID_BODY, FaultKind.TRUNCATED_BODY, FaultKind.INTERNAL_ERROR}
    assert body_faults <= set(injected), injected
    assert {s.file: s.sha256 for s in result.shards} == reference
    if protocol == "s3":
        assert shard_hashes(sim, out_bucket, "merged") == reference
        assert json.loads((sim.bucket_path(out_bucket) / "merged" / MANIFEST_FILE).read_text())["shards"]
        assert client_for(sim).list_multipart_uploads(Bucket=out_bucket).get("Uploads", []) == []
    else:
        got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "merged").glob("*.safetensors")}
        assert got == reference


# -- pinned inputs ------------------------------------------------------------------------------------


def replace_file(path: Path) -> None:
    """A new version of the same size under the same name (a rename onto it, as a re-upload does)."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    staged = path.with_name(path.name + ".new")
    staged.write_bytes(bytes(data))
    os.replace(staged, path)


def test_input_replaced_mid_merge_is_refused_with_exit_2_and_no_output(
    sim: StoreSimulator, tmp_path: Path, ray_local, capsys: pytest.CaptureFixture[str]
) -> None:
    root = sim.bucket_path("inputs") / f"replaced-{uuid.uuid4().hex[:8]}"
    base, tuned = write_family(root, SHAPE, finetunes=2, dtype=torch.bfloat16, seed=5)
    urls = [sim.s3_url("inputs", keys_of(p, sim.root)) for p in (base, *tuned)]
    out_bucket = bucket(sim)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"merge_method: model_stock\nbase_model: {urls[0]}\nmodels:\n"
                      + "".join(f"  - model: {u}\n" for u in urls[1:]))
    # One request at a time on a slow link: the merge reads for a few seconds, each file in
    # several requests, so the second fine-tune still has requests to make when it is replaced.
    sim.configure(SimulatorConfig(throttle=ThrottleConfig(connection_mib_s=16.0)))
    victim = Path(tuned[1]) / "model.safetensors"
    _, header_bytes = tensor_and_header_bytes(urls, sim.s3_storage_options())
    codes: list[int] = []
    merge = threading.Thread(target=lambda: codes.append(main([
        "merge", str(recipe), sim.s3_url(out_bucket, "merged"), "--quiet", "--workers", "1", "--io-concurrency", "1",
        "--storage-options", json.dumps(sim.s3_storage_options())])))
    sim.reset_stats()
    merge.start()
    deadline = time.monotonic() + 60
    # Header reads (prepare), then the first tensor bytes: replace the second fine-tune now.
    while time.monotonic() < deadline and sim.stats().bytes_sent_by_method.get("GET", 0) < header_bytes + 1_000_000:
        time.sleep(0.02)
    replace_file(victim)
    merge.join(timeout=120)
    assert not merge.is_alive()
    err = capsys.readouterr().err.strip().splitlines()
    assert codes == [2], err
    assert len(err) == 1 and err[0].startswith("modelstock: error: "), err
    assert "finetune-2/model.safetensors: changed since the merge was planned" in err[0], err
    assert sim.stats().precondition_failures >= 1
    client = client_for(sim)
    assert client.list_objects_v2(Bucket=out_bucket).get("KeyCount") == 0
    assert client.list_multipart_uploads(Bucket=out_bucket).get("Uploads", []) == []


def test_local_input_replaced_after_planning_is_refused_and_the_shard_is_absent(tmp_path: Path) -> None:
    base, tuned = write_family(tmp_path / "family", SMALL, finetunes=2, dtype=torch.bfloat16, seed=2)
    request = MergeRequest(recipe=recipe_for(base, tuned), out_url=str(tmp_path / "out"), progress=False)
    prepared = prepare_merge(request)
    (shard,) = prepared.plan.shards
    replace_file(Path(tuned[0]) / "model.safetensors")
    out = storage.resolve(str(tmp_path / "out" / shard.file))
    with pytest.raises(storage.InputChanged, match=r"finetune-1/model.safetensors: changed since the merge was"):
        merge_into_shard(out, shard.tensors, memory_budget=64 * MIB)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_stores_without_conditional_reads_are_checked_around_each_shard(tmp_path: Path) -> None:
    """memory:// cannot condition a read: its files' versions are checked before the shard's first
    read (and after the last), so a file rewritten after planning is refused all the same."""
    root = f"memory://store-io-{uuid.uuid4().hex[:8]}"
    base, tuned = write_family(root, SMALL, finetunes=2, dtype=torch.bfloat16, seed=4)
    request = MergeRequest(recipe=recipe_for(base, tuned), out_url=str(tmp_path / "out"), progress=False)
    (shard,) = prepare_merge(request).plan.shards
    victim = storage.resolve(f"{tuned[1]}/model.safetensors")
    assert not storage.reads_are_conditional(shard.tensors[0].locations[0].file)
    victim.fs.pipe_file(victim.path, victim.fs.cat_file(victim.path) + b"appended")
    with pytest.raises(storage.InputChanged, match=r"finetune-2/model.safetensors: changed since the merge was"):
        merge_into_shard(storage.resolve(str(tmp_path / "out" / shard.file)), shard.tensors, memory_budget=64 * MIB)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_http_reads_are_conditional_and_a_replaced_object_is_refused(sim: StoreSimulator) -> None:
    folder = sim.bucket_path("inputs") / f"cond-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    (folder / "x.bin").write_bytes(os.urandom(100_000))
    for url, options in ((sim.http_url("inputs", f"{folder.name}/x.bin"), {}),
                         (sim.s3_url("inputs", f"{folder.name}/x.bin"), sim.s3_storage_options())):
        location = storage.resolve(url, options)
        location = location.pinned(storage.ObjectVersion.from_info(storage.object_info(location)))
        assert storage.reads_are_conditional(location)
        assert bytes(storage.read_range(location, 10, 20)) == (folder / "x.bin").read_bytes()[10:20]
    replace_file(folder / "x.bin")
    for url, options in ((sim.http_url("inputs", f"{folder.name}/x.bin"), {}),
                         (sim.s3_url("inputs", f"{folder.name}/x.bin"), sim.s3_storage_options())):
        location = storage.resolve(url, options)
        stale = location.pinned(storage.ObjectVersion(100_000, '"not-the-etag"'))
        with pytest.raises(storage.InputChanged, match="changed since the merge was planned"):
            storage.read_range(stale, 0, 10)


# -- multipart uploads --------------------------------------------------------------------------------


def write_shard(location: storage.Location, rows: int, fail_after_rows: int | None = None) -> ShardWriter:
    tensor = torch.arange(rows * 4096, dtype=torch.float32).reshape(rows, 4096)
    writer = ShardWriter(location, [TensorSpec("w", "F32", (rows, 4096))])
    with writer:
        for start in range(0, rows, 64):
            if fail_after_rows is not None and start >= fail_after_rows:
                raise RuntimeError("the merge failed mid-shard")
            writer.write_block("w", tensor[start : start + 64])
    return writer


def test_multipart_upload_runs_parts_concurrently_and_abort_leaves_nothing(sim: StoreSimulator) -> None:
    out_bucket = bucket(sim)
    # A slow link per connection, so that parts overlap only if they are sent concurrently.
    sim.configure(SimulatorConfig(throttle=ThrottleConfig(connection_mib_s=32.0, throttle_uploads=True)))
    location = storage.resolve(sim.s3_url(out_bucket, "out/model-00001-of-00001.safetensors"), sim.s3_storage_options())
    writer = write_shard(location, rows=2560)  # 40 MiB and the header: six parts of at most 8 MiB
    stats = sim.stats()
    assert stats.requests_by_operation["UploadPart"] == -(-writer.result.size // backends.MIN_UPLOAD_PART_BYTES) == 6
    assert stats.requests_by_operation["CompleteMultipartUpload"] == 1
    assert stats.max_concurrent_requests > 1  # nothing else runs: the parts were in flight together
    stored = sim.bucket_path(out_bucket) / "out" / "model-00001-of-00001.safetensors"
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == writer.result.sha256

    sim.reset_stats()
    aborted = storage.resolve(sim.s3_url(out_bucket, "out/model-00002-of-00002.safetensors"), sim.s3_storage_options())
    with pytest.raises(RuntimeError, match="mid-shard"):
        write_shard(aborted, rows=2560, fail_after_rows=1536)  # 24 MiB written: parts were uploaded
    stats = sim.stats()
    assert stats.requests_by_operation["UploadPart"] >= 2
    assert stats.requests_by_operation["AbortMultipartUpload"] == 1
    client = client_for(sim)
    assert client.list_multipart_uploads(Bucket=out_bucket).get("Uploads", []) == []
    assert [o["Key"] for o in client.list_objects_v2(Bucket=out_bucket)["Contents"]] == [
        "out/model-00001-of-00001.safetensors"]


def test_a_small_shard_is_one_put_visible_only_when_whole(sim: StoreSimulator) -> None:
    out_bucket = bucket(sim)
    location = storage.resolve(sim.s3_url(out_bucket, "small.safetensors"), sim.s3_storage_options())
    with pytest.raises(RuntimeError):
        write_shard(location, rows=128, fail_after_rows=64)
    assert not (sim.bucket_path(out_bucket) / "small.safetensors").exists()
    writer = write_shard(location, rows=128)
    assert sim.stats().requests_by_operation.get("CreateMultipartUpload", 0) == 0
    stored = (sim.bucket_path(out_bucket) / "small.safetensors").read_bytes()
    assert hashlib.sha256(stored).hexdigest() == writer.result.sha256


# -- a dead endpoint ----------------------------------------------------------------------------------


def dead_endpoint() -> str:
    """An address where nothing listens (bound, then closed: connections are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_dead_endpoint_fails_within_the_documented_bound_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = {"key": "k", "secret": "s", "endpoint_url": dead_endpoint(),
               "client_kwargs": {"region_name": "eu-west-1"}}
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("merge_method: model_stock\nbase_model: s3://gone/base\nmodels:\n"
                      "  - model: s3://gone/ft-1\n  - model: s3://gone/ft-2\n")
    started = time.monotonic()
    code = main(["merge", str(recipe), str(tmp_path / "out"), "--quiet", "--storage-options", json.dumps(options)])
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err.strip().splitlines()
    print(f"\ndead endpoint: failed in {elapsed:.1f} s (bound {DEAD_ENDPOINT_BOUND_S:.0f} s): {err}")
    assert code == 1, err
    assert len(err) == 1 and err[0].startswith("modelstock: failed: s3://gone/"), err
    assert "storage failed after" in err[0] and "EndpointConnectionError" in err[0], err
    assert elapsed < DEAD_ENDPOINT_BOUND_S + 5  # start-up slack
    assert not (tmp_path / "out").exists()


def test_transient_faults_are_retried_within_the_policy_and_then_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = storage.RetryPolicy(first_delay_s=0.01, max_delay_s=0.04, max_attempts=5, deadline_s=10)
    monkeypatch.setattr(storage, "RETRY_POLICY", policy)
    attempts: list[float] = []

    def flaky() -> str:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert storage.storage_call("x", flaky) == "ok" and len(attempts) == 3

    def down() -> str:
        raise ConnectionResetError("down")

    with pytest.raises(StorageError, match=r"x: storage failed after 5 attempts .*ConnectionResetError"):
        storage.storage_call("x", down)
    for attempt in range(4):  # exponential, capped, with jitter in the upper half
        ceiling = min(policy.max_delay_s, policy.first_delay_s * 2**attempt)
        delay = policy.delay_after(attempt, 0.0)
        assert delay is not None and ceiling / 2 <= delay <= ceiling
    assert policy.delay_after(4, 0.0) is None and policy.delay_after(0, 9.999) is None
