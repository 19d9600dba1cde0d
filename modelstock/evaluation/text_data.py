"""Language-model evaluation rows: Parquet shards read as text (perplexity) or multiple-choice
rows, tokenized by the checkpoint's own tokenizer with the definitions users know.

Perplexity rows: ``tokenizer(text)`` with the tokenizer's defaults (its BOS, if it adds one),
truncated to ``max_length``; every token after the first is predicted.

Choice rows (lm-evaluation-harness's rule): a choice's continuation is
``tokenize(prompt + " " + choice)`` beyond ``len(tokenize(prompt))``; its score is the summed
log-probability of those tokens. A sequence longer than ``max_length`` loses tokens on the left
(the context), never the continuation.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from modelstock import storage
from modelstock.errors import StorageAccessError
from modelstock.evaluation.datasets import DatasetShard

CHOICE_DELIMITER = " "


@dataclass(frozen=True)
class ChoiceRow:
    prompt: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class TextShardRows:
    """One shard's rows; ``first_row`` is the index of its first row in the file (for messages)."""

    texts: list[str] | None
    choices: list[ChoiceRow] | None
    first_row: int


def _read_groups(shard: DatasetShard, location: storage.Location) -> tuple[pa.Table, int]:
    def read() -> tuple[pa.Table, int]:
        with location.fs.open(location.path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            first = sum(parquet.metadata.row_group(g).num_rows for g in range(min(shard.row_groups)))
            return parquet.read_row_groups(list(shard.row_groups)), first

    return storage.storage_call(location.url, read)


def _column(table: pa.Table, name: str, shard: DatasetShard) -> list[Any]:
    if name not in table.column_names:
        raise StorageAccessError(f"{shard.file_url}: dataset {shard.dataset.name} has no {name!r} column "
                                 f"(columns: {', '.join(table.column_names)})")
    return table.column(name).to_pylist()


def read_text_shard(shard: DatasetShard, storage_options: Mapping[str, Any] | None = None,
                    location: storage.Location | None = None) -> TextShardRows:
    """Read and validate one shard: strings in ``text``, or ``prompt``/``choices``/``answer``.

    ``location``: the file, already resolved (an actor reading many shards of one file reuses it).
    """
    table, first = _read_groups(shard, location or storage.resolve(shard.file_url, storage_options))
    task = getattr(shard.dataset, "task", "perplexity")
    if task == "perplexity":
        texts = _column(table, "text", shard)
        for offset, text in enumerate(texts):
            if not isinstance(text, str):
                raise StorageAccessError(f"{shard.file_url}: row {first + offset}: 'text' is "
                                         f"{type(text).__name__}, expected a string")
        return TextShardRows(texts=texts, choices=None, first_row=first)
    rows: list[ChoiceRow] = []
    columns = zip(_column(table, "prompt", shard), _column(table, "choices", shard), _column(table, "answer", shard))
    for offset, (prompt, choices, answer) in enumerate(columns):
        where = f"{shard.file_url}: row {first + offset}"
        if not isinstance(prompt, str):
            raise StorageAccessError(f"{where}: 'prompt' is {type(prompt).__name__}, expected a string")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise StorageAccessError(f"{where}: 'choices' must be a list of at least two strings")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise StorageAccessError(f"{where}: 'answer' {answer!r} is not an index into its {len(choices)} choices")
        rows.append(ChoiceRow(prompt, tuple(choices), answer))
    return TextShardRows(texts=None, choices=rows, first_row=first)


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """``tokenizer(text)`` with the tokenizer's defaults (special tokens included)."""
    return list(tokenizer(text)["input_ids"])


def perplexity_sequence(tokenizer: Any, text: str, max_length: int) -> list[int]:
    return token_ids(tokenizer, text)[:max_length]


@dataclass(frozen=True)
class ChoiceSequence:
    """One (row, choice) pair: the tokens to run and how many trailing ones are the continuation."""

    ids: list[int]
    continuation: int


def choice_sequences(tokenizer: Any, row: ChoiceRow, max_length: int) -> list[ChoiceSequence]:
    context = token_ids(tokenizer, row.prompt)
    sequences = []
    for choice in row.choices:
        whole = token_ids(tokenizer, row.prompt + CHOICE_DELIMITER + choice)
        continuation = max(0, len(whole) - len(context))
        kept = whole[-max_length:]
        sequences.append(ChoiceSequence(kept, min(continuation, len(kept) - 1)))
    return sequences


def write_text_parquet(url: str, texts: Sequence[str], rows_per_group: int = 256,
                       storage_options: Mapping[str, Any] | None = None) -> None:
    """A perplexity set: one ``text`` column."""
    _write(url, pa.table({"text": pa.array(list(texts), pa.string())}), rows_per_group, storage_options)


def write_choice_parquet(url: str, rows: Sequence[ChoiceRow], rows_per_group: int = 256,
                         storage_options: Mapping[str, Any] | None = None) -> None:
    """A multiple-choice set: ``prompt``, ``choices`` (list of strings), ``answer`` (int)."""
    table = pa.table({
        "prompt": pa.array([r.prompt for r in rows], pa.string()),
        "choices": pa.array([list(r.choices) for r in rows], pa.list_(pa.string())),
        "answer": pa.array([r.answer for r in rows], pa.int64()),
    })
    _write(url, table, rows_per_group, storage_options)


def _write(url: str, table: pa.Table, rows_per_group: int, storage_options: Mapping[str, Any] | None) -> None:
    location = storage.resolve(url, storage_options)
    if location.is_local:
        location.fs.makedirs(posixpath.dirname(location.path), exist_ok=True)
    with location.fs.open(location.path, "wb") as handle:
        pq.write_table(table, handle, row_group_size=rows_per_group)
