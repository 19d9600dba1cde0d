"""The merge report: per-layer statistics as JSON, and cos(theta) / t by layer as a PNG."""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

from modelstock.methods.base import LayerStats


def report_json(method: str, recipe_yaml: str, layers: Sequence[LayerStats]) -> dict[str, Any]:
    merged = [s for s in layers if s.method != "copy"]
    ratios = [s.values["t"] for s in merged if "t" in s.values]
    flags = Counter(flag for s in layers for flag in s.flags)
    return {
        "format": "modelstock-report/1",
        "method": method,
        "recipe": recipe_yaml,
        "summary": {
            "tensors": len(layers),
            "merged": len(merged),
            "copied": len(layers) - len(merged),
            "flags": dict(sorted(flags.items())),
            **(
                {"t_mean": sum(ratios) / len(ratios), "t_min": min(ratios), "t_max": max(ratios)}
                if ratios
                else {}
            ),
        },
        "layers": [s.to_json() for s in layers],
    }


def report_bytes(report: dict[str, Any]) -> bytes:
    return (json.dumps(report, indent=1, allow_nan=False) + "\n").encode()


def report_png(layers: Sequence[LayerStats], title: str) -> bytes | None:
    """cos(theta) and t per merged tensor, in plan order (None when the method has no angles)."""
    points = [(s.name, s.values["cos_theta"], s.values["t"]) for s in layers if "cos_theta" in s.values]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(max(6.0, min(24.0, len(points) * 0.08)), 3.6), dpi=100)
    positions = list(range(len(points)))
    axis.plot(positions, [p[1] for p in points], ".", markersize=3, label="cos θ (mean pairwise)")
    axis.plot(positions, [p[2] for p in points], ".", markersize=3, label="t (interpolation ratio)")
    axis.axhline(0.0, color="grey", linewidth=0.5)
    axis.set_xlabel("tensor (plan order)")
    axis.set_title(title)
    axis.legend(loc="best", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    # Fixed metadata keeps the PNG bytes reproducible run to run.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()
