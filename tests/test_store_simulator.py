"""The loopback store simulator, driven by the real clients: s3fs, boto3 (botocore) and fsspec's
HTTP filesystem against the real server subprocess.

One server serves the whole module; each test gets its own bucket and a faultless, unthrottled
configuration with zeroed counters.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import boto3
import botocore.exceptions
import fsspec
import pytest
import s3fs
from botocore.config import Config
from botocore.httpchecksum import AwsChunkedWrapper, Crc32Checksum

from modelstock.testing.store_simulator import (
    FaultKind,
    FaultRule,
    SimulatorConfig,
    StoreSimulator,
    ThrottleConfig,
)

MIB = 2**20


@pytest.fixture(scope="module")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSimulator]:
    with StoreSimulator(tmp_path_factory.mktemp("store")) as running:
        yield running


@pytest.fixture
def sim(simulator: StoreSimulator) -> Iterator[StoreSimulator]:
    simulator.start()  # in case an earlier test left it stopped
    simulator.configure(SimulatorConfig())
    simulator.reset_stats()
    yield simulator
    simulator.start()
    simulator.configure(SimulatorConfig())


@pytest.fixture
def bucket(sim: StoreSimulator) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    sim.bucket_path(name)
    return name


@pytest.fixture
def fs(sim: StoreSimulator) -> s3fs.S3FileSystem:
    """s3fs with its default retries (a merge worker's view of the store)."""
    return s3fs.S3FileSystem(**sim.s3_storage_options(), skip_instance_cache=True)


@pytest.fixture
def client(sim: StoreSimulator):
    """A botocore client that tries each request exactly once, so every fault reaches the test."""
    options = sim.s3_storage_options()
    return boto3.client(
        "s3",
        endpoint_url=sim.endpoint,
        region_name=sim.region,
        aws_access_key_id=options["key"],
        aws_secret_access_key=options["secret"],
        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
    )


def md5_etag(data: bytes) -> str:
    return '"' + hashlib.md5(data).hexdigest() + '"'


# S3 through s3fs


def test_s3fs_put_get_info_ls_rm_exists(fs: s3fs.S3FileSystem, bucket: str, tmp_path: Path) -> None:
    local = tmp_path / "weights.bin"
    payload = os.urandom(300_000)
    local.write_bytes(payload)
    fs.put(str(local), f"{bucket}/model/weights.bin")
    fs.pipe_file(f"{bucket}/model/config.json", b'{"layers": 2}')

    assert sorted(fs.ls(f"{bucket}/model", detail=False)) == [
        f"{bucket}/model/config.json",
        f"{bucket}/model/weights.bin",
    ]
    assert fs.ls(bucket, detail=False) == [f"{bucket}/model"]
    info = fs.info(f"{bucket}/model/weights.bin")
    assert (info["size"], info["ETag"], info["type"]) == (len(payload), md5_etag(payload), "file")
    assert fs.info(f"{bucket}/model")["type"] == "directory"
    fs.get(f"{bucket}/model/weights.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == payload
    assert fs.cat_file(f"{bucket}/model/weights.bin", start=10, end=20) == payload[10:20]

    fs.rm(f"{bucket}/model/weights.bin")
    assert not fs.exists(f"{bucket}/model/weights.bin")
    assert fs.exists(f"{bucket}/model/config.json")
    fs.rm(f"{bucket}/model", recursive=True)
    assert fs.ls(bucket, detail=False, refresh=True) == []


def test_s3fs_creates_lists_and_removes_buckets(fs: s3fs.S3FileSystem) -> None:
    name = f"t-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    assert fs.exists(name) and name in fs.ls("", detail=False, refresh=True)
    with pytest.raises(FileExistsError):
        fs.mkdir(name, exist_ok=False)
    fs.rmdir(name)
    assert name not in fs.ls("", detail=False, refresh=True)


def test_files_placed_on_disk_are_served_and_replacing_them_changes_the_etag(
    sim: StoreSimulator, fs: s3fs.S3FileSystem, bucket: str
) -> None:
    path = sim.bucket_path(bucket) / "shard-00001.safetensors"
    path.write_bytes(b"first version")
    first = fs.info(f"{bucket}/shard-00001.safetensors")["ETag"]
    path.write_bytes(b"second version, longer")
    fs.invalidate_cache()
    info = fs.info(f"{bucket}/shard-00001.safetensors")
    assert info["size"] == len(b"second version, longer") and info["ETag"] != first
    assert fs.cat_file(f"{bucket}/shard-00001.safetensors") == b"second version, longer"


def test_list_objects_v2_pages_delimits_and_url_encodes_keys(sim: StoreSimulator, client, bucket: str) -> None:
    keys = [f"dir/{index:02d}.bin" for index in range(12)] + ["dir/sub/deep.bin", "odd key+plus&amp.bin", "top.bin"]
    for key in keys:
        target = sim.bucket_path(bucket).joinpath(*key.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(key.encode())

    listed, pages, token = [], 0, None
    while True:
        page = client.list_objects_v2(Bucket=bucket, MaxKeys=5, **({"ContinuationToken": token} if token else {}))
        listed += [entry["Key"] for entry in page.get("Contents", [])]
        pages += 1
        if not page["IsTruncated"]:
            break
        token = page["NextContinuationToken"]
    assert listed == sorted(keys) and pages == 3

    top = client.list_objects_v2(Bucket=bucket, Delimiter="/")
    assert [entry["Key"] for entry in top["Contents"]] == ["odd key+plus&amp.bin", "top.bin"]
    assert [entry["Prefix"] for entry in top["CommonPrefixes"]] == ["dir/"]
    inside = client.list_objects_v2(Bucket=bucket, Prefix="dir/", Delimiter="/", MaxKeys=12)
    assert len(inside["Contents"]) == 12 and inside["IsTruncated"]  # dir/sub/ is the 13th entry
    rest = client.list_objects_v2(
        Bucket=bucket, Prefix="dir/", Delimiter="/", ContinuationToken=inside["NextContinuationToken"]
    )
    assert [entry["Prefix"] for entry in rest["CommonPrefixes"]] == ["dir/sub/"] and "Contents" not in rest
    assert client.get_object(Bucket=bucket, Key="odd key+plus&amp.bin")["Body"].read() == b"odd key+plus&amp.bin"


def test_cat_ranges_with_many_ranges_returns_the_file_bytes(
    sim: StoreSimulator, fs: s3fs.S3FileSystem, bucket: str
) -> None:
    payload = os.urandom(3 * MIB)
    (sim.bucket_path(bucket) / "blob.bin").write_bytes(payload)
    generator = random.Random(0)
    starts = [generator.randrange(0, len(payload) - 1) for _ in range(200)]
    ends = [min(len(payload), start + generator.randrange(1, 200_000)) for start in starts]

    got = fs.cat_ranges([f"{bucket}/blob.bin"] * len(starts), starts, ends)

    assert got == [payload[start:end] for start, end in zip(starts, ends)]
    stats = sim.stats()
    assert stats.requests_by_operation["GetObject"] == 200
    assert stats.bytes_sent_by_method["GET"] == sum(end - start for start, end in zip(starts, ends))
    assert stats.max_concurrent_connections > 1


def test_multipart_upload_through_s3fs_open(sim: StoreSimulator, fs: s3fs.S3FileSystem, bucket: str) -> None:
    payload = os.urandom(11 * MIB + 12345)
    with fs.open(f"{bucket}/out/model.safetensors", "wb", block_size=5 * MIB) as target:
        for offset in range(0, len(payload), MIB):
            target.write(payload[offset : offset + MIB])

    stats = sim.stats()
    assert stats.requests_by_operation["UploadPart"] == 3
    assert stats.requests_by_operation["CompleteMultipartUpload"] == 1
    assert stats.bytes_received == len(payload)
    info = fs.info(f"{bucket}/out/model.safetensors")
    part_digests = b"".join(
        hashlib.md5(payload[offset : offset + 5 * MIB]).digest() for offset in range(0, len(payload), 5 * MIB)
    )
    assert info["ETag"] == f'"{hashlib.md5(part_digests).hexdigest()}-3"'
    assert fs.cat_file(f"{bucket}/out/model.safetensors") == payload


def test_multipart_object_is_invisible_until_complete_and_abort_leaves_nothing(client, bucket: str) -> None:
    upload = client.create_multipart_upload(Bucket=bucket, Key="out/shard.bin")["UploadId"]
    client.upload_part(Bucket=bucket, Key="out/shard.bin", UploadId=upload, PartNumber=1, Body=os.urandom(5 * MIB))
    client.upload_part(Bucket=bucket, Key="out/shard.bin", UploadId=upload, PartNumber=2, Body=b"tail")

    assert [
        part["PartNumber"] for part in client.list_parts(Bucket=bucket, Key="out/shard.bin", UploadId=upload)["Parts"]
    ] == [1, 2]
    assert [entry["UploadId"] for entry in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])] == [upload]
    assert client.list_objects_v2(Bucket=bucket)["KeyCount"] == 0
    with pytest.raises(botocore.exceptions.ClientError, match="404"):
        client.head_object(Bucket=bucket, Key="out/shard.bin")

    client.abort_multipart_upload(Bucket=bucket, Key="out/shard.bin", UploadId=upload)

    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert client.list_objects_v2(Bucket=bucket)["KeyCount"] == 0
    with pytest.raises(botocore.exceptions.ClientError, match="NoSuchUpload"):
        client.list_parts(Bucket=bucket, Key="out/shard.bin", UploadId=upload)


def test_complete_refuses_small_parts_and_wrong_etags(client, bucket: str) -> None:
    upload = client.create_multipart_upload(Bucket=bucket, Key="k")["UploadId"]
    first = client.upload_part(Bucket=bucket, Key="k", UploadId=upload, PartNumber=1, Body=b"too small")["ETag"]
    second = client.upload_part(Bucket=bucket, Key="k", UploadId=upload, PartNumber=2, Body=b"tail")["ETag"]
    with pytest.raises(botocore.exceptions.ClientError, match="EntityTooSmall"):
        client.complete_multipart_upload(
            Bucket=bucket,
            Key="k",
            UploadId=upload,
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": first}, {"PartNumber": 2, "ETag": second}]},
        )
    with pytest.raises(botocore.exceptions.ClientError, match="InvalidPart"):
        client.complete_multipart_upload(
            Bucket=bucket, Key="k", UploadId=upload, MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": second}]}
        )


def test_pipe_file_create_on_existing_key_raises_file_exists(
    fs: s3fs.S3FileSystem, bucket: str, sim: StoreSimulator
) -> None:
    fs.pipe_file(f"{bucket}/manifest.json", b"{}", mode="create")
    with pytest.raises(FileExistsError):
        fs.pipe_file(f"{bucket}/manifest.json", b'{"second": true}', mode="create")
    assert fs.cat_file(f"{bucket}/manifest.json") == b"{}"
    assert sim.stats().precondition_failures == 1


def test_conditional_get_with_a_stale_etag_fails_after_the_object_is_replaced(
    sim: StoreSimulator, client, bucket: str
) -> None:
    client.put_object(Bucket=bucket, Key="base/model.safetensors", Body=b"version one")
    old_etag = client.head_object(Bucket=bucket, Key="base/model.safetensors")["ETag"]
    assert old_etag == md5_etag(b"version one")
    ranged = client.get_object(Bucket=bucket, Key="base/model.safetensors", Range="bytes=0-6", IfMatch=old_etag)
    assert ranged["Body"].read() == b"version" and ranged["ContentRange"] == "bytes 0-6/11"

    client.put_object(Bucket=bucket, Key="base/model.safetensors", Body=b"version two!")

    with pytest.raises(botocore.exceptions.ClientError) as failure:
        client.get_object(Bucket=bucket, Key="base/model.safetensors", Range="bytes=0-6", IfMatch=old_etag)
    assert failure.value.response["Error"]["Code"] == "PreconditionFailed"
    assert failure.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    new_etag = client.head_object(Bucket=bucket, Key="base/model.safetensors")["ETag"]
    assert (
        client.get_object(Bucket=bucket, Key="base/model.safetensors", IfMatch=new_etag)["Body"].read()
        == b"version two!"
    )
    with pytest.raises(botocore.exceptions.ClientError, match="304"):
        client.get_object(Bucket=bucket, Key="base/model.safetensors", IfNoneMatch=new_etag)
    assert sim.stats().precondition_failures == 1
    client.delete_object(Bucket=bucket, Key="base/model.safetensors")
    with pytest.raises(botocore.exceptions.ClientError, match="NoSuchKey"):
        client.get_object(Bucket=bucket, Key="base/model.safetensors")


def test_copy_and_move(fs: s3fs.S3FileSystem, bucket: str) -> None:
    fs.pipe_file(f"{bucket}/a.bin", b"payload")
    fs.copy(f"{bucket}/a.bin", f"{bucket}/copies/b.bin")
    fs.mv(f"{bucket}/a.bin", f"{bucket}/moved/c.bin")
    assert fs.cat_file(f"{bucket}/copies/b.bin") == fs.cat_file(f"{bucket}/moved/c.bin") == b"payload"
    assert not fs.exists(f"{bucket}/a.bin")
    assert fs.info(f"{bucket}/copies/b.bin")["ETag"] == md5_etag(b"payload")


def test_aws_chunked_bodies_with_trailing_checksums_are_decoded_and_verified(sim: StoreSimulator, bucket: str) -> None:
    # Over HTTPS botocore streams PutObject/UploadPart bodies like this (it signs plain-HTTP
    # bodies instead); encode with botocore's own wrapper, exactly as it sends them.
    payload = os.urandom(3 * MIB + 17)

    def put(trailer_checksum: str | None) -> int:
        body = AwsChunkedWrapper(
            io.BytesIO(payload), checksum_cls=Crc32Checksum, checksum_name="x-amz-checksum-crc32"
        ).read()
        if trailer_checksum is not None:
            body = body.replace(
                body[body.rindex(b"x-amz-checksum-crc32:") :],
                f"x-amz-checksum-crc32:{trailer_checksum}\r\n\r\n".encode(),
            )
        request = urllib.request.Request(
            f"{sim.endpoint}/{bucket}/chunked.bin",
            data=body,
            method="PUT",
            headers={
                "Content-Encoding": "aws-chunked",
                "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
                "x-amz-trailer": "x-amz-checksum-crc32",
                "x-amz-decoded-content-length": str(len(payload)),
                "x-amz-sdk-checksum-algorithm": "CRC32",
            },
        )
        try:
            with urllib.request.urlopen(request) as response:
                assert response.headers["ETag"] == md5_etag(payload)
                return response.status
        except urllib.error.HTTPError as error:
            assert b"BadDigest" in error.read()
            return error.code

    assert put(None) == 200
    fs = s3fs.S3FileSystem(**sim.s3_storage_options(), skip_instance_cache=True)
    assert fs.cat_file(f"{bucket}/chunked.bin") == payload
    wrong = base64.b64encode((zlib.crc32(payload) ^ 1).to_bytes(4, "big")).decode()
    assert put(wrong) == 400
    assert fs.cat_file(f"{bucket}/chunked.bin") == payload  # the bad upload replaced nothing


# Plain HTTP through fsspec


def test_http_view_ls_info_cat_file_and_cat_ranges(sim: StoreSimulator, bucket: str) -> None:
    folder = sim.bucket_path(bucket) / "model"
    (folder / "sub").mkdir(parents=True)
    payload = os.urandom(100_000)
    (folder / "weights.bin").write_bytes(payload)
    (folder / "sub" / "x.txt").write_text("x")
    http = fsspec.filesystem("http", skip_instance_cache=True)

    listed = {entry["name"]: entry["type"] for entry in http.ls(sim.http_url(bucket, "model/"))}
    assert listed == {
        sim.http_url(bucket, "model/weights.bin"): "file",
        sim.http_url(bucket, "model/sub/"): "directory",
    }
    info = http.info(sim.http_url(bucket, "model/weights.bin"))
    assert info["size"] == len(payload) and info["ETag"]
    assert http.cat_file(sim.http_url(bucket, "model/weights.bin"), start=1000, end=1010) == payload[1000:1010]
    assert http.cat_ranges([sim.http_url(bucket, "model/weights.bin")] * 3, [0, 5, 99_990], [5, 50_000, 100_000]) == [
        payload[0:5],
        payload[5:50_000],
        payload[99_990:],
    ]

    stale = urllib.request.Request(
        sim.http_url(bucket, "model/weights.bin"), headers={"If-Match": '"stale"', "Range": "bytes=0-9"}
    )
    with pytest.raises(urllib.error.HTTPError) as failure:
        urllib.request.urlopen(stale)
    assert failure.value.code == 412
    operations = sim.stats().requests_by_operation
    assert operations["HttpList"] >= 1 and operations["HttpHead"] >= 1 and operations["HttpGet"] >= 3


# Faults


def test_status_faults_hit_exactly_every_nth_matching_request(sim: StoreSimulator, client, bucket: str) -> None:
    for key in ("target-1", "other"):
        client.put_object(Bucket=bucket, Key=key, Body=b"bytes")
    sim.configure(
        SimulatorConfig(
            faults=(
                FaultRule(FaultKind.SLOW_DOWN, every_nth=2, methods=("GET",), key_contains="target"),
                FaultRule(FaultKind.INTERNAL_ERROR, every_nth=3, methods=("HEAD",)),
            )
        )
    )

    get_errors = []
    for _ in range(6):
        client.get_object(Bucket=bucket, Key="other")["Body"].read()  # never matches: other key
        try:
            client.get_object(Bucket=bucket, Key="target-1")["Body"].read()
        except botocore.exceptions.ClientError as error:
            get_errors.append((error.response["ResponseMetadata"]["HTTPStatusCode"], error.response["Error"]["Code"]))
    head_errors = 0
    for _ in range(6):
        try:
            client.head_object(Bucket=bucket, Key="other")
        except botocore.exceptions.ClientError as error:
            assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 500
            head_errors += 1

    assert get_errors == [(503, "SlowDown")] * 3
    assert head_errors == 2
    assert sim.stats().faults_injected == {FaultKind.SLOW_DOWN: 3, FaultKind.INTERNAL_ERROR: 2}


def test_s3fs_rides_out_a_few_slow_downs(sim: StoreSimulator, fs: s3fs.S3FileSystem, bucket: str) -> None:
    payload = os.urandom(1000)
    (sim.bucket_path(bucket) / "input.bin").write_bytes(payload)
    sim.configure(SimulatorConfig(faults=(FaultRule(FaultKind.SLOW_DOWN, every_nth=1, max_count=2, methods=("GET",)),)))
    assert fs.cat_file(f"{bucket}/input.bin", start=0, end=1000) == payload
    assert sim.stats().faults_injected == {FaultKind.SLOW_DOWN: 2}


@pytest.mark.parametrize("kind", [FaultKind.RESET_MID_BODY, FaultKind.TRUNCATED_BODY])
def test_body_faults_break_the_body_the_client_reads(sim: StoreSimulator, client, bucket: str, kind: FaultKind) -> None:
    payload = os.urandom(2 * MIB)
    (sim.bucket_path(bucket) / "input.bin").write_bytes(payload)
    sim.configure(SimulatorConfig(faults=(FaultRule(kind, every_nth=2, body_fraction=0.5),)))
    outcomes = []
    for _ in range(4):
        try:
            outcomes.append(client.get_object(Bucket=bucket, Key="input.bin")["Body"].read() == payload)
        except botocore.exceptions.ResponseStreamingError as error:
            expected = "ConnectionResetError" if kind is FaultKind.RESET_MID_BODY else "IncompleteRead"
            assert expected in str(error)
            outcomes.append(False)
    assert outcomes == [True, False, True, False]
    stats = sim.stats()
    assert stats.faults_injected == {kind: 2}
    assert stats.bytes_sent_by_method["GET"] == 2 * len(payload) + 2 * len(payload) // 2


def test_s3fs_reports_a_truncated_body_as_a_payload_error(
    sim: StoreSimulator, fs: s3fs.S3FileSystem, bucket: str
) -> None:
    (sim.bucket_path(bucket) / "input.bin").write_bytes(os.urandom(MIB))
    sim.configure(SimulatorConfig(faults=(FaultRule(FaultKind.TRUNCATED_BODY, every_nth=1),)))
    fs.retries = 2
    with pytest.raises(aiohttp.ClientPayloadError):
        fs.cat_file(f"{bucket}/input.bin", start=0, end=MIB)
    assert sim.stats().faults_injected == {FaultKind.TRUNCATED_BODY: 2}


def test_seeded_faults_repeat_exactly(sim: StoreSimulator, client, bucket: str) -> None:
    client.put_object(Bucket=bucket, Key="k", Body=b"x")
    config = SimulatorConfig(faults=(FaultRule(FaultKind.INTERNAL_ERROR, probability=0.4),), seed=7)

    def failures() -> list[bool]:
        sim.configure(config)
        pattern = []
        for _ in range(20):
            try:
                client.head_object(Bucket=bucket, Key="k")
                pattern.append(False)
            except botocore.exceptions.ClientError:
                pattern.append(True)
        return pattern

    first = failures()
    assert first == failures() and 0 < sum(first) < 20


def test_throttle_burst_slows_the_store_for_a_while(sim: StoreSimulator, bucket: str) -> None:
    payload = os.urandom(2 * MIB)
    (sim.bucket_path(bucket) / "input.bin").write_bytes(payload)
    sim.configure(
        SimulatorConfig(
            faults=(FaultRule(FaultKind.THROTTLE_BURST, every_nth=1, max_count=1, burst_mib_s=2.0, burst_seconds=30.0),)
        )
    )
    started = time.monotonic()
    with urllib.request.urlopen(sim.http_url(bucket, "input.bin")) as response:
        assert response.read() == payload
    assert time.monotonic() - started >= 0.7  # 2 MiB at 2 MiB/s; an unthrottled read takes milliseconds
    assert sim.stats().faults_injected == {FaultKind.THROTTLE_BURST: 1}


def test_aggregate_cap_limits_concurrent_reads(sim: StoreSimulator, fs: s3fs.S3FileSystem, bucket: str) -> None:
    payload = os.urandom(4 * MIB)
    (sim.bucket_path(bucket) / "input.bin").write_bytes(payload)
    sim.configure(SimulatorConfig(throttle=ThrottleConfig(aggregate_mib_s=2.0)))
    started = time.monotonic()
    parts = fs.cat_ranges([f"{bucket}/input.bin"] * 4, [0, MIB, 2 * MIB, 3 * MIB], [MIB, 2 * MIB, 3 * MIB, 4 * MIB])
    elapsed = time.monotonic() - started
    assert b"".join(parts) == payload
    assert elapsed >= 1.5, f"4 MiB at 2 MiB/s took {elapsed:.2f} s"


def test_restart_keeps_data_and_port_and_a_stopped_store_refuses(sim: StoreSimulator, client, bucket: str) -> None:
    client.put_object(Bucket=bucket, Key="kept.bin", Body=b"survives")
    port, etag = sim.port, client.head_object(Bucket=bucket, Key="kept.bin")["ETag"]

    sim.stop()
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        client.head_object(Bucket=bucket, Key="kept.bin")
    sim.start()

    assert sim.port == port
    kept = client.get_object(Bucket=bucket, Key="kept.bin")
    assert kept["Body"].read() == b"survives" and kept["ETag"] == etag
    sim.restart()
    assert client.get_object(Bucket=bucket, Key="kept.bin")["Body"].read() == b"survives"


def test_command_line_announces_its_endpoint_and_applies_flags(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "modelstock.testing.store_simulator",
        "--root",
        str(tmp_path),
        "--port",
        "0",
        "--latency-ms",
        "5",
        "--aggregate-mib-s",
        "100",
        "--exit-with-stdin",
    ]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        announced = json.loads(process.stdout.readline())
        assert announced["endpoint"] == f"http://127.0.0.1:{announced['port']}"
        with urllib.request.urlopen(announced["endpoint"] + "/_sim/config") as response:
            config = SimulatorConfig.from_json(json.loads(response.read()))
        assert config.throttle == ThrottleConfig(first_byte_latency_ms=5.0, aggregate_mib_s=100.0)
    finally:
        assert process.stdin is not None
        process.stdin.close()  # the server ends when whoever started it goes away
        assert process.wait(timeout=10) == 0
        process.stdout.close()
