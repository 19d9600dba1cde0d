"""The LLM demo's settings in one validated place: model shape, the shared fine-tuning recipe,
the seeds that make the fine-tunes differ, and the evaluation sets' sizes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FineTuneRecipe:
    """One recipe for every fine-tune (the papers' protocol): only the seed differs between runs."""

    lr: float = 1e-3
    steps: int = 60
    warmup_steps: int = 10
    weight_decay: float = 0.0


@dataclass(frozen=True)
class LlmDemoConfig:
    out_dir: str = "modelstock-demo-llm"
    # A tiny Llama: ~0.4M parameters with these values.
    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 176
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    seq_len: int = 96  # training windows
    batch_rows: int = 12
    pretrain_steps: int = 300
    pretrain_lr: float = 3e-3
    finetune: FineTuneRecipe = field(default_factory=FineTuneRecipe)
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    # Text budgets (characters) and evaluation sets (rows).
    pretrain_chars: int = 900_000
    finetune_chars: int = 600_000
    row_chars: int = 360
    eval_rows: int = 160
    choice_rows: int = 120
    max_length: int = 128
    rows_per_shard: int = 40
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("the demo needs at least two fine-tunes with distinct seeds")
        if self.hidden_size % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden_size must divide into heads, and heads into kv_heads")

    @classmethod
    def quick(cls, out_dir: str = "modelstock-demo-llm") -> LlmDemoConfig:
        """Small enough for a test: narrow model, few steps, small sets, still six fine-tunes."""
        return cls(out_dir=out_dir, vocab_size=512, hidden_size=32, intermediate_size=88, layers=2, seq_len=64,
                   pretrain_steps=120, finetune=FineTuneRecipe(lr=2e-3, steps=30, warmup_steps=3),
                   pretrain_chars=200_000, finetune_chars=120_000, eval_rows=40, choice_rows=24, max_length=64,
                   rows_per_shard=20)
