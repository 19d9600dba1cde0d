"""Scoring one (model, dataset shard) work item: the unit both the Ray evaluator and a plain
single-process evaluation run. A model is a checkpoint URL, or a uniform soup of several URLs
averaged in memory (how greedy soups are scored without writing each candidate soup)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelstock.api import merge_state_dicts
from modelstock.evaluation.builders import builder_for, load_weights, logits_in_batches, read_config, read_state_dict
from modelstock.evaluation.datasets import DatasetShard, read_shard
from modelstock.evaluation.metrics import ShardScore, top1_correct


@dataclass(frozen=True)
class ModelSource:
    """A named model to evaluate: one checkpoint, or the uniform average of several."""

    name: str
    urls: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError(f"model {self.name}: no checkpoint URL")


def soup_state(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Uniform average (the linear method with equal weights); one state is returned as is."""
    if len(states) == 1:
        return dict(states[0])
    merged, _ = merge_state_dicts("linear", states)
    return merged


def build_source(
    source: ModelSource,
    storage_options: Mapping[str, Any] | None = None,
    states: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> nn.Module:
    """Build the module from the first URL's config and load the (averaged) weights.

    ``states`` is an optional cache of already read state dicts by URL.
    """
    config = read_config(source.urls[0], storage_options)
    module = builder_for(config, source.urls[0])(config)
    loaded = [states[url] if states and url in states else read_state_dict(url, storage_options) for url in source.urls]
    return load_weights(module, soup_state(loaded), source.name)


def score_shard(
    module: nn.Module,
    model_name: str,
    shard: DatasetShard,
    batch_size: int,
    device: torch.device | str = "cpu",
    storage_options: Mapping[str, Any] | None = None,
) -> ShardScore:
    data = read_shard(shard, storage_options)
    logits = logits_in_batches(module, data.inputs, batch_size, device)
    correct = top1_correct(logits, data.labels, data.class_subset, data.class_mapping)
    return ShardScore(model_name, shard.dataset.name, shard.index, correct, int(data.labels.shape[0]))
