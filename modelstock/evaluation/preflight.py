"""An evaluation's inputs checked on the driver before any actor starts (docs/ARCHITECTURE.md,
"Evaluation"): each set's Parquet files readable, the columns its task needs present with their
types, every row valid (strings, choice lists, answers in range), at least one row a model can
score; for language models, every token id a set tokenizes to within the model's embedding rows;
model names unique. A bad input is one line and exit 2, with nothing started and nothing written.

Text sets are small next to their models, so their rows are read here whole (the columns the task
needs only); a tokenizer whose ids all fit the embeddings needs no tokenizing beyond the first
scorable row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from modelstock import storage
from modelstock.checkpoint.reader import open_checkpoint
from modelstock.checkpoint.tokenizer import load_tokenizer
from modelstock.errors import InvalidDataset, InvalidRecipe
from modelstock.evaluation.datasets import AnySuite, DatasetSpec, TextDatasetSpec, TextSuite, _parquet_files
from modelstock.evaluation.scoring import ModelSource
from modelstock.evaluation.text_data import ChoiceRow, choice_sequences, perplexity_sequence

# Columns each kind of set needs, and the Arrow types they may have.
TEXT_COLUMNS = {
    "perplexity": {"text": "string"},
    "choice": {"prompt": "string", "choices": "list of strings", "answer": "integer"},
}


def _type_ok(kind: pa.DataType, wanted: str) -> bool:
    if wanted == "string":
        return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))
    if wanted == "integer":
        return bool(pa.types.is_integer(kind))
    if wanted == "list of strings":
        return bool((pa.types.is_list(kind) or pa.types.is_large_list(kind))
                    and (pa.types.is_string(kind.value_type) or pa.types.is_large_string(kind.value_type)))
    return True


def check_unique_names(sources: Sequence[ModelSource]) -> None:
    names = [s.name for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidRecipe(f"model name {duplicates[0]!r} is given twice (name models NAME=URL)")


def _read_columns(location: storage.Location, dataset: str, columns: Mapping[str, str],
                  one_of: tuple[str, ...] = ()) -> pa.Table:
    """The set's ``columns`` from one Parquet file, each checked for presence and type (and one of
    ``one_of`` present, when given)."""

    def read() -> pa.Table:
        with location.fs.open(location.path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            schema = parquet.schema_arrow
            for name, wanted in columns.items():
                if name not in schema.names:
                    raise InvalidDataset(f"{location.url}: dataset {dataset} has no {name!r} column "
                                         f"(columns: {', '.join(schema.names) or 'none'})")
                if not _type_ok(schema.field(name).type, wanted):
                    raise InvalidDataset(f"{location.url}: dataset {dataset}: column {name!r} is "
                                         f"{schema.field(name).type}, expected {wanted}")
            if one_of and not set(one_of) & set(schema.names):
                raise InvalidDataset(f"{location.url}: dataset {dataset} has no {' or '.join(map(repr, one_of))} column "
                                     f"(columns: {', '.join(schema.names) or 'none'})")
            return parquet.read(columns=list(columns))

    try:
        return storage.storage_call(location.url, read)
    except pa.ArrowException as exc:  # not Parquet, a corrupt footer or page
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise InvalidDataset(f"{location.url}: dataset {dataset} is not a readable Parquet file ({first})") from None


@dataclass(frozen=True)
class TextSetRows:
    """Every row of a text set, with where it is (file URL, row) for messages."""

    spec: TextDatasetSpec
    texts: list[tuple[str, int, str]]  # (file, row, text)
    choices: list[tuple[str, int, ChoiceRow]]


def read_text_set(spec: TextDatasetSpec, storage_options: Mapping[str, Any] | None) -> TextSetRows:
    texts: list[tuple[str, int, str]] = []
    choices: list[tuple[str, int, ChoiceRow]] = []
    for location in _parquet_files(spec, storage_options):
        table = _read_columns(location, spec.name, TEXT_COLUMNS[spec.task])
        where = location.url
        if spec.task == "perplexity":
            for row, text in enumerate(table.column("text").to_pylist()):
                if not isinstance(text, str):
                    raise InvalidDataset(f"{where}: row {row}: 'text' is null, expected a string")
                texts.append((where, row, text))
            continue
        columns = zip(*(table.column(n).to_pylist() for n in ("prompt", "choices", "answer")))
        for row, (prompt, options, answer) in enumerate(columns):
            if not isinstance(prompt, str):
                raise InvalidDataset(f"{where}: row {row}: 'prompt' is null, expected a string")
            if not isinstance(options, list) or len(options) < 2 or not all(isinstance(c, str) for c in options):
                raise InvalidDataset(f"{where}: row {row}: 'choices' must be a list of at least two strings")
            if not isinstance(answer, int) or not 0 <= answer < len(options):
                raise InvalidDataset(f"{where}: row {row}: 'answer' {answer!r} is not an index into its "
                                     f"{len(options)} choices")
            choices.append((where, row, ChoiceRow(prompt, tuple(options), answer)))
    if spec.task == "perplexity" and not any(text.strip() for _, _, text in texts):
        raise InvalidDataset(f"{spec.url}: dataset {spec.name} has no row of text to score "
                             f"({len(texts)} rows, all empty)")
    if spec.task == "choice" and not choices:
        raise InvalidDataset(f"{spec.url}: dataset {spec.name} has no rows")
    return TextSetRows(spec, texts, choices)


def embedding_rows(url: str, storage_options: Mapping[str, Any] | None) -> int | None:
    """Rows of the model's input embedding (the ids it can take), from its headers."""
    from modelstock.planner import TOKEN_INDEXED_NAME

    checkpoint = open_checkpoint(url, storage_options)
    rows = [loc.entry.shape[0] for name, loc in checkpoint.tensors.items()
            if TOKEN_INDEXED_NAME.search(name) and loc.entry.shape]
    return min(rows) if rows else None


def check_text_model(source: ModelSource, sets: Sequence[TextSetRows], max_length: int,
                     storage_options: Mapping[str, Any] | None) -> None:
    """Every id the model's tokenizer gives the sets' rows is a row of its embeddings, and each
    perplexity set has a row of at least two tokens (one to predict)."""
    url = source.urls[0]
    rows = embedding_rows(url, storage_options)
    tokenizer = load_tokenizer(storage.resolve(url, storage_options))
    largest = max(tokenizer.get_vocab().values(), default=-1)
    every_id_fits = rows is None or largest < rows
    for text_set in sets:
        scorable = False
        for where, row, text in text_set.texts:
            ids = perplexity_sequence(tokenizer, text, max_length)
            scorable = scorable or len(ids) >= 2
            _check_ids(ids, rows, url, where, row)
            if scorable and every_id_fits:
                break
        if text_set.spec.task == "perplexity" and not scorable:
            raise InvalidDataset(f"{text_set.spec.url}: dataset {text_set.spec.name}: no row has two tokens for "
                                 f"{source.name} to predict one from")
        if not every_id_fits:
            for where, row, choice in text_set.choices:
                for sequence in choice_sequences(tokenizer, choice, max_length):
                    _check_ids(sequence.ids, rows, url, where, row)


def _check_ids(ids: Sequence[int], rows: int | None, url: str, where: str, row: int) -> None:
    if rows is not None and ids and max(ids) >= rows:
        raise InvalidDataset(f"{where}: row {row}: token id {max(ids)} is past the vocabulary of {url} "
                             f"({rows} embedding rows): its tokenizer and weights disagree")


def check_image_set(spec: DatasetSpec, storage_options: Mapping[str, Any] | None) -> None:
    total = 0
    for location in _parquet_files(spec, storage_options):
        table = _read_columns(location, spec.name, {"label": "integer"}, one_of=("pixels", "image"))
        labels = table.column("label").to_pylist()
        bad = next((i for i, label in enumerate(labels) if label is None or label < 0), None)
        if bad is not None:
            raise InvalidDataset(f"{location.url}: row {bad}: 'label' {labels[bad]!r} is not a class index")
        total += len(labels)
    if not total:
        raise InvalidDataset(f"{spec.url}: dataset {spec.name} has no rows")


def check_evaluation_inputs(sources: Sequence[ModelSource], suite: AnySuite,
                            storage_options: Mapping[str, Any] | None = None) -> None:
    """Every check of this module, for every set of the suite (held-out included) and every model."""
    check_unique_names(sources)
    if isinstance(suite, TextSuite):
        text_sets = [*suite.datasets, *([suite.held_out] if suite.held_out else [])]
        rows = [read_text_set(spec, storage_options) for spec in text_sets]
        for source in sources:
            check_text_model(source, rows, suite.max_length, storage_options)
        return
    for spec in [*suite.datasets, *([suite.held_out] if suite.held_out else [])]:
        check_image_set(spec, storage_options)

