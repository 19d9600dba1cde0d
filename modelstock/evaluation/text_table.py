"""The language-model results table: perplexity (lower is better) on text sets, accuracy (higher
is better) on multiple-choice sets.

OOD means: perplexity and choice sets measure different things on different scales, so they are
never averaged together. ``ood_mean_perplexity`` is the unweighted mean of the OOD text sets'
perplexities (each set's own exp(NLL / tokens); as the papers average per-set accuracies, every
set counts the same however many tokens it has) and ``ood_mean_accuracy`` the unweighted mean of
the OOD choice sets' accuracies. Either is null when the suite has no such OOD set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from modelstock.evaluation.metrics import accuracy, perplexity
from modelstock.evaluation.tables import (
    RESULTS_JSON,
    RESULTS_PARQUET,
    RESULTS_PLOT,
    ScatterPanel,
    SummaryColumn,
    group_by_kind,
    parquet_bytes,
    results_json,
    scatter_png,
    write_results,
)

OOD_MEAN_RULE = ("ood_mean_perplexity: unweighted mean of the OOD text sets' perplexities (lower is better); "
                 "ood_mean_accuracy: unweighted mean of the OOD choice sets' accuracies (higher is better); "
                 "the two kinds are never averaged together")


@dataclass(frozen=True)
class TextEvalRow:
    model: str
    dataset: str
    role: str  # "id", "ood" or "held_out"
    task: str  # "perplexity" or "choice"
    nll: float = 0.0
    tokens: int = 0
    correct: int = 0
    total: int = 0

    @property
    def value(self) -> float:
        """Perplexity for a text set, accuracy for a choice set."""
        return perplexity(self.nll, self.tokens) if self.task == "perplexity" else accuracy(self.correct, self.total)

    def to_json(self) -> dict[str, Any]:
        if self.task == "perplexity":
            return {"task": self.task, "perplexity": self.value, "nll": self.nll, "tokens": self.tokens}
        return {"task": self.task, "accuracy": self.value, "correct": self.correct, "total": self.total}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class TextEvalTable:
    rows: list[TextEvalRow]
    id_name: str
    ood_names: list[str]
    kinds: dict[str, str] = field(default_factory=dict)
    held_out_name: str | None = None

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(row.model for row in self.rows))

    def row(self, model: str, dataset: str) -> TextEvalRow:
        for row in self.rows:
            if row.model == model and row.dataset == dataset:
                return row
        raise KeyError((model, dataset))

    def task(self, dataset: str) -> str:
        return next(row.task for row in self.rows if row.dataset == dataset)

    def value(self, model: str, dataset: str) -> float:
        return self.row(model, dataset).value

    def id_value(self, model: str) -> float:
        return self.value(model, self.id_name)

    @property
    def id_metric(self) -> str:
        return "perplexity" if self.task(self.id_name) == "perplexity" else "accuracy"

    @property
    def ood_perplexity_names(self) -> list[str]:
        return [n for n in self.ood_names if self.task(n) == "perplexity"]

    @property
    def ood_choice_names(self) -> list[str]:
        return [n for n in self.ood_names if self.task(n) == "choice"]

    def ood_mean_perplexity(self, model: str) -> float | None:
        return _mean([self.value(model, n) for n in self.ood_perplexity_names])

    def ood_mean_accuracy(self, model: str) -> float | None:
        return _mean([self.value(model, n) for n in self.ood_choice_names])

    def summary_columns(self) -> list[SummaryColumn]:
        perplexity_id = self.id_metric == "perplexity"
        columns = [SummaryColumn(f"ID {'perplexity' if perplexity_id else 'accuracy'}", not perplexity_id,
                                 {m: self.id_value(m) for m in self.models})]
        if self.ood_perplexity_names:
            ood_perplexity = {m: self.ood_mean_perplexity(m) or 0.0 for m in self.models}
            columns.append(SummaryColumn("OOD mean perplexity", False, ood_perplexity))
        if self.ood_choice_names:
            ood_accuracy = {m: self.ood_mean_accuracy(m) or 0.0 for m in self.models}
            columns.append(SummaryColumn("OOD choice accuracy", True, ood_accuracy))
        if self.held_out_name:
            held_out = self.held_out_name
            perplexity_set = self.task(held_out) == "perplexity"
            name = f"held-out {'perplexity' if perplexity_set else 'accuracy'}"
            columns.append(SummaryColumn(name, not perplexity_set, {m: self.value(m, held_out) for m in self.models}))
        return columns

    def _cells(self) -> list[tuple[str, Any]]:
        """(header, model -> text) for each column of the terminal table."""

        def dataset_cell(name: str) -> tuple[str, Any]:
            if self.task(name) == "perplexity":
                return f"{name} ppl", lambda m: f"{self.value(m, name):.3f}"
            return f"{name} acc%", lambda m: f"{100 * self.value(m, name):.2f}"

        cells = [dataset_cell(n) for n in [self.id_name, *self.ood_names]]
        if self.ood_perplexity_names:
            cells.append(("OOD ppl", lambda m: f"{self.ood_mean_perplexity(m):.3f}"))
        if self.ood_choice_names:
            cells.append(("OOD acc%", lambda m: f"{100 * (self.ood_mean_accuracy(m) or 0.0):.2f}"))
        if self.held_out_name:
            cells.append(dataset_cell(self.held_out_name))
        return cells

    def format(self) -> str:
        cells = self._cells()
        name_width = max([len("model"), *(len(m) for m in self.models)])
        widths = [max(8, len(header)) for header, _ in cells]
        header = f"{'model':<{name_width}}  " + "  ".join(f"{h:>{w}}" for (h, _), w in zip(cells, widths))
        lines = [header, "-" * len(header)]
        for model in self.models:
            values = [f"{cell(model):>{w}}" for (_, cell), w in zip(cells, widths)]
            lines.append(f"{model:<{name_width}}  " + "  ".join(values))
        lines.append("ppl: perplexity, lower is better; acc%: multiple-choice accuracy, higher is better; "
                     "OOD ppl: mean of the OOD text sets' perplexities; "
                     "OOD acc%: mean of the OOD choice sets' accuracies")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "text",
            "id": self.id_name,
            "id_metric": self.id_metric,
            "ood": list(self.ood_names),
            "ood_perplexity_sets": self.ood_perplexity_names,
            "ood_choice_sets": self.ood_choice_names,
            "held_out": self.held_out_name,
            "better": {"perplexity": "lower", "accuracy": "higher"},
            "ood_mean_rule": OOD_MEAN_RULE,
            "models": [
                {
                    "model": model,
                    "kind": self.kinds.get(model),
                    f"id_{self.id_metric}": self.id_value(model),
                    "ood_mean_perplexity": self.ood_mean_perplexity(model),
                    "ood_mean_accuracy": self.ood_mean_accuracy(model),
                    "datasets": {row.dataset: row.to_json() for row in self.rows if row.model == model},
                }
                for model in self.models
            ],
        }

    def parquet_bytes(self) -> bytes:
        records = []
        for row in self.rows:
            record = {**asdict(row), "perplexity": None, "accuracy": None}
            record["perplexity" if row.task == "perplexity" else "accuracy"] = row.value
            records.append(record)
        return parquet_bytes(records)

    def scatter_png(self, title: str = "ID vs OOD, language models") -> bytes | None:
        """ID metric against the OOD means; perplexity axes are inverted so up and right are better."""
        if not self.ood_names:
            return None
        groups = group_by_kind(self.models, self.kinds)
        perplexity_id = self.id_metric == "perplexity"
        xlabel = f"ID {'perplexity (lower is better)' if perplexity_id else 'accuracy'}: {self.id_name}"
        panels = []
        for names, mean, label, inverted in (
            (self.ood_perplexity_names, self.ood_mean_perplexity, "OOD mean perplexity (lower is better)", True),
            (self.ood_choice_names, self.ood_mean_accuracy, "OOD mean choice accuracy", False),
        ):
            if names:
                points = {kind: [(m, self.id_value(m), mean(m) or 0.0) for m in models]
                          for kind, models in groups.items()}
                panels.append(ScatterPanel(points, xlabel, f"{label}: {len(names)} sets", perplexity_id, inverted))
        return scatter_png(panels, title)

    def write(self, out_url: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
        return write_results({
            RESULTS_JSON: results_json(self.to_json()),
            RESULTS_PARQUET: self.parquet_bytes(),
            RESULTS_PLOT: self.scatter_png(),
        }, out_url, storage_options)
