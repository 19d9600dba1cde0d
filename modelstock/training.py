"""Periodic Model Stock during training (Jang et al., 2024, section 4: "Model Stock during
training"): every ``every`` steps or epochs, the running fine-tuned models are merged with the
pre-trained weights w_0 by Model Stock, and every run continues from the merged weights.

```python
merger = PeriodicModelStock(base=pretrained.state_dict(), every=1)   # every epoch
for epoch in range(epochs):
    for model, optimizer in runs:
        train_one_epoch(model, optimizer)
    merger.tick(models)          # merges (in place) when the period is reached
final = merger.merged            # the last merged state dict
```

Only the weights are replaced; optimiser state is left to the caller (the paper keeps it).
No Ray and no storage here: it works on in-memory modules through ``modelstock.merge``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from modelstock.api import merge_state_dicts


@dataclass(frozen=True)
class MergeEvent:
    """One periodic merge: when, and the interpolation ratios t it used (weighted by size)."""

    tick: int
    mean_t: float
    min_t: float
    max_t: float


@dataclass
class PeriodicModelStock:
    base: Mapping[str, torch.Tensor]
    every: int = 1
    exclude: Sequence[str] = ()
    ticks: int = 0
    events: list[MergeEvent] = field(default_factory=list)
    merged: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError("every must be at least 1")
        self.base = {name: tensor.detach().clone() for name, tensor in self.base.items()}

    def tick(self, models: Sequence[nn.Module]) -> MergeEvent | None:
        """Count one step/epoch; merge when the period is reached. Returns the merge, if any."""
        self.ticks += 1
        if self.ticks % self.every:
            return None
        return self.merge_now(models)

    @torch.no_grad()
    def merge_now(self, models: Sequence[nn.Module]) -> MergeEvent:
        """Model Stock of the models' current weights with w_0, loaded back into every model."""
        if len(models) < 2:
            raise ValueError("periodic Model Stock needs at least two running models")
        states = [{name: tensor.detach() for name, tensor in model.state_dict().items()} for model in models]
        merged, stats = merge_state_dicts("model_stock", states, base=self.base, exclude=self.exclude)
        for model in models:
            model.load_state_dict(merged)
        self.merged = {name: tensor.clone() for name, tensor in merged.items()}
        ratios = [(s.values["t"], max(1, _numel(s.shape))) for s in stats if "t" in s.values]
        weight = sum(n for _, n in ratios) or 1
        event = MergeEvent(
            tick=self.ticks,
            mean_t=sum(t * n for t, n in ratios) / weight,
            min_t=min((t for t, _ in ratios), default=0.0),
            max_t=max((t for t, _ in ratios), default=0.0),
        )
        self.events.append(event)
        return event


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
