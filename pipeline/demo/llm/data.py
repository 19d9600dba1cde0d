"""The LLM demo's text, all shipped with Python and installed packages (no downloads):

- ``code``: Python's standard library sources, the fine-tuning domain (ID);
- ``docs``: the Python reference documentation in ``pydoc_data.topics`` (pretraining's main text;
  held-out topics are an OOD set, and the source of the multiple-choice set: the true next line
  among shuffled versions of it);
- ``science``: scikit-learn's dataset descriptions (``sklearn/datasets/descr``), never trained on;
- ``license``: Python's own LICENSE.txt, never trained on.

Documents are split (never rows) between pretraining, fine-tuning, ID test and held-out sets, so
no evaluated row was seen in training. Every choice is deterministic given the seed.
"""

from __future__ import annotations

import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from modelstock.evaluation.datasets import TextDatasetSpec, TextSuite
from modelstock.evaluation.text_data import ChoiceRow, write_choice_parquet, write_text_parquet
from pipeline.demo.llm.config import LlmDemoConfig

CHOICES = 4
CHOICE_WORDS = 8


Documents = list[tuple[str, str]]  # (name, text)


def stdlib_sources() -> Documents:
    """(file name, source) of the standard library's top-level modules, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    return [(p.name, p.read_text(encoding="utf-8", errors="replace")) for p in files]


def python_docs() -> Documents:
    import pydoc_data.topics as topics

    return sorted(topics.topics.items())


def sklearn_descriptions() -> Documents:
    import sklearn

    root = Path(sklearn.__file__).parent / "datasets" / "descr"
    return [(p.name, p.read_text(encoding="utf-8")) for p in sorted(root.glob("*.rst"))]


def python_license() -> Documents:
    path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    return [(path.name, path.read_text(encoding="utf-8"))] if path.exists() else []


def chunks(text: str, row_chars: int) -> list[str]:
    """Consecutive lines joined until a row holds about ``row_chars`` characters."""
    rows, current = [], ""
    for line in text.splitlines():
        current = f"{current}\n{line}" if current else line
        if len(current) >= row_chars:
            rows.append(current[: 2 * row_chars])
            current = ""
    if current.strip():
        rows.append(current)
    return [row for row in rows if row.strip()]


def split_documents(documents: Documents, fractions: tuple[float, ...], seed: int) -> list[Documents]:
    """Shuffle documents (by a seeded RNG) and cut them into consecutive parts."""
    order = list(documents)
    random.Random(seed).shuffle(order)
    parts, start = [], 0
    for index, fraction in enumerate(fractions):
        end = len(order) if index == len(fractions) - 1 else start + round(fraction * len(order))
        parts.append(order[start:end])
        start = end
    return parts


def rows_of(documents: Documents, row_chars: int) -> list[str]:
    return [row for _, text in documents for row in chunks(text, row_chars)]


def within(rows: list[str], budget: int) -> list[str]:
    """The first rows that hold ``budget`` characters."""
    kept, used = [], 0
    for row in rows:
        if used >= budget:
            break
        kept.append(row)
        used += len(row)
    return kept


def sample(rows: list[str], count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return rng.sample(rows, count) if len(rows) > count else list(rows)


def next_line_choices(documents: Documents, count: int, seed: int) -> list[ChoiceRow]:
    """Which is the true next line? The prompt is a documentation line; the answer the first words
    of the line after it; the distractors the same words in shuffled orders, so every choice has
    the same words and only the model's sense of language can tell the true one."""
    lines = [line.strip() for _, text in documents for line in text.splitlines() if len(line.strip()) > 40]
    rng = random.Random(seed)
    rows: list[ChoiceRow] = []
    for start in rng.sample(range(len(lines) - 1), len(lines) - 1):
        words = lines[start + 1].split()[:CHOICE_WORDS]
        truth = " ".join(words)
        distractors: list[str] = []
        for _ in range(50):  # lines of repeated words may have fewer distinct orders: skip them
            shuffled = " ".join(rng.sample(words, len(words)))
            if shuffled not in (truth, *distractors):
                distractors.append(shuffled)
            if len(distractors) == CHOICES - 1:
                break
        if len(distractors) < CHOICES - 1:
            continue
        answer = rng.randrange(CHOICES)
        choices = distractors[:answer] + [truth] + distractors[answer:]
        rows.append(ChoiceRow(lines[start][-240:], tuple(choices), answer))
        if len(rows) == count:
            break
    return rows


@dataclass(frozen=True)
class DemoText:
    """Training text and evaluation rows."""

    pretrain: list[str]
    finetune: list[str]
    eval_sets: dict[str, list[str]]  # perplexity sets, ID first
    held_out: list[str]
    choices: list[ChoiceRow]

    @property
    def id_name(self) -> str:
        return next(iter(self.eval_sets))


def build_text(config: LlmDemoConfig) -> DemoText:
    seed, row_chars = config.seed, config.row_chars
    code_pretrain, code_train, code_test, code_val = split_documents(stdlib_sources(), (0.15, 0.55, 0.15, 0.15), seed)
    docs_pretrain, docs_test = split_documents(python_docs(), (0.8, 0.2), seed + 1)
    # Pretraining: mostly documentation prose, some code; the fine-tunes then specialise on code.
    mixed = rows_of(docs_pretrain, row_chars) + rows_of(code_pretrain, row_chars)
    pretrain = within(sample(mixed, len(mixed), seed + 2), config.pretrain_chars)
    docs_eval, docs_choice = split_documents(docs_test, (0.5, 0.5), seed + 3)
    eval_sets = {
        "code": sample(rows_of(code_test, row_chars), config.eval_rows, seed + 4),
        "docs": sample(rows_of(docs_eval, row_chars), config.eval_rows, seed + 5),
        "science": sample(rows_of(sklearn_descriptions(), row_chars), config.eval_rows, seed + 6),
    }
    license_rows = rows_of(python_license(), row_chars)
    if license_rows:
        eval_sets["license"] = sample(license_rows, config.eval_rows, seed + 7)
    return DemoText(
        pretrain=pretrain,
        finetune=within(rows_of(code_train, row_chars), config.finetune_chars),
        eval_sets=eval_sets,
        held_out=sample(rows_of(code_val, row_chars), config.eval_rows, seed + 8),
        choices=next_line_choices(docs_choice, config.choice_rows, seed + 9),
    )


def write_suite(root: Path, text: DemoText, config: LlmDemoConfig) -> TextSuite:
    """Every evaluation set as Parquet under ``root``, and the text suite naming them."""
    group = max(1, config.rows_per_shard // 2)

    def spec(name: str, rows: list[str]) -> TextDatasetSpec:
        write_text_parquet(str(root / name / "part-00000.parquet"), rows, rows_per_group=group)
        return TextDatasetSpec(name=name, url=str(root / name))

    specs = [spec(name, rows) for name, rows in text.eval_sets.items()]
    write_choice_parquet(str(root / "docs-next-line" / "part-00000.parquet"), text.choices, rows_per_group=group)
    choice = TextDatasetSpec(name="docs-next-line", url=str(root / "docs-next-line"), task="choice")
    return TextSuite(
        kind="text",
        id=specs[0],
        ood=[*specs[1:], choice],
        held_out=spec(f"{text.id_name}-val", text.held_out),
        max_length=config.max_length,
        batch_tokens=max(config.max_length, 32 * config.max_length),
        batch_size=32,
        rows_per_shard=config.rows_per_shard,
    )
