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


# Fine-tuning uses learning rates well below pretraining's, as when fine-tuning a foundation
# model; ft-1 and ft-2 share hyper-parameters and differ by seed (the Model Stock paper's pair).
DEFAULT_FINETUNES = (
    FineTune("ft-1", seed=1, lr=0.03, epochs=10),
    FineTune("ft-2", seed=2, lr=0.03, epochs=10),
    FineTune("ft-3", seed=3, lr=0.01, epochs=10),
    FineTune("ft-4", seed=4, lr=0.1, epochs=10),
    FineTune("ft-5", seed=5, lr=0.03, epochs=10, label_smoothing=0.1),
    FineTune("ft-6", seed=6, lr=0.05, epochs=8, weight_decay=5e-4),
    FineTune("ft-7", seed=7, lr=0.02, epochs=15),
    FineTune("ft-8", seed=8, lr=0.1, epochs=10, label_smoothing=0.05),
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
    def quick(cls, out_dir: str = "modelstock-demo") -> "DemoConfig":
        """Small enough for a test: narrow model, few epochs, still six fine-tunes."""
        finetunes = tuple(replace(ft, epochs=max(2, ft.epochs // 4)) for ft in DEFAULT_FINETUNES[:6])
        return cls(out_dir=out_dir, width=8, pretrain_epochs=10, finetunes=finetunes)
