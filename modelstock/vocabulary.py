"""Merging models whose vocabularies differ, as mergekit does (``tokenizer_source``, ``tokenizer:``).

The output tokenizer is the base's, a named model's, or the *union* of every input's (the base's
tokens first, then each other model's tokens it lacks, then added tokens). Every tensor indexed by
token (embeddings, lm_head) is then seen, for each input, through a *permutation*: output token j
takes the input's row of that token. A token an input lacks gets a default row, the same for
every input that lacks it (mergekit's rules, in order): the ``tokens:`` setting for it if any
(a model's row for it, a given token of a model, or zeros; ``force`` applies it even where the
token exists); else the only model that has it; else zeros if none has it; else the base's row if
the base has it; else the mean of the rows of the inputs that have it. With
``pad_to_multiple_of``, rows past the vocabulary are each input's mean vocabulary row.

Tokenizers are read with ``transformers`` from the checkpoint folders' small tokenizer files,
fetched through fsspec into a private temporary folder; never with remote code.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelstock import storage
from modelstock.checkpoint.side_files import read_json_side_file, read_text_side_file
from modelstock.checkpoint.tokenizer import load_tokenizer, transformers_quietly
from modelstock.errors import InvalidCheckpoint, InvalidRecipe, StorageAccessError

log = logging.getLogger(__name__)

# Default rows: where a missing (or forced) token's row comes from.
FROM_ZERO, FROM_MEAN, NO_DEFAULT = -1, -2, -3


def load_tokenizer_at(url: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    return load_tokenizer(storage.resolve(url, storage_options))


def vocabulary_size(config: Mapping[str, Any] | None, tokenizer: Any) -> int:
    """Rows of the model's token-indexed tensors: config.json's vocab_size, else the tokenizer's."""
    for holder in (config or {}, (config or {}).get("text_config") or {}):
        if isinstance(holder.get("vocab_size"), int):
            return int(holder["vocab_size"])
    return len(tokenizer.get_vocab())


def union_tokenizer(base: Any, others: Sequence[Any], sizes: Sequence[int]) -> Any:
    """The base tokenizer extended with every other input's tokens it lacks (added tokens last, with
    their first settings), ignoring tokens whose id is past their model's vocabulary size."""
    import transformers

    vocabulary: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tokenizer, size in zip([base, *others], sizes):
        special = tokenizer.added_tokens_decoder
        for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if index < size and index not in special:
                vocabulary.setdefault(token, None)
        for index, info in sorted(special.items()):
            if index < size:
                added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory(prefix="modelstock-tokenizer-") as local, transformers_quietly():
        base.save_pretrained(local)  # a copy: the base tokenizer stays as it was
        result = transformers.AutoTokenizer.from_pretrained(local, use_fast=True, trust_remote_code=False)
    base_vocabulary = base.get_vocab()
    for token in vocabulary:
        if token not in base_vocabulary and token not in added:
            result.add_tokens(token)
    for info in added.values():
        result.add_tokens(info)
    return result


def permutation(output: Mapping[str, int], vocabulary: Mapping[str, int], size: int) -> torch.Tensor:
    """For each output token id, the model's row for that token (-1 where it has none)."""
    rows = torch.full((len(output),), -1, dtype=torch.int64)
    for token, index in output.items():
        source = vocabulary.get(token)
        if source is not None and source < size:
            rows[index] = source
    return rows


@dataclass(frozen=True)
class TokenDefault:
    """A ``tokens:`` setting of the recipe, resolved: copy row ``row`` of input ``source`` (or zeros
    when ``source`` is None); ``force`` even where the token exists."""

    source: int | None
    row: int | None
    force: bool


@dataclass(frozen=True)
class VocabularyMap:
    """How each input's rows of a token-indexed tensor become the output's rows (see the module
    docstring); one per distinct set of inputs, shared by the tensors that have them."""

    rows: torch.Tensor  # (inputs, output rows): the input's row for each output row, or -1
    default_source: torch.Tensor  # (vocabulary,): an input index, FROM_ZERO, FROM_MEAN or NO_DEFAULT
    default_row: torch.Tensor  # (vocabulary,): the row of ``default_source`` to copy
    forced: torch.Tensor  # (vocabulary,) bool: the default replaces even existing rows
    vocabulary: int  # output tokens; rows past it are padding

    @property
    def padded(self) -> bool:
        return self.rows.shape[1] > self.vocabulary

    def span(self, index: int, start: int, stop: int) -> tuple[int, int]:
        """The rows ``[first, last + 1)`` of input ``index`` that output rows ``[start, stop)`` use
        (read as one range: vocabularies keep their order, so the span is about the rows used)."""
        stop_vocabulary = min(stop, self.vocabulary)
        own = self.rows[index, start:stop_vocabulary]
        defaults = self.default_row[start:stop_vocabulary][self.default_source[start:stop_vocabulary] == index]
        wanted = torch.cat([own[own >= 0], defaults])
        return (int(wanted.min()), int(wanted.max()) + 1) if wanted.numel() else (0, 0)

    def assemble(self, gathered: Sequence[torch.Tensor], spans: Sequence[tuple[int, int]], start: int, stop: int,
                 dtype: torch.dtype, pad_rows: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Output rows ``[start, stop)`` of every input (each (rows, cols) in ``dtype``) from rows
        ``spans[i]`` of input i, which ``gathered[i]`` holds; ``pad_rows`` (inputs, cols), when given,
        fills the padding rows (else they stay zero)."""
        count, cols = len(gathered), max(g.shape[1] for g in gathered)
        end = min(stop, self.vocabulary)
        span = max(0, end - start)

        def rows_of(i: int, source_rows: torch.Tensor) -> torch.Tensor:
            return gathered[i][source_rows - spans[i][0]].to(dtype)

        out = torch.zeros((count, stop - start, cols), dtype=dtype)
        rows = self.rows[:, start:end]
        forced = self.forced[start:end]
        for i in range(count):
            own = (rows[i] >= 0) & ~forced
            out[i, :span][own] = rows_of(i, rows[i][own])
        missing = rows < 0  # (count, span)
        wanted = forced | missing.any(dim=0)
        source = torch.where(wanted, self.default_source[start:end], NO_DEFAULT)
        value = torch.zeros((span, cols), dtype=dtype)
        for k in range(count):
            picked = source == k
            if bool(picked.any()):
                value[picked] = rows_of(k, self.default_row[start:end][picked])
        averaged = source == FROM_MEAN
        if bool(averaged.any()):
            present = (~missing[:, averaged]).to(dtype)  # (count, n)
            total = (out[:, :span][:, averaged] * present.unsqueeze(-1)).sum(dim=0)
            value[averaged] = total / present.sum(dim=0).unsqueeze(-1)
        has_default = source != NO_DEFAULT
        for i in range(count):
            replace = has_default & (forced | missing[i])
            out[i, :span][replace] = value[replace]
        if stop > self.vocabulary and pad_rows is not None:
            out[:, max(self.vocabulary, start) - start:] = pad_rows.to(dtype).unsqueeze(1)
        return list(out)


def vocabulary_map(permutations: Sequence[torch.Tensor], base: int | None, settings: Mapping[str, TokenDefault],
                   output: Mapping[str, int], padded_size: int) -> VocabularyMap:
    """The map for one set of inputs (their permutations in input order; ``base``: the base's position)."""
    count, vocabulary = len(permutations), len(output)
    rows = torch.full((count, padded_size), -1, dtype=torch.int64)
    for i, perm in enumerate(permutations):
        rows[i, :vocabulary] = perm
    default_source = torch.full((vocabulary,), NO_DEFAULT, dtype=torch.int64)
    default_row = torch.full((vocabulary,), -1, dtype=torch.int64)
    forced = torch.zeros(vocabulary, dtype=torch.bool)
    for token, j in output.items():
        present = [i for i in range(count) if int(rows[i, j]) >= 0]
        setting = settings.get(token)
        if setting is not None:
            forced[j] = setting.force
            if not setting.force and len(present) == count:
                continue
            if setting.source is None:
                default_source[j] = FROM_ZERO
            else:
                row = setting.row if setting.row is not None else int(rows[setting.source, j])
                if row < 0:
                    raise InvalidRecipe(f"tokenizer.tokens: token {token!r} is not in input {setting.source}'s vocabulary")
                default_source[j], default_row[j] = setting.source, row
        elif len(present) == count:
            continue
        elif len(present) == 1:
            default_source[j], default_row[j] = present[0], int(rows[present[0], j])
        elif not present:
            log.warning("token %r is in no input's vocabulary: zeros", token)
            default_source[j] = FROM_ZERO
        elif base is not None and base in present:
            default_source[j], default_row[j] = base, int(rows[base, j])
        else:
            default_source[j] = FROM_MEAN
    return VocabularyMap(rows, default_source, default_row, forced, vocabulary)


def read_tokenizers(urls: Sequence[str], storage_options: Mapping[str, Any] | None) -> list[Any]:
    tokenizers = []
    for url in urls:
        try:
            tokenizers.append(load_tokenizer_at(url, storage_options))
        except StorageAccessError as exc:
            raise InvalidCheckpoint(f"{url}: cannot read its tokenizer ({exc})") from None
    return tokenizers


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The files ``save_pretrained`` writes for a tokenizer, by name."""
    with tempfile.TemporaryDirectory(prefix="modelstock-tokenizer-") as local, transformers_quietly():
        tokenizer.save_pretrained(local)
        return {path.name: path.read_bytes() for path in Path(local).iterdir() if path.is_file()}


@dataclass(frozen=True)
class VocabularyPlan:
    """The output's vocabulary and, for every input (by URL), its permutation onto it."""

    output: dict[str, int]
    padded_size: int
    permutations: dict[str, torch.Tensor]
    sizes: dict[str, int]  # rows of each input's token-indexed tensors
    settings: dict[str, tuple[str | None, int | None, bool]]  # token -> (input URL or None: zeros, row, force)
    files: dict[str, bytes]  # the output tokenizer's files

    def map_for(self, urls: Sequence[str], base: str | None) -> VocabularyMap:
        """The map of a tensor whose inputs are ``urls`` (in job order; ``base`` among them or None)."""
        position = {url: i for i, url in enumerate(urls)}
        settings = {
            token: TokenDefault(position[url] if url is not None else None, row, force)
            for token, (url, row, force) in self.settings.items()
            if url is None or url in position
        }
        return vocabulary_map([self.permutations[url] for url in urls], position.get(base) if base else None,
                              settings, self.output, self.padded_size)


def _chat_template(tokenizers: Sequence[Any]) -> str | None:
    """The inputs' most common chat template (mergekit's ``chat_template: auto``)."""
    templates = []
    for tokenizer in tokenizers:
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            templates.append(template.strip())
    return max(sorted(set(templates)), key=templates.count) if templates else None


def build_vocabulary(recipe: Any, urls: Sequence[str], configs: Sequence[Mapping[str, Any] | None],
                     storage_options: Mapping[str, Any] | None) -> VocabularyPlan | None:
    """The output vocabulary a recipe asks for (``tokenizer_source`` / ``tokenizer:``), or None.

    ``urls`` are every input in the merge's order (base first), ``configs`` their config.json.
    """
    source = recipe.vocabulary_source
    if source is None:
        return None
    tokenizers = read_tokenizers(urls, storage_options)
    sizes = [vocabulary_size(config, tokenizer) for config, tokenizer in zip(configs, tokenizers)]
    by_url = dict(zip(urls, tokenizers))
    if source == "union":
        output_tokenizer = union_tokenizer(tokenizers[0], tokenizers[1:], sizes)
    elif source == "base":
        output_tokenizer = tokenizers[0]
    else:
        output_tokenizer = by_url[recipe.input_named(source)]
    settings = recipe.tokenizer.tokens if recipe.tokenizer is not None else {}
    missing = [token for token in settings if token not in output_tokenizer.get_vocab()]
    if missing:
        output_tokenizer.add_tokens(missing)  # tokens the recipe configures are in the output
    output = output_tokenizer.get_vocab()
    pad = recipe.tokenizer.pad_to_multiple_of if recipe.tokenizer is not None else None
    padded = len(output) if not pad else -(-len(output) // pad) * pad
    resolved: dict[str, tuple[str | None, int | None, bool]] = {}
    for token, setting in settings.items():
        if setting.source is None:
            continue
        if isinstance(setting.source, str):
            resolved[token] = (recipe.input_named(setting.source), None, setting.force)
        elif getattr(setting.source, "kind", None) == "zero":
            resolved[token] = (None, None, setting.force)
        else:
            url = recipe.input_named(setting.source.model)
            row = setting.source.token_id
            if row is None:
                row = by_url[url].get_vocab().get(setting.source.token)
                if row is None:
                    raise InvalidRecipe(f"tokenizer.tokens: {token!r}: token {setting.source.token!r} is not in {url}")
            size = sizes[urls.index(url)]
            if not 0 <= row < size:
                # Checked here, from the headers: a row past the embeddings would be read past the tensor.
                raise InvalidRecipe(f"tokenizer.tokens: {token!r}: token id {row} is past the vocabulary of {url} "
                                    f"({size} rows: ids 0..{size - 1})")
            resolved[token] = (url, row, setting.force)
    if recipe.chat_template is not None:
        template = _chat_template(tokenizers) if recipe.chat_template == "auto" else recipe.chat_template
        if template:
            output_tokenizer.chat_template = template
    return VocabularyPlan(
        output=dict(output),
        padded_size=padded,
        permutations={url: permutation(output, t.get_vocab(), size) for url, t, size in zip(urls, tokenizers, sizes)},
        sizes=dict(zip(urls, sizes)),
        settings=resolved,
        files=tokenizer_files(output_tokenizer),
    )


def _stored_chat_template(url: str, storage_options: Mapping[str, Any] | None) -> str | None:
    """A checkpoint's chat template from its files (chat_template.jinja, else tokenizer_config.json);
    a corrupt file is an error naming it, never "no template"."""
    folder = storage.resolve(url, storage_options)
    text = read_text_side_file(folder.join("chat_template.jinja"))
    if text is not None:
        return text.strip() or None
    config = read_json_side_file(folder.join("tokenizer_config.json"))
    template = (config or {}).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, dict):
        template = template.get("default")
    return template.strip() if isinstance(template, str) and template.strip() else None


def chat_template_for(setting: str, urls: Sequence[str], storage_options: Mapping[str, Any] | None) -> str | None:
    """The chat template a recipe asks for: its own Jinja text, or with ``auto`` the inputs' most
    common one (None if no input has one)."""
    if setting != "auto":
        return setting
    templates = [t for t in (_stored_chat_template(url, storage_options) for url in urls) if t]
    return max(sorted(set(templates)), key=templates.count) if templates else None


def with_chat_template(tokenizer_config: bytes, template: str) -> bytes:
    config = json.loads(tokenizer_config)
    config["chat_template"] = template
    return (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
