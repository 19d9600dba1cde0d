"""Evaluation core (no Ray): Parquet datasets and eval suites, model builders, top-1 metrics,
and the greedy-soup rule. ``pipeline.evaluate`` runs it in parallel on Ray."""

from modelstock.evaluation.datasets import DatasetShard, DatasetSpec, EvalSuite, load_suite, plan_dataset_shards
from modelstock.evaluation.metrics import ShardScore, top1_correct
from modelstock.evaluation.soup import GreedySoupResult, GreedyStep, greedy_soup

__all__ = [
    "DatasetShard",
    "DatasetSpec",
    "EvalSuite",
    "GreedySoupResult",
    "GreedyStep",
    "ShardScore",
    "greedy_soup",
    "load_suite",
    "plan_dataset_shards",
    "top1_correct",
]
