"""The benchmark's I/O floor: read every tensor of every input, write an output of the merge's size.

No arithmetic: each tensor of every input is read in full with safetensors (``safe_open`` maps the
file; ``clone`` copies the tensor out of the mapping, which is what makes the read happen), then
the base's copy (cast to the output dtype, a no-op when they match) is streamed to the output,
in shards of about ``--shard-size`` bytes. Single process, single thread, one tensor at a time:
the cost of moving the bytes the simple way, which a merge cannot avoid.

    python bench/io_floor.py OUT_DIR --out-dtype bfloat16 --shard-size 2000000000 BASE_DIR MODEL_DIR...
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64"}
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


def tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> file, in the checkpoint's own order (index order, then header order)."""
    index = folder / "model.safetensors.index.json"
    files = (
        list(dict.fromkeys(folder / f for f in json.loads(index.read_text())["weight_map"].values()))
        if index.exists() else [folder / "model.safetensors"]
    )
    located: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as opened:
            for name in opened.keys():
                located[name] = file
    return located


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, produce) -> None:
    """Header first (shapes are known), then each tensor's bytes as ``produce(name)`` returns it."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    size = torch.empty((), dtype=dtype).element_size()
    for name, shape in tensors:
        nbytes = size * int(torch.tensor(shape, dtype=torch.int64).prod()) if shape else size
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        for name, _ in tensors:
            out.write(produce(name).reshape(-1).view(torch.uint8).numpy().data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("inputs", type=Path, nargs="+", help="base model folder first, then the fine-tunes")
    parser.add_argument("--out-dtype", default="bfloat16", choices=sorted(TORCH_DTYPES))
    parser.add_argument("--shard-size", type=int, default=2 * 1000**3)
    args = parser.parse_args()
    out_dtype = TORCH_DTYPES[args.out_dtype]

    located = [tensor_files(folder) for folder in args.inputs]
    handles = {file: safe_open(str(file), framework="pt") for model in located for file in set(model.values())}
    names = list(located[0])
    shapes = {name: tuple(handles[located[0][name]].get_slice(name).get_shape()) for name in names}

    element = torch.empty((), dtype=out_dtype).element_size()
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        nbytes = element * int(torch.tensor(shapes[name], dtype=torch.int64).prod())
        if groups[-1] and used + nbytes > args.shard_size:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += nbytes

    def produce(name: str) -> torch.Tensor:
        copies = [handles[model[name]].get_tensor(name).clone() for model in located]
        return copies[0].to(out_dtype)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    for number, group in enumerate(groups, start=1):
        path = args.out_dir / f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        write_shard(path, [(name, shapes[name]) for name in group], out_dtype, produce)


if __name__ == "__main__":
    main()
