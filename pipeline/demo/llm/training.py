"""Training for the LLM demo: a byte-level BPE tokenizer trained with ``tokenizers``, a tiny
transformers Llama pretrained on the mixed text (w_0), fine-tunes on code with one recipe and
different seeds, and Hugging Face folders (save_pretrained + tokenizer.json/tokenizer_config.json)."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pipeline.demo.llm.config import FineTuneRecipe, LlmDemoConfig

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


@contextmanager
def one_thread() -> Iterator[None]:
    """Train on one thread: a model this small gains little from more, and threads that spin-wait
    for each other collapse on a busy machine (measured: 0.34 s/step on one thread, 2.7 s on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_tokenizer(texts: list[str], vocab_size: int, folder: Path) -> Any:
    """BPE over bytes (no unknown tokens), BOS added to every row, saved as tokenizer.json plus a
    tokenizer_config.json naming the special tokens; returned as transformers loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>",
        "model_max_length": 4096,
    }, indent=1) + "\n")
    return AutoTokenizer.from_pretrained(str(folder))


def token_stream(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """Every row tokenized (with its BOS) and concatenated: the stream training windows come from."""
    ids = tokenizer(texts)["input_ids"]
    return torch.tensor([token for row in ids for token in row], dtype=torch.long)


def new_model(config: LlmDemoConfig, tokenizer: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.kv_heads,
        max_position_embeddings=max(config.seq_len, config.max_length) * 2, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def train(model: Any, stream: torch.Tensor, steps: int, lr: float, warmup: int, weight_decay: float,
          config: LlmDemoConfig, seed: int) -> Any:
    """AdamW on random windows of ``stream`` (drawn by ``seed``), linear warm-up then cosine decay."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * step / steps)))
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - config.seq_len - 1, (config.batch_rows,), generator=generator)
        batch = torch.stack([stream[s : s + config.seq_len + 1] for s in starts.tolist()])
        loss = _next_token_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return model.eval()


def _next_token_loss(model: Any, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def pretrain(config: LlmDemoConfig, tokenizer: Any, stream: torch.Tensor) -> Any:
    torch.manual_seed(config.seed)
    model = new_model(config, tokenizer)
    with one_thread():
        return train(model, stream, config.pretrain_steps, config.pretrain_lr, max(1, config.pretrain_steps // 20),
                     0.01, config, config.seed)


def fine_tune(config: LlmDemoConfig, base_state: dict[str, torch.Tensor], tokenizer: Any, stream: torch.Tensor,
              seed: int) -> Any:
    """One run of the shared recipe from w_0; the seed draws its training windows."""
    recipe: FineTuneRecipe = config.finetune
    torch.manual_seed(seed)
    model = new_model(config, tokenizer)
    model.load_state_dict(base_state)
    with one_thread():
        return train(model, stream, recipe.steps, recipe.lr, recipe.warmup_steps, recipe.weight_decay, config,
                     1000 + seed)


def save_model(model: Any, folder: Path, tokenizer_dir: Path) -> str:
    """save_pretrained (config.json + model.safetensors) plus the tokenizer files."""
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return str(folder)
