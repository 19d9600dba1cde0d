"""How much memory evaluating a causal LM needs, from its safetensors headers and config.json
alone, and how much an evaluation actor has: the rule that refuses a model before loading it and
decides whether a candidate soup can be averaged in an actor's memory.

need = weights + activations + runtime, where
  weights     = the checkpoint's tensor bytes (header sizes; rescaled when evaluated in another dtype),
  activations = batch_tokens x (vocab x logit bytes                 the batch's logits
                                + 4 x (2 x intermediate + 4 x hidden) MLP and residual buffers of a layer
                                + 4 x heads x max_length)             attention scores of a layer
                + 8 x max_length x vocab                              one row's float32 logits + log-softmax,
  runtime     = RUNTIME_OVERHEAD_BYTES + ALLOCATOR_SLACK x weights (CUDA context, kernels, tokenizer,
                allocator fragmentation).
An in-memory soup of k checkpoints also holds the k ingredients and their average: + (k + 1) x weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelstock.errors import ModelTooLarge

RUNTIME_OVERHEAD_BYTES = 512 * 2**20
ALLOCATOR_SLACK = 0.05
GiB = 2**30


def format_bytes(value: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{int(value)} B"


@dataclass(frozen=True)
class ModelShape:
    """What sizing needs from config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int


@dataclass(frozen=True)
class Footprint:
    """Memory one actor needs to evaluate one model (bytes)."""

    url: str
    weights: int
    activations: int
    runtime: int
    ingredients: int = 1  # > 1: an in-memory soup

    @property
    def soup_buffers(self) -> int:
        """The ingredients and their average, held while a soup is built in memory."""
        return (self.ingredients + 1) * self.weights if self.ingredients > 1 else 0

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.runtime + self.soup_buffers

    def describe(self) -> str:
        parts = [f"weights {format_bytes(self.weights)} from the checkpoint headers",
                 f"activations {format_bytes(self.activations)}", f"runtime {format_bytes(self.runtime)}"]
        if self.ingredients > 1:
            parts.append(f"{self.ingredients} ingredients + their average {format_bytes(self.soup_buffers)}")
        return " + ".join(parts)


def footprint(url: str, weight_bytes: int, shape: ModelShape, batch_tokens: int, max_length: int,
              logit_dtype: torch.dtype, ingredients: int = 1) -> Footprint:
    logit_bytes = torch.empty(0, dtype=logit_dtype).element_size()
    per_token = (shape.vocab_size * logit_bytes + 4 * (2 * shape.intermediate_size + 4 * shape.hidden_size)
                 + 4 * shape.num_attention_heads * max_length)
    row = 8 * max_length * shape.vocab_size
    runtime = RUNTIME_OVERHEAD_BYTES + int(ALLOCATOR_SLACK * weight_bytes)
    return Footprint(url, weight_bytes, batch_tokens * per_token + row, runtime, ingredients)


@dataclass(frozen=True)
class ActorCapacity:
    """Memory one evaluation actor may use, and where that number comes from (for messages)."""

    bytes: int
    source: str

    def describe(self) -> str:
        return f"{format_bytes(self.bytes)} ({self.source})"


def check_fits(need: Footprint, capacity: ActorCapacity) -> None:
    """Refuse, before anything is loaded, a model that one actor cannot hold."""
    if need.total > capacity.bytes:
        what = f"an in-memory soup of {need.ingredients} checkpoints" if need.ingredients > 1 else "this model"
        raise ModelTooLarge(
            f"{need.url}: evaluating {what} needs {format_bytes(need.total)} ({need.describe()}), "
            f"but an evaluation actor has {capacity.describe()}; give each model more GPUs "
            "(gpus_per_model / --gpus-per-model), a larger --actor-memory, or lower batch_tokens"
        )


def fits(need: Footprint, capacity: ActorCapacity) -> bool:
    return need.total <= capacity.bytes
