"""From a recipe and the inputs' tensor catalogs to one job per output tensor: the one planner
that both the Python API (state dicts in memory) and the Ray driver (checkpoints in storage) use.

Every check happens here, on names, shapes and dtypes alone, before any tensor byte is read, and
each method's own rules are applied to the parameters resolved per tensor.

Layers (docs/ARCHITECTURE.md, "Recipes and layers"): a tensor named ``<prefix>layers.<i>.<rest>``
(also ``h.<i>``, ``blocks.<i>``, ``layer.<i>``) belongs to layer i of a layer stack; its position
``t = i / (layers - 1)`` in its slice drives gradient parameters, as in mergekit. Tensors outside
the stack take ``t = 0``: embeddings come from the first slice's models, the rest (final norm,
lm_head) from the last slice's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from modelstock.checkpoint.reader import Checkpoint
from modelstock.dtypes import element_count, is_float
from modelstock.errors import IncompatibleModels, InvalidCheckpoint, InvalidRecipe
from modelstock.jobs import TensorInput, TensorJob
from modelstock.quantization import DEQUANTIZED_DTYPE, FP8_CODES, SCALE_SUFFIX, BlockFP8, check_scales
from modelstock.recipe import MergeRecipe, SliceSpec, recipe_models
from modelstock.vocabulary import VocabularyMap, VocabularyPlan

log = logging.getLogger(__name__)

LAYER_NAME = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer)\.)(?P<index>\d+)(?P<suffix>\..+)$")
EMBEDDING_NAME = re.compile(r"(embed|wte|wpe|word_embeddings)")
# Tensors whose first dimension is the vocabulary (as mergekit's architectures declare them).
TOKEN_INDEXED_NAME = re.compile(r"(embed_tokens|lm_head|wte|word_embeddings|embed_out|tok_embeddings)\.weight$")
TIED_HEAD, TIED_EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"


@dataclass(frozen=True)
class CatalogEntry:
    """One tensor as an input lists it: dtype, shape, and the file (or label) it lives in."""

    dtype: str
    shape: tuple[int, ...]
    label: str


@dataclass(frozen=True)
class ModelCatalog:
    """The tensors of one input model, by name, and how its weights are quantized (if they are)."""

    label: str
    tensors: Mapping[str, CatalogEntry]
    quantization: BlockFP8 | None = None

    def __post_init__(self) -> None:
        check_scales(self.label, {n: (e.dtype, e.shape) for n, e in self.tensors.items()}, self.quantization)

    def is_scale(self, name: str) -> bool:
        """Block scales are part of their weight, not tensors of their own."""
        return (self.quantization is not None and name.endswith(SCALE_SUFFIX)
                and name.removesuffix(SCALE_SUFFIX) in self.tensors)

    def source(self, model: int, name: str) -> TensorInput:
        entry = self.tensors[name]
        if self.quantization is not None and entry.dtype in FP8_CODES:
            return TensorInput(model, name, entry.dtype, entry.label, self.quantization.scale_of(name),
                               self.quantization.block)
        return TensorInput(model, name, entry.dtype, entry.label)


@dataclass(frozen=True)
class TensorPlan:
    """The jobs of a merge, and what it changes in the model's shape."""

    jobs: list[TensorJob]
    output_layers: int | None = None  # decoder layers of the output when slices changed the count
    ignored: list[str] = field(default_factory=list)  # tensors of some inputs that the output does not have


def catalog_of(checkpoint: Checkpoint, quantization: BlockFP8 | None = None) -> ModelCatalog:
    return ModelCatalog(
        checkpoint.url,
        {name: CatalogEntry(loc.entry.dtype, loc.entry.shape, loc.file.url) for name, loc in checkpoint.tensors.items()},
        quantization,
    )


def natural_key(name: str) -> tuple[object, ...]:
    """Sort key that puts ``layers.2`` before ``layers.10``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def layer_of(name: str) -> tuple[str, int, str] | None:
    """(prefix, index, suffix) of a tensor in a layer stack, else None."""
    match = LAYER_NAME.match(name)
    return (match["prefix"], int(match["index"]), match["suffix"]) if match else None


def layer_counts(names: Sequence[str]) -> dict[str, int]:
    """Layers per stack prefix (the largest index + 1)."""
    counts: dict[str, int] = {}
    for name in names:
        found = layer_of(name)
        if found:
            counts[found[0]] = max(counts.get(found[0], 0), found[1] + 1)
    return counts


def position(index: int, layers: int) -> float:
    """t of layer ``index`` of ``layers`` (mergekit: 1 for a single layer)."""
    return index / (layers - 1) if layers > 1 else 1.0


@dataclass(frozen=True)
class _Planned:
    """One output tensor before its job: where each input comes from, and its layer position."""

    name: str
    spec: SliceSpec
    base: tuple[int, str] | None  # (input index, tensor name)
    models: tuple[tuple[int, str], ...]
    t: float


class _Planner:
    def __init__(self, recipe: MergeRecipe, catalogs: Mapping[str, ModelCatalog]) -> None:
        self.recipe = recipe
        self.method = recipe.method
        self.urls = list(recipe_models(recipe))
        missing = [url for url in self.urls if url not in catalogs]
        if missing:
            raise ValueError(f"no catalog for input {missing[0]}")
        self.catalogs = [catalogs[url] for url in self.urls]
        self.index = {url.rstrip("/"): i for i, url in enumerate(self.urls)}
        specs = recipe.slice_specs()
        self.specs = specs
        first = specs[0]
        reference_url = first.base_model if first.base_model else first.models[0]
        self.reference = self.catalogs[self.input_index(reference_url)]

    def input_index(self, url: str) -> int:
        return self.index[url.rstrip("/")]

    def planned(self) -> tuple[list[_Planned], int | None]:
        if self.recipe.slices is None:
            return self._models_form(), None
        return self._slices_form()

    def _models_form(self) -> list[_Planned]:
        """A ``models`` recipe: every tensor of the reference, from the same name in every input."""
        spec = self.specs[0]
        counts = layer_counts(list(self.reference.tensors))
        base = self.input_index(spec.base_model) if spec.base_model and self.method.uses_base else None
        planned = []
        for name in self.reference.tensors:
            if self.reference.is_scale(name):
                continue
            found = layer_of(name)
            t = position(found[1], counts[found[0]]) if found else 0.0
            models = tuple((self.input_index(url), name) for url in spec.models)
            planned.append(_Planned(name, spec, (base, name) if base is not None else None, models, t))
        return planned

    def _slices_form(self) -> tuple[list[_Planned], int]:
        """A ``slices`` recipe: layers renumbered slice after slice; the rest from the first/last slice."""
        counts = layer_counts(list(self.reference.tensors))
        if not counts:
            raise InvalidRecipe(f"slices: {self.reference.label} has no layer stack (tensors named '...layers.<i>...')")
        stack = max(counts, key=lambda prefix: sum(1 for n in self.reference.tensors if n.startswith(prefix)))
        suffixes = sorted({found[2] for n in self.reference.tensors if (found := layer_of(n)) and found[0] == stack})
        planned: list[_Planned] = []
        offset = 0
        for spec in self.specs:
            assert spec.layers is not None and spec.first_layers is not None and spec.base_first_layer is not None
            base = self.input_index(spec.base_model) if spec.base_model and self.method.uses_base else None
            for k in range(spec.layers):
                for suffix in suffixes:
                    models = tuple(
                        (self.input_index(url), f"{stack}{first + k}{suffix}")
                        for url, first in zip(spec.models, spec.first_layers)
                    )
                    base_input = (base, f"{stack}{spec.base_first_layer + k}{suffix}") if base is not None else None
                    planned.append(_Planned(f"{stack}{offset + k}{suffix}", spec, base_input, models, position(k, spec.layers)))
            offset += spec.layers
        for name in self.reference.tensors:
            found = layer_of(name)
            if (found and found[0] == stack) or self.reference.is_scale(name):
                continue
            spec = self.specs[0] if EMBEDDING_NAME.search(name) else self.specs[-1]
            base = self.input_index(spec.base_model) if spec.base_model and self.method.uses_base else None
            models = tuple((self.input_index(url), name) for url in spec.models)
            planned.append(_Planned(name, spec, (base, name) if base is not None else None, models, 0.0))
        return planned, offset

    def entry(self, source: tuple[int, str], wanted: str) -> tuple[CatalogEntry, TensorInput]:
        """An input tensor: its catalog entry and how to read it (a tied lm_head falls back to the embedding)."""
        model, name = source
        catalog = self.catalogs[model]
        if name not in catalog.tensors and name == TIED_HEAD and TIED_EMBEDDING in catalog.tensors:
            name = TIED_EMBEDDING
        if name not in catalog.tensors:
            raise IncompatibleModels(f"{catalog.label}: tensor {name!r} is missing (needed for output tensor {wanted!r})")
        return catalog.tensors[name], catalog.source(model, name)


def _check_same_shape(name: str, entries: Sequence[tuple[CatalogEntry, TensorInput]], skip_rows: bool = False) -> None:
    """The same shape in every input (past the first dimension only, for token-indexed tensors)."""
    first, _ = entries[0]
    for entry, source in entries[1:]:
        tensor = source.tensor
        if (entry.shape[1:] != first.shape[1:]) if skip_rows else (entry.shape != first.shape):
            raise IncompatibleModels(
                f"{entry.label}: tensor {tensor!r} has shape {list(entry.shape)} but {first.label} has {list(first.shape)}"
                + (f" (output tensor {name!r})" if tensor != name else "")
            )


def _stored_dtype(source: TensorInput) -> str:
    """The output dtype a tensor keeps by default: its own, or bfloat16 for dequantized codes."""
    return DEQUANTIZED_DTYPE if source.scale is not None else source.dtype


def _token_rows(vocabulary: VocabularyPlan | None, planner: _Planner, name: str,
                entries: Sequence[tuple[CatalogEntry, TensorInput]]) -> bool:
    """Whether a tensor is indexed by token in every input (its rows are the inputs' vocabularies)."""
    if vocabulary is None or not TOKEN_INDEXED_NAME.search(name):
        return False
    return all(len(e.shape) >= 1 and e.shape[0] == vocabulary.sizes[planner.urls[s.model]] for e, s in entries)


def _vocabulary_of(vocabulary: VocabularyPlan, planner: _Planner, inputs: Sequence[TensorInput],
                   base: str | None) -> VocabularyMap:
    """The vocabulary map of a job's inputs; the base model counts as such (for default rows)
    wherever it is among them, whatever the method does with it (as mergekit)."""
    urls = [planner.urls[source.model] for source in inputs]
    base_url = planner.urls[planner.input_index(base)] if base else None
    return vocabulary.map_for(urls, base_url if base_url in urls else None)


def plan_tensors(recipe: MergeRecipe, catalogs: Mapping[str, ModelCatalog],
                 vocabulary: VocabularyPlan | None = None) -> TensorPlan:
    """One job per output tensor, in natural name order.

    ``catalogs`` holds every input by URL; inputs are numbered as :func:`recipe_models` lists
    them (base models first, then the models in order of first appearance). With ``vocabulary``
    (a recipe's ``tokenizer_source``), token-indexed tensors are mapped onto the output's vocabulary.
    """
    planner = _Planner(recipe, catalogs)
    method = recipe.method
    planned, output_layers = planner.planned()
    jobs: list[TensorJob] = []
    for item in sorted(planned, key=lambda p: natural_key(p.name)):
        sources = ([item.base] if item.base is not None else []) + list(item.models)
        entries = [planner.entry(source, item.name) for source in sources]
        token_rows = _token_rows(vocabulary, planner, item.name, entries)
        _check_same_shape(item.name, entries, skip_rows=token_rows)
        reference, _ = entries[0]
        shape = (vocabulary.padded_size, *reference.shape[1:]) if vocabulary is not None and token_rows else reference.shape
        if element_count(reference.shape) == 0:
            raise InvalidCheckpoint(
                f"{reference.label}: tensor {item.name!r} has zero elements {list(reference.shape)}; nothing to merge"
            )
        inputs = tuple(source for _, source in entries)
        tied = any(source.tensor != name for (_, name), (_, source) in zip(sources, entries) if name == TIED_HEAD)
        if is_float(reference.dtype):
            for entry, source in entries[1:]:
                tensor = source.tensor
                if not is_float(entry.dtype):
                    raise IncompatibleModels(
                        f"{entry.label}: tensor {tensor!r} is {entry.dtype} but {reference.label} has {reference.dtype}; "
                        "only floating-point dtypes can be mixed"
                    )
        flags = ("tied_lm_head",) if tied else ()
        if recipe.is_excluded(item.name) or not all(is_float(i.dtype) for i in inputs):
            # Copied as it is from the slice's base model (whatever the method), else its first model.
            why = "excluded" if recipe.is_excluded(item.name) else "not_floating_point"
            origin = (planner.input_index(item.spec.base_model), sources[0][1]) if item.spec.base_model else sources[0]
            entry, copied = planner.entry(origin, item.name)
            out = recipe.output_dtype if recipe.output_dtype and is_float(entry.dtype) else _stored_dtype(copied)
            mapped = (_vocabulary_of(vocabulary, planner, [copied], item.spec.base_model)
                      if vocabulary is not None and token_rows else None)
            jobs.append(TensorJob(item.name, shape if mapped else entry.shape, out, None, None, (copied,), False,
                                  (why, *flags), mapped))
            continue
        params = recipe.tensor_parameters(item.name, item.t, item.spec)
        if method.validate is not None:
            method.validate(params, item.name)
        mapped = _vocabulary_of(vocabulary, planner, inputs, item.spec.base_model) if vocabulary and token_rows else None
        jobs.append(TensorJob(
            item.name, shape, recipe.output_dtype or _stored_dtype(inputs[0]), method.name, params, inputs,
            item.base is not None, flags, mapped,
        ))
    used = {(i.model, name) for job in jobs for i in job.inputs for name in (i.tensor, i.scale) if name}
    ignored = sorted(
        {f"{catalog.label}: {name}" for index, catalog in enumerate(planner.catalogs) for name in catalog.tensors
         if (index, name) not in used and catalog is not planner.reference and recipe.slices is None
         and name not in planner.reference.tensors},
        key=natural_key,
    )
    if ignored:
        log.warning("%d tensors of the inputs are not in %s and are left out (e.g. %s)",
                    len(ignored), planner.reference.label, ignored[0])
    return TensorPlan(jobs, output_layers, ignored)
