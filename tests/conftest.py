"""Shared fixtures: real files, a real local Ray, a real S3-protocol server on loopback."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.ray_env import apply_to_process

# This process runs only local Ray (ray_local, cluster_utils): loopback only, no token auth, no
# usage stats, set before ray is imported. Clients of token-auth clusters run in subprocesses with
# their own environment, or set it themselves (cluster.session and cluster.jobs re-read it).
apply_to_process()

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "eu-west-1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).parent))

import ray  # noqa: E402
import torch  # noqa: E402
from s3server import RecordingS3Server  # noqa: E402

REGION = "eu-west-1"


def start_local_ray(num_cpus: int = 2) -> None:
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=256 * 1024 * 1024,
        log_to_driver=False,
        logging_level="WARNING",
    )


@pytest.fixture
def ray_local() -> Iterator[None]:
    """A local Ray instance, shared across tests (restarted if a test shut it down)."""
    if not ray.is_initialized():
        start_local_ray()
    yield


def pytest_sessionfinish(session, exitstatus):
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[RecordingS3Server]:
    server = RecordingS3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server: RecordingS3Server) -> Iterator[S3Bucket]:
    """A fresh bucket on the loopback S3 server, with s3fs storage options pointing at it."""
    import s3fs

    options = {
        "key": "testing",
        "secret": "testing",
        "endpoint_url": s3_server.endpoint,
        "client_kwargs": {"region_name": REGION},
        "skip_instance_cache": True,
    }
    fs = s3fs.S3FileSystem(**options)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket, region_name=REGION)
    s3_server.clear()
    yield S3Bucket(name=bucket, options=options, fs=fs, server=s3_server)


@dataclass
class S3Bucket:
    name: str
    options: dict
    fs: object
    server: RecordingS3Server

    def url(self, *parts: str) -> str:
        return "s3://" + "/".join([self.name, *parts])

    def upload(self, local: Path, prefix: str) -> str:
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                self.fs.put_file(str(path), f"{self.name}/{prefix}/{path.relative_to(local).as_posix()}")
        return self.url(prefix)


@dataclass(frozen=True)
class TinyFamily:
    """A tiny real Llama (transformers) saved with save_pretrained, plus seeded fine-tunes."""

    root: Path
    base: Path
    finetunes: list[Path]
    dtype: torch.dtype


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def make_tiny_family(root: Path, finetunes: int = 3, dtype: torch.dtype = torch.float32, seed: int = 0) -> TinyFamily:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    base_model = LlamaForCausalLM(tiny_llama_config()).to(dtype)
    base = root / "base"
    base_model.save_pretrained(base, safe_serialization=True)
    base_state = {k: v.clone() for k, v in base_model.state_dict().items()}
    paths = []
    generator = torch.Generator().manual_seed(seed + 1)
    shared = {k: torch.randn(v.shape, generator=generator) for k, v in base_state.items()}
    for index in range(finetunes):
        state = {}
        for name, tensor in base_state.items():
            noise = torch.randn(tensor.shape, generator=generator)
            scale = 0.02 * (tensor.float().abs().mean() + 1e-3)
            state[name] = (tensor.float() + scale * (shared[name] + noise)).to(dtype)
        model = LlamaForCausalLM(tiny_llama_config()).to(dtype)
        model.load_state_dict(state)
        path = root / f"finetune-{index + 1}"
        model.save_pretrained(path, safe_serialization=True)
        paths.append(path)
    return TinyFamily(root=root, base=base, finetunes=paths, dtype=dtype)


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> TinyFamily:
    """float32 tiny Llama family (base + 3 fine-tunes). Treat as read-only."""
    return make_tiny_family(tmp_path_factory.mktemp("tiny-f32"), finetunes=3, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_family_bf16(tmp_path_factory: pytest.TempPathFactory) -> TinyFamily:
    """bfloat16 tiny Llama family (base + 3 fine-tunes). Treat as read-only."""
    return make_tiny_family(tmp_path_factory.mktemp("tiny-bf16"), finetunes=3, dtype=torch.bfloat16, seed=1)


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
