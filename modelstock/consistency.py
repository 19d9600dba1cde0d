"""Inputs that contradict themselves or each other, refused from their headers and config.json
before any tensor byte is read (docs/ARCHITECTURE.md, "Errors").

- A ``config.json`` must describe its weights: ``vocab_size`` the rows of the token-indexed
  tensors, ``num_hidden_layers`` the layers of the main stack, ``hidden_size`` the width of its
  layer norms. A model whose config says otherwise cannot be loaded by transformers, and a merge
  would copy the lie into its output (with ``tokenizer_source``, the vocabulary is planned from it).
- A ``models:`` recipe merges layer i of every input with layer i: inputs whose stacks have
  different depths are refused, never trimmed to the reference's depth (``slices:`` picks layers
  explicitly, and is the way to merge models of different depths).
- The output takes its config and tokenizer files from the first base (else the first model): when
  that input has no ``config.json`` but another input has one, the inputs are transformers models and
  the output could not be loaded, so the merge is refused. Inputs none of which has a config.json
  (bare safetensors) merge as before.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from modelstock import storage
from modelstock.checkpoint.side_files import check_side_files
from modelstock.errors import IncompatibleModels, InvalidCheckpoint
from modelstock.planner import TOKEN_INDEXED_NAME, ModelCatalog, layer_of
from modelstock.recipe import MergeRecipe


@dataclass(frozen=True)
class CheckedInput:
    """One input as the driver opened it: its URL, parsed config.json (None: none) and tensor catalog."""

    url: str
    config: Mapping[str, Any] | None
    catalog: ModelCatalog


def _holders(config: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """The config and its nested model configs (text_config, language_config, ...), one level down."""
    yield config
    for value in config.values():
        if isinstance(value, Mapping):
            yield value


def _values(config: Mapping[str, Any], key: str) -> set[int]:
    return {h[key] for h in _holders(config) if isinstance(h.get(key), int) and not isinstance(h.get(key), bool)}


def main_stack(names: Sequence[str]) -> tuple[str, int] | None:
    """The layer stack with the most tensors (the decoder's, in an LLM): (prefix, layers)."""
    tensors: dict[str, int] = {}
    depth: dict[str, int] = {}
    for name in names:
        found = layer_of(name)
        if found:
            tensors[found[0]] = tensors.get(found[0], 0) + 1
            depth[found[0]] = max(depth.get(found[0], 0), found[1] + 1)
    if not tensors:
        return None
    prefix = max(sorted(tensors), key=lambda p: tensors[p])
    return prefix, depth[prefix]


def check_config_matches_weights(item: CheckedInput, config_url: str) -> None:
    """``vocab_size``, ``num_hidden_layers`` and ``hidden_size`` of config.json against the headers."""
    config, tensors = item.config, item.catalog.tensors
    if not config:
        return
    vocab = _values(config, "vocab_size")
    if vocab:
        for name, entry in tensors.items():
            if TOKEN_INDEXED_NAME.search(name) and entry.shape and entry.shape[0] not in vocab:
                raise InvalidCheckpoint(
                    f"{config_url}: vocab_size is {min(vocab)} but tensor {name!r} has {entry.shape[0]} rows "
                    f"({entry.label}); the config must describe the weights"
                )
    stack = main_stack(list(tensors))
    layers = _values(config, "num_hidden_layers")
    if stack is not None and layers:
        extra = max(_values(config, "num_nextn_predict_layers") or {0})  # DeepSeek-V3's MTP layer follows the stack
        allowed = layers | {n + extra for n in layers}
        if stack[1] not in allowed:
            raise InvalidCheckpoint(
                f"{config_url}: num_hidden_layers is {min(layers)} but the weights have {stack[1]} layers "
                f"('{stack[0]}<i>...', {item.url}); the config must describe the weights"
            )
    hidden = _values(config, "hidden_size")
    if stack is not None and hidden:
        for name, entry in tensors.items():
            found = layer_of(name)
            if found and found[0] == stack[0] and found[2] == ".input_layernorm.weight" and entry.shape[-1:] and \
                    entry.shape[-1] not in hidden:
                raise InvalidCheckpoint(
                    f"{config_url}: hidden_size is {min(hidden)} but tensor {name!r} has shape {list(entry.shape)} "
                    f"({entry.label}); the config must describe the weights"
                )


def check_same_depth(recipe: MergeRecipe, inputs: Sequence[CheckedInput]) -> None:
    """A ``models:`` recipe: every input's main stack as deep as the reference's (the first input)."""
    if recipe.slices is not None or len(inputs) < 2:
        return
    reference = inputs[0]
    reference_stack = main_stack(list(reference.catalog.tensors))
    if reference_stack is None:
        return
    for other in inputs[1:]:
        names = [n for n in other.catalog.tensors if n.startswith(reference_stack[0])]
        depth = max((found[1] + 1 for n in names if (found := layer_of(n)) and found[0] == reference_stack[0]),
                    default=0)
        if depth != reference_stack[1]:
            raise IncompatibleModels(
                f"{other.url}: has {depth} layers ('{reference_stack[0]}<i>...') but {reference.url} has "
                f"{reference_stack[1]}; a models: recipe merges layer i with layer i: use slices: to choose the layers"
            )


def config_url(url: str, storage_options: Mapping[str, Any] | None) -> str:
    return storage.resolve(url, storage_options).join("config.json").url


def check_inputs(recipe: MergeRecipe, inputs: Sequence[CheckedInput], storage_options: Mapping[str, Any] | None) -> None:
    """Every check of this module; ``inputs`` in the merge's input order (the config source first)."""
    for item in inputs:
        check_config_matches_weights(item, config_url(item.url, storage_options))
    check_same_depth(recipe, inputs)
    source = inputs[0]
    if source.config is None:
        configured = next((i for i in inputs[1:] if i.config is not None), None)
        if configured is not None:
            raise InvalidCheckpoint(
                f"{source.url}: has no config.json, but {configured.url} has one: the output takes its config and "
                "tokenizer from this input and could not be loaded; add its config.json (or make an input with "
                "one the base_model)"
            )
        return
    # The files the output copies from the config source are read at commit: checked now, before any work.
    check_side_files(storage.resolve(source.url, storage_options))
