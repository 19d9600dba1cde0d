"""Evaluation results as tables: the terminal table, ``eval.json``, ``eval.parquet`` and the
ID-vs-OOD scatter (``eval.png``). This module holds the image-classifier table and what both
tables share; ``text_table`` holds the language-model one.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from modelstock import storage
from modelstock.evaluation.metrics import accuracy, ood_mean

RESULTS_JSON, RESULTS_PARQUET, RESULTS_PLOT = "eval.json", "eval.parquet", "eval.png"


@dataclass(frozen=True)
class SummaryColumn:
    """One per-model number and which way is better: what the demos' claims compare."""

    name: str
    higher_is_better: bool
    values: dict[str, float]

    def at_least_as_good(self, a: float, b: float) -> bool:
        return a >= b if self.higher_is_better else a <= b

    def best(self, models: Sequence[str]) -> str:
        return (max if self.higher_is_better else min)(models, key=lambda m: self.values[m])


@dataclass(frozen=True)
class ScatterPanel:
    """One ID-vs-OOD panel: (label, x, y) points by legend group, axis titles, better direction."""

    points: dict[str, list[tuple[str, float, float]]]
    xlabel: str
    ylabel: str
    invert_x: bool = False  # lower is better on this axis: flip it so up-right is always better
    invert_y: bool = False


def scatter_png(panels: Sequence[ScatterPanel], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(7.0 * len(panels), 5.0), dpi=100, squeeze=False)
    markers = "o*sD^vP"
    for axis, panel in zip(axes[0], panels):
        for index, (kind, points) in enumerate(panel.points.items()):
            axis.scatter([p[1] for p in points], [p[2] for p in points], marker=markers[index % len(markers)],
                         s=60 if index else 30, label=kind)
            for label, x, y in points:
                axis.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if panel.invert_x:
            axis.invert_xaxis()
        if panel.invert_y:
            axis.invert_yaxis()
        axis.set_xlabel(panel.xlabel)
        axis.set_ylabel(panel.ylabel)
        axis.legend(loc="best", fontsize=8)
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()


def parquet_bytes(records: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), buffer)
    return buffer.getvalue()


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def results_json(document: Mapping[str, Any]) -> bytes:
    """eval.json: a NaN or infinite metric is written as null, never as a bare NaN (which is not JSON)."""
    return (json.dumps(_finite_or_null(document), indent=1, allow_nan=False) + "\n").encode()


def write_results(files: Mapping[str, bytes | None], out_url: str,
                  storage_options: Mapping[str, Any] | None) -> list[str]:
    """Write the non-empty ``files`` under ``out_url``; returns the URLs written."""
    out = storage.resolve(out_url, storage_options)
    written = []
    for name, raw in files.items():
        if raw is not None:
            storage.write_bytes(out.join(name), raw)
            written.append(out.join(name).url)
    return written


def group_by_kind(models: Sequence[str], kinds: Mapping[str, str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for model in models:
        groups.setdefault(kinds.get(model, "model"), []).append(model)
    return groups


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
    """Top-1 per (model, dataset), plus the OOD mean per model (image classifiers)."""

    rows: list[EvalRow]
    id_name: str
    ood_names: list[str]
    kinds: dict[str, str] = field(default_factory=dict)  # model -> legend group for the plot
    held_out_name: str | None = None  # set when the held-out set was evaluated too

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

    def summary_columns(self) -> list[SummaryColumn]:
        columns = [SummaryColumn("ID top-1", True, {m: self.id_accuracy(m) for m in self.models})]
        if self.ood_names:
            columns.append(SummaryColumn("OOD mean top-1", True, {m: self.ood_mean(m) or 0.0 for m in self.models}))
        if self.held_out_name:
            held_out = self.held_out_name
            columns.append(SummaryColumn("held-out top-1", True, {m: self.accuracy(m, held_out) for m in self.models}))
        return columns

    def format(self) -> str:
        """The terminal table: one line per model, accuracies in percent."""
        columns = [self.id_name, *self.ood_names]
        name_width = max([len("model"), *(len(m) for m in self.models)])
        widths = [max(7, len(c)) for c in columns]
        header = f"{'model':<{name_width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(columns, widths))
        if self.ood_names:
            header += f"  {'OOD mean':>8}"
        if self.held_out_name:
            header += f"  {self.held_out_name:>{max(8, len(self.held_out_name))}}"
        lines = [header, "-" * len(header)]
        for model in self.models:
            cells = [f"{100 * self.accuracy(model, c):>{w}.2f}" for c, w in zip(columns, widths)]
            line = f"{model:<{name_width}}  " + "  ".join(cells)
            if self.ood_names:
                line += f"  {100 * (self.ood_mean(model) or 0.0):>8.2f}"
            if self.held_out_name:
                line += f"  {100 * self.accuracy(model, self.held_out_name):>{max(8, len(self.held_out_name))}.2f}"
            lines.append(line)
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "image",
            "id": self.id_name,
            "ood": list(self.ood_names),
            "held_out": self.held_out_name,
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
        return parquet_bytes([{**asdict(row), "accuracy": row.accuracy} for row in self.rows])

    def scatter_png(self, title: str = "ID vs OOD top-1") -> bytes | None:
        """ID accuracy against OOD mean, one labelled point per model (as in the papers' figures)."""
        if not self.ood_names:
            return None
        groups = group_by_kind(self.models, self.kinds)
        points = {kind: [(m, 100 * self.id_accuracy(m), 100 * (self.ood_mean(m) or 0.0)) for m in models]
                  for kind, models in groups.items()}
        panel = ScatterPanel(points, f"ID top-1 (%): {self.id_name}", f"OOD mean top-1 (%): {len(self.ood_names)} sets")
        return scatter_png([panel], title)

    def write(self, out_url: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
        """eval.json, eval.parquet and eval.png under ``out_url``; returns the URLs written."""
        return write_results({
            RESULTS_JSON: results_json(self.to_json()),
            RESULTS_PARQUET: self.parquet_bytes(),
            RESULTS_PLOT: self.scatter_png(),
        }, out_url, storage_options)
