"""Open a Hugging Face safetensors checkpoint on any fsspec URL by reading headers only.

A checkpoint is a folder holding ``model.safetensors`` or ``model.safetensors.index.json`` plus
its shards (or a URL to a single ``.safetensors`` file). Opening one reads each file's header
with ranged requests; tensor bytes are read later, one byte range per tensor (or row block).
Pickle weights (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) are never loaded.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from modelstock import storage
from modelstock.checkpoint.header import (
    LENGTH_PREFIX_BYTES,
    SafetensorsHeader,
    TensorEntry,
    declared_header_length,
    parse_header,
)
from modelstock.dtypes import to_torch
from modelstock.errors import InvalidCheckpoint
from modelstock.storage import Location, ObjectVersion

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# pytorch_model.bin.index.json: a sharded pickle checkpoint's index (the shards may be absent).
PICKLE_INDEX_SUFFIXES = tuple(suffix + ".index.json" for suffix in PICKLE_SUFFIXES)
# One request usually holds the whole header (an 8B Llama's is ~25 KB).
SPECULATIVE_HEADER_READ = 64 * 1024
HEADER_READ_THREADS = 16
MAX_INDEX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class FileFingerprint:
    """Identifies an input file's content cheaply: size, ETag where the store has one, header hash.

    ``version`` is the same observation as the store states it (quoted ETag; mtime and inode for
    local files): every later ranged read of the file is held to it (``storage.ObjectVersion``).
    It is not part of plan digests, which use the first three fields."""

    url: str
    size: int
    etag: str | None
    header_sha256: str
    version: ObjectVersion | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class TensorLocation:
    """One tensor of one checkpoint: which file, and where in it."""

    file: Location
    entry: TensorEntry

    @property
    def name(self) -> str:
        return self.entry.name



@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint's tensors, located by header reads alone."""

    url: str
    tensors: dict[str, TensorLocation]
    files: tuple[FileFingerprint, ...]
    index_metadata: dict[str, Any]

    @property
    def total_bytes(self) -> int:
        return sum(loc.entry.nbytes for loc in self.tensors.values())


def read_header(location: Location) -> tuple[SafetensorsHeader, FileFingerprint]:
    """Read and validate one file's header with one (rarely two) ranged requests, both held to
    the version the first metadata request saw."""
    info = storage.object_info(location)
    if info.get("type") == "directory":
        raise InvalidCheckpoint(f"{location.url}: is a directory, expected a .safetensors file")
    size = int(info.get("size") or 0)
    version = ObjectVersion.from_info(info)
    location = location.pinned(version)
    prefix = bytes(storage.read_range(location, 0, min(size, SPECULATIVE_HEADER_READ))) if size else b""
    length = declared_header_length(location.url, prefix, size)
    end = LENGTH_PREFIX_BYTES + length
    if end > len(prefix):
        prefix += storage.read_range(location, len(prefix), end)
    header_blob = prefix[:end]
    header = parse_header(location.url, header_blob[LENGTH_PREFIX_BYTES:], size)
    etag = info.get("ETag") or info.get("etag")
    fingerprint = FileFingerprint(
        url=location.url,
        size=size,
        etag=str(etag).strip('"') if etag else None,
        header_sha256=hashlib.sha256(header_blob).hexdigest(),
        version=version,
    )
    return header, fingerprint


def _pinned(location: Location, fingerprint: FileFingerprint) -> Location:
    return location.pinned(fingerprint.version) if fingerprint.version is not None else location


def _safe_shard_name(index_url: str, tensor: str, file_name: object) -> str:
    if (
        not isinstance(file_name, str)
        or not file_name
        or "/" in file_name
        or "\\" in file_name
        or file_name in (".", "..")
        or not file_name.endswith(".safetensors")
    ):
        raise InvalidCheckpoint(
            f"{index_url}: tensor {tensor!r} maps to {file_name!r}, not a .safetensors file beside the index"
        )
    return file_name


def _read_index(location: Location) -> tuple[dict[str, str], dict[str, Any]]:
    info = storage.object_info(location)
    if int(info.get("size") or 0) > MAX_INDEX_BYTES:
        raise InvalidCheckpoint(f"{location.url}: index is larger than {MAX_INDEX_BYTES} bytes")
    raw = storage.read_bytes(location)
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidCheckpoint(f"{location.url}: not valid JSON ({exc})") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("weight_map"), dict):
        raise InvalidCheckpoint(f"{location.url}: has no 'weight_map' object")
    weight_map = {
        str(tensor): _safe_shard_name(location.url, tensor, file_name)
        for tensor, file_name in parsed["weight_map"].items()
    }
    if not weight_map:
        raise InvalidCheckpoint(f"{location.url}: 'weight_map' is empty")
    metadata = parsed.get("metadata")
    return weight_map, metadata if isinstance(metadata, dict) else {}


# Said with every pickle refusal: unpickling runs arbitrary code (mergekit's --lazy-unpickle is
# the code execution we do not offer), so the conversion happens once, where the file is trusted.
CONVERT_HINT = (
    "convert it once where you trust the file: state = torch.load(path, weights_only=True), then "
    "safetensors.torch.save_file(state, 'model.safetensors') (or the Hub's safetensors convert space)"
)


def _pickle_refusal(url: str, files: Sequence[str]) -> InvalidCheckpoint:
    return InvalidCheckpoint(
        f"{url}: only pickle weights ({', '.join(files[:3])}); modelstock reads safetensors only and never unpickles; "
        + CONVERT_HINT
    )


def _refuse_folder(folder: Location, names: Sequence[str]) -> InvalidCheckpoint:
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES) or n.endswith(PICKLE_INDEX_SUFFIXES)]
    if pickles:
        return _pickle_refusal(folder.url, pickles)
    if not names:
        hint = ""
        if re.fullmatch(r"[\w.-]+/[\w.-]+", folder.url):
            hint = f" (for a Hugging Face hub repo, write hf://{folder.url})"
        return InvalidCheckpoint(f"{folder.url}: empty or missing folder, expected {SINGLE_FILE} or {INDEX_FILE}{hint}")
    return InvalidCheckpoint(
        f"{folder.url}: no {SINGLE_FILE} or {INDEX_FILE} (found: {', '.join(names[:5])})"
    )


def open_checkpoint(url: str, storage_options: Mapping[str, Any] | None = None) -> Checkpoint:
    """Locate every tensor of the checkpoint at ``url`` from its headers."""
    root = storage.resolve(url, storage_options)
    if root.path.endswith(PICKLE_SUFFIXES):
        raise _pickle_refusal(root.url, [posixpath.basename(root.path)])
    if root.path.endswith(".safetensors"):
        header, fingerprint = read_header(root)
        pinned = _pinned(root, fingerprint)
        single = {name: TensorLocation(pinned, entry) for name, entry in header.tensors.items()}
        return Checkpoint(url=root.url, tensors=single, files=(fingerprint,), index_metadata={})

    names = storage.list_names(root)
    if INDEX_FILE in names:
        weight_map, index_metadata = _read_index(root.join(INDEX_FILE))
        shard_names = sorted(set(weight_map.values()))
    elif SINGLE_FILE in names:
        weight_map, index_metadata = {}, {}
        shard_names = [SINGLE_FILE]
    else:
        raise _refuse_folder(root, names)

    missing = [name for name in shard_names if name not in names]
    if missing:
        raise InvalidCheckpoint(f"{root.join(missing[0]).url}: shard named in {INDEX_FILE} is missing")
    shard_locations = [root.join(name) for name in shard_names]
    with ThreadPoolExecutor(max_workers=min(HEADER_READ_THREADS, len(shard_locations))) as pool:
        headers = list(pool.map(read_header, shard_locations))

    tensors: dict[str, TensorLocation] = {}
    for unpinned, (header, fingerprint) in zip(shard_locations, headers):
        location = _pinned(unpinned, fingerprint)
        shard_name = posixpath.basename(location.path)
        for name, entry in header.tensors.items():
            if name in tensors:
                raise InvalidCheckpoint(
                    f"{location.url}: tensor {name!r} also appears in {tensors[name].file.url}"
                )
            if weight_map and weight_map.get(name) != shard_name:
                raise InvalidCheckpoint(
                    f"{location.url}: tensor {name!r} is not mapped to this shard in {INDEX_FILE}"
                )
            tensors[name] = TensorLocation(location, entry)
    for name, shard_name in weight_map.items():
        if name not in tensors:
            raise InvalidCheckpoint(
                f"{root.join(shard_name).url}: tensor {name!r} listed in {INDEX_FILE} is not in this shard"
            )
    if not tensors:
        raise InvalidCheckpoint(f"{root.url}: checkpoint holds no tensors")
    return Checkpoint(
        url=root.url,
        tensors=tensors,
        files=tuple(fingerprint for _, fingerprint in headers),
        index_metadata=index_metadata,
    )


def tensor_from_bytes(blob: bytes | bytearray | memoryview, dtype: str, shape: Sequence[int]) -> torch.Tensor:
    """A read-only view of raw little-endian bytes as a tensor (no copy)."""
    if len(blob) == 0:
        return torch.empty(tuple(shape), dtype=to_torch(dtype))
    with warnings.catch_warnings():
        # The buffer is immutable bytes; every consumer treats the tensor as read-only.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(blob, dtype=to_torch(dtype))
    return flat.reshape(tuple(shape))


def read_tensor(location: TensorLocation) -> torch.Tensor:
    """One whole tensor, by a single ranged read."""
    blob = storage.read_range(location.file, location.entry.start, location.entry.end)
    return tensor_from_bytes(blob, location.entry.dtype, location.entry.shape)
