"""CLI subcommands for evaluation, soups and the demo (filled in by the evaluation work)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `evaluate`, `soup` and `demo` on the `modelstock` parser."""
