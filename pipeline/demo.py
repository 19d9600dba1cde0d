"""``modelstock demo``: the whole job end to end on local data, in a few minutes on a laptop.

On scikit-learn's digits (shipped with sklearn, no download): pretrain a small CNN on augmented
digits (the robust "w_0"), fine-tune several variants on clean digits (seeds and
hyper-parameters differ), build OOD test sets by fixed shifts, store models as safetensors
folders (config.json names the builder) and data as Parquet, then run the pipeline on Ray:
Model Stock of 2 (run_merge), uniform soup of all, greedy soup, periodic Model Stock, and every
single model, all evaluated by the Ray evaluator into one table and one ID-vs-OOD plot.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from modelstock.evaluation.builders import BUILDER_KEY, ReferenceCNN
from modelstock.evaluation.datasets import DatasetSpec, EvalSuite, write_pixels_parquet
from modelstock.evaluation.scoring import ModelSource
from modelstock.recipe import parse_recipe
from modelstock.training import PeriodicModelStock

log = logging.getLogger(__name__)


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
    shifts: tuple[str, ...] = ("rotate", "noise", "blur", "contrast", "translate", "occlude")

    @classmethod
    def quick(cls, out_dir: str = "modelstock-demo") -> "DemoConfig":
        """Small enough for a test: narrow model, few epochs, still six fine-tunes."""
        finetunes = tuple(replace(ft, epochs=max(2, ft.epochs // 4)) for ft in DEFAULT_FINETUNES[:6])
        return cls(out_dir=out_dir, width=8, pretrain_epochs=10, finetunes=finetunes)


# --- data -----------------------------------------------------------------------------------

def load_digits_splits(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """train / val (held-out, for greedy soups) / test (ID), images (N, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    images, labels = images[order], labels[order]
    return {
        "train": (images[:1000], labels[:1000]),
        "val": (images[1000:1300], labels[1000:1300]),
        "test": (images[1300:], labels[1300:]),
    }


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    angle = degrees * math.pi / 180
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


def translate(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    one, zero = torch.ones_like(dx), torch.zeros_like(dx)
    theta = torch.stack([torch.stack([one, zero, -dx * 2 / 8], 1), torch.stack([zero, one, -dy * 2 / 8], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    offsets = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    kernel2d = (kernel[:, None] * kernel[None, :]).view(1, 1, 5, 5)
    return F.conv2d(images, kernel2d, padding=2)


def shifted(images: torch.Tensor, shift: str, seed: int) -> torch.Tensor:
    """A fixed distribution shift of the test images (deterministic given the seed)."""
    generator = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    if shift == "rotate":
        signs = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
        return rotate(images, signs * 30.0)
    if shift == "noise":
        return (images + 0.35 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    if shift == "blur":
        return blur(images, 1.2)
    if shift == "contrast":
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        return (images - mean) * 0.3 + mean
    if shift == "translate":
        signs = (torch.randint(0, 2, (2, n), generator=generator).float() * 2 - 1) * 1.5
        return translate(images, signs[0], signs[1])
    if shift == "occlude":
        out = images.clone()
        corners = torch.randint(0, 5, (n, 2), generator=generator)
        for i, (row, col) in enumerate(corners.tolist()):
            out[i, :, row : row + 4, col : col + 4] = 0
        return out
    raise ValueError(f"unknown shift {shift!r}")


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pretraining augmentation: random rotations, shifts, noise, contrast and blur (a 'diverse' w_0)."""
    n = images.shape[0]
    out = rotate(images, (torch.rand(n, generator=generator) * 2 - 1) * 35.0)
    out = translate(out, (torch.rand(n, generator=generator) * 2 - 1) * 1.5, (torch.rand(n, generator=generator) * 2 - 1) * 1.5)
    contrast = 0.25 + 0.75 * torch.rand(n, 1, 1, 1, generator=generator)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * contrast + mean
    blurred = torch.rand(n, generator=generator) < 0.3
    out[blurred] = blur(out[blurred], 1.0)
    out = out + torch.rand(n, 1, 1, 1, generator=generator) * 0.35 * torch.randn(out.shape, generator=generator)
    return out.clamp(0, 1)


def jitter(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fine-tuning augmentation: a mild random shift only (what makes seeds differ besides order)."""
    n = images.shape[0]
    return translate(images, (torch.rand(n, generator=generator) * 2 - 1) * 0.5, (torch.rand(n, generator=generator) * 2 - 1) * 0.5)


# --- training -------------------------------------------------------------------------------

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


def fine_tune_start(config: DemoConfig, base: nn.Module, run: FineTune) -> tuple[nn.Module, torch.optim.Optimizer, torch.Generator]:
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


# --- storage --------------------------------------------------------------------------------

def save_checkpoint(folder: Path, state: dict[str, torch.Tensor], config: DemoConfig, note: str) -> str:
    """An HF-style folder: model.safetensors plus a config.json naming the builder."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    model_config = {BUILDER_KEY: "reference-cnn", "in_channels": 1, "num_classes": 10, "width": config.width, "note": note}
    (folder / "config.json").write_text(json.dumps(model_config, indent=1) + "\n")
    return str(folder)


def write_datasets(root: Path, config: DemoConfig, splits: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> EvalSuite:
    test_images, test_labels = splits["test"]
    val_images, val_labels = splits["val"]

    def write(name: str, images: torch.Tensor, labels: torch.Tensor) -> DatasetSpec:
        folder = root / name
        write_pixels_parquet(str(folder / "part-00000.parquet"), images, labels, rows_per_group=config.rows_per_group)
        return DatasetSpec(name=name, url=str(folder))

    ood = [write(f"digits-{shift}", shifted(test_images, shift, config.seed + i), test_labels)
           for i, shift in enumerate(config.shifts)]
    return EvalSuite(
        id=write("digits", test_images, test_labels),
        held_out=write("digits-val", val_images, val_labels),
        ood=ood,
        batch_size=256,
        rows_per_shard=config.rows_per_shard,
    )


# --- the pipeline ---------------------------------------------------------------------------

@dataclass
class DemoResult:
    table: object
    greedy_accepted: list[str]
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0


def run_demo(config: DemoConfig, address: str | None = None, progress: bool = True) -> DemoResult:
    from cluster.session import ray_session
    from pipeline.driver import MergeRequest, run_merge
    from pipeline.evaluate import RayEvaluator
    from pipeline.soup import SoupRequest, run_soup

    started = time.monotonic()
    root = Path(config.out_dir).resolve()
    models_dir, merged_dir = root / "models", root / "merged"
    splits = load_digits_splits(config.seed)
    train_images, train_labels = splits["train"]
    suite = write_datasets(root / "data", config, splits)
    (root / "suite.yml").write_text(_suite_yaml(suite))

    print(f"[demo] pretraining w_0 ({config.pretrain_epochs} epochs, augmented digits)", flush=True)
    base = pretrain(config, train_images, train_labels)
    base_url = save_checkpoint(models_dir / "base", base.state_dict(), config, "pretrained w_0")
    finetuned: dict[str, str] = {}
    for run in config.finetunes:
        print(f"[demo] fine-tuning {run.name}: seed {run.seed}, lr {run.lr}, {run.epochs} epochs"
              + (f", label smoothing {run.label_smoothing}" if run.label_smoothing else "")
              + (f", weight decay {run.weight_decay}" if run.weight_decay else ""), flush=True)
        model = fine_tune(config, base, run, train_images, train_labels)
        finetuned[run.name] = save_checkpoint(models_dir / run.name, model.state_dict(), config, f"fine-tuned: {run}")
    pair = config.finetunes[:2]
    print(f"[demo] periodic Model Stock: {pair[0].name}/{pair[1].name} settings with other seeds, merged every "
          f"{config.periodic_every} epoch(s)", flush=True)
    periodic_runs = (replace(pair[0], seed=pair[0].seed + 100), replace(pair[1], seed=pair[1].seed + 100))
    periodic_state, merger = periodic_model_stock(config, base, periodic_runs, train_images, train_labels)
    periodic_url = save_checkpoint(models_dir / "periodic-model-stock", periodic_state, config, "periodic Model Stock")
    log.info("periodic merges: %s", [round(e.mean_t, 3) for e in merger.events])

    all_ft = list(finetuned.values())
    with ray_session(address) as session:
        print(f"[demo] Ray: {session.nodes} node(s), {session.cpus:g} CPUs, {session.gpus:g} GPUs", flush=True)

        def merge(name: str, recipe: dict) -> str:
            url = str(merged_dir / name)
            run_merge(MergeRequest(recipe=parse_recipe(recipe, name), out_url=url, overwrite=True, progress=progress))
            return url

        model_stock_2 = merge("model-stock-2", {"merge_method": "model_stock", "base_model": base_url,
                                                "models": [{"model": finetuned[r.name]} for r in pair]})
        model_stock_all = merge(f"model-stock-{len(all_ft)}", {"merge_method": "model_stock", "base_model": base_url,
                                                              "models": [{"model": u} for u in all_ft]})
        uniform = merge("uniform-soup", {"merge_method": "linear",
                                         "models": [{"model": u, "init": base_url} for u in all_ft]})
        with RayEvaluator(batch_size=suite.batch_size, progress=progress) as evaluator:
            print(f"[demo] greedy soup over {len(all_ft)} fine-tunes, selected on {suite.selection_set.name}", flush=True)
            soup_recipe = parse_recipe({"merge_method": "linear", "models": [{"model": u, "init": base_url} for u in all_ft]})
            greedy = run_soup(SoupRequest(recipe=soup_recipe, out_url=str(merged_dir / "greedy-soup"), greedy=True,
                                          suite=suite, overwrite=True, progress=progress), evaluator)
            names = {url: name for name, url in finetuned.items()}
            sources = [
                ModelSource("model stock (2)", (model_stock_2,)),
                ModelSource(f"model stock ({len(all_ft)})", (model_stock_all,)),
                ModelSource(f"uniform soup ({len(all_ft)})", (uniform,)),
                ModelSource(f"greedy soup ({len(greedy.accepted)})", (greedy.out_url,)),
                ModelSource("periodic model stock", (periodic_url,)),
                ModelSource("w_0 (pretrained)", (base_url,)),
                *[ModelSource(name, (url,)) for name, url in finetuned.items()],
            ]
            kinds = {s.name: ("fine-tuned" if s.urls[0] in names else "pretrained" if s.urls[0] == base_url else "merged")
                     for s in sources}
            print(f"[demo] evaluating {len(sources)} models on {len(suite.datasets)} sets", flush=True)
            table = evaluator.evaluate(sources, suite, kinds)
    files = table.write(str(root / "results"))
    accepted = [names[url] for url in greedy.accepted]
    print()
    print(table.format())
    print()
    print(f"greedy soup kept: {', '.join(accepted)}")
    best = max(finetuned, key=table.id_accuracy)
    print(f"best single fine-tune (ID): {best}")
    for url in files:
        print(f"wrote {url}")
    seconds = time.monotonic() - started
    print(f"[demo] done in {seconds:.0f} s")
    return DemoResult(table=table, greedy_accepted=accepted, files=files, seconds=seconds)


def _suite_yaml(suite: EvalSuite) -> str:
    import yaml

    return yaml.safe_dump(suite.model_dump(mode="json", exclude_none=True), sort_keys=False)
