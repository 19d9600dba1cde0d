"""Llama-shaped checkpoint families written straight to safetensors: the demo's and the
benchmark's inputs. A base model and fine-tunes = base + a shared drift + individual noise, so
the task vectors have the positive, layer-varying angles real fine-tunes show.

Tensors are generated and streamed one at a time, so a multi-GB family needs little memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from modelstock import storage
from modelstock.checkpoint.writer import ShardWriter, TensorSpec
from modelstock.dtypes import from_torch
from modelstock.output import index_json, shard_file_name


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    vocab: int = 256
    heads: int = 4
    kv_heads: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> dict[str, tuple[int, ...]]:
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for n in range(self.layers):
            p = f"model.layers.{n}."
            shapes.update({
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            })
        shapes["model.norm.weight"] = (h,)
        shapes["lm_head.weight"] = (self.vocab, h)
        return shapes

    def parameters(self) -> int:
        total = 0
        for shape in self.tensors().values():
            count = 1
            for d in shape:
                count *= d
            total += count
        return total

    def config(self, dtype: torch.dtype) -> dict[str, object]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }

    @classmethod
    def with_parameters(cls, target: int, layers: int | None = None) -> LlamaShape:
        """A Llama-like shape of roughly ``target`` parameters (hidden size scaled, 32k vocab)."""
        vocab = 32000
        best = cls()
        for hidden in range(256, 16385, 128):
            depth = layers or max(2, hidden // 128)
            shape = cls(hidden=hidden, intermediate=int(hidden * 2.6875) // 64 * 64, layers=depth,
                        vocab=vocab, heads=max(1, hidden // 64), kv_heads=max(1, hidden // 256))
            if shape.parameters() > target:
                return best
            best = shape
        return best


# Published Llama shapes (from each model's config.json) plus a tiny one for fast tests. The
# procedural checkpoint source (modelstock.testing.procedural) serves any of them by name.
LLAMA_PRESETS: dict[str, LlamaShape] = {
    "tiny": LlamaShape(),
    "tinyllama": LlamaShape(hidden=2048, intermediate=5632, layers=22, vocab=32000, heads=32, kv_heads=4),
    "llama3-8b": LlamaShape(hidden=4096, intermediate=14336, layers=32, vocab=128256, heads=32, kv_heads=8),
    "llama3-70b": LlamaShape(hidden=8192, intermediate=28672, layers=80, vocab=128256, heads=64, kv_heads=8),
    "llama3-405b": LlamaShape(hidden=16384, intermediate=53248, layers=126, vocab=128256, heads=128, kv_heads=8),
}


def _tensor(shape: tuple[int, ...], name: str, generator: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape) + 0.01 * torch.randn(shape, generator=generator)
    return 0.02 * torch.randn(shape, generator=generator)


def _family_tensors(shape: LlamaShape, seed: int, variant: int, drift: float, noise: float) -> Iterator[tuple[str, torch.Tensor]]:
    for index, (name, dims) in enumerate(shape.tensors().items()):
        base = _tensor(dims, name, torch.Generator().manual_seed(seed * 1_000_003 + index))
        if variant > 0:
            shared = torch.randn(dims, generator=torch.Generator().manual_seed(seed * 7 + index + 17))
            own = torch.randn(dims, generator=torch.Generator().manual_seed(seed * 13 + variant * 1_000_033 + index))
            scale = base.abs().mean().item() or 1.0
            layer_drift = drift * (1 + index % 5) / 3  # angles that vary across layers
            base = base + scale * (layer_drift * shared + noise * own)
        yield name, base


def write_model(
    folder: str, shape: LlamaShape, dtype: torch.dtype, seed: int, variant: int,
    drift: float = 0.05, noise: float = 0.05, shard_size: int = 2 * 1000**3,
) -> None:
    """Write one model of the family (variant 0 = base) in Hugging Face layout."""
    location = storage.resolve(folder)
    location.fs.makedirs(location.path, exist_ok=True)
    names = list(shape.tensors())
    sizes = {n: int(torch.tensor(d).prod()) * torch.empty((), dtype=dtype).element_size() for n, d in shape.tensors().items()}
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        if groups[-1] and used + sizes[name] > shard_size:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += sizes[name]
    files = [shard_file_name(i + 1, len(groups)) if len(groups) > 1 else "model.safetensors" for i in range(len(groups))]
    tensors = _family_tensors(shape, seed, variant, drift, noise)
    for file, group in zip(files, groups):
        specs = [TensorSpec(n, from_torch(dtype), shape.tensors()[n]) for n in group]
        with ShardWriter(location.join(file), specs) as writer:
            for name in group:
                produced, tensor = next(tensors)
                assert produced == name
                writer.write_block(name, tensor.to(dtype))
    if len(groups) > 1:
        total = sum(sizes.values())
        storage.write_bytes(location.join("model.safetensors.index.json"), index_json(list(zip(files, groups)), total))
    storage.write_bytes(location.join("config.json"), (json.dumps(shape.config(dtype), indent=2) + "\n").encode())


def write_family(
    folder: str | Path, shape: LlamaShape, finetunes: int, dtype: torch.dtype = torch.bfloat16,
    seed: int = 0, shard_size: int = 2 * 1000**3,
) -> tuple[str, list[str]]:
    """A base model and ``finetunes`` fine-tunes under ``folder``; returns their paths."""
    root = str(folder).rstrip("/")
    base = f"{root}/base"
    write_model(base, shape, dtype, seed, 0, shard_size=shard_size)
    tuned = []
    for variant in range(1, finetunes + 1):
        path = f"{root}/finetune-{variant}"
        write_model(path, shape, dtype, seed, variant, shard_size=shard_size)
        tuned.append(path)
    return base, tuned
