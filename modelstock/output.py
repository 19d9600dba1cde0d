"""The output folder's contract (docs/ARCHITECTURE.md, "The output contract"): file names, the
commit, resume records.

A merge is finished exactly when ``modelstock-manifest.json`` exists: it is written last and
records the recipe hash, the inputs' fingerprints and every shard's sha256. Work in progress lives
under ``.modelstock/``: the job record (which recipe and inputs this folder belongs to) and one
progress record per finished shard, so a re-run skips what is done.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from modelstock import storage
from modelstock.errors import InvalidCheckpoint, OutputConflict, StorageAccessError
from modelstock.methods.base import TensorStats
from modelstock.storage import Location

INDEX_FILE_NAME = "model.safetensors.index.json"
MANIFEST_FILE = "modelstock-manifest.json"
REPORT_FILE = "modelstock-report.json"
REPORT_PLOT_FILE = "modelstock-report.png"
RECIPE_FILE = "modelstock-recipe.yml"
MODEL_CARD_FILE = "README.md"
STATE_DIR = ".modelstock"
JOB_FILE = "job.json"
PROGRESS_DIR = "progress"
MANIFEST_FORMAT = "modelstock-manifest/1"

# Small files copied from the base model next to the weights.
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)
MAX_MODEL_FILE_BYTES = 64 * 1024 * 1024


def shard_file_name(index: int, count: int) -> str:
    """Shard names as transformers writes them; always sharded so the index is the one entry point."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def progress_location(out: Location, shard_file: str) -> Location:
    return out.join(STATE_DIR, PROGRESS_DIR, shard_file + ".json")


@dataclass(frozen=True)
class ShardRecord:
    """Written by a worker once its shard is complete: what a re-run needs to skip it."""

    file: str
    shard_digest: str
    size: int
    sha256: str
    attempt: str
    tensors: list[dict[str, Any]]

    def to_bytes(self) -> bytes:
        return canonical(self.__dict__)

    @classmethod
    def from_bytes(cls, raw: bytes) -> ShardRecord:
        data = json.loads(raw)
        return cls(**data)

    def tensor_stats(self) -> list[TensorStats]:
        return [TensorStats.from_json(tensor) for tensor in self.tensors]


def read_shard_record(out: Location, shard_file: str) -> ShardRecord | None:
    location = progress_location(out, shard_file)
    try:
        return ShardRecord.from_bytes(storage.read_bytes(location))
    except StorageAccessError:
        return None
    except (ValueError, TypeError, KeyError):
        return None  # a torn or foreign record: the shard is simply redone


def write_shard_record(out: Location, record: ShardRecord) -> None:
    storage.write_bytes(progress_location(out, record.file), record.to_bytes())


def file_sha256(location: Location, block_size: int = 16 * 1024 * 1024) -> tuple[int, str]:
    """Size and sha256 of an object, streamed."""
    digest = hashlib.sha256()
    size = 0

    def run() -> None:
        nonlocal size
        with location.fs.open(location.path, "rb", block_size=block_size) as handle:
            while chunk := handle.read(block_size):
                digest.update(chunk)
                size += len(chunk)

    storage.storage_call(location.url, run)
    return size, digest.hexdigest()


@dataclass(frozen=True)
class OutputState:
    """What is at the output location before a merge starts."""

    entries: list[str]
    manifest: dict[str, Any] | None
    job: dict[str, Any] | None

    @property
    def empty(self) -> bool:
        return not self.entries


def _read_json(location: Location) -> dict[str, Any] | None:
    try:
        raw = storage.read_bytes(location)
    except StorageAccessError:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def read_output_state(out: Location) -> OutputState:
    entries = storage.list_names(out)
    manifest = _read_json(out.join(MANIFEST_FILE)) if MANIFEST_FILE in entries else None
    job = _read_json(out.join(STATE_DIR, JOB_FILE)) if STATE_DIR in entries else None
    return OutputState(entries=entries, manifest=manifest, job=job)


def remove_stale_partials(out: Location) -> list[str]:
    """Delete temporary files left by writers that died (e.g. on a lost node); returns their names."""
    stale = [name for name in storage.list_names(out) if ".partial" in name]
    for name in stale:
        storage.remove_file(out.join(name))
    return stale


def index_json(shards: Sequence[tuple[str, Sequence[str]]], total_size: int) -> bytes:
    """``model.safetensors.index.json`` as transformers writes it."""
    weight_map = {name: file for file, names in shards for name in names}
    return (
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2, sort_keys=False)
        + "\n"
    ).encode()


def output_config(raw: bytes, out_dtype_name: str, layers: int | None, source: str, vocab_size: int | None = None) -> bytes:
    """config.json of the output: the output dtype recorded (as transformers and mergekit do) and,
    when the merge changed them, the number of decoder layers and the vocabulary size."""
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise InvalidCheckpoint(f"{source}: config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidCheckpoint(f"{source}: config.json is not a JSON object")
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    for key in keys:
        config[key] = out_dtype_name
    # The merge writes unquantized weights (block-FP8 inputs are dequantized).
    config.pop("quantization_config", None)
    if vocab_size is not None:
        text = config.get("text_config")
        target = text if isinstance(text, dict) and "vocab_size" in text else config
        target["vocab_size"] = vocab_size
    if layers is not None:
        for holder in (config, config.get("text_config")):
            if isinstance(holder, dict) and "num_hidden_layers" in holder:
                holder["num_hidden_layers"] = layers
                if isinstance(holder.get("layer_types"), list) and holder["layer_types"]:
                    # Per-layer kinds (e.g. sliding/full attention) follow the layer count, cycling.
                    kinds = holder["layer_types"]
                    holder["layer_types"] = [kinds[i % len(kinds)] for i in range(layers)]
    return (json.dumps(config, indent=2) + "\n").encode()


def model_files(base: Location) -> list[str]:
    """The small non-weight files of the base model worth copying."""
    names = set(storage.list_names(base))
    return [name for name in MODEL_FILES if name in names]


def model_card(recipe_yaml: str, base_model: str | None, method: str, models: Iterable[str], summary: Mapping[str, Any]) -> bytes:
    front = ["---", "library_name: transformers", "tags:", "- merge", "- modelstock", f"- {method}"]
    if base_model:
        front.append(f"base_model: {json.dumps(base_model)}")
    front.append("---")
    lines = [
        *front,
        "",
        "# Merged model",
        "",
        f"Merged with modelstock using the `{method}` method.",
        "",
        "## Inputs",
        "",
        *(f"- base: `{base_model}`" for _ in [0] if base_model),
        *(f"- `{m}`" for m in models),
        "",
        "## Summary",
        "",
        *(f"- {k}: {v}" for k, v in summary.items()),
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe_yaml.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines).encode()


def check_not_overlapping(out: Location, inputs: Iterable[str], storage_options: Mapping[str, Any] | None) -> None:
    """The output must not be, contain, or sit inside an input (we may delete the output)."""
    out_key = (out.fs.protocol if isinstance(out.fs.protocol, str) else out.fs.protocol[0], out.path.rstrip("/") + "/")
    for url in inputs:
        location = storage.resolve(url, storage_options)
        protocol = location.fs.protocol if isinstance(location.fs.protocol, str) else location.fs.protocol[0]
        in_path = location.path.rstrip("/") + "/"
        if protocol == out_key[0] and (in_path.startswith(out_key[1]) or out_key[1].startswith(in_path)):
            raise OutputConflict(f"{out.url}: output location overlaps input {url}; choose another output")


LOCK_FILE = "lock.json"
LOCK_LEASE_S = 120.0
LOCK_HEARTBEAT_S = 20.0


class OutputLock:
    """One writer per output: an exclusively created lock record, kept fresh by a heartbeat.

    A lock is stale (and may be taken over) when its heartbeat is older than the lease, or when
    it was taken on this host by a process that no longer exists (a crashed or killed driver).
    """

    def __init__(self, out: Location, plan_sha256: str) -> None:
        self.location = out.join(STATE_DIR, LOCK_FILE)
        self.plan_sha256 = plan_sha256
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return canonical({
            "owner": self.owner, "plan_sha256": self.plan_sha256, "host": socket.gethostname(),
            "pid": os.getpid(), "heartbeat": time.time(),
        })

    def _current(self) -> dict[str, Any] | None:
        return _read_json(self.location)

    @staticmethod
    def _is_stale(record: dict[str, Any] | None) -> bool:
        if record is None:
            return True  # unreadable or vanished: a torn write by a dead writer
        if time.time() - float(record.get("heartbeat", 0)) > LOCK_LEASE_S:
            return True
        if record.get("host") == socket.gethostname():
            try:
                os.kill(int(record.get("pid", -1)), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError, OverflowError):
                return False
        return False

    def acquire(self) -> None:
        for _ in range(3):
            if storage.create_exclusive(self.location, self._record()):
                self._thread = threading.Thread(target=self._beat, name="output-lock", daemon=True)
                self._thread.start()
                return
            holder = self._current()
            if holder is not None and not self._is_stale(holder):
                raise OutputConflict(
                    f"{self.location.url}: another merge (pid {holder.get('pid')} on {holder.get('host')}) "
                    "is writing to this output; wait for it or choose another output"
                )
            storage.remove_file(self.location)
        raise OutputConflict(f"{self.location.url}: could not take the output lock")

    def _beat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            if not self.held():
                return
            storage.write_bytes(self.location, self._record())

    def held(self) -> bool:
        record = self._current()
        return record is not None and record.get("owner") == self.owner

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.held():
            storage.remove_file(self.location)
