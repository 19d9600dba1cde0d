"""Evaluation datasets: Parquet files on any fsspec URL, split into shards of row groups, and the
eval-suite YAML naming one ID set and any number of OOD sets.

A dataset is a ``.parquet`` file or a folder of them with a ``label`` column (int) and either
``pixels`` (a flattened float list; the file's key-value metadata ``modelstock.shape`` gives
its shape, e.g. ``[1, 8, 8]``) or ``image`` (encoded PNG/JPEG bytes, read as floats in [0, 1]).
Class subsets / mappings come from the suite or, failing that, from the file metadata keys
``modelstock.class_subset`` / ``modelstock.class_mapping`` (JSON).

```yaml
id: {name: digits, url: s3://bucket/eval/digits}
held_out: {name: digits-val, url: s3://bucket/eval/digits-val}   # greedy soup; default: id
ood:
  - {name: imagenet-r, url: s3://bucket/eval/r, class_subset: [1, 2, 9]}
  - {name: objectnet, url: s3://bucket/eval/objectnet, class_mapping: {409: 0, 530: 1}}
batch_size: 256
rows_per_shard: 2048
```

A language-model suite says ``kind: text`` (image is the default). Its sets hold a ``text``
column (perplexity) or, with ``task: choice``, ``prompt``, ``choices`` (list of strings) and
``answer`` (int index into ``choices``):

```yaml
kind: text
id: {name: code, url: s3://bucket/eval/code.parquet}
ood:
  - {name: prose, url: s3://bucket/eval/prose.parquet}
  - {name: cloze, url: s3://bucket/eval/cloze.parquet, task: choice}
held_out: {name: code-val, url: s3://bucket/eval/code-val.parquet}   # greedy soup; default: id
max_length: 1024        # tokens per row (longer rows are truncated)
batch_tokens: 16384     # padded tokens per batch (rows are batched by length)
batch_size: 64          # rows per batch, at most
rows_per_shard: 512
gpus_per_model: 1       # GPUs one actor holds a model on (its layers split across them)
actor_memory: 80GiB     # optional: memory of one actor, instead of the measured one
dtype: auto             # auto (the checkpoint's) | float32 | bfloat16 | float16
```
"""

from __future__ import annotations

import io
import json
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from modelstock import storage
from modelstock.errors import InvalidRecipe, StorageAccessError

SHAPE_KEY = b"modelstock.shape"
SUBSET_KEY = b"modelstock.class_subset"
MAPPING_KEY = b"modelstock.class_mapping"


class DatasetSpec(BaseModel):
    """One evaluation set as the suite names it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1)
    url: str = Field(min_length=1)
    class_subset: tuple[int, ...] | None = None
    class_mapping: dict[int, int] | None = None
    mean: tuple[float, ...] | None = None  # per-channel normalisation applied after loading
    std: tuple[float, ...] | None = None

    @model_validator(mode="after")
    def _one_projection(self) -> DatasetSpec:
        if self.class_subset is not None and self.class_mapping is not None:
            raise ValueError(f"dataset {self.name}: give class_subset or class_mapping, not both")
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"dataset {self.name}: give both mean and std")
        return self


class EvalSuite(BaseModel):
    """An image suite: one ID set, optional OOD sets, and an optional held-out set for greedy soups."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["image"] = "image"
    id: DatasetSpec
    ood: list[DatasetSpec] = Field(default_factory=list)
    held_out: DatasetSpec | None = None
    batch_size: int = Field(default=256, gt=0)
    rows_per_shard: int = Field(default=2048, gt=0)

    @model_validator(mode="after")
    def _unique_names(self) -> EvalSuite:
        names = [d.name for d in self.datasets]
        if self.held_out is not None:
            names.append(self.held_out.name)
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"dataset name {duplicates[0]!r} is used twice")
        return self

    @property
    def datasets(self) -> list[DatasetSpec]:
        """ID first, then the OOD sets in suite order."""
        return [self.id, *self.ood]

    @property
    def ood_names(self) -> list[str]:
        return [d.name for d in self.ood]

    @property
    def selection_set(self) -> DatasetSpec:
        """The set greedy soups select on: ``held_out`` if given, else the ID set."""
        return self.held_out or self.id


class TextDatasetSpec(BaseModel):
    """One language-model evaluation set: held-out text (perplexity) or multiple choice."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1)
    url: str = Field(min_length=1)
    task: Literal["perplexity", "choice"] = "perplexity"


def parse_byte_size(value: Any) -> int:
    """``80GiB``, ``512MB`` or a number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 80GiB")
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", str(value), re.IGNORECASE)
        if not match:
            raise ValueError(f"not a size: {value!r} (e.g. 80GiB, 512MB)")
        unit = (match.group(2) or "").upper()
        letter = unit[:1] if unit[:1] in "KMGT" else ""
        scale = (1024 if "I" in unit else 1000) ** ("KMGT".index(letter) + 1) if letter else 1
        size = int(float(match.group(1)) * scale)
    if size <= 0:
        raise ValueError("a size must be positive")
    return size


class TextSuite(BaseModel):
    """A language-model suite (``kind: text``): perplexity and multiple-choice sets."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["text"]
    id: TextDatasetSpec
    ood: list[TextDatasetSpec] = Field(default_factory=list)
    held_out: TextDatasetSpec | None = None
    max_length: int = Field(default=1024, gt=1)
    batch_tokens: int = Field(default=16384, gt=0)
    batch_size: int = Field(default=64, gt=0)
    rows_per_shard: int = Field(default=512, gt=0)
    gpus_per_model: int = Field(default=1, gt=0)
    actor_memory: int | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @field_validator("actor_memory", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int | None:
        return None if value is None else parse_byte_size(value)

    @model_validator(mode="after")
    def _consistent(self) -> TextSuite:
        names = [d.name for d in self.datasets] + ([self.held_out.name] if self.held_out else [])
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"dataset name {duplicates[0]!r} is used twice")
        if self.batch_tokens < self.max_length:
            raise ValueError(f"batch_tokens ({self.batch_tokens}) must hold one row of max_length "
                             f"({self.max_length}) tokens")
        return self

    @property
    def datasets(self) -> list[TextDatasetSpec]:
        """ID first, then the OOD sets in suite order."""
        return [self.id, *self.ood]

    @property
    def ood_names(self) -> list[str]:
        return [d.name for d in self.ood]

    @property
    def selection_set(self) -> TextDatasetSpec:
        """The set greedy soups select on: ``held_out`` if given, else the ID set."""
        return self.held_out or self.id


AnySuite = EvalSuite | TextSuite
SUITE_KINDS: dict[str, type[BaseModel]] = {"image": EvalSuite, "text": TextSuite}


def parse_suite(data: Any, source: str = "<suite>") -> AnySuite:
    if not isinstance(data, Mapping):
        raise InvalidRecipe(f"{source}: an eval suite must be a mapping with id and ood")
    kind = data.get("kind", "image")
    if kind not in SUITE_KINDS:
        raise InvalidRecipe(f"{source}: kind: must be one of {', '.join(SUITE_KINDS)}, got {kind!r}")
    try:
        return SUITE_KINDS[kind].model_validate(dict(data))  # type: ignore[return-value]
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        location = ".".join(str(p) for p in error["loc"])
        raise InvalidRecipe(f"{source}: {location + ': ' if location else ''}{error['msg']}") from None


def load_suite(path: str | Path) -> AnySuite:
    """Read and validate an eval-suite YAML file from local disk."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidRecipe(f"{path}: eval suite not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InvalidRecipe(f"{path}: cannot read eval suite ({exc})") from None
    return parse_suite(data, str(path))


@dataclass(frozen=True)
class DatasetShard:
    """Consecutive row groups of one Parquet file: the unit of evaluation work."""

    dataset: DatasetSpec | TextDatasetSpec
    index: int
    file_url: str
    row_groups: tuple[int, ...]
    rows: int


def _parquet_files(spec: DatasetSpec | TextDatasetSpec,
                   storage_options: Mapping[str, Any] | None) -> list[storage.Location]:
    root = storage.resolve(spec.url, storage_options)
    if root.path.endswith(".parquet"):
        return [root]
    names = [n for n in storage.list_names(root) if n.endswith(".parquet")]
    if not names:
        raise StorageAccessError(f"{spec.url}: dataset {spec.name} has no .parquet files")
    return [root.join(n) for n in names]


def _footer(location: storage.Location) -> pq.FileMetaData:
    def read() -> pq.FileMetaData:
        with location.fs.open(location.path, "rb") as handle:
            return pq.ParquetFile(handle).metadata

    return storage.storage_call(location.url, read)


def _row_groups(location: storage.Location, row_groups: list[int]) -> tuple[pa.Table, dict[bytes, bytes] | None]:
    def read() -> tuple[pa.Table, dict[bytes, bytes] | None]:
        with location.fs.open(location.path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            return parquet.read_row_groups(row_groups), parquet.schema_arrow.metadata

    return storage.storage_call(location.url, read)


def plan_dataset_shards(
    spec: DatasetSpec | TextDatasetSpec, rows_per_shard: int, storage_options: Mapping[str, Any] | None = None
) -> list[DatasetShard]:
    """Shards of about ``rows_per_shard`` rows from the Parquet footers alone (row groups are not split)."""
    shards: list[DatasetShard] = []
    for location in _parquet_files(spec, storage_options):
        metadata = _footer(location)
        group: list[int] = []
        rows = 0
        for index in range(metadata.num_row_groups):
            group.append(index)
            rows += metadata.row_group(index).num_rows
            if rows >= rows_per_shard:
                shards.append(DatasetShard(spec, len(shards), location.url, tuple(group), rows))
                group, rows = [], 0
        if group:
            shards.append(DatasetShard(spec, len(shards), location.url, tuple(group), rows))
    return shards


@dataclass(frozen=True)
class ShardData:
    inputs: torch.Tensor  # (rows, C, H, W) float32
    labels: torch.Tensor  # (rows,) int64
    class_subset: tuple[int, ...] | None
    class_mapping: dict[int, int] | None


def _decode_images(column: pa.ChunkedArray) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    images = []
    for blob in column.to_pylist():
        array = np.asarray(Image.open(io.BytesIO(blob)), dtype=np.float32) / 255.0
        images.append(torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy()))
    return torch.stack(images)


def _metadata_json(metadata: Mapping[bytes, bytes] | None, key: bytes) -> Any:
    if not metadata or key not in metadata:
        return None
    return json.loads(metadata[key])


def read_shard(shard: DatasetShard, storage_options: Mapping[str, Any] | None = None) -> ShardData:
    """Read one shard's rows as model-ready tensors (normalised if the suite says so)."""
    location = storage.resolve(shard.file_url, storage_options)
    table, metadata = _row_groups(location, list(shard.row_groups))
    if "label" not in table.column_names:
        raise StorageAccessError(f"{shard.file_url}: dataset {shard.dataset.name} has no 'label' column")
    labels = torch.from_numpy(table.column("label").to_numpy().astype("int64"))
    if "pixels" in table.column_names:
        shape = _metadata_json(metadata, SHAPE_KEY)
        if shape is None:
            raise StorageAccessError(f"{shard.file_url}: 'pixels' column without {SHAPE_KEY.decode()} metadata")
        flat = table.column("pixels").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        inputs = torch.from_numpy(flat.astype("float32")).reshape(len(labels), *shape)
    elif "image" in table.column_names:
        inputs = _decode_images(table.column("image"))
    else:
        raise StorageAccessError(f"{shard.file_url}: dataset {shard.dataset.name} has no 'pixels' or 'image' column")
    spec = shard.dataset
    if not isinstance(spec, DatasetSpec):
        raise InvalidRecipe(f"{shard.file_url}: dataset {spec.name} is a text set; it needs a text suite (kind: text)")
    if spec.mean is not None and spec.std is not None:
        mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
        std = torch.tensor(spec.std).view(1, -1, 1, 1)
        inputs = (inputs - mean) / std
    subset = spec.class_subset
    mapping = spec.class_mapping
    if subset is None and mapping is None:
        stored_subset = _metadata_json(metadata, SUBSET_KEY)
        stored_mapping = _metadata_json(metadata, MAPPING_KEY)
        subset = tuple(stored_subset) if stored_subset is not None else None
        mapping = {int(k): int(v) for k, v in stored_mapping.items()} if stored_mapping is not None else None
    return ShardData(inputs=inputs, labels=labels, class_subset=subset, class_mapping=mapping)


def write_pixels_parquet(
    url: str,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    rows_per_group: int = 1024,
    class_subset: tuple[int, ...] | None = None,
    class_mapping: Mapping[int, int] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Write a dataset file in the ``pixels`` layout (used by the demo and the tests)."""
    rows = inputs.shape[0]
    flat = inputs.detach().float().reshape(rows, -1).numpy()
    pixels = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    metadata = {SHAPE_KEY: json.dumps(list(inputs.shape[1:])).encode()}
    if class_subset is not None:
        metadata[SUBSET_KEY] = json.dumps(list(class_subset)).encode()
    if class_mapping is not None:
        metadata[MAPPING_KEY] = json.dumps({str(k): v for k, v in class_mapping.items()}).encode()
    table = pa.table({"pixels": pixels, "label": pa.array(labels.long().numpy())}).replace_schema_metadata(metadata)
    location = storage.resolve(url, storage_options)
    if location.is_local:
        location.fs.makedirs(posixpath.dirname(location.path), exist_ok=True)
    with location.fs.open(location.path, "wb") as handle:
        pq.write_table(table, handle, row_group_size=rows_per_group)
