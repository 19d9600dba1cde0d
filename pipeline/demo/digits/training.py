"""Training for the image demo: pretraining w_0 on augmented digits, fine-tuning runs, periodic
Model Stock during training, and saving checkpoints as Hugging Face-style folders."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from modelstock.evaluation.builders import BUILDER_KEY, ReferenceCNN
from modelstock.training import PeriodicModelStock
from pipeline.demo.digits.config import DemoConfig, FineTune
from pipeline.demo.digits.data import augment, jitter


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
                generator: torch.Generator, batch_size: int, pretraining: bool, label_smoothing: float = 0.0) -> None:
    model.train()
    order = torch.randperm(images.shape[0], generator=generator)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        inputs = augment(images[batch], generator) if pretraining else jitter(images[batch], generator)
        loss = F.cross_entropy(model(inputs), labels[batch], label_smoothing=label_smoothing)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def new_model(config: DemoConfig) -> ReferenceCNN:
    return ReferenceCNN(in_channels=1, num_classes=10, width=config.width)


def pretrain(config: DemoConfig, images: torch.Tensor, labels: torch.Tensor) -> ReferenceCNN:
    torch.manual_seed(config.seed)
    model = new_model(config)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(config.pretrain_epochs):
        train_epoch(model, optimizer, images, labels, generator, config.batch_size, pretraining=True)
    return model


def fine_tune_start(config: DemoConfig, base: nn.Module,
                    run: FineTune) -> tuple[nn.Module, torch.optim.Optimizer, torch.Generator]:
    model = new_model(config)
    model.load_state_dict(base.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=run.lr, momentum=0.9, weight_decay=run.weight_decay)
    return model, optimizer, torch.Generator().manual_seed(1000 + run.seed)


def fine_tune(config: DemoConfig, base: nn.Module, run: FineTune, images: torch.Tensor, labels: torch.Tensor) -> nn.Module:
    model, optimizer, generator = fine_tune_start(config, base, run)
    for _ in range(run.epochs):
        train_epoch(model, optimizer, images, labels, generator, config.batch_size, False, run.label_smoothing)
    return model


def periodic_model_stock(config: DemoConfig, base: nn.Module, runs: tuple[FineTune, FineTune],
                         images: torch.Tensor, labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], PeriodicModelStock]:
    """Two runs from w_0, merged with w_0 by Model Stock every ``periodic_every`` epochs."""
    started = [fine_tune_start(config, base, run) for run in runs]
    merger = PeriodicModelStock(base.state_dict(), every=config.periodic_every)
    for _ in range(runs[0].epochs):
        for (model, optimizer, generator), run in zip(started, runs):
            train_epoch(model, optimizer, images, labels, generator, config.batch_size, False, run.label_smoothing)
        merger.tick([model for model, _, _ in started])
    if merger.merged is None:
        merger.merge_now([model for model, _, _ in started])
    assert merger.merged is not None
    return merger.merged, merger


def save_checkpoint(folder: Path, state: dict[str, torch.Tensor], config: DemoConfig, note: str) -> str:
    """An HF-style folder: model.safetensors plus a config.json naming the builder."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    model_config = {BUILDER_KEY: "reference-cnn", "in_channels": 1, "num_classes": 10, "width": config.width, "note": note}
    (folder / "config.json").write_text(json.dumps(model_config, indent=1) + "\n")
    return str(folder)
