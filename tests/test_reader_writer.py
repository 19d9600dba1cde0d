"""Checkpoint reader and shard writer on local disk and fsspec memory, against safetensors itself."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from safetensors.torch import load_file, save, save_file

from modelstock import storage
from modelstock.checkpoint.reader import (
    INDEX_FILE,
    SINGLE_FILE,
    Checkpoint,
    open_checkpoint,
    read_tensor,
)
from modelstock.checkpoint.writer import ShardWriter, TensorSpec
from modelstock.dtypes import from_torch
from modelstock.errors import InvalidCheckpoint, StorageAccessError
from modelstock.fetch import read_rows


@dataclass(frozen=True)
class CatCall:
    path: str
    start: int | None
    end: int | None


class CountingMemoryFileSystem(MemoryFileSystem):
    """fsspec's in-memory filesystem under its own protocol, recording every data read."""

    protocol = "countingmem"
    store: dict[str, Any] = {}
    pseudo_dirs = [""]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cat_calls: list[CatCall] = []
        self.opened_for_read: list[str] = []

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        if isinstance(path, str) and path.startswith("countingmem://"):
            path = "memory://" + path[len("countingmem://") :]
        return MemoryFileSystem._strip_protocol(path)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        self.cat_calls.append(CatCall(self._strip_protocol(path), start, end))
        return super().cat_file(path, start=start, end=end, **kwargs)

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        if "r" in mode:
            self.opened_for_read.append(self._strip_protocol(path))
        return super()._open(path, mode, *args, **kwargs)


fsspec.register_implementation("countingmem", CountingMemoryFileSystem, clobber=True)


def counting_fs() -> CountingMemoryFileSystem:
    fs = fsspec.filesystem("countingmem")
    assert isinstance(fs, CountingMemoryFileSystem)
    return fs


# ----------------------------------------------------------------------------- fixtures


def model_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(40, 16, generator=generator),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=generator).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": torch.randn(16, 24, generator=generator).to(torch.float16),
        "model.layers.0.conv.weight": torch.randn(6, 3, 2, 2, generator=generator),
        "model.layers.1.input_layernorm.weight": torch.randn(16, generator=generator),
        "model.layers.10.scale": torch.tensor(0.5),
        "model.position_ids": torch.arange(12, dtype=torch.int64),
    }


def write_single(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / SINGLE_FILE), metadata={"format": "pt"})
    return folder


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 3) -> Path:
    """The Hugging Face sharded layout: model-0000k-of-0000n.safetensors + index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    weight_map: dict[str, str] = {}
    for index in range(shards):
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[index::shards]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


@pytest.fixture
def memory_folder() -> Iterator[str]:
    """A fresh folder in fsspec's global memory filesystem (removed afterwards)."""
    root = f"/modelstock-test-{uuid.uuid4().hex[:10]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def upload(local: Path, fs: fsspec.AbstractFileSystem, root: str) -> None:
    for path in sorted(local.iterdir()):
        fs.pipe_file(f"{root}/{path.name}", path.read_bytes())


def check_against_safetensors(checkpoint: Checkpoint, tensors: dict[str, torch.Tensor]) -> None:
    assert sorted(checkpoint.tensors) == sorted(tensors)
    for name, expected in tensors.items():
        location = checkpoint.tensors[name]
        assert location.entry.dtype == from_torch(expected.dtype)
        assert location.entry.shape == tuple(expected.shape)
        assert location.entry.nbytes == expected.numel() * expected.element_size()
        got = read_tensor(location)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got, expected)


# ----------------------------------------------------------------------------- open_checkpoint


def test_single_file_layout(tmp_path: Path) -> None:
    tensors = model_tensors()
    folder = write_single(tmp_path / "single", tensors)
    checkpoint = open_checkpoint(str(folder))
    check_against_safetensors(checkpoint, load_file(str(folder / SINGLE_FILE)))
    assert len(checkpoint.files) == 1
    assert checkpoint.files[0].size == (folder / SINGLE_FILE).stat().st_size
    assert checkpoint.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    # A URL straight to the file works too, and a trailing slash on the folder changes nothing.
    direct = open_checkpoint(str(folder / SINGLE_FILE))
    assert sorted(direct.tensors) == sorted(tensors)
    assert sorted(open_checkpoint(str(folder) + "/").tensors) == sorted(tensors)


def test_sharded_layout(tmp_path: Path) -> None:
    tensors = model_tensors(1)
    folder = write_sharded(tmp_path / "sharded", tensors, shards=3)
    checkpoint = open_checkpoint(str(folder))
    assert len(checkpoint.files) == 3
    index = json.loads((folder / INDEX_FILE).read_text())
    for name, location in checkpoint.tensors.items():
        assert location.file.path.endswith(index["weight_map"][name])
    loaded: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        loaded.update(load_file(str(folder / file)))
    check_against_safetensors(checkpoint, loaded)
    assert checkpoint.index_metadata == {"total_size": index["metadata"]["total_size"]}


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_memory_url(tmp_path: Path, memory_folder: str, layout: str) -> None:
    tensors = model_tensors(2)
    local = write_single(tmp_path / "m", tensors) if layout == "single" else write_sharded(tmp_path / "m", tensors)
    upload(local, fsspec.filesystem("memory"), memory_folder)
    checkpoint = open_checkpoint(f"memory://{memory_folder}")
    assert checkpoint.url == f"memory://{memory_folder}"
    assert all(loc.file.url.startswith(f"memory://{memory_folder}/") for loc in checkpoint.tensors.values())
    check_against_safetensors(checkpoint, tensors)


def test_transformers_save_pretrained_sharded(tmp_path: Path, tiny_family) -> None:
    """A real sharded checkpoint written by transformers itself."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_family.base)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / INDEX_FILE).exists()
    checkpoint = open_checkpoint(str(tmp_path / "sharded"))
    assert len(checkpoint.files) > 1
    expected = load_file(str(tiny_family.base / SINGLE_FILE))
    check_against_safetensors(checkpoint, expected)


# ----------------------------------------------------------------------------- ranged reads


@pytest.fixture
def counted_checkpoint(tmp_path: Path) -> Iterator[tuple[Checkpoint, dict[str, torch.Tensor], CountingMemoryFileSystem]]:
    tensors = {**model_tensors(3), "big": torch.randn(512, 300)}
    local = write_single(tmp_path / "c", tensors)
    fs = counting_fs()
    root = f"/ckpt-{uuid.uuid4().hex[:10]}"
    upload(local, fs, root)
    fs.cat_calls.clear()
    fs.opened_for_read.clear()
    checkpoint = open_checkpoint(f"countingmem://{root}")
    yield checkpoint, tensors, fs
    fs.rm(root, recursive=True)


def test_opening_reads_headers_only(counted_checkpoint) -> None:
    checkpoint, _, fs = counted_checkpoint
    size = checkpoint.files[0].size
    assert fs.cat_calls, "the header must be read with cat_file"
    assert all(call.start is not None and call.end is not None for call in fs.cat_calls), fs.cat_calls
    assert sum(call.end - call.start for call in fs.cat_calls) < size // 4
    assert fs.opened_for_read == []


def test_read_tensor_is_one_ranged_request(counted_checkpoint) -> None:
    checkpoint, tensors, fs = counted_checkpoint
    for name in ("big", "model.layers.0.conv.weight", "model.layers.10.scale"):
        fs.cat_calls.clear()
        location = checkpoint.tensors[name]
        got = read_tensor(location)
        assert torch.equal(got, tensors[name])
        assert fs.cat_calls == [CatCall(location.file.path, location.entry.start, location.entry.end)]
    assert fs.opened_for_read == []


def test_read_rows_reads_only_those_rows(counted_checkpoint) -> None:
    checkpoint, tensors, fs = counted_checkpoint
    location = checkpoint.tensors["big"]
    fs.cat_calls.clear()
    rows = read_rows([location, location], 100, 163)
    row_bytes = 300 * 4
    expected_call = CatCall(location.file.path, location.entry.start + 100 * row_bytes, location.entry.start + 163 * row_bytes)
    assert fs.cat_calls == [expected_call, expected_call]
    for block in rows:
        assert torch.equal(block, tensors["big"][100:163])


@pytest.mark.parametrize(
    "name, start, stop",
    [
        ("model.embed_tokens.weight", 0, 40),
        ("model.embed_tokens.weight", 7, 9),
        ("model.layers.0.self_attn.q_proj.weight", 3, 16),
        ("model.layers.0.conv.weight", 2, 5),  # 4-D: rows are dim 0, the rest flattened
        ("model.layers.1.input_layernorm.weight", 0, 1),  # 1-D: a single row
        ("model.layers.10.scale", 0, 1),  # 0-D
    ],
)
def test_read_rows_matches_safetensors(tmp_path: Path, name: str, start: int, stop: int) -> None:
    tensors = model_tensors(4)
    shifted = [{k: v + i if v.is_floating_point() else v for k, v in tensors.items()} for i in range(2)]
    folders = [write_single(tmp_path / f"m{i}", state) for i, state in enumerate(shifted)]
    locations = [open_checkpoint(str(folder)).tensors[name] for folder in folders]
    blocks = read_rows(locations, start, stop)
    for folder, block in zip(folders, blocks):
        expected = load_file(str(folder / SINGLE_FILE))[name]
        expected_rows = expected.reshape(expected.shape[0] if expected.dim() >= 2 else 1, -1)[start:stop]
        assert block.dtype == expected.dtype
        assert torch.equal(block, expected_rows)


# ----------------------------------------------------------------------------- refusals


def test_pickle_only_folder_is_refused_without_loading(tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    # Would run code if unpickled; the reader must never open it.
    (folder / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'touch pwned'\ntR.")
    (folder / "config.json").write_text("{}")
    with pytest.raises(InvalidCheckpoint, match=r"pickle") as caught:
        open_checkpoint(str(folder))
    assert str(folder) in str(caught.value) and "pytorch_model.bin" in str(caught.value)
    assert not (Path.cwd() / "pwned").exists()


def test_pickle_only_folder_in_memory_is_never_read(memory_folder: str) -> None:
    fs = counting_fs()
    fs.pipe_file(f"{memory_folder}/model.pt", b"\x80\x04not really")
    fs.cat_calls.clear()
    with pytest.raises(InvalidCheckpoint, match=r"pickle"):
        open_checkpoint(f"countingmem://{memory_folder}")
    assert fs.cat_calls == [] and fs.opened_for_read == []
    fs.rm(memory_folder, recursive=True)


@pytest.mark.parametrize("exists", [True, False], ids=["empty", "missing"])
def test_empty_or_missing_folder(tmp_path: Path, exists: bool) -> None:
    folder = tmp_path / "nothing"
    if exists:
        folder.mkdir()
    with pytest.raises((InvalidCheckpoint, StorageAccessError), match=r"empty or missing|does not exist|not found") as caught:
        open_checkpoint(str(folder))
    assert str(folder) in str(caught.value)


def test_folder_without_weights(tmp_path: Path) -> None:
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(InvalidCheckpoint, match=rf"no {SINGLE_FILE} or {INDEX_FILE}.*config.json"):
        open_checkpoint(str(folder))


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    folder = write_sharded(tmp_path / "s", model_tensors(5), shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InvalidCheckpoint, match=r"model-00002-of-00002.safetensors.*missing"):
        open_checkpoint(str(folder))


def test_index_entry_not_in_its_shard(tmp_path: Path) -> None:
    folder = write_sharded(tmp_path / "s", model_tensors(5), shards=2)
    index = json.loads((folder / INDEX_FILE).read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    (folder / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(InvalidCheckpoint, match=r"'ghost.weight'.*not in this shard"):
        open_checkpoint(str(folder))


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "model.bin", ""])
def test_index_pointing_outside_the_folder_is_refused(tmp_path: Path, target: str) -> None:
    folder = write_sharded(tmp_path / "s", model_tensors(5), shards=2)
    index = json.loads((folder / INDEX_FILE).read_text())
    index["weight_map"]["model.embed_tokens.weight"] = target
    (folder / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(InvalidCheckpoint, match=r"'model.embed_tokens.weight'"):
        open_checkpoint(str(folder))


def test_same_tensor_in_two_shards(tmp_path: Path) -> None:
    folder = tmp_path / "dup"
    folder.mkdir()
    save_file({"a": torch.ones(2), "b": torch.ones(2)}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({"a": torch.ones(2)}, str(folder / "model-00002-of-00002.safetensors"))
    weight_map = {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}
    (folder / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(InvalidCheckpoint, match=r"'a'"):
        open_checkpoint(str(folder))


# ----------------------------------------------------------------------------- ShardWriter


def specs_of(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(name, from_torch(t.dtype), tuple(t.shape)) for name, t in tensors.items()]


def write_in_blocks(writer: ShardWriter, tensors: dict[str, torch.Tensor], rows_per_block: int = 3) -> None:
    for name, tensor in tensors.items():
        if tensor.dim() >= 2:
            for start in range(0, tensor.shape[0], rows_per_block):
                writer.write_block(name, tensor[start : start + rows_per_block])
        else:
            writer.write_block(name, tensor)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_shard_writer_output_loads_and_hashes(tmp_path: Path, memory_folder: str, where: str) -> None:
    tensors = {**model_tensors(6), "empty": torch.zeros(0, 4), "z.last": torch.randn(5, 2).to(torch.bfloat16)}
    url = str(tmp_path / "out" / "model-00001-of-00001.safetensors") if where == "local" else f"memory://{memory_folder}/model-00001-of-00001.safetensors"
    location = storage.resolve(url)
    writer = ShardWriter(location, specs_of(tensors))
    with writer:
        write_in_blocks(writer, tensors)
    raw = location.fs.cat_file(location.path)
    assert writer.result.sha256 == hashlib.sha256(raw).hexdigest()
    assert writer.result.size == len(raw)
    assert writer.result.url == url
    from safetensors.torch import load

    loaded = load(raw)
    assert sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
    if where == "local":
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model-00001-of-00001.safetensors"]
        for name, tensor in load_file(url).items():
            assert torch.equal(tensor, tensors[name])
    # And our own reader reads it back.
    check_against_safetensors(open_checkpoint(url), tensors)


def test_shard_writer_header_matches_the_reference_writer(tmp_path: Path) -> None:
    """Same tensors: the official writer and ours produce files with the same tensor bytes."""
    tensors = model_tensors(7)
    location = storage.resolve(str(tmp_path / "ours.safetensors"))
    writer = ShardWriter(location, specs_of(tensors))
    with writer:
        write_in_blocks(writer, tensors)
    ours = (tmp_path / "ours.safetensors").read_bytes()
    theirs = save(tensors)
    ours_header_length = int.from_bytes(ours[:8], "little")
    assert (8 + ours_header_length) % 8 == 0  # aligned data section, as the reference writer does
    for name, tensor in tensors.items():
        ours_entry = json.loads(ours[8 : 8 + ours_header_length])[name]
        assert ours_entry["dtype"] == from_torch(tensor.dtype)
        begin, end = ours_entry["data_offsets"]
        expected = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert ours[8 + ours_header_length + begin : 8 + ours_header_length + end] == expected
    assert load_file(str(tmp_path / "ours.safetensors")).keys() == load_file_from_bytes(theirs).keys()


def load_file_from_bytes(raw: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(raw)


def test_shard_writer_refuses_wrong_order_and_leaves_nothing(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(2, 2), "b": torch.zeros(3)}
    location = storage.resolve(str(tmp_path / "out" / "shard.safetensors"))
    with pytest.raises(ValueError, match=r"expected tensor 'a' next, got 'b'"):
        with ShardWriter(location, specs_of(tensors)) as writer:
            writer.write_block("b", tensors["b"])
    assert not (tmp_path / "out" / "shard.safetensors").exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_shard_writer_refuses_an_incomplete_shard(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(4, 2), "b": torch.zeros(3)}
    location = storage.resolve(str(tmp_path / "out" / "shard.safetensors"))
    with pytest.raises(ValueError, match=r"incomplete"), ShardWriter(location, specs_of(tensors)) as writer:
        writer.write_block("a", tensors["a"][:2])
    assert not (tmp_path / "out" / "shard.safetensors").exists()


def test_shard_writer_refuses_too_many_bytes(tmp_path: Path) -> None:
    location = storage.resolve(str(tmp_path / "shard.safetensors"))
    with pytest.raises(ValueError, match=r"more than 8 bytes"):
        with ShardWriter(location, [TensorSpec("a", "F32", (2,))]) as writer:
            writer.write_block("a", torch.ones(3))
    assert not (tmp_path / "shard.safetensors").exists()
