"""``modelstock methods``: the registered merge methods, their parameters and one-line summaries."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any

from modelstock.methods import get_method, method_names
from modelstock.methods.base import MergeMethod, recipe_name
from pipeline.cli.options import EXIT_OK


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def parameter_table(kind: type) -> list[dict[str, Any]]:
    """One entry per parameter of a parameter dataclass: name, type and default (None: required)."""
    hints = typing.get_type_hints(kind)
    rows = []
    for parameter in dataclasses.fields(kind):
        required = parameter.default is dataclasses.MISSING and parameter.default_factory is dataclasses.MISSING
        rows.append({"name": recipe_name(parameter), "type": _type_name(hints[parameter.name]),
                     "required": required, "default": None if required else parameter.default})
    return rows


def describe(method: MergeMethod[Any, Any]) -> dict[str, Any]:
    return {
        "name": method.name,
        "summary": method.summary,
        "needs_base": method.needs_base,
        "models": {"min": method.min_models, "max": method.max_models},
        "parameters": parameter_table(method.parameters),
        "model_parameters": parameter_table(method.model_parameters),
    }


def _format_parameters(rows: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['name']}: {r['type']}" + ("" if r["required"] else f" = {r['default']!r}") for r in rows) or "-"


def run(args: argparse.Namespace) -> int:
    methods = [describe(get_method(name)) for name in method_names()]
    if args.json:
        print(json.dumps(methods, indent=1))
        return EXIT_OK
    for method in methods:
        models = method["models"]
        count = f"{models['min']}+" if models["max"] is None else f"{models['min']}-{models['max']}"
        base = "base + " if method["needs_base"] else ""
        print(f"{method['name']}  ({base}{count} models)  {method['summary']}")
        print(f"    parameters:       {_format_parameters(method['parameters'])}")
        print(f"    model parameters: {_format_parameters(method['model_parameters'])}")
    return EXIT_OK


def add_command(sub: Any) -> None:
    methods = sub.add_parser("methods", help="list the merge methods, their parameters and summaries")
    methods.add_argument("--json", action="store_true", help="as JSON")
    methods.set_defaults(handler=run)
