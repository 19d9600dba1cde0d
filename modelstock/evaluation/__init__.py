"""Evaluation core (no Ray): eval suites and Parquet datasets, model builders (image classifiers,
causal language models built empty and filled through our reader, split across devices), metrics
(top-1, perplexity, multiple-choice accuracy), memory sizing, result tables, and the greedy-soup
rule. ``pipeline.evaluate`` runs it in parallel on Ray."""

from modelstock.evaluation.datasets import (
    AnySuite,
    DatasetShard,
    DatasetSpec,
    EvalSuite,
    TextDatasetSpec,
    TextSuite,
    load_suite,
    plan_dataset_shards,
)
from modelstock.evaluation.metrics import ShardScore, TextShardScore, perplexity, top1_correct
from modelstock.evaluation.soup import GreedySoupResult, GreedyStep, greedy_soup

__all__ = [
    "AnySuite",
    "DatasetShard",
    "DatasetSpec",
    "EvalSuite",
    "GreedySoupResult",
    "GreedyStep",
    "ShardScore",
    "TextDatasetSpec",
    "TextShardScore",
    "TextSuite",
    "greedy_soup",
    "load_suite",
    "perplexity",
    "plan_dataset_shards",
    "top1_correct",
]
