"""The recipe search on Ray Tune: sample a point, merge the candidate, score it on held-out data.

The spec (``modelstock.recipe_search``) names the space; Optuna's sampler (TPE, CMA-ES or random,
through ``ray.tune.search.optuna.OptunaSearch``) proposes points; each Tune trial expands its
point into a plain recipe, merges it (in the trial's memory when the inputs fit, else on the
cluster to a scratch folder removed after loading) and scores it on the suite's held-out set,
reporting after each of the growing prefixes of that set when successive halving (ASHA) is on.

Reproducible: the sampler is seeded and trials are proposed in batches of ``concurrency`` (a
batch is proposed only when the previous one has finished). At concurrency 1 the points depend
only on the seed and the trial count (tested); at higher concurrency Tune may interleave
suggestions and results differently from run to run, so the points usually, not always, agree.
ASHA's stopping decisions depend on the order of reports too.

A killed driver resumes from Tune's experiment state (``Tuner.restore``): finished trials are
kept, unfinished ones run again. The best trial's recipe (gradients written out) is then merged
to the output with the normal commit; the trials table (Parquet), its plot and a summary are
written beside it before the manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelstock import storage
from modelstock.errors import InvalidRecipe, OutputConflict
from modelstock.evaluation.datasets import AnySuite, DatasetShard, TextSuite, plan_dataset_shards
from modelstock.evaluation.metrics import TextShardScore
from modelstock.recipe import MergeRecipe
from modelstock.recipe_search import Choice, Dimension, SearchSpec

log = logging.getLogger(__name__)

SEARCH_DIR = ".modelstock/search"  # Tune's experiment under the output's state folder
SCRATCH_DIR = ".modelstock/scratch"
SPEC_FILE = "search-spec.json"
TABLE_FILE, PLOT_FILE, SUMMARY_FILE = "modelstock-search.parquet", "modelstock-search.png", "modelstock-search.json"
EXPERIMENT = "trials"

Report = Callable[[dict[str, Any]], None]
Objective = Callable[[dict[str, Any], Report], None]


# --- the generic part: any objective over a space, on Tune -------------------------------------------


def optuna_space(space: Mapping[str, Dimension]) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    return {name: CategoricalDistribution(list(dim.options)) if isinstance(dim, Choice)
            else FloatDistribution(dim.low, dim.high, log=dim.log) for name, dim in space.items()}


def make_sampler(name: str, seed: int) -> Any:
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    try:
        import cmaes  # noqa: F401  (Optuna's CMA-ES sampler needs it)
    except ImportError:
        raise InvalidRecipe("sampler: cmaes needs the 'cmaes' package, which is not installed (use tpe)") from None
    return optuna.samplers.CmaEsSampler(seed=seed)


@dataclass(frozen=True)
class TrialSettings:
    """How the trials run: the metric and its direction, how many, how many at once, the sampler."""

    metric: str
    mode: str  # "min" or "max"
    trials: int
    concurrency: int
    seed: int
    sampler: str = "tpe"
    rungs: int = 1  # > 1: ASHA over that many reports per trial
    reduction_factor: int = 2
    cpus_per_trial: float = 1.0


def _trainable(objective: Objective) -> Callable[[dict[str, Any]], None]:
    def trial(config: dict[str, Any]) -> None:
        from ray import tune

        objective(config, tune.report)

    return trial


def run_trials(objective: Objective, space: Mapping[str, Dimension], settings: TrialSettings,
               experiment_dir: str) -> Any:
    """Run (or resume, if ``experiment_dir`` holds a Tune experiment) the trials; Tune's ResultGrid."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    path = Path(experiment_dir).resolve()
    # A trial that only waits for cluster merges holds no CPU (its merge tasks need them); Ray wants
    # some resource in a bundle, so it declares a token of memory instead.
    resources: dict[str, float] = {"cpu": settings.cpus_per_trial} if settings.cpus_per_trial else {"cpu": 0, "memory": 2**20}
    trainable = tune.with_resources(_trainable(objective), resources)
    if tune.Tuner.can_restore(str(path / EXPERIMENT)):
        log.info("search: resuming the experiment at %s (finished trials are kept)", path)
        tuner = tune.Tuner.restore(str(path / EXPERIMENT), trainable, resume_errored=True)
        return tuner.fit()
    searcher = OptunaSearch(optuna_space(space), metric=settings.metric, mode=settings.mode,
                            sampler=make_sampler(settings.sampler, settings.seed))
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=settings.rungs, grace_period=1,
                               reduction_factor=settings.reduction_factor)
                 if settings.rungs > 1 else FIFOScheduler())
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=settings.metric, mode=settings.mode, num_samples=settings.trials, scheduler=scheduler,
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=settings.concurrency, batch=True),
        ),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(path), verbose=0),
    )
    return tuner.fit()


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the table shows it: its number, point, last score, how much it saw, its state."""

    number: int
    point: dict[str, Any]
    score: float | None
    fraction: float  # of the held-out set scored (1.0: complete)
    rows: int
    state: str  # "complete", "stopped" (successive halving) or "error"


def trial_records(grid: Any, space: Mapping[str, Dimension], metric: str) -> list[TrialRecord]:
    records: list[TrialRecord] = []
    for result in grid:
        metrics = result.metrics or {}
        config = result.config or {}
        trial_id = str(metrics.get("trial_id") or getattr(result, "path", "0"))
        number = int(trial_id.rsplit("_", 1)[-1]) if trial_id.rsplit("_", 1)[-1].isdigit() else len(records)
        fraction = float(metrics.get("fraction", 0.0))
        state = "error" if result.error else ("complete" if fraction >= 1.0 else "stopped")
        score = metrics.get(metric)
        records.append(TrialRecord(number, {name: config.get(name) for name in space},
                                   None if score is None else float(score), fraction, int(metrics.get("rows", 0)), state))
    return sorted(records, key=lambda r: r.number)


def best_record(records: Sequence[TrialRecord], mode: str) -> TrialRecord:
    complete = [r for r in records if r.state == "complete" and r.score is not None and math.isfinite(r.score)]
    if not complete:
        raise InvalidRecipe("search: no trial scored the whole held-out set (see the trials' errors in the log)")
    sign = 1.0 if mode == "min" else -1.0
    return min(complete, key=lambda r: (sign * (r.score or 0.0), r.number))  # ties: the earlier trial


# --- the merge-and-score objective ------------------------------------------------------------------


_STATES: dict[str, Any] = {}  # per trial process: inputs read once, reused by later trials in it


def _input_states(urls: Sequence[str], storage_options: Mapping[str, Any]) -> dict[str, Any]:
    from modelstock.evaluation.causal_lm import read_checkpoint_state

    for url in urls:
        if url not in _STATES:
            _STATES[url] = read_checkpoint_state(url, storage_options)
    return {url: _STATES[url] for url in urls}


def rung_shards(shards: Sequence[DatasetShard], rungs: int) -> list[list[DatasetShard]]:
    """The held-out shards cut into ``rungs`` growing prefixes: each rung adds the next group."""
    rungs = max(1, min(rungs, len(shards)))
    bounds = [round(len(shards) * (k + 1) / rungs) for k in range(rungs)]
    return [list(shards[lo:hi]) for lo, hi in zip([0, *bounds[:-1]], bounds)]


@dataclass(frozen=True)
class CandidateObjective:
    """Expand a point, merge it, score it on the held-out set (one report per rung)."""

    spec: SearchSpec
    suite: TextSuite
    shards: tuple[DatasetShard, ...]
    rungs: int
    in_memory: bool
    scratch_url: str
    metric: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, config: dict[str, Any], report: Report) -> None:
        import torch

        torch.set_num_threads(1)  # one CPU per trial: trials run side by side, never oversubscribed
        recipe = self.spec.expand(config, "search point")
        name = hashlib.sha256(recipe.canonical_json().encode()).hexdigest()[:12]
        lm = self._merged(recipe, name)
        self._score(lm, name, report)

    def _merged(self, recipe: MergeRecipe, name: str) -> Any:
        from modelstock.api import merge_recipe_in_memory
        from modelstock.checkpoint.reader import open_checkpoint
        from modelstock.evaluation.builders import read_config_in
        from modelstock.evaluation.causal_lm import build_causal_lm, causal_lm_config, load_causal_lm, load_tokenizer
        from modelstock.recipe import recipe_models

        if not self.in_memory:
            return self._merged_on_cluster(recipe, name, load_causal_lm)
        urls = list(recipe_models(recipe))
        merged, _ = merge_recipe_in_memory(recipe, _input_states(urls, self.storage_options))
        first = storage.resolve(urls[0], self.storage_options)
        config = causal_lm_config(read_config_in(first), first.url)
        dtype = config.dtype(self.suite.dtype, open_checkpoint(first.url, self.storage_options))
        return build_causal_lm(name, config, iter(merged.items()), load_tokenizer(first), ["cpu"], dtype)

    def _merged_on_cluster(self, recipe: MergeRecipe, name: str, load: Callable[..., Any]) -> Any:
        from pipeline.driver import MergeRequest, run_merge

        scratch = storage.resolve(self.scratch_url, self.storage_options).join(name)
        try:
            run_merge(MergeRequest(recipe=recipe, out_url=scratch.url, storage_options=self.storage_options,
                                   overwrite=True, progress=False))
            return load(scratch.url, self.storage_options, ["cpu"], self.suite.dtype)  # all in memory now
        finally:
            storage.remove_tree(scratch)

    def _score(self, lm: Any, name: str, report: Report) -> None:
        from modelstock.evaluation.text_data import read_text_shard
        from modelstock.evaluation.text_scoring import TextBatching, score_text_rows
        from pipeline.evaluate import text_row

        batching = TextBatching.of(self.suite)
        parts: list[TextShardScore] = []
        groups = rung_shards(self.shards, self.rungs)
        for index, group in enumerate(groups):
            for shard in group:
                rows = read_text_shard(shard, self.storage_options)
                parts.append(score_text_rows(lm, name, shard, rows, batching))
            total = TextShardScore(name, parts[0].dataset, -1, parts[0].task, nll=math.fsum(p.nll for p in parts),
                                   tokens=sum(p.tokens for p in parts), correct=sum(p.correct for p in parts),
                                   total=sum(p.total for p in parts))
            report({self.metric: text_row(total, "held_out").value, "fraction": (index + 1) / len(groups),
                    "rows": sum(s.rows for g in groups[: index + 1] for s in g)})


# --- the whole command ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchRequest:
    spec: SearchSpec
    suite: AnySuite
    out_url: str
    trials: int | None = None  # overrides the spec's
    experiment_dir: str | None = None  # default: under the output's state folder (local outputs)
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    progress: bool = True


@dataclass(frozen=True)
class SearchResult:
    out_url: str
    recipe: MergeRecipe
    best: TrialRecord
    records: list[TrialRecord]
    metric: str
    mode: str
    in_memory: bool
    files: list[str]


def check_search_suite(suite: AnySuite) -> TextSuite:
    """The held-out set scores the trials; it must exist and never be the set reported as ID."""
    if not isinstance(suite, TextSuite):
        raise InvalidRecipe("search: the suite must be a language-model suite (kind: text)")
    held = suite.held_out
    if held is None:
        raise InvalidRecipe("search: the suite needs a held_out set to score trials on (never the ID set)")
    if held.url.rstrip("/") == suite.id.url.rstrip("/"):
        raise InvalidRecipe(f"search: held_out {held.name} is the ID set's data ({held.url}); give a separate set")
    return suite


def experiment_folder(request: SearchRequest) -> str:
    if request.experiment_dir:
        return request.experiment_dir
    out = storage.resolve(request.out_url, request.storage_options)
    if not out.is_local:
        raise InvalidRecipe(f"{request.out_url}: a remote output needs --experiment-dir (a local folder for Tune's state)")
    return str(Path(out.path) / SEARCH_DIR)


def _spec_record(spec: SearchSpec, trials: int, suite: TextSuite) -> str:
    return json.dumps({"spec": spec.model_dump(mode="json"), "trials": trials,
                       "suite": suite.model_dump(mode="json")}, sort_keys=True)


def prepare_experiment(folder: str, record: str, overwrite: bool) -> None:
    """A fresh experiment, or the same one again (resume); a different search there is a conflict."""
    path = Path(folder)
    saved = path / SPEC_FILE
    if overwrite and path.exists():
        shutil.rmtree(path)
    if saved.exists() and saved.read_text() != record:
        raise OutputConflict(f"{path}: holds a search of another spec, trial count or suite; "
                             "pass --overwrite to start again")
    path.mkdir(parents=True, exist_ok=True)
    saved.write_text(record)


def fits_in_trial(spec: SearchSpec, suite: TextSuite, storage_options: Mapping[str, Any], concurrency: int) -> bool:
    """Whether a trial can hold every input, the merged model and its activations in its share of
    the largest node's memory (else candidates are merged on the cluster)."""
    import ray

    from modelstock.evaluation.causal_lm import model_footprint
    from modelstock.recipe import recipe_models

    recipe = spec.expand(spec.middle(), "search")
    if recipe.vocabulary_source is not None:
        return False  # the in-memory merge has no vocabulary planning
    urls = list(recipe_models(recipe))
    need = model_footprint(urls[0], storage_options, suite.batch_tokens, suite.max_length, suite.dtype,
                           ingredients=len(urls) + 1)
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    memory = max((n.get("memory", 0.0) for n in nodes), default=0.0)
    return need.total <= memory / concurrency


def trials_table(records: Sequence[TrialRecord], metric: str) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = sorted({name for r in records for name in r.point})
    columns: dict[str, Any] = {"trial": [r.number for r in records], metric: [r.score for r in records],
                               "fraction": [r.fraction for r in records], "rows": [r.rows for r in records],
                               "state": [r.state for r in records]}
    for name in names:
        values = [r.point.get(name) for r in records]
        columns[name] = values if all(isinstance(v, (int, float)) or v is None for v in values) else [str(v) for v in values]
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()


def trials_plot(records: Sequence[TrialRecord], metric: str, mode: str, baselines: Mapping[str, float]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for state, marker in (("complete", "o"), ("stopped", "x")):
        shown = [r for r in records if r.state == state and r.score is not None]
        axes.scatter([r.number for r in shown], [float(r.score or 0.0) for r in shown], marker=marker, label=f"trial ({state})")
    best: list[float] = []
    for r in records:
        if r.state == "complete" and r.score is not None:
            best.append(r.score if not best else (min if mode == "min" else max)(best[-1], r.score))
        elif best:
            best.append(best[-1])
        else:
            best.append(float("nan"))
    axes.plot([r.number for r in records], best, label="best so far")
    for index, (name, value) in enumerate(baselines.items()):
        axes.axhline(value, linestyle="--", color=f"C{index + 2}", label=name)
    axes.set_xlabel("trial")
    axes.set_ylabel(f"held-out {metric}")
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def run_search(request: SearchRequest, baselines: Mapping[str, float] | None = None) -> SearchResult:
    """Search, merge the best recipe to the output, write the trials' record beside it."""
    from pipeline.driver import MergeRequest, run_merge

    spec = request.spec
    suite = check_search_suite(request.suite)
    trials = request.trials or spec.trials
    held = suite.held_out
    assert held is not None
    metric = "perplexity" if held.task == "perplexity" else "accuracy"
    mode = "min" if metric == "perplexity" else "max"
    folder = experiment_folder(request)
    prepare_experiment(folder, _spec_record(spec, trials, suite), request.overwrite)
    shards = tuple(plan_dataset_shards(held, suite.rows_per_shard, request.storage_options))
    rungs = spec.halving.rungs if spec.halving else 1
    in_memory = spec.merge == "memory" or (
        spec.merge == "auto" and fits_in_trial(spec, suite, request.storage_options, spec.concurrency))
    scratch = storage.resolve(request.out_url, request.storage_options).join(*SCRATCH_DIR.split("/"))
    objective = CandidateObjective(spec, suite, shards, rungs, in_memory, scratch.url, metric,
                                   dict(request.storage_options))
    settings = TrialSettings(metric, mode, trials, min(spec.concurrency, trials), spec.seed, spec.sampler, rungs,
                             spec.halving.reduction_factor if spec.halving else 2,
                             # a cluster merge's tasks need the CPUs: the trial itself mostly waits for them
                             cpus_per_trial=1.0 if in_memory else 0.0)
    log.info("search: %d trials of %d dimension(s), %d at once, %s merges, scored on %s (%s)", trials,
             len(spec.space), settings.concurrency, "in-memory" if in_memory else "cluster", held.name, metric)
    grid = run_trials(objective, spec.space, settings, folder)
    records = trial_records(grid, spec.space, metric)
    best = best_record(records, mode)
    recipe = spec.expand(best.point, "best point")
    summary = {"metric": metric, "mode": mode, "held_out": held.name, "trials": len(records), "best_trial": best.number,
               "best_score": best.score, "best_point": best.point, "seed": spec.seed, "sampler": spec.sampler,
               "concurrency": settings.concurrency, "halving": spec.halving.model_dump() if spec.halving else None,
               "in_memory": in_memory}
    extra = {TABLE_FILE: trials_table(records, metric), PLOT_FILE: trials_plot(records, metric, mode, baselines or {}),
             SUMMARY_FILE: (json.dumps(summary, indent=1) + "\n").encode()}
    merged = run_merge(MergeRequest(recipe=recipe, out_url=request.out_url, storage_options=request.storage_options,
                                    overwrite=request.overwrite, progress=request.progress, extra_files=extra))
    storage.remove_tree(scratch)
    return SearchResult(merged.out_url, recipe, best, records, metric, mode, in_memory, list(extra))
