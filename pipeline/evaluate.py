"""Ray-parallel ID/OOD evaluation (DESIGN section 5).

Work items are (model x dataset shard); a pool of actors (one GPU each when the cluster has GPUs,
else one CPU each) reads its own shards and checkpoints from storage and returns integer counts.
The driver only plans shards from Parquet footers and adds counts up: top-1 per dataset and the
OOD mean, shown as a table and written as JSON, Parquet and a PNG scatter of ID vs OOD mean.
"""

from __future__ import annotations

import io
import json
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any

import ray
from tqdm import tqdm

from modelstock import storage
from modelstock.evaluation.datasets import DatasetShard, DatasetSpec, EvalSuite, plan_dataset_shards
from modelstock.evaluation.metrics import ShardScore, accuracy, ood_mean
from modelstock.evaluation.scoring import ModelSource, build_source, score_shard
from pipeline.ray_results import result_of

log = logging.getLogger(__name__)

RESULTS_JSON, RESULTS_PARQUET, RESULTS_PLOT = "eval.json", "eval.parquet", "eval.png"


@dataclass(frozen=True)
class WorkItem:
    source: ModelSource
    shard: DatasetShard


@ray.remote(max_restarts=1, max_task_retries=2)
class EvalWorker:
    """Scores work items; keeps the last few built models and read checkpoints in memory."""

    def __init__(self, storage_options: Mapping[str, Any], batch_size: int, use_gpu: bool,
                 cached_models: int = 4, cached_checkpoints: int = 8) -> None:
        import torch

        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(1)  # one CPU per actor: no oversubscription
        self.storage_options = dict(storage_options)
        self.batch_size = batch_size
        self.models: OrderedDict[ModelSource, Any] = OrderedDict()
        self.states: OrderedDict[str, Any] = OrderedDict()
        self.cached_models, self.cached_checkpoints = cached_models, cached_checkpoints

    def _state(self, url: str) -> Any:
        from modelstock.evaluation.builders import read_state_dict

        if url not in self.states:
            self.states[url] = read_state_dict(url, self.storage_options)
            while len(self.states) > self.cached_checkpoints:
                self.states.popitem(last=False)
        self.states.move_to_end(url)
        return self.states[url]

    def _model(self, source: ModelSource) -> Any:
        if source not in self.models:
            states = {url: self._state(url) for url in source.urls}
            self.models[source] = build_source(source, self.storage_options, states).to(self.device)
            while len(self.models) > self.cached_models:
                self.models.popitem(last=False)
        self.models.move_to_end(source)
        return self.models[source]

    def score(self, item: WorkItem) -> ShardScore:
        module = self._model(item.source)
        return score_shard(module, item.source.name, item.shard, self.batch_size, self.device, self.storage_options)


@dataclass(frozen=True)
class EvalRow:
    model: str
    dataset: str
    role: str  # "id", "ood" or "held_out"
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return accuracy(self.correct, self.total)


@dataclass
class EvalTable:
    """Top-1 per (model, dataset), plus the OOD mean per model."""

    rows: list[EvalRow]
    id_name: str
    ood_names: list[str]
    kinds: dict[str, str] = field(default_factory=dict)  # model -> legend group for the plot

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(row.model for row in self.rows))

    def accuracy(self, model: str, dataset: str) -> float:
        for row in self.rows:
            if row.model == model and row.dataset == dataset:
                return row.accuracy
        raise KeyError((model, dataset))

    def id_accuracy(self, model: str) -> float:
        return self.accuracy(model, self.id_name)

    def ood_mean(self, model: str) -> float | None:
        return ood_mean({name: self.accuracy(model, name) for name in self.ood_names}, self.ood_names)

    def format(self) -> str:
        """The terminal table: one line per model, accuracies in percent."""
        columns = [self.id_name, *self.ood_names]
        name_width = max([len("model"), *(len(m) for m in self.models)])
        widths = [max(7, len(c)) for c in columns]
        header = f"{'model':<{name_width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(columns, widths))
        if self.ood_names:
            header += f"  {'OOD mean':>8}"
        lines = [header, "-" * len(header)]
        for model in self.models:
            cells = [f"{100 * self.accuracy(model, c):>{w}.2f}" for c, w in zip(columns, widths)]
            line = f"{model:<{name_width}}  " + "  ".join(cells)
            if self.ood_names:
                line += f"  {100 * (self.ood_mean(model) or 0.0):>8.2f}"
            lines.append(line)
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id_name,
            "ood": list(self.ood_names),
            "models": [
                {
                    "model": model,
                    "kind": self.kinds.get(model),
                    "id_accuracy": self.id_accuracy(model),
                    "ood_mean": self.ood_mean(model),
                    "datasets": {
                        row.dataset: {"correct": row.correct, "total": row.total, "accuracy": row.accuracy}
                        for row in self.rows
                        if row.model == model
                    },
                }
                for model in self.models
            ],
        }

    def parquet_bytes(self) -> bytes:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist([{**asdict(row), "accuracy": row.accuracy} for row in self.rows])
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        return buffer.getvalue()

    def scatter_png(self, title: str = "ID vs OOD top-1") -> bytes | None:
        """ID accuracy against OOD mean, one labelled point per model (as in the papers' figures)."""
        if not self.ood_names:
            return None
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        figure, axis = plt.subplots(figsize=(7.0, 5.0), dpi=100)
        groups: dict[str, list[str]] = {}
        for model in self.models:
            groups.setdefault(self.kinds.get(model, "model"), []).append(model)
        markers = "o*sD^vP"
        for index, (kind, models) in enumerate(groups.items()):
            xs = [100 * self.id_accuracy(m) for m in models]
            ys = [100 * (self.ood_mean(m) or 0.0) for m in models]
            axis.scatter(xs, ys, marker=markers[index % len(markers)], s=60 if index else 30, label=kind)
            for model, x, y in zip(models, xs, ys):
                axis.annotate(model, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        axis.set_xlabel(f"ID top-1 (%): {self.id_name}")
        axis.set_ylabel(f"OOD mean top-1 (%): {len(self.ood_names)} sets")
        axis.set_title(title)
        axis.legend(loc="best", fontsize=8)
        axis.grid(alpha=0.3)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", metadata={"Software": None})
        plt.close(figure)
        return buffer.getvalue()

    def write(self, out_url: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
        """eval.json, eval.parquet and eval.png under ``out_url``; returns the URLs written."""
        out = storage.resolve(out_url, storage_options)
        files = {
            RESULTS_JSON: (json.dumps(self.to_json(), indent=1) + "\n").encode(),
            RESULTS_PARQUET: self.parquet_bytes(),
        }
        plot = self.scatter_png()
        if plot is not None:
            files[RESULTS_PLOT] = plot
        for name, raw in files.items():
            storage.write_bytes(out.join(name), raw)
        return [out.join(name).url for name in files]


def _role(suite: EvalSuite, dataset: DatasetSpec) -> str:
    if dataset.name == suite.id.name:
        return "id"
    return "ood" if dataset.name in suite.ood_names else "held_out"


class RayEvaluator:
    """A pool of evaluation actors, started on first use and kept alive across calls (greedy soups
    evaluate in a loop) until ``release`` or the end of the ``with`` block."""

    def __init__(self, storage_options: Mapping[str, Any] | None = None, workers: int | None = None,
                 batch_size: int = 256, progress: bool = True) -> None:
        self.storage_options = dict(storage_options or {})
        self.batch_size = batch_size
        self.progress = progress
        resources = ray.cluster_resources()
        self.use_gpu = resources.get("GPU", 0) > 0
        self.gpus = resources.get("GPU", 0.0)
        slots = int(self.gpus) if self.use_gpu else int(resources.get("CPU", 1))
        self.workers = max(1, workers or slots)
        self._actors: list[Any] = []

    def __enter__(self) -> "RayEvaluator":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def _ensure_actors(self) -> None:
        if not self._actors:
            # More actors than GPUs share them (fractional GPUs) rather than wait for ever.
            share = min(1.0, self.gpus / self.workers)
            options = {"num_gpus": share, "num_cpus": 0} if self.use_gpu else {"num_cpus": 1}
            self._actors = [
                EvalWorker.options(**options).remote(self.storage_options, self.batch_size, self.use_gpu)
                for _ in range(self.workers)
            ]

    def release(self) -> None:
        """Stop the actors and free their CPUs/GPUs (e.g. before merge tasks need them).

        The next evaluation starts a fresh pool. Actors hold their resources while alive, so a
        merge submitted while they live would wait for ever on a small cluster.
        """
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []

    def shards(self, datasets: Sequence[DatasetSpec], rows_per_shard: int) -> list[DatasetShard]:
        return [shard for dataset in datasets for shard in plan_dataset_shards(dataset, rows_per_shard, self.storage_options)]

    def score(self, sources: Sequence[ModelSource], shards: Sequence[DatasetShard]) -> list[ShardScore]:
        """Every (model, shard) pair, spread over the actors, two in flight per actor."""
        self._ensure_actors()
        pending = [WorkItem(source, shard) for source in sources for shard in shards][::-1]
        in_flight: dict[ray.ObjectRef, int] = {}
        load = [0] * len(self._actors)
        scores: list[ShardScore] = []
        bar = tqdm(total=len(pending), desc="evaluate", unit="shard", disable=not self.progress)
        try:
            while pending or in_flight:
                while pending and min(load) < 2:
                    actor = load.index(min(load))
                    in_flight[self._actors[actor].score.remote(pending.pop())] = actor
                    load[actor] += 1
                done, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in done:
                    load[in_flight.pop(ref)] -= 1
                    scores.append(result_of(ref))
                    bar.update(1)
        finally:
            bar.close()
        return scores

    def evaluate_datasets(self, sources: Sequence[ModelSource], datasets: Sequence[DatasetSpec],
                          rows_per_shard: int) -> dict[tuple[str, str], tuple[int, int]]:
        """(model, dataset) -> (correct, total)."""
        totals: dict[tuple[str, str], tuple[int, int]] = {}
        for score in self.score(sources, self.shards(datasets, rows_per_shard)):
            correct, total = totals.get((score.model, score.dataset), (0, 0))
            totals[(score.model, score.dataset)] = (correct + score.correct, total + score.total)
        return totals

    def evaluate(self, sources: Sequence[ModelSource], suite: EvalSuite,
                 kinds: Mapping[str, str] | None = None) -> EvalTable:
        """The suite's ID and OOD sets for every model."""
        names = [s.name for s in sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model name {duplicates[0]!r} is used twice")
        totals = self.evaluate_datasets(sources, suite.datasets, suite.rows_per_shard)
        rows = [
            EvalRow(source.name, dataset.name, _role(suite, dataset), *totals[(source.name, dataset.name)])
            for source in sources
            for dataset in suite.datasets
        ]
        return EvalTable(rows, suite.id.name, suite.ood_names, dict(kinds or {}))

    def selection_accuracy(self, sources: Sequence[ModelSource], suite: EvalSuite) -> dict[str, float]:
        """Each model's accuracy on the suite's selection (held-out) set."""
        dataset = suite.selection_set
        totals = self.evaluate_datasets(sources, [dataset], suite.rows_per_shard)
        return {source.name: accuracy(*totals[(source.name, dataset.name)]) for source in sources}


def evaluate_models(sources: Sequence[ModelSource], suite: EvalSuite, storage_options: Mapping[str, Any] | None = None,
                    workers: int | None = None, progress: bool = True, kinds: Mapping[str, str] | None = None) -> EvalTable:
    """One-shot evaluation on the connected Ray."""
    with RayEvaluator(storage_options, workers, suite.batch_size, progress) as evaluator:
        return evaluator.evaluate(sources, suite, kinds)
