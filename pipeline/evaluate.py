"""Ray-parallel ID/OOD evaluation (docs/ARCHITECTURE.md, "Evaluation").

Work items are (model x dataset shard); a pool of actors reads its own shards and checkpoints from
storage and returns sums (integer counts, float64 NLL sums). The driver plans shards from Parquet
footers, sizes models from safetensors headers, and adds sums up into a table (``modelstock.
evaluation.tables`` / ``text_table``): terminal table, eval.json, eval.parquet and eval.png.

Image classifiers: one GPU per actor when the cluster has GPUs, else one CPU.

Language models (``kind: text`` suites) are size-aware:
- every model's memory need is estimated from its headers before anything is loaded
  (``modelstock.evaluation.sizing``) and a model that no actor can hold is refused, naming both;
- an actor holds ``gpus_per_model`` GPUs and splits the model's layers across them
  (``modelstock.evaluation.placement``); without GPUs it splits them into that many CPU stages,
  the same code path on one memory (how the tests check that a split gives the same numbers);
- on CPU nodes the pool gets as many actors as both the CPUs and the node's memory allow.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import ray
from tqdm import tqdm

from modelstock import storage
from modelstock.checkpoint.reader import open_checkpoint
from modelstock.errors import InvalidRecipe, ModelTooLarge
from modelstock.evaluation.builders import read_config_in
from modelstock.evaluation.causal_lm import (
    CausalLM,
    build_causal_lm,
    causal_lm_config,
    load_causal_lm,
    load_tokenizer,
    model_footprint,
    read_checkpoint_state,
)
from modelstock.evaluation.datasets import (
    AnySuite,
    DatasetShard,
    DatasetSpec,
    EvalSuite,
    TextDatasetSpec,
    TextSuite,
    plan_dataset_shards,
)
from modelstock.evaluation.metrics import ShardScore, TextShardScore, accuracy
from modelstock.evaluation.preflight import check_unique_names
from modelstock.evaluation.scoring import ModelSource, build_source, score_shard, soup_state
from modelstock.evaluation.sizing import ActorCapacity, Footprint, check_fits, fits, format_bytes
from modelstock.evaluation.tables import RESULTS_JSON, RESULTS_PARQUET, RESULTS_PLOT, EvalRow, EvalTable
from modelstock.evaluation.text_data import read_text_shard
from modelstock.evaluation.text_scoring import TextBatching, score_text_rows
from modelstock.evaluation.text_table import TextEvalRow, TextEvalTable
from pipeline.ray_results import result_of

log = logging.getLogger(__name__)

__all__ = ["RESULTS_JSON", "RESULTS_PARQUET", "RESULTS_PLOT", "EvalRow", "EvalTable", "TextEvalRow", "TextEvalTable",
           "RayEvaluator", "evaluate_models"]

AnyTable = EvalTable | TextEvalTable


@dataclass(frozen=True)
class WorkItem:
    source: ModelSource
    shard: DatasetShard


@dataclass(frozen=True)
class TextWorkItem:
    source: ModelSource
    shard: DatasetShard
    need: Footprint


@ray.remote(max_restarts=1, max_task_retries=2)
class EvalWorker:
    """Scores image work items; keeps the last few built models and read checkpoints in memory."""

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


@ray.remote(max_restarts=1, max_task_retries=2)
class TextEvalWorker:
    """Scores language-model work items on the devices it holds.

    Models stay loaded while their footprints fit the actor's capacity together (least recently
    used out first); an in-memory soup's ingredients stay too, so a greedy soup reads each once.
    """

    def __init__(self, storage_options: Mapping[str, Any], batching: TextBatching, dtype: str, gpus_per_model: int,
                 use_gpu: bool, capacity: int) -> None:
        import torch

        if use_gpu and torch.cuda.is_available():
            self.devices = [f"cuda:{i}" for i in range(min(gpus_per_model, torch.cuda.device_count()))]
        else:
            self.devices = ["cpu"] * gpus_per_model  # CPU stand-ins: the multi-device code path on one memory
            torch.set_num_threads(1)
        self.storage_options = dict(storage_options)
        self.batching, self.dtype, self.capacity = batching, dtype, capacity
        self.models: OrderedDict[ModelSource, tuple[CausalLM, int]] = OrderedDict()
        self.states: OrderedDict[str, tuple[dict[str, Any], int]] = OrderedDict()
        # Dataset files, resolved once: every model reads the same shards, and a filesystem
        # instance may be costly to make (a new client per instance with skip_instance_cache).
        self.files: dict[str, storage.Location] = {}

    def placement(self) -> list[str]:
        return list(self.devices)

    def _make_room(self, need: int) -> None:
        def held() -> int:
            return sum(size for _, size in self.models.values()) + sum(size for _, size in self.states.values())

        while (self.models or self.states) and held() + need > self.capacity:
            (self.states if self.states and not self.models else self.models).popitem(last=False)

    def _check_devices(self, need: Footprint) -> None:
        """On GPUs, the devices' free memory at load time (a second line after the driver's rule)."""
        import torch

        if not self.devices[0].startswith("cuda"):
            return
        free = sum(torch.cuda.mem_get_info(torch.device(d))[0] for d in self.devices)
        on_devices = need.weights + need.activations + need.soup_buffers
        if on_devices > free:
            raise ModelTooLarge(f"{need.url}: needs {format_bytes(on_devices)} of GPU memory ({need.describe()}), "
                                f"but this actor's {len(self.devices)} GPU(s) have {format_bytes(free)} free")

    def _ingredient(self, url: str, weights: int) -> dict[str, Any]:
        if url not in self.states:
            self.states[url] = (read_checkpoint_state(url, self.storage_options), weights)
        self.states.move_to_end(url)
        return self.states[url][0]

    def _model(self, source: ModelSource, need: Footprint) -> CausalLM:
        if source in self.models:
            self.models.move_to_end(source)
            return self.models[source][0]
        self._make_room(need.total)
        self._check_devices(need)
        if len(source.urls) == 1:
            lm = load_causal_lm(source.urls[0], self.storage_options, self.devices, self.dtype)
        else:
            first = storage.resolve(source.urls[0], self.storage_options)
            config = causal_lm_config(read_config_in(first), first.url)
            dtype = config.dtype(self.dtype, open_checkpoint(first.url, self.storage_options))
            average = soup_state([self._ingredient(url, need.weights) for url in source.urls])
            tokenizer = load_tokenizer(first)
            lm = build_causal_lm(source.name, config, iter(average.items()), tokenizer, self.devices, dtype)
            del average
        self.models[source] = (lm, need.total - need.soup_buffers)
        return lm

    def score(self, item: TextWorkItem) -> TextShardScore:
        lm = self._model(item.source, item.need)
        url = item.shard.file_url
        if url not in self.files:
            self.files[url] = storage.resolve(url, self.storage_options)
        rows = read_text_shard(item.shard, location=self.files[url])
        return score_text_rows(lm, item.source.name, item.shard, rows, self.batching)


@ray.remote(num_gpus=1, num_cpus=0)
def gpu_memory_bytes() -> int:
    """Total memory of one GPU of the cluster (a probe; Ray's resources do not say)."""
    import torch

    return int(torch.cuda.get_device_properties(0).total_memory)


@dataclass(frozen=True)
class TextPool:
    """The language-model actor pool: how many, with how many GPUs each, and the memory each has."""

    settings: tuple[Any, ...]
    actors: int
    capacity: ActorCapacity
    gpus_per_model: int
    use_gpu: bool


def _role(suite: AnySuite, dataset: DatasetSpec | TextDatasetSpec) -> str:
    if dataset.name == suite.id.name:
        return "id"
    return "ood" if dataset.name in suite.ood_names else "held_out"


def text_row(total: TextShardScore, role: str) -> TextEvalRow:
    return TextEvalRow(total.model, total.dataset, role, total.task, total.nll, total.tokens, total.correct,
                       total.total)


def _actors_on(node: Mapping[str, float], need: int) -> int:
    """Evaluation actors a CPU node can run for models of ``need`` bytes: its CPUs, its memory."""
    return max(1, min(int(node.get("CPU", 1)), int(node.get("memory", 0.0) // need)))


class RayEvaluator:
    """A pool of evaluation actors, started on first use and kept alive across calls (greedy soups
    evaluate in a loop) until ``release`` or the end of the ``with`` block.

    ``gpus_per_model`` and ``actor_memory`` override a text suite's values (CLI flags).
    """

    def __init__(self, storage_options: Mapping[str, Any] | None = None, workers: int | None = None,
                 batch_size: int = 256, progress: bool = True, gpus_per_model: int | None = None,
                 actor_memory: int | None = None) -> None:
        self.storage_options = dict(storage_options or {})
        self.batch_size = batch_size
        self.progress = progress
        self.requested_workers = workers
        self.gpus_per_model = gpus_per_model
        self.actor_memory = actor_memory
        resources = ray.cluster_resources()
        self.use_gpu = resources.get("GPU", 0) > 0
        self.gpus = resources.get("GPU", 0.0)
        slots = int(self.gpus) if self.use_gpu else int(resources.get("CPU", 1))
        self.workers = max(1, workers or slots)
        self._actors: list[Any] = []
        self._pool_key: tuple[Any, ...] | None = None
        self._text_pool: TextPool | None = None
        self._footprints: dict[tuple[Any, ...], Footprint] = {}

    def __enter__(self) -> RayEvaluator:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def release(self) -> None:
        """Stop the actors and free their CPUs/GPUs (e.g. before merge tasks need them).

        The next evaluation starts a fresh pool. Actors hold their resources while alive, so a
        merge submitted while they live would wait for ever on a small cluster.
        """
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        self._pool_key = None

    def _pool(self, key: tuple[Any, ...], start: Callable[[], list[Any]]) -> list[Any]:
        if self._pool_key != key:
            self.release()
            self._actors = start()
            self._pool_key = key
        return self._actors

    def _dispatch(self, actors: Sequence[Any], items: Sequence[Any]) -> list[Any]:
        """Every item through ``actor.score``, two in flight per actor."""
        pending = list(items)[::-1]
        in_flight: dict[ray.ObjectRef, int] = {}
        load = [0] * len(actors)
        results: list[Any] = []
        bar = tqdm(total=len(pending), desc="evaluate", unit="shard", disable=not self.progress)
        try:
            while pending or in_flight:
                while pending and min(load) < 2:
                    actor = load.index(min(load))
                    in_flight[actors[actor].score.remote(pending.pop())] = actor
                    load[actor] += 1
                done, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in done:
                    load[in_flight.pop(ref)] -= 1
                    results.append(result_of(ref))
                    bar.update(1)
        finally:
            bar.close()
        return results

    # --- image classifiers ------------------------------------------------------------------

    def _image_actors(self) -> list[Any]:
        def start() -> list[Any]:
            # More actors than GPUs share them (fractional GPUs) rather than wait for ever.
            share = min(1.0, self.gpus / self.workers)
            options = {"num_gpus": share, "num_cpus": 0} if self.use_gpu else {"num_cpus": 1}
            actor: Any = EvalWorker  # a Ray actor class: .options() is Ray's
            return [actor.options(**options).remote(self.storage_options, self.batch_size, self.use_gpu)
                    for _ in range(self.workers)]

        return self._pool(("image", self.batch_size), start)

    def shards(self, datasets: Sequence[DatasetSpec | TextDatasetSpec], rows_per_shard: int) -> list[DatasetShard]:
        return [shard for dataset in datasets
                for shard in plan_dataset_shards(dataset, rows_per_shard, self.storage_options)]

    def score(self, sources: Sequence[ModelSource], shards: Sequence[DatasetShard]) -> list[ShardScore]:
        """Every (image model, shard) pair, spread over the actors."""
        return self._dispatch(self._image_actors(), [WorkItem(source, shard) for source in sources for shard in shards])

    def evaluate_datasets(self, sources: Sequence[ModelSource], datasets: Sequence[DatasetSpec],
                          rows_per_shard: int) -> dict[tuple[str, str], tuple[int, int]]:
        """(model, dataset) -> (correct, total)."""
        totals: dict[tuple[str, str], tuple[int, int]] = {}
        for score in self.score(sources, self.shards(datasets, rows_per_shard)):
            correct, total = totals.get((score.model, score.dataset), (0, 0))
            totals[(score.model, score.dataset)] = (correct + score.correct, total + score.total)
        return totals

    # --- language models --------------------------------------------------------------------

    def _text_settings(self, suite: TextSuite) -> tuple[TextBatching, str, int]:
        return TextBatching.of(suite), suite.dtype, self.gpus_per_model or suite.gpus_per_model

    def footprint(self, source: ModelSource, suite: TextSuite) -> Footprint:
        """Memory one actor needs for ``source`` (headers and config only; cached per URL)."""
        key = (source.urls[0], suite.batch_tokens, suite.max_length, suite.dtype)
        if key not in self._footprints:
            self._footprints[key] = model_footprint(source.urls[0], self.storage_options, suite.batch_tokens,
                                                    suite.max_length, suite.dtype)
        single = self._footprints[key]
        url = source.urls[0] if len(source.urls) == 1 else f"soup of {', '.join(source.urls)}"
        return Footprint(url, single.weights, single.activations, single.runtime, len(source.urls))

    def text_pool(self, suite: TextSuite, largest: int) -> TextPool:
        """Decide the pool once per suite settings: actors, GPUs each, and each actor's capacity
        (``largest``: the largest single model's need, which sizes the pool on CPU nodes)."""
        largest = max(1, largest)
        settings = self._text_settings(suite) + (self.actor_memory or suite.actor_memory,)
        if self._text_pool is not None and self._text_pool.settings == settings:
            return self._text_pool
        gpus_per_model, explicit = settings[2], settings[3]
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        if self.use_gpu:
            most = max(int(n.get("GPU", 0)) for n in nodes)
            if gpus_per_model > most:
                raise InvalidRecipe(f"gpus_per_model is {gpus_per_model}, but the largest node has {most} GPU(s)")
            actors = sum(int(n.get("GPU", 0)) // gpus_per_model for n in nodes)
            if explicit:
                capacity = ActorCapacity(explicit, "actor_memory")
            else:
                self.release()  # the probe needs a GPU; a pool of other settings is replaced anyway
                per_gpu = ray.get(gpu_memory_bytes.remote())
                capacity = ActorCapacity(per_gpu * gpus_per_model, f"{gpus_per_model} GPU x {format_bytes(per_gpu)}")
        else:
            cpu_nodes = [n for n in nodes if n.get("CPU", 0) >= 1] or nodes
            if explicit:
                actors = sum(int(n.get("CPU", 1)) for n in cpu_nodes)
                capacity = ActorCapacity(explicit, "actor_memory")
            else:
                # As many actors per node as its CPUs and its memory (Ray's 'memory' resource) allow
                # for the largest model; each then has the node's memory divided among the actors
                # it may hold (all of the pool's, at worst: Ray packs actors onto nodes).
                per_node = [(n.get("memory", 0.0), _actors_on(n, largest)) for n in cpu_nodes]
                possible = sum(k for _, k in per_node)
                actors = min(possible, self.requested_workers) if self.requested_workers else possible
                memory, share = max(((m, min(k, actors)) for m, k in per_node), key=lambda pair: pair[0] / pair[1])
                capacity = ActorCapacity(int(memory // share), f"node memory {format_bytes(memory)} / {share} actor(s)")
        actors = max(1, min(actors, self.requested_workers or actors))
        self._text_pool = TextPool(settings, actors, capacity, gpus_per_model, self.use_gpu)
        return self._text_pool

    def _text_actors(self, suite: TextSuite, pool: TextPool) -> list[Any]:
        batching, dtype, gpus_per_model = self._text_settings(suite)

        def start() -> list[Any]:
            options = {"num_gpus": gpus_per_model, "num_cpus": 1} if pool.use_gpu else {"num_cpus": 1}
            actor: Any = TextEvalWorker  # a Ray actor class: .options() is Ray's
            return [actor.options(**options).remote(self.storage_options, batching, dtype, gpus_per_model,
                                                    pool.use_gpu, pool.capacity.bytes)
                    for _ in range(pool.actors)]

        return self._pool(("text", pool), start)

    def check_text_sources(self, sources: Sequence[ModelSource], suite: TextSuite) -> dict[ModelSource, Footprint]:
        """Every model's footprint, refusing (before anything is loaded) one no actor can hold."""
        needs = {source: self.footprint(source, suite) for source in sources}
        largest = max(Footprint(f.url, f.weights, f.activations, f.runtime).total for f in needs.values())
        pool = self.text_pool(suite, largest)
        for need in needs.values():
            check_fits(need, pool.capacity)
        return needs

    def soup_fits_in_memory(self, urls: Sequence[str], suite: TextSuite) -> bool:
        """Whether an actor can average these checkpoints in its memory (else: a scratch merge)."""
        need = self.footprint(ModelSource("soup", tuple(urls)), suite)
        single = Footprint(need.url, need.weights, need.activations, need.runtime)
        return fits(need, self.text_pool(suite, single.total).capacity)

    def score_text(self, sources: Sequence[ModelSource], shards: Sequence[DatasetShard],
                   suite: TextSuite) -> list[TextShardScore]:
        """Every (language model, shard) pair, spread over the actors, after the size check."""
        needs = self.check_text_sources(sources, suite)
        actors = self._text_actors(suite, self.text_pool(suite, 0))
        items = [TextWorkItem(source, shard, needs[source]) for source in sources for shard in shards]
        return self._dispatch(actors, items)

    def text_totals(self, sources: Sequence[ModelSource], datasets: Sequence[TextDatasetSpec],
                    suite: TextSuite) -> dict[tuple[str, str], TextShardScore]:
        """(model, dataset) -> summed score; NLL sums added with ``math.fsum`` (exactly rounded,
        so the total is the same whatever order the shards came back in)."""
        scores: dict[tuple[str, str], list[TextShardScore]] = {}
        for score in self.score_text(sources, self.shards(datasets, suite.rows_per_shard), suite):
            scores.setdefault((score.model, score.dataset), []).append(score)
        return {
            key: TextShardScore(key[0], key[1], -1, parts[0].task, nll=math.fsum(p.nll for p in parts),
                                tokens=sum(p.tokens for p in parts), correct=sum(p.correct for p in parts),
                                total=sum(p.total for p in parts))
            for key, parts in scores.items()
        }

    # --- both -------------------------------------------------------------------------------

    def evaluate(self, sources: Sequence[ModelSource], suite: AnySuite, kinds: Mapping[str, str] | None = None,
                 include_held_out: bool = False) -> AnyTable:
        """The suite's ID and OOD sets (and, if asked, its held-out set) for every model."""
        check_unique_names(sources)
        held_out_name = suite.held_out.name if include_held_out and suite.held_out is not None else None
        if isinstance(suite, TextSuite):
            text_sets = [*suite.datasets, *([suite.held_out] if held_out_name and suite.held_out else [])]
            totals = self.text_totals(sources, text_sets, suite)
            text_rows = [text_row(totals[(s.name, d.name)], _role(suite, d)) for s in sources for d in text_sets]
            return TextEvalTable(text_rows, suite.id.name, suite.ood_names, dict(kinds or {}), held_out_name)
        datasets = [*suite.datasets, *([suite.held_out] if held_out_name and suite.held_out else [])]
        counts = self.evaluate_datasets(sources, datasets, suite.rows_per_shard)
        rows = [EvalRow(s.name, d.name, _role(suite, d), *counts[(s.name, d.name)]) for s in sources for d in datasets]
        return EvalTable(rows, suite.id.name, suite.ood_names, dict(kinds or {}), held_out_name)

    @staticmethod
    def selection_higher_is_better(suite: AnySuite) -> bool:
        """Accuracy (images, choice sets): higher is better; perplexity: lower is better."""
        return not (isinstance(suite, TextSuite) and suite.selection_set.task == "perplexity")

    def selection_scores(self, sources: Sequence[ModelSource], suite: AnySuite) -> dict[str, float]:
        """Each model's score on the suite's selection (held-out) set: accuracy or perplexity."""
        if isinstance(suite, TextSuite):
            text_set = suite.selection_set
            totals = self.text_totals(sources, [text_set], suite)
            return {s.name: text_row(totals[(s.name, text_set.name)], "held_out").value for s in sources}
        dataset = suite.selection_set
        counts = self.evaluate_datasets(sources, [dataset], suite.rows_per_shard)
        return {source.name: accuracy(*counts[(source.name, dataset.name)]) for source in sources}

    def selection_accuracy(self, sources: Sequence[ModelSource], suite: EvalSuite) -> dict[str, float]:
        """Each image model's accuracy on the suite's selection (held-out) set."""
        return self.selection_scores(sources, suite)


def evaluate_models(sources: Sequence[ModelSource], suite: AnySuite, storage_options: Mapping[str, Any] | None = None,
                    workers: int | None = None, progress: bool = True, kinds: Mapping[str, str] | None = None,
                    gpus_per_model: int | None = None, actor_memory: int | None = None) -> AnyTable:
    """One-shot evaluation on the connected Ray."""
    batch_size = suite.batch_size
    with RayEvaluator(storage_options, workers, batch_size, progress, gpus_per_model, actor_memory) as evaluator:
        return evaluator.evaluate(sources, suite, kinds)
