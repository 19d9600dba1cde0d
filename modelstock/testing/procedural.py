"""A read-only fsspec filesystem serving Hugging Face checkpoint folders of any Llama shape,
generating tensor bytes on read: scale tests (a 405B base and its fine-tunes opened and planned,
a 70B-wide slice merged end to end) on machines with no room for those bytes.

URL grammar::

    procedural://<family>/<model>/<file>
    <family> = <preset>[,<key>=<value>]...   presets: LLAMA_PRESETS (tiny, tinyllama, llama3-8b, ...)
               keys: hidden intermediate layers vocab heads kv_heads (the LlamaShape fields),
                     dtype (BF16 | F16 | F32), shard_gb (default 5), seed, drift, noise
    <model>  = base | ft-<k>                 k >= 1; any k exists, listings show ft-1..ft-3
    <file>   = config.json | model.safetensors.index.json | model-0000i-of-0000n.safetensors

e.g. ``procedural://llama3-70b,layers=4/ft-2/model.safetensors.index.json``.

Determinism rule: the value of an element is a pure function of (seed, drift, noise, model,
tensor name and size, generation block), blocks being GENERATION_BLOCK_ELEMENTS consecutive elements drawn
from a ``torch.Generator`` seeded by a stable hash; the served bytes are those values rounded to
the family's dtype. So any byte range is served by generating only the blocks it overlaps, every
process and every run serves the same bytes, and a tensor keeps its values whatever the layer
count, shard size or dtype (``llama3-70b,layers=4`` is the first four layers of ``llama3-70b``).
"Every process" assumes one torch version on one CPU family: torch's vectorised normal sampler
may round differently elsewhere (x86 AVX2 vs ARM), which is why ETags name the torch version.

Base weights are N(0, 0.02) (norm weights 1 + N(0, 0.01)); fine-tune k is
base + m * (drift * f(name) * shared + noise * own_k), m the weights' magnitude (0.02, or 1 for
norm weights), ``shared`` and ``own_k`` standard normal, ``shared`` common to all fine-tunes and
f(name) in {1/3, ..., 5/3}, so task vectors meet at positive angles that vary across tensors
(cosine f^2 drift^2 / (f^2 drift^2 + noise^2)), as real fine-tunes' do.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import fsspec
import torch
from fsspec.spec import AbstractBufferedFile

from modelstock.checkpoint.writer import TensorSpec, encode_header
from modelstock.dtypes import to_torch
from modelstock.output import index_json, shard_file_name
from modelstock.testing.synthetic import LLAMA_PRESETS, LlamaShape

PROTOCOL = "procedural"
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
# Part of the determinism rule: changing it changes every served byte (and GENERATOR_VERSION).
GENERATION_BLOCK_ELEMENTS = 1 << 16
GENERATOR_VERSION = 1
# base + shared drift is common to every fine-tune: cached, a merge reading the same rows of
# ft-1..ft-n generates it once (two normal draws saved per block and fine-tune). 64 MB holds a
# 32 MiB bf16 range's worth without weighing on a driver that must stay under 1 GiB.
BLOCK_CACHE_BYTES = 64 * 1024 * 1024
LISTED_FINETUNES = 3
SERVED_DTYPES = ("BF16", "F16", "F32")
MATRIX_STD = 0.02
NORM_STD = 0.01
# Fine-tune deltas scale with a weight's typical magnitude (as synthetic.py's mean |w| does):
# deltas of norm weights relative to 0.01 would vanish under bf16's 2**-8 resolution near 1.
MATRIX_MAGNITUDE = MATRIX_STD
NORM_MAGNITUDE = 1.0
# Beyond these a spec is a typo, and laying it out would hang rather than fail.
MAX_LAYERS = 10_000
MAX_WIDTH = 1 << 21

_MODEL = re.compile(r"base|ft-([1-9][0-9]*)")
_SHAPE_FIELDS = tuple(f.name for f in dataclasses.fields(LlamaShape))


@dataclass(frozen=True)
class FamilySpec:
    """A parsed ``<family>``: the shape and how its checkpoints are stored and generated."""

    shape: LlamaShape
    dtype: str = "BF16"
    shard_gb: float = 5.0
    seed: int = 0
    drift: float = 0.05
    noise: float = 0.05

    @property
    def shard_bytes(self) -> int:
        return max(1, int(self.shard_gb * 1000**3))  # "5GB" as transformers counts it

    @property
    def canonical(self) -> str:
        """Every field spelled out: what a file's ETag is derived from."""
        fields = {name: getattr(self.shape, name) for name in _SHAPE_FIELDS}
        fields.update(dtype=self.dtype, shard_gb=self.shard_gb, seed=self.seed, drift=self.drift, noise=self.noise)
        return ",".join(f"{key}={value!r}" for key, value in fields.items())


def _override_value(key: str, text: str) -> Any:
    kind = "an integer" if key in _SHAPE_FIELDS or key == "seed" else "a number"
    try:
        if key == "dtype":
            if text.upper() not in SERVED_DTYPES:
                raise ValueError
            return text.upper()
        return int(text) if kind == "an integer" else float(text)
    except ValueError:
        expected = " | ".join(SERVED_DTYPES) if key == "dtype" else kind
        raise ValueError(f"override {key}={text!r} is not {expected}") from None


def _check_family(family: FamilySpec) -> None:
    shape = family.shape
    for name in _SHAPE_FIELDS:
        value = getattr(shape, name)
        low, high = (0, MAX_LAYERS) if name == "layers" else (1, MAX_WIDTH)
        if not low <= value <= high:
            raise ValueError(f"{name}={value} is outside [{low}, {high}]")
    if shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        raise ValueError(
            f"heads={shape.heads} must divide hidden={shape.hidden} and be a multiple of kv_heads={shape.kv_heads}"
        )
    finite = all(math.isfinite(v) for v in (family.shard_gb, family.drift, family.noise))
    if not finite or family.shard_gb <= 0 or family.drift < 0 or family.noise < 0:
        raise ValueError(
            f"shard_gb={family.shard_gb}, drift={family.drift}, noise={family.noise}: shard_gb must be "
            "positive, drift and noise non-negative, all finite"
        )


@functools.lru_cache(maxsize=256)
def parse_family(text: str) -> FamilySpec:
    """``llama3-70b,layers=4`` -> FamilySpec; a ValueError saying what is wrong otherwise."""
    preset, *overrides = text.split(",")
    if preset not in LLAMA_PRESETS:
        raise ValueError(f"unknown preset {preset!r} (known: {', '.join(LLAMA_PRESETS)})")
    values: dict[str, Any] = {}
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or key not in (*_SHAPE_FIELDS, "dtype", "shard_gb", "seed", "drift", "noise"):
            raise ValueError(
                f"bad override {override!r} (expected key=value with key one of "
                f"{', '.join(_SHAPE_FIELDS)}, dtype, shard_gb, seed, drift, noise)"
            )
        if key in values:
            raise ValueError(f"override {key!r} given twice")
        values[key] = _override_value(key, raw)
    shape = dataclasses.replace(LLAMA_PRESETS[preset], **{k: v for k, v in values.items() if k in _SHAPE_FIELDS})
    family = FamilySpec(shape, **{k: v for k, v in values.items() if k not in _SHAPE_FIELDS})
    _check_family(family)
    return family


# ----------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class ShardLayout:
    """One shard file: its tensors in order, its header bytes and where each tensor starts."""

    specs: tuple[TensorSpec, ...]
    header: bytes
    starts: tuple[int, ...]  # absolute offset of each tensor's first byte

    @property
    def size(self) -> int:
        return len(self.header) + sum(spec.nbytes for spec in self.specs)


@dataclass(frozen=True)
class FolderLayout:
    """The files of every model folder of a family (base and fine-tunes share one layout)."""

    shards: dict[str, ShardLayout]
    small_files: dict[str, bytes]  # config.json and the index

    def has(self, file: str) -> bool:
        return file in self.shards or file in self.small_files

    def size(self, file: str) -> int:
        return self.shards[file].size if file in self.shards else len(self.small_files[file])

    @property
    def files(self) -> list[str]:
        return [*self.small_files, *self.shards]


def _pack(specs: list[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors up to ``shard_bytes`` per shard (a bigger tensor gets its own), as
    transformers' ``save_pretrained`` splits them."""
    groups: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        if groups[-1] and used + spec.nbytes > shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(spec)
        used += spec.nbytes
    return groups


@functools.lru_cache(maxsize=32)
def folder_layout(family: FamilySpec) -> FolderLayout:
    specs = [TensorSpec(name, family.dtype, dims) for name, dims in family.shape.tensors().items()]
    groups = _pack(specs, family.shard_bytes)
    shards: dict[str, ShardLayout] = {}
    for number, group in enumerate(groups, start=1):
        header = encode_header(group)
        starts, offset = [], len(header)
        for spec in group:
            starts.append(offset)
            offset += spec.nbytes
        shards[shard_file_name(number, len(groups))] = ShardLayout(tuple(group), header, tuple(starts))
    total = sum(spec.nbytes for spec in specs)
    index = index_json([(file, [s.name for s in shard.specs]) for file, shard in shards.items()], total)
    config = (json.dumps(family.shape.config(to_torch(family.dtype)), indent=2) + "\n").encode()
    return FolderLayout(shards, {CONFIG_FILE: config, INDEX_FILE: index})


# ------------------------------------------------------------------------------- generation


def _stable_seed(*parts: object) -> int:
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds must fit in 63 bits here


def _standard_normal(seed: int, count: int) -> torch.Tensor:
    return torch.randn(count, generator=torch.Generator().manual_seed(seed))


class _BlockCache:
    """A thread-safe LRU of float32 blocks, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._blocks: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get_or_make(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached block, or ``make()``'s (outside the lock: two threads may both make it,
        which is harmless since blocks are pure functions of their key)."""
        with self._lock:
            block = self._blocks.get(key)
            if block is not None:
                self._blocks.move_to_end(key)
                return block
        block = make()
        self._put(key, block)
        return block

    def _put(self, key: tuple, block: torch.Tensor) -> None:
        size = block.numel() * block.element_size()
        with self._lock:
            if key in self._blocks or size > self.max_bytes:
                return
            self._blocks[key] = block
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._blocks.popitem(last=False)
                self._bytes -= evicted.numel() * evicted.element_size()

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._bytes = 0


# Per process, outside the filesystem object so that instances stay cheap to create and pickle.
BLOCK_CACHE = _BlockCache(BLOCK_CACHE_BYTES)


def _is_norm(spec: TensorSpec) -> bool:
    return len(spec.shape) == 1


def _magnitude(spec: TensorSpec) -> float:
    return NORM_MAGNITUDE if _is_norm(spec) else MATRIX_MAGNITUDE


def _drift_factor(name: str) -> float:
    """In {1/3, ..., 5/3}, varying from tensor to tensor: how far the shared drift goes here."""
    return (1 + _stable_seed("drift", name) % 5) / 3


def _base_block(family: FamilySpec, spec: TensorSpec, block: int, count: int) -> torch.Tensor:
    values = _standard_normal(_stable_seed("base", family.seed, spec.name, block), count)
    return values.mul_(NORM_STD).add_(1.0) if _is_norm(spec) else values.mul_(MATRIX_STD)


def _finetune_common_block(family: FamilySpec, spec: TensorSpec, block: int, count: int) -> torch.Tensor:
    """base + the drift every fine-tune shares."""

    def make() -> torch.Tensor:
        shared = _standard_normal(_stable_seed("shared", family.seed, spec.name, block), count)
        weight = _magnitude(spec) * family.drift * _drift_factor(spec.name)
        return shared.mul_(weight).add_(_base_block(family, spec, block, count))

    key = ("common", family.seed, family.drift, spec.name, block, count, len(spec.shape))
    return BLOCK_CACHE.get_or_make(key, make)


def block_values(family: FamilySpec, variant: int, spec: TensorSpec, block: int) -> torch.Tensor:
    """Float32 values of one generation block of a tensor (variant 0 = base, k = ft-k)."""
    first = block * GENERATION_BLOCK_ELEMENTS
    count = min(GENERATION_BLOCK_ELEMENTS, _numel(spec) - first)
    if variant == 0:
        return _base_block(family, spec, block, count)
    own = _standard_normal(_stable_seed(f"ft-{variant}", family.seed, spec.name, block), count)
    return own.mul_(_magnitude(spec) * family.noise).add_(_finetune_common_block(family, spec, block, count))


def _numel(spec: TensorSpec) -> int:
    count = 1
    for dim in spec.shape:
        count *= dim
    return count


def tensor_byte_parts(
    family: FamilySpec, variant: int, spec: TensorSpec, start: int, end: int
) -> Iterator[memoryview]:
    """Bytes ``[start, end)`` of a tensor's data, block by block, generating only the blocks
    they overlap."""
    element = spec.nbytes // _numel(spec)
    block_bytes = GENERATION_BLOCK_ELEMENTS * element
    dtype = to_torch(spec.dtype)
    for block in range(start // block_bytes, (end - 1) // block_bytes + 1):
        raw = memoryview(block_values(family, variant, spec, block).to(dtype).view(torch.uint8).numpy())  # type: ignore[arg-type]
        origin = block * block_bytes
        yield raw[max(start, origin) - origin : min(end, origin + len(raw)) - origin]


def read_shard_range(family: FamilySpec, variant: int, shard: ShardLayout, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of a shard file: header bytes as laid out, then generated data."""
    # Parts joined once: the output is allocated (and page-faulted) a single time.
    parts: list[bytes | memoryview] = []
    header_end = len(shard.header)
    if start < header_end:
        parts.append(shard.header[start : min(end, header_end)])
    position = max(start, header_end)
    index = bisect.bisect_right(shard.starts, position) - 1
    while position < end and index < len(shard.specs):
        spec, tensor_start = shard.specs[index], shard.starts[index]
        stop = min(end, tensor_start + spec.nbytes)
        if stop > position:
            parts.extend(tensor_byte_parts(family, variant, spec, position - tensor_start, stop - tensor_start))
            position = stop
        index += 1
    return b"".join(parts)


# ------------------------------------------------------------------------------- filesystem


@dataclass(frozen=True)
class ProceduralPath:
    """A resolved path: the root, a family folder, a model folder or a file."""

    path: str
    family: FamilySpec | None = None
    variant: int | None = None  # 0 = base, k = ft-k
    file: str | None = None

    @property
    def url(self) -> str:
        return f"{PROTOCOL}://{self.path}"

    @property
    def is_file(self) -> bool:
        return self.file is not None


def resolve_path(path: str) -> ProceduralPath:
    """FileNotFoundError for a path that names nothing; ValueError for a malformed family."""
    parts = path.split("/") if path else []
    if not parts:
        return ProceduralPath(path)
    try:
        family = parse_family(parts[0])
    except ValueError as exc:
        raise ValueError(f"{PROTOCOL}://{path}: {exc}") from None
    if len(parts) == 1:
        return ProceduralPath(path, family)
    model = _MODEL.fullmatch(parts[1])
    if model is None:
        raise FileNotFoundError(f"{PROTOCOL}://{path}: no model {parts[1]!r} (expected base or ft-<k>, k >= 1)")
    variant = int(model.group(1) or 0)
    if len(parts) == 2:
        return ProceduralPath(path, family, variant)
    if len(parts) > 3 or not folder_layout(family).has(parts[2]):
        raise FileNotFoundError(f"{PROTOCOL}://{path}: no such file in a procedural checkpoint folder")
    return ProceduralPath(path, family, variant, parts[2])


def _etag(resolved: ProceduralPath) -> str:
    assert resolved.family is not None
    sampler = f"v{GENERATOR_VERSION}|torch-{torch.__version__.split('+')[0]}"
    key = f"{sampler}|{resolved.family.canonical}|{resolved.variant}|{resolved.file}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _read_only(operation: str) -> Any:
    def refuse(self: ProceduralFileSystem, *args: Any, **kwargs: Any) -> NoReturn:
        target = f" {args[0]!r}" if args else ""
        raise PermissionError(f"{PROTOCOL}:// is read-only ({operation}{target} refused)")

    refuse.__name__ = operation
    return refuse


class ProceduralFile(AbstractBufferedFile):
    """A read-only file whose ranges are generated on demand."""

    def _fetch_range(self, start: int, end: int) -> bytes:
        return self.fs.cat_file(self.path, start=start, end=end)


class ProceduralFileSystem(fsspec.AbstractFileSystem):
    """Hugging Face checkpoint folders of any Llama shape, generated on read (see the module doc).

    Stateless: instances are cheap and pickle to their class alone; layouts and generated blocks
    are cached per process."""

    protocol = PROTOCOL
    root_marker = ""

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        if path.startswith(f"{PROTOCOL}://"):
            path = path[len(PROTOCOL) + 3 :]
        return path.strip("/")

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        resolved = resolve_path(self._strip_protocol(path))
        if not resolved.is_file:
            return {"name": resolved.path, "size": 0, "type": "directory"}
        assert resolved.family is not None and resolved.file is not None
        size = folder_layout(resolved.family).size(resolved.file)
        return {"name": resolved.path, "size": size, "type": "file", "ETag": _etag(resolved)}

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        resolved = resolve_path(self._strip_protocol(path))
        if resolved.is_file:
            children = [resolved.path]
        elif resolved.family is None:
            children = list(LLAMA_PRESETS)
        elif resolved.variant is None:
            models = ["base", *(f"ft-{k}" for k in range(1, LISTED_FINETUNES + 1))]
            children = [f"{resolved.path}/{model}" for model in models]
        else:
            children = [f"{resolved.path}/{file}" for file in folder_layout(resolved.family).files]
        return [self.info(child) for child in children] if detail else children

    def exists(self, path: str, **kwargs: Any) -> bool:
        # A malformed family is an error to report, not an absence.
        try:
            self.info(path)
        except FileNotFoundError:
            return False
        return True

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        resolved = resolve_path(self._strip_protocol(path))
        if not resolved.is_file:
            raise IsADirectoryError(f"{resolved.url}: is a directory")
        assert resolved.family is not None and resolved.file is not None and resolved.variant is not None
        layout = folder_layout(resolved.family)
        size = layout.size(resolved.file)
        start, end = _byte_bounds(size, start, end)
        if start >= end:
            return b""
        if resolved.file in layout.small_files:
            return layout.small_files[resolved.file][start:end]
        return read_shard_range(resolved.family, resolved.variant, layout.shards[resolved.file], start, end)

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, autocommit: bool = True,
              cache_options: dict[str, Any] | None = None, **kwargs: Any) -> ProceduralFile:
        if mode != "rb":
            raise PermissionError(f"{PROTOCOL}:// is read-only (open {path!r} with mode {mode!r} refused)")
        size = self.info(path)["size"]
        return ProceduralFile(self, path, mode, block_size=block_size or "default",
                              cache_options=cache_options, size=size, **kwargs)

    mkdir = _read_only("mkdir")
    makedirs = _read_only("makedirs")
    rmdir = _read_only("rmdir")
    rm = _read_only("rm")
    rm_file = _read_only("rm_file")
    _rm = _read_only("rm")
    cp_file = _read_only("copy")
    mv = _read_only("move")
    pipe_file = _read_only("write")
    put_file = _read_only("upload")
    touch = _read_only("touch")


def _byte_bounds(size: int, start: int | None, end: int | None) -> tuple[int, int]:
    """fsspec's range convention: None is the file's start/end, negatives count from the end."""
    start = 0 if start is None else (size + start if start < 0 else start)
    end = size if end is None else (size + end if end < 0 else end)
    return max(0, min(start, size)), max(0, min(end, size))
