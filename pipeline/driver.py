"""The merge driver. It reads like the data flow (docs/ARCHITECTURE.md): validate, plan, submit,
gather, commit.

It holds plans, not data: workers fetch and write tensors themselves and hand back statistics
and checksums. Expects a connected Ray (see ``cluster.session``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import ray
from tqdm import tqdm

from modelstock import storage
from modelstock.checkpoint.model_config import read_model_config
from modelstock.checkpoint.reader import Checkpoint, open_checkpoint
from modelstock.checkpoint.tokenizer import TOKENIZER_FILES
from modelstock.consistency import CheckedInput, check_inputs
from modelstock.dtypes import CONFIG_DTYPE_NAMES
from modelstock.errors import InputError, InvalidRecipe, OutputConflict, StorageError
from modelstock.methods.base import TensorStats
from modelstock.output import (
    INDEX_FILE_NAME,
    JOB_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    MODEL_CARD_FILE,
    RECIPE_FILE,
    REPORT_FILE,
    REPORT_PLOT_FILE,
    STATE_DIR,
    OutputLock,
    OutputState,
    canonical,
    check_not_overlapping,
    index_json,
    model_card,
    model_files,
    output_config,
    read_output_state,
    remove_stale_partials,
    sha256_hex,
)
from modelstock.planner import TensorPlan, catalog_of, plan_tensors
from modelstock.quantization import BlockFP8, quantization_of
from modelstock.recipe import (
    MergeRecipe,
    check_filters_match,
    check_strict_parameters,
    log_parameter_notices,
    naming_the_recipe,
    recipe_models,
)
from modelstock.report import report_bytes, report_json, report_png
from modelstock.shard import shard_tensor
from modelstock.storage import Location
from modelstock.vocabulary import (
    VocabularyPlan,
    build_vocabulary,
    chat_template_for,
    with_chat_template,
)
from pipeline.plan import MergePlan, input_fingerprints, plan_shards
from pipeline.ray_results import result_of
from pipeline.worker import ShardOutcome, ShardTask, merge_shard_task

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 2 * 1000**3
DEFAULT_MEMORY_BUDGET = 512 * 1024**2
# What a shard task holds besides its tensor budget (Python, torch, Ray's worker, read buffers in
# flight, the writer's queue), measured on the 1.1B benchmark: declared to Ray with the budget so
# that a node never runs more shard tasks than its memory holds.
WORKER_OVERHEAD_BYTES = 512 * 1024**2
# Threads per shard task: beyond a few, the merge kernels are bound by memory bandwidth.
MAX_THREADS_PER_TASK = 4
CANCEL_WAIT_S = 60.0


@dataclass(frozen=True)
class MergeRequest:
    recipe: MergeRecipe
    out_url: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    shard_size: int = DEFAULT_SHARD_SIZE
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    overwrite: bool = False
    workers: int | None = None
    progress: bool = True
    device: str = "auto"  # "gpu": ask Ray for a GPU per shard even before an autoscaler adds one
    extra_files: Mapping[str, bytes] = field(default_factory=dict)  # e.g. a soup's record; in the manifest
    io_concurrency: int | None = None  # ranged reads in flight per worker (default: by backend)
    strict_parameters: bool = False  # refuse recipe parameters the method does not use (else: warned, reported)
    allow_empty_filter: bool = False  # accept include/exclude patterns and filters that match no tensor


@dataclass(frozen=True)
class MergeResult:
    out_url: str
    plan_digest: str
    shards: list[ShardOutcome]
    already_complete: bool = False

    @property
    def computed(self) -> list[str]:
        return [s.file for s in self.shards if not s.resumed]

    @property
    def resumed(self) -> list[str]:
        return [s.file for s in self.shards if s.resumed]

    @property
    def bytes_read(self) -> int:
        """Input bytes the workers fetched (re-reads of chunked tensors included; resumed shards read none)."""
        return sum(s.bytes_read for s in self.shards)


@dataclass(frozen=True)
class OpenedInput:
    checkpoint: Checkpoint
    config: dict[str, Any] | None
    quantization: BlockFP8 | None


def open_inputs(recipe: MergeRecipe, storage_options: Mapping[str, Any]) -> list[OpenedInput]:
    """Headers, config and quantization of every input, read concurrently, in the merge's input
    order (``recipe_models``)."""

    def open_one(url: str) -> OpenedInput:
        checkpoint = open_checkpoint(url, storage_options)
        config = read_model_config(url, storage_options)
        return OpenedInput(checkpoint, config, quantization_of(config, checkpoint.url))

    urls = list(recipe_models(recipe))
    with ThreadPoolExecutor(max_workers=min(8, len(urls))) as pool:
        return list(pool.map(open_one, urls))


@dataclass(frozen=True)
class PreparedMerge:
    """A validated, planned merge: everything decided from headers, nothing written, no Ray."""

    out: Location
    plan: MergePlan
    checkpoints: list[Checkpoint]  # every input, in the merge's input order
    output_layers: int | None = None  # the output's decoder layers, when slices change them
    ignored_tensors: tuple[str, ...] = ()
    vocabulary: VocabularyPlan | None = None  # the output's tokenizer when the recipe builds one

    @property
    def config_source(self) -> Checkpoint:
        """The model whose config and tokenizer files the output takes: the (first) base, else the first model."""
        return self.checkpoints[0]


def plan_merge(request: MergeRequest) -> tuple[MergePlan, TensorPlan, list[Checkpoint], VocabularyPlan | None]:
    recipe = request.recipe
    urls = list(recipe_models(recipe))
    opened = open_inputs(recipe, request.storage_options)
    checkpoints = [o.checkpoint for o in opened]
    catalogs = {url: catalog_of(o.checkpoint, o.quantization) for url, o in zip(urls, opened)}
    # Configs against weights, depths against each other, the side files the output copies: before any tensor byte.
    check_inputs(recipe, [CheckedInput(url, o.config, catalogs[url]) for url, o in zip(urls, opened)],
                 request.storage_options)
    vocabulary = build_vocabulary(recipe, urls, [o.config for o in opened], request.storage_options)
    if request.strict_parameters:
        check_strict_parameters(recipe)
    log_parameter_notices(recipe)
    check_filters_match(recipe, (name for c in catalogs.values() for name in c.tensors), request.allow_empty_filter)
    try:
        tensor_plan = plan_tensors(recipe, catalogs, vocabulary)
    except InvalidRecipe as exc:  # a value no method accepts for some tensor: name the recipe it came from
        raise naming_the_recipe(recipe, exc) from None
    tensors = [shard_tensor(job, checkpoints) for job in tensor_plan.jobs]
    return plan_shards(tensors, request.shard_size, checkpoints), tensor_plan, checkpoints, vocabulary


def output_action(state: OutputState, plan: MergePlan, overwrite: bool, out: Location) -> str:
    """What to do with the output location: 'complete', 'fresh', 'resume' or 'replace'."""
    if state.manifest is not None and state.manifest.get("plan_sha256") == plan.digest and not overwrite:
        return "complete"
    foreign = [name for name in state.entries if name != STATE_DIR and ".partial" not in name]
    if state.job is None and not foreign:
        return "fresh"
    if state.manifest is None and state.job is not None and state.job.get("plan_sha256") == plan.digest:
        return "resume"
    if overwrite:
        return "replace"
    what = (
        "holds a merge of a different recipe, inputs or shard size"
        if state.manifest is not None or state.job is not None
        else "is not empty"
    )
    raise OutputConflict(f"{out.url}: output location {what}; pass --overwrite to replace it")


def clear_output(out: Location) -> None:
    """Remove everything at the output but the lock we hold."""
    for name in storage.list_names(out):
        if name != STATE_DIR:
            target = out.join(name)
            storage.remove_tree(target) if target.fs.isdir(target.path) else storage.remove_file(target)
    for name in storage.list_names(out.join(STATE_DIR)):
        if name != LOCK_FILE:
            storage.remove_tree(out.join(STATE_DIR, name))


def task_options(request: MergeRequest, plan: MergePlan) -> dict[str, Any]:
    """Resources each shard task declares: a GPU (when the cluster has them) or CPUs for its
    threads, and the memory it will hold, so Ray never packs more tasks on a node than it holds."""
    resources = ray.cluster_resources()
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    use_gpu = request.device == "gpu" or (request.device == "auto" and resources.get("GPU", 0) > 0)
    concurrent = max(1, min(len(plan.shards), request.workers or len(plan.shards)))
    largest_node = max((node.get("CPU", 0) for node in nodes), default=1)
    threads = max(1, min(MAX_THREADS_PER_TASK, math.floor(largest_node),
                         math.floor(resources.get("CPU", 1) / concurrent)))
    options: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": threads}
    memory = request.memory_budget + WORKER_OVERHEAD_BYTES
    most_memory = max((node.get("memory", 0) for node in nodes), default=0)
    if most_memory and memory > most_memory:
        # An autoscaler may still add a node big enough, so this is a warning, not an error.
        log.warning(
            "--memory-budget %d bytes plus a worker's overhead (%d bytes) exceeds the memory Ray offers on any "
            "node now (%d bytes): shard tasks wait for a bigger node; lower --memory-budget otherwise",
            request.memory_budget, WORKER_OVERHEAD_BYTES, int(most_memory),
        )
    options["memory"] = memory
    return options


def submit_and_gather(request: MergeRequest, plan: MergePlan) -> list[ShardOutcome]:
    """One task per shard, at most ``workers`` in flight; results in plan order."""
    options = task_options(request, plan)
    window = request.workers or len(plan.shards)
    pending = list(reversed(plan.shards))
    in_flight: dict[ray.ObjectRef, str] = {}
    outcomes: dict[str, ShardOutcome] = {}
    bar = tqdm(total=plan.total_size, unit="B", unit_scale=True, desc="merge", disable=not request.progress)
    try:
        while pending or in_flight:
            while pending and len(in_flight) < window:
                shard = pending.pop()
                task = ShardTask(request.out_url, dict(request.storage_options), shard, request.memory_budget,
                                 request.io_concurrency)
                in_flight[merge_shard_task.options(**options).remote(task)] = shard.file
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                in_flight.pop(ref)
                outcome: ShardOutcome = result_of(ref)
                outcomes[outcome.file] = outcome
                bar.update(outcome.size)
    except BaseException:
        for ref in in_flight:
            ray.cancel(ref, force=False)
        # Let the cancelled tasks end (their writers remove their partial files) before the caller
        # cleans up or reports: a straggler must not write into an output that was just removed.
        if in_flight:
            ray.wait(list(in_flight), num_returns=len(in_flight), timeout=CANCEL_WAIT_S)
        raise
    finally:
        bar.close()
    return [outcomes[s.file] for s in plan.shards]


def _out_dtype_name(recipe: MergeRecipe, tensors: Sequence[TensorStats]) -> str:
    if recipe.output_dtype:
        return CONFIG_DTYPE_NAMES[recipe.output_dtype]
    merged = [s.out_dtype for s in tensors if s.method != "copy"] or [s.out_dtype for s in tensors]
    most = max(sorted(set(merged)), key=merged.count)  # sorted: ties resolve the same way every run
    return CONFIG_DTYPE_NAMES.get(most, "float32")


def commit(request: MergeRequest, prepared: PreparedMerge, outcomes: list[ShardOutcome]) -> None:
    """Index, config and tokenizer files, recipe, report, model card; the manifest last."""
    recipe, out, plan = request.recipe, prepared.out, prepared.plan
    tensors = [stats for outcome in outcomes for stats in outcome.tensors]
    written: dict[str, bytes] = {}
    source_dir = storage.resolve(prepared.config_source.url, request.storage_options)
    vocabulary = prepared.vocabulary
    for name in model_files(source_dir):
        if vocabulary is not None and name in TOKENIZER_FILES:
            continue  # the merge's own tokenizer replaces the base's
        raw = storage.read_bytes(source_dir.join(name))
        if name == "config.json":
            raw = output_config(raw, _out_dtype_name(recipe, tensors), prepared.output_layers, source_dir.join(name).url,
                                vocab_size=vocabulary.padded_size if vocabulary is not None else None)
        written[name] = raw
    if vocabulary is not None:
        written.update(vocabulary.files)
    elif recipe.chat_template is not None and "tokenizer_config.json" in written:
        template = chat_template_for(recipe.chat_template, [c.url for c in prepared.checkpoints], request.storage_options)
        if template:
            written["tokenizer_config.json"] = with_chat_template(written["tokenizer_config.json"], template)
            written.pop("chat_template.jinja", None)
    written[INDEX_FILE_NAME] = index_json(
        [(shard.file, [t.job.name for t in shard.tensors]) for shard in plan.shards], plan.total_size
    )
    recipe_yaml = recipe.to_yaml()
    written[RECIPE_FILE] = recipe_yaml.encode()
    notices = recipe.parameter_notices
    report = report_json(recipe.merge_method, recipe_yaml, tensors, prepared.ignored_tensors, notices.unused, notices.clamped)
    written[REPORT_FILE] = report_bytes(report)
    plot = report_png(tensors, f"{recipe.merge_method}: cos θ and t by tensor")
    if plot is not None:
        written[REPORT_PLOT_FILE] = plot
    written.update(request.extra_files)
    written[MODEL_CARD_FILE] = model_card(
        recipe_yaml, recipe.base_model, recipe.merge_method, recipe.model_urls, report["summary"]
    )
    for name, raw in written.items():
        storage.write_bytes(out.join(name), raw)
    for name in remove_stale_partials(out):
        log.info("%s: removed a partial file left by a lost worker", out.join(name).url)
    manifest = {
        "format": MANIFEST_FORMAT,
        "recipe_sha256": recipe.sha256(),
        "plan_sha256": plan.digest,
        "inputs": input_fingerprints(prepared.checkpoints),
        "total_size": plan.total_size,
        "shards": [{"file": o.file, "size": o.size, "sha256": o.sha256} for o in outcomes],
        "files": {name: sha256_hex(raw) for name, raw in sorted(written.items())},
    }
    storage.write_bytes(out.join(MANIFEST_FILE), (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())


def prepare_merge(request: MergeRequest) -> PreparedMerge:
    """Validate the output location and every input's headers, and plan the shards.

    Runs before Ray is started, so bad input is refused in a second, with nothing written.
    """
    out = storage.resolve(request.out_url, request.storage_options)
    recipe = request.recipe
    check_not_overlapping(out, list(recipe_models(recipe)), request.storage_options)
    plan, tensor_plan, checkpoints, vocabulary = plan_merge(request)
    log.info("plan: %d shards, %.2f GB out, %.2f GB to read", len(plan.shards), plan.total_size / 1e9, plan.input_bytes / 1e9)
    output_action(read_output_state(out), plan, request.overwrite, out)  # refuse early, touch nothing
    return PreparedMerge(out, plan, checkpoints, tensor_plan.output_layers, tuple(tensor_plan.ignored), vocabulary)


def log_bytes_read(plan: MergePlan, outcomes: Sequence[ShardOutcome]) -> None:
    """Bytes the workers fetched against the input tensor bytes their shards needed."""
    computed = {o.file for o in outcomes if not o.resumed}
    needed = sum(shard.input_bytes for shard in plan.shards if shard.file in computed)
    fetched = sum(o.bytes_read for o in outcomes)
    if needed:
        log.info("read %.2f GB for %.2f GB of input tensors (%.3fx)", fetched / 1e9, needed / 1e9, fetched / needed)


def _release_quietly(lock: OutputLock) -> None:
    """Release the lock without letting a storage fault hide the error being raised."""
    try:
        lock.release()
    except StorageError as exc:
        log.warning("could not release the output lock: %s", exc)


def run_merge(request: MergeRequest, prepared: PreparedMerge | None = None) -> MergeResult:
    """Validate, plan, submit, gather, commit. Bad input raises before anything is written."""
    prepared = prepared or prepare_merge(request)
    out, plan = prepared.out, prepared.plan
    # Decided once before taking the lock (refuse without touching the output), then under it.
    if output_action(read_output_state(out), plan, request.overwrite, out) == "complete":
        log.info("%s already holds this merge (manifest matches); nothing to do", out.url)
        return MergeResult(out.url, plan.digest, [], already_complete=True)
    lock = OutputLock(out, plan.digest)
    lock.acquire()
    try:
        action = output_action(read_output_state(out), plan, request.overwrite, out)
        if action == "complete":
            return MergeResult(out.url, plan.digest, [], already_complete=True)
        if action == "replace":
            log.info("%s: --overwrite: removing the previous content", out.url)
            clear_output(out)
        if action != "resume":
            job = {"plan_sha256": plan.digest, "recipe": request.recipe.model_dump(mode="json")}
            storage.write_bytes(out.join(STATE_DIR, JOB_FILE), canonical(job))
        try:
            outcomes = submit_and_gather(request, plan)
            log_bytes_read(plan, outcomes)
            if not lock.held():
                raise OutputConflict(f"{out.url}: the output lock was taken over by another merge; not committing")
            commit(request, prepared, outcomes)
        except OutputConflict:
            raise  # another merge owns the output now: leave it alone
        except InputError:
            # The inputs themselves are bad (NaN weights found while merging, an unreadable
            # config.json at commit): this output can never complete, so leave nothing behind.
            _release_quietly(lock)
            storage.remove_tree(out)
            raise
    finally:
        _release_quietly(lock)
    return MergeResult(out.url, plan.digest, outcomes)
