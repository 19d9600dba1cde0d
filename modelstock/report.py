"""The merge report: per-tensor statistics as JSON, and cos(theta) / t by layer depth as a PNG."""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from modelstock.methods.base import TensorStats


def report_json(
    method: str,
    recipe_yaml: str,
    tensors: Sequence[TensorStats],
    ignored: Sequence[str] = (),
    unused_parameters: Sequence[str] = (),
    clamped_parameters: Sequence[str] = (),
) -> dict[str, Any]:
    merged = [s for s in tensors if s.method != "copy"]
    ratios = [s.values["t"] for s in merged if "t" in s.values]
    flags = Counter(flag for s in tensors for flag in s.flags)
    reread = sum(int(s.values.get("reread_bytes", 0)) for s in tensors)
    return {
        "format": "modelstock-report/2",
        "method": method,
        "recipe": recipe_yaml,
        "summary": {
            "tensors": len(tensors),
            "merged": len(merged),
            "copied": len(tensors) - len(merged),
            "flags": dict(sorted(flags.items())),
            # Bytes read twice because a tensor's inputs exceeded the worker's memory budget.
            "reread_bytes": reread,
            # Tensors some inputs hold but the output (shaped as the base) does not, as mergekit.
            "ignored_tensors": list(ignored),
            # Recipe parameters this method does not use (no effect, as in mergekit), and values
            # clamped to their domain (a density above 1 is 1).
            "unused_parameters": list(unused_parameters),
            "clamped_parameters": list(clamped_parameters),
            **(
                {"t_mean": sum(ratios) / len(ratios), "t_min": min(ratios), "t_max": max(ratios)}
                if ratios
                else {}
            ),
        },
        "tensors": [s.to_json() for s in tensors],
    }


def report_bytes(report: dict[str, Any]) -> bytes:
    return (json.dumps(report, indent=1, allow_nan=False) + "\n").encode()


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _layer_and_kind(name: str) -> tuple[int | None, str]:
    """('model.layers.12.mlp.up_proj.weight') -> (12, 'mlp.up_proj.weight')."""
    match = _LAYER_INDEX.search(name)
    if match is None:
        return None, name
    return int(match.group(1)), name[match.end():]


def report_png(tensors: Sequence[TensorStats], title: str) -> bytes | None:
    """cos(theta) and t by layer depth, one series per tensor kind (None without angles)."""
    points = [(s.name, s.values["cos_theta"], s.values["t"]) for s in tensors if "cos_theta" in s.values]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    depth = max((_layer_and_kind(name)[0] or 0) for name, _, _ in points) + 1
    series: dict[str, list[tuple[float, float, float]]] = {}
    for name, cos, ratio in points:
        index, kind = _layer_and_kind(name)
        # Tensors outside the layer stack (embeddings, final norm, head) sit just outside it.
        x = float(index) if index is not None else (-1.0 if "embed" in name else float(depth))
        series.setdefault(kind if index is not None else "outside layers", []).append((x, cos, ratio))
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 6), dpi=100)
    for kind, values in sorted(series.items()):
        xs = [v[0] for v in values]
        style = "o" if kind == "outside layers" or len(values) == 1 else ".-"
        top.plot(xs, [v[1] for v in values], style, markersize=4, linewidth=0.8, label=kind)
        bottom.plot(xs, [v[2] for v in values], style, markersize=4, linewidth=0.8)
    for axis, label in ((top, "cos θ (mean pairwise)"), (bottom, "t = Nc / (1 + (N-1)c)")):
        axis.axhline(0.0, color="grey", linewidth=0.5)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    bottom.set_xlabel("layer")
    top.set_title(title)
    top.legend(loc="center left", bbox_to_anchor=(1.01, 0.0), fontsize=7, frameon=False)
    figure.tight_layout()
    buffer = io.BytesIO()
    # No software/date metadata: the PNG bytes are reproducible run to run.
    figure.savefig(buffer, format="png", metadata={"Software": None}, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()
