"""Language-model fixtures: a tiny real Llama family (base + seeded fine-tunes) saved with
save_pretrained beside a real BPE tokenizer trained with ``tokenizers``, and Parquet text and
multiple-choice sets, plus plain-transformers reference metrics computed row by row."""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from modelstock.evaluation.text_data import ChoiceRow, write_choice_parquet, write_text_parquet

VOCAB = 320


def corpus_lines() -> list[str]:
    """Documentation prose that ships with Python (pydoc's topics), one line per row."""
    import pydoc_data.topics as topics

    lines = [line.strip() for text in topics.topics.values() for line in text.splitlines()]
    return [line for line in lines if len(line) > 20]


def save_tokenizer(folder: Path, lines: list[str], vocab_size: int = VOCAB) -> None:
    """A byte-level BPE tokenizer that adds BOS, saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(lines, trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "model_max_length": 4096,
    }))


def llama_config(tie: bool = False, layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=tie)


@dataclass(frozen=True)
class TextFamily:
    root: Path
    base: Path
    finetunes: list[Path]

    @property
    def all(self) -> list[Path]:
        return [self.base, *self.finetunes]


def make_text_family(root: Path, finetunes: int = 3, tie: bool = False, seed: int = 0) -> TextFamily:
    """A random base Llama and fine-tunes that share a drift plus their own noise (so soups differ
    from their ingredients)."""
    from transformers import LlamaForCausalLM

    lines = corpus_lines()
    tokenizer_dir = root / "tokenizer"
    save_tokenizer(tokenizer_dir, lines)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(llama_config(tie)).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    shared = {k: torch.randn(v.shape, generator=generator) for k, v in state.items()}
    paths = []
    for index in range(finetunes + 1):
        model = LlamaForCausalLM(llama_config(tie)).eval()
        if index == 0:
            model.load_state_dict(state)
            folder = root / "base"
        else:
            scale = 0.3 * index  # fine-tunes of different quality
            model.load_state_dict({
                k: v + 0.02 * (shared[k] + scale * torch.randn(v.shape, generator=generator)) * (v.abs().mean() + 1e-3)
                for k, v in state.items()
            })
            folder = root / f"ft-{index}"
        model.save_pretrained(folder, safe_serialization=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / name, folder / name)
        paths.append(folder)
    return TextFamily(root, paths[0], paths[1:])


@pytest.fixture(scope="module", name="one_torch_thread")
def one_torch_thread_fixture() -> Iterator[None]:
    """In-process forward passes of tiny models on one thread: more threads only spin-wait for each
    other on a busy 2-core machine (measured 8x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", name="text_family")
def text_family_fixture(tmp_path_factory: pytest.TempPathFactory) -> TextFamily:
    """Untied tiny Llama family with a tokenizer. Treat as read-only."""
    return make_text_family(tmp_path_factory.mktemp("text-family"))


def text_rows(count: int, seed: int) -> list[str]:
    """Rows of 1..6 joined corpus lines: lengths from a few tokens to past a small max_length."""
    lines = corpus_lines()
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        start = rng.randrange(len(lines) - 6)
        rows.append(" ".join(lines[start : start + rng.randint(1, 6)]))
    rows[0] = "x"  # shorter than two tokens with BOS: predicts one token
    return rows


def choice_rows(count: int, seed: int) -> list[ChoiceRow]:
    """Which line comes next: the true continuation among three other corpus lines."""
    lines = corpus_lines()
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        start = rng.randrange(len(lines) - 1)
        words = lines[start + 1].split()
        choices = [" ".join(words[:6])] + [" ".join(rng.choice(lines).split()[:6]) for _ in range(3)]
        order = list(range(4))
        rng.shuffle(order)
        rows.append(ChoiceRow(lines[start][:120], tuple(choices[i] for i in order), order.index(0)))
    return rows


@dataclass(frozen=True)
class TextSets:
    root: Path
    texts: dict[str, list[str]]
    choices: dict[str, list[ChoiceRow]]


def write_text_sets(root: Path, rows_per_group: int = 8) -> TextSets:
    texts = {"docs": text_rows(40, seed=1), "docs-shifted": [t.upper() for t in text_rows(24, seed=2)],
             "docs-val": text_rows(20, seed=3)}
    choices = {"next-line": choice_rows(16, seed=4)}
    for name, rows in texts.items():
        write_text_parquet(str(root / name / "part-0.parquet"), rows, rows_per_group=rows_per_group)
    for name, choice in choices.items():
        write_choice_parquet(str(root / name / "part-0.parquet"), choice, rows_per_group=rows_per_group)
    return TextSets(root, texts, choices)


def suite_yaml(base_url: str, max_length: int = 48, rows_per_shard: int = 8, **extra: object) -> str:
    lines = [
        "kind: text",
        f"id: {{name: docs, url: {base_url}/docs}}",
        "ood:",
        f"  - {{name: docs-shifted, url: {base_url}/docs-shifted}}",
        f"  - {{name: next-line, url: {base_url}/next-line, task: choice}}",
        f"held_out: {{name: docs-val, url: {base_url}/docs-val}}",
        f"max_length: {max_length}",
        "batch_tokens: 256",
        "batch_size: 6",
        f"rows_per_shard: {rows_per_shard}",
    ]
    lines += [f"{key}: {value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


# --- plain-transformers references, row by row ------------------------------------------------

def reference_log_probs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, one unpadded row through ``model(input_ids).logits``."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def reference_perplexity(model: torch.nn.Module, tokenizer, texts: list[str], max_length: int) -> tuple[float, int]:
    nll, tokens = 0.0, 0
    for text in texts:
        ids = tokenizer(text)["input_ids"][:max_length]
        if len(ids) < 2:
            continue
        log_probs = reference_log_probs(model, ids)
        nll -= float(log_probs.sum())
        tokens += len(ids) - 1
    return math.exp(nll / tokens), tokens


def reference_choice_correct(model: torch.nn.Module, tokenizer, rows: list[ChoiceRow], max_length: int) -> int:
    correct = 0
    for row in rows:
        context = len(tokenizer(row.prompt)["input_ids"])
        scores = []
        for choice in row.choices:
            whole = tokenizer(row.prompt + " " + choice)["input_ids"]
            continuation = len(whole) - context
            kept = whole[-max_length:]
            scores.append(float(reference_log_probs(model, kept)[-continuation:].sum()) if continuation > 0 else 0.0)
        correct += int(scores.index(max(scores)) == row.answer)
    return correct


def load_reference(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
