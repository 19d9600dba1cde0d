"""The demo's data: scikit-learn's digits (shipped with sklearn, no download) split into train,
held-out and test sets, the fixed distribution shifts that make the OOD sets, the augmentations
used in training, and the eval suite written as Parquet."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from modelstock.evaluation.datasets import DatasetSpec, EvalSuite, write_pixels_parquet

SHIFTS = ("rotate", "noise", "blur", "contrast", "translate", "occlude")


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
    dx, dy = (torch.rand(n, generator=generator) * 2 - 1) * 0.5, (torch.rand(n, generator=generator) * 2 - 1) * 0.5
    return translate(images, dx, dy)


def write_datasets(root: Path, splits: dict[str, tuple[torch.Tensor, torch.Tensor]], shifts: tuple[str, ...],
                   seed: int, rows_per_group: int, rows_per_shard: int) -> EvalSuite:
    """ID (test), held-out (val) and one OOD set per shift, as Parquet under ``root``."""
    test_images, test_labels = splits["test"]
    val_images, val_labels = splits["val"]

    def write(name: str, images: torch.Tensor, labels: torch.Tensor) -> DatasetSpec:
        folder = root / name
        write_pixels_parquet(str(folder / "part-00000.parquet"), images, labels, rows_per_group=rows_per_group)
        return DatasetSpec(name=name, url=str(folder))

    ood = [write(f"digits-{shift}", shifted(test_images, shift, seed + i), test_labels) for i, shift in enumerate(shifts)]
    return EvalSuite(
        id=write("digits", test_images, test_labels),
        held_out=write("digits-val", val_images, val_labels),
        ood=ood,
        batch_size=256,
        rows_per_shard=rows_per_shard,
    )
