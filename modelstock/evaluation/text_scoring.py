"""Scoring one (language model, dataset shard) work item: rows sorted by token length and cut
into batches padded to their longest row, one forward pass per batch, log-probabilities of each
row's own tokens read back in float32 and summed in float64.

Rows are right-padded: causal attention never lets a real token see the padding after it, and
positions start at 0 for every row, so a row's log-probabilities do not depend on its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from modelstock.evaluation.causal_lm import CausalLM
from modelstock.evaluation.datasets import DatasetShard, TextSuite
from modelstock.evaluation.metrics import TextShardScore
from modelstock.evaluation.text_data import TextShardRows, choice_sequences, perplexity_sequence


@dataclass(frozen=True)
class TextBatching:
    """How rows become batches: truncation length, most rows and most padded tokens per batch."""

    max_length: int
    batch_size: int
    batch_tokens: int

    @classmethod
    def of(cls, suite: TextSuite) -> TextBatching:
        return cls(suite.max_length, suite.batch_size, suite.batch_tokens)


def length_batches(lengths: Sequence[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Row indices, longest first (stable for equal lengths), cut so that each batch holds at most
    ``max_rows`` rows and ``rows x longest`` <= ``max_tokens`` (a longer single row goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if batches:
            batch = batches[-1]
            longest = lengths[batch[0]]
            if len(batch) < max_rows and (len(batch) + 1) * longest <= max_tokens:
                batch.append(index)
                continue
        batches.append([index])
    return batches


@torch.no_grad()
def token_log_probs(lm: CausalLM, sequences: Sequence[Sequence[int]], batching: TextBatching) -> list[torch.Tensor]:
    """For each sequence, log p(ids[t] | ids[:t]) for t >= 1 (float64, on the CPU)."""
    results: list[torch.Tensor] = [torch.empty(0, dtype=torch.float64)] * len(sequences)
    runnable = [i for i, s in enumerate(sequences) if len(s) >= 2]
    lengths = [len(sequences[i]) for i in runnable]
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    for batch in length_batches(lengths, batching.batch_size, batching.batch_tokens):
        rows = [runnable[b] for b in batch]
        longest = len(sequences[rows[0]])
        ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for r, index in enumerate(rows):
            ids[r, : len(sequences[index])] = torch.tensor(sequences[index], dtype=torch.long)
            mask[r, : len(sequences[index])] = 1
        device = lm.input_device
        logits = lm.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for r, index in enumerate(rows):
            n = len(sequences[index])
            row = logits[r, : n - 1].float()  # one row at a time: float32 copies stay row-sized
            targets = ids[r, 1:n].to(row.device)
            results[index] = torch.log_softmax(row, dim=-1).gather(1, targets[:, None])[:, 0].double().cpu()
    return results


def continuation_log_prob(log_probs: torch.Tensor, continuation: int) -> float:
    """The summed log-probability of a sequence's last ``continuation`` tokens (0 for none)."""
    return math.fsum(log_probs[len(log_probs) - continuation :].tolist()) if continuation else 0.0


def score_text_rows(lm: CausalLM, model_name: str, shard: DatasetShard, rows: TextShardRows,
                    batching: TextBatching) -> TextShardScore:
    name, task = shard.dataset.name, getattr(shard.dataset, "task", "perplexity")
    if rows.texts is not None:
        sequences = [perplexity_sequence(lm.tokenizer, text, batching.max_length) for text in rows.texts]
        log_probs = token_log_probs(lm, sequences, batching)
        nll = math.fsum(-float(lp.sum()) for lp in log_probs)
        tokens = sum(int(lp.numel()) for lp in log_probs)
        return TextShardScore(model_name, name, shard.index, task, nll=nll, tokens=tokens)
    assert rows.choices is not None
    per_row = [choice_sequences(lm.tokenizer, row, batching.max_length) for row in rows.choices]
    flat = [sequence for sequences in per_row for sequence in sequences]
    log_probs = token_log_probs(lm, [s.ids for s in flat], batching)
    correct, start = 0, 0
    for row, choices in zip(rows.choices, per_row):
        scores = [continuation_log_prob(log_probs[start + j], c.continuation) for j, c in enumerate(choices)]
        start += len(choices)
        correct += int(max(range(len(scores)), key=lambda j: (scores[j], -j)) == row.answer)  # ties: first choice
    return TextShardScore(model_name, name, shard.index, task, correct=correct, total=len(rows.choices))
