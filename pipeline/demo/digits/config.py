"""The image demo's settings: the fine-tuning runs and everything else, in one validated place."""

from __future__ import annotations

from dataclasses import dataclass, replace

from pipeline.demo.digits.data import SHIFTS


@dataclass(frozen=True)
class FineTune:
    """One fine-tuning run's hyper-parameters."""

    name: str
    seed: int
    lr: float
    epochs: int
    weight_decay: float = 0.0
    label_smoothing: float = 0.0


# The papers' protocol: every fine-tune runs the same recipe (hyper-parameters) from w_0 and only
# the seed differs (data order and augmentation draws). Learning rates are well below
# pretraining's, as when fine-tuning a foundation model.
FINETUNE_LR = 0.03
FINETUNE_EPOCHS = 10
DEFAULT_FINETUNES = tuple(
    FineTune(f"ft-{seed}", seed=seed, lr=FINETUNE_LR, epochs=FINETUNE_EPOCHS) for seed in range(1, 9)
)


@dataclass(frozen=True)
class DemoConfig:
    out_dir: str = "modelstock-demo"
    width: int = 16
    pretrain_epochs: int = 60
    finetunes: tuple[FineTune, ...] = DEFAULT_FINETUNES
    periodic_every: int = 1  # epochs between periodic Model Stock merges
    batch_size: int = 32
    rows_per_group: int = 64
    rows_per_shard: int = 128
    seed: int = 0
    shifts: tuple[str, ...] = SHIFTS

    @classmethod
    def quick(cls, out_dir: str = "modelstock-demo") -> DemoConfig:
        """Small enough for a test: narrow model, few epochs, still six fine-tunes."""
        finetunes = tuple(replace(ft, epochs=max(2, ft.epochs // 4)) for ft in DEFAULT_FINETUNES[:6])
        return cls(out_dir=out_dir, width=8, pretrain_epochs=10, finetunes=finetunes)
