"""Inputs named as users name them: a local path, any fsspec URL (``s3://``, ``gs://``, ``az://``,
``hf://``, ...), or a bare Hugging Face hub id ``org/model`` with an optional ``@revision`` (a
branch, tag or commit), which is read as ``hf://org/model@revision`` unless a local folder of that
name exists (mergekit's rule)."""

from __future__ import annotations

import os
import re

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def source_url(name: str) -> str:
    """The URL a model name in a recipe stands for."""
    if "://" in name or os.path.exists(name) or not HUB_ID.match(name):
        return name
    return f"hf://{name}"
