"""Top-1 accuracy as pure functions, with the class-subset / class-mapping projections used for
ImageNet-A/-R (200 of the 1000 classes) and ObjectNet (its classes mapped onto ImageNet ids)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShardScore:
    """Correct predictions over one (model, dataset shard) work item: integers, so they add up exactly."""

    model: str
    dataset: str
    shard: int
    correct: int
    total: int


def predict(
    logits: torch.Tensor,
    class_subset: Sequence[int] | None = None,
    class_mapping: Mapping[int, int] | None = None,
) -> torch.Tensor:
    """Predicted labels in the dataset's label space.

    ``class_subset``: the argmax is taken over these model classes only (the other logits are
    masked), labels stay model class ids. ``class_mapping``: model class id -> dataset label; the
    argmax is taken over the mapped model classes only and translated to the dataset label.
    """
    if class_subset is not None and class_mapping is not None:
        raise ValueError("give a class subset or a class mapping, not both")
    if class_mapping is not None:
        sources = sorted(class_mapping)
        index = torch.tensor(sources, dtype=torch.long, device=logits.device)
        targets = torch.tensor([class_mapping[s] for s in sources], dtype=torch.long, device=logits.device)
        return targets[logits.index_select(1, index).argmax(dim=1)]
    if class_subset is not None:
        index = torch.tensor(sorted(set(class_subset)), dtype=torch.long, device=logits.device)
        return index[logits.index_select(1, index).argmax(dim=1)]
    return logits.argmax(dim=1)


def top1_correct(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_subset: Sequence[int] | None = None,
    class_mapping: Mapping[int, int] | None = None,
) -> int:
    """How many rows of ``logits`` (batch, classes) predict their label."""
    predictions = predict(logits, class_subset, class_mapping)
    return int((predictions.cpu() == labels.cpu().long()).sum())


def accuracy(correct: int, total: int) -> float:
    if total <= 0:
        raise ValueError("accuracy of an empty dataset")
    return correct / total


def ood_mean(accuracies: Mapping[str, float], ood_names: Sequence[str]) -> float | None:
    """Mean top-1 over the OOD sets (unweighted, as the papers report it); None without OOD sets."""
    values = [accuracies[name] for name in ood_names]
    return sum(values) / len(values) if values else None


@dataclass(frozen=True)
class TextShardScore:
    """Sums over one (language model, dataset shard) work item. Counts are integers and the NLL a
    float64 sum (itself an exactly rounded ``math.fsum`` of per-row sums), so shards add up to the
    same totals however the rows were spread over actors."""

    model: str
    dataset: str
    shard: int
    task: str  # "perplexity" or "choice"
    nll: float = 0.0
    tokens: int = 0
    correct: int = 0
    total: int = 0


def perplexity(nll: float, tokens: int) -> float:
    """exp(total negative log-likelihood / total predicted tokens), over a whole set."""
    import math

    if tokens <= 0:
        raise ValueError("perplexity of a set with no predicted tokens")
    try:
        return math.exp(nll / tokens)
    except OverflowError:
        return math.inf  # eval.json writes it as null (``tables.results_json``): never a bare Infinity
