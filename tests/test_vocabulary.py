"""Models with different vocabularies, side by side with mergekit: ``tokenizer_source: union | base |
model``, the ``tokenizer:`` block (per-token sources, ``force``, ``pad_to_multiple_of``), tied and untied
heads. Three tiny Llamas with three tokenizers: the base's, the base's plus added tokens, and one
trained on other text (overlapping, in another order).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from mergekit_runner import run_mergekit
from safetensors.torch import load_file

from pipeline.cli import main

MERGEKIT = shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent))
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MERGEKIT is None, reason="mergekit-yaml is not installed")]
ULPS, FLOAT32_EPS = 4, 2.0**-23

TEXT_A = " ".join(["the merge of fine tuned models keeps what each learned"] * 20 + ["model stock soup ratatouille"] * 10)
TEXT_B = " ".join(["tokens differ across vocabularies and embeddings follow them"] * 20 + ["union base source"] * 10)
ADDED = ["<|im_start|>", "<|im_end|>", "ratatouille_token"]


def train_tokenizer(text: str, size: int) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_model(folder: Path, tokenizer: object, seed: int, tie: bool = False) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = len(tokenizer.get_vocab())  # type: ignore[attr-defined]
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=tie)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocabularies")
    base_tokenizer = train_tokenizer(TEXT_A, 300)
    extended = train_tokenizer(TEXT_A, 300)
    extended.add_tokens(ADDED[:2], special_tokens=True)  # type: ignore[attr-defined]
    extended.add_tokens(ADDED[2:])  # type: ignore[attr-defined]
    other = train_tokenizer(TEXT_B, 310)
    folders = {"base": root / "base", "extended": root / "extended", "other": root / "other"}
    save_model(folders["base"], base_tokenizer, 1)
    save_model(folders["extended"], extended, 2)
    save_model(folders["other"], other, 3)
    return folders


def recipes(f: dict[str, Path]) -> dict[str, str]:
    models = (f"models:\n  - model: {f['base']}\n  - model: {f['extended']}\n  - model: {f['other']}\n"
              "parameters: {weight: 1.0}\n")
    return {
        "linear_union": f"merge_method: linear\nbase_model: {f['base']}\n{models}tokenizer_source: union\ndtype: float32\n",
        "linear_base": f"merge_method: linear\nbase_model: {f['base']}\n{models}tokenizer_source: base\ndtype: float32\n",
        "ties_union": (
            f"merge_method: ties\nbase_model: {f['base']}\nmodels:\n"
            f"  - model: {f['extended']}\n    parameters: {{weight: 1.0, density: 0.7}}\n"
            f"  - model: {f['other']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
            "tokenizer_source: union\ndtype: float32\n"
        ),
        "tokenizer_block": (
            f"merge_method: linear\nbase_model: {f['base']}\n{models}"
            "tokenizer:\n  source: union\n  pad_to_multiple_of: 16\n  tokens:\n"
            f"    '<|im_start|>': {{source: {f['extended']}}}\n"
            "    '<|im_end|>': {source: {kind: zero}}\n"
            f"    '<s>': {{source: {f['other']}, force: true}}\n"
            f"    'ratatouille_token': {{source: {{kind: model_token, model: {f['base']}, token: '</s>'}}}}\n"
            "dtype: float32\n"
        ),
    }


def load_output(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def vocabulary_of(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


@pytest.fixture(scope="module")
def mergekit_outputs(family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return run_mergekit(recipes(family), tmp_path_factory.mktemp("mergekit-vocabularies"), copy_tokenizer=True)


@pytest.mark.parametrize("name", sorted(recipes({k: Path(k) for k in ("base", "extended", "other")})))
def test_same_vocabulary_and_tensors_as_mergekit(name: str, family: dict[str, Path], mergekit_outputs: dict[str, Path],
                                                 ray_local, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(recipes(family)[name])
    out = tmp_path / "out"
    assert main(["merge", str(recipe), str(out), "--quiet"]) == 0
    theirs_folder = mergekit_outputs[name]
    # The same tokens. Their ids may differ: mergekit orders the union's new tokens by the iteration
    # order of the tokenizers' vocabulary dicts (hash order, different in every process); modelstock
    # by each model's token id. So token-indexed rows are compared token by token.
    our_vocabulary, their_vocabulary = vocabulary_of(out), vocabulary_of(theirs_folder)
    assert sorted(our_vocabulary) == sorted(their_vocabulary)
    ours, theirs = load_output(out), load_output(theirs_folder)
    assert sorted(ours) == sorted(theirs)
    for tensor, expected in theirs.items():
        actual = ours[tensor]
        assert actual.shape == expected.shape, tensor
        if tensor in ("model.embed_tokens.weight", "lm_head.weight"):
            tokens = sorted(our_vocabulary)
            padding = range(len(our_vocabulary), actual.shape[0])
            actual = torch.cat([actual[[our_vocabulary[t] for t in tokens]], actual[list(padding)]])
            expected = torch.cat([expected[[their_vocabulary[t] for t in tokens]], expected[list(padding)]])
        scale = float(expected.abs().max())
        difference = float((actual.double() - expected.double()).abs().max())
        assert difference <= ULPS * FLOAT32_EPS * scale, f"{name}: {tensor}: {difference:.3e}"
    ours_config = json.loads((out / "config.json").read_text())
    assert ours_config["vocab_size"] == ours["model.embed_tokens.weight"].shape[0]


def test_union_output_loads_and_its_tokenizer_encodes_every_input_token(family: dict[str, Path], ray_local,
                                                                        tmp_path: Path) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    recipe = tmp_path / "recipe.yml"
    recipe.write_text(recipes(family)["linear_union"])
    out = tmp_path / "out"
    assert main(["merge", str(recipe), str(out), "--quiet"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    for token in ADDED:
        assert token in tokenizer.get_vocab()
    model = LlamaForCausalLM.from_pretrained(out)
    ids = tokenizer("<|im_start|> model stock soup", return_tensors="pt").input_ids
    assert bool(torch.isfinite(model(ids).logits).all())


@pytest.mark.parametrize("padded", [False, True])
def test_vocabulary_rows_are_the_same_bytes_in_any_chunking(monkeypatch, padded: bool) -> None:
    """Permuted rows, default rows (donor, base, mean, zero) and padding means do not depend on chunks."""
    from modelstock import chunks
    from modelstock.engine import chunk_plan_for, merge_in_memory
    from modelstock.jobs import TensorInput, TensorJob
    from modelstock.methods.base import TensorParameters
    from modelstock.methods.linear import LinearModelParameters, LinearParameters
    from modelstock.vocabulary import TokenDefault, permutation, vocabulary_map

    output = {f"t{i}": i for i in range(50)}
    vocabularies = [{f"t{i}": i for i in range(40)},  # lacks t40..t49
                    {f"t{i}": 49 - i for i in range(50)},  # every token, reversed
                    {f"t{i}": i // 2 for i in range(0, 50, 2)}]  # every other token
    permutations = [permutation(output, v, len(v)) for v in vocabularies]
    settings = {"t3": TokenDefault(None, None, True), "t45": TokenDefault(1, 0, False)}
    padded_size = 56 if padded else 50
    mapping = vocabulary_map(permutations, 0, settings, output, padded_size)
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(len(v), 6, generator=generator) for v in vocabularies]
    job = TensorJob("model.embed_tokens.weight", (padded_size, 6), "F32", "linear",
                    TensorParameters(LinearParameters(), (LinearModelParameters(),) * 3),
                    tuple(TensorInput(i, "model.embed_tokens.weight", "F32", f"m{i}") for i in range(3)),
                    has_base=False, vocabulary=mapping)
    whole, _ = merge_in_memory(job, inputs)
    monkeypatch.setattr(chunks, "BLOCK_ELEMENTS", 18)  # 3 rows per block
    monkeypatch.setattr(chunks, "MIN_CHUNK_BYTES", 1)
    assert len(chunk_plan_for(job, 400).chunks) > 4
    chunked, _ = merge_in_memory(job, inputs, memory_budget=400)
    assert chunked.equal(whole)
    # Independent expectations for a few rows.
    assert torch.equal(whole[3], torch.zeros(6))  # forced to zeros
    expected_45 = (inputs[1][0].double() + inputs[1][4].double() + inputs[1][0].double()) / 3
    assert torch.allclose(whole[45].double(), expected_45, atol=1e-6)  # t45: model 1's row 0 for model 0
    expected_41 = ((inputs[1][8].double() + inputs[1][8].double()) + inputs[1][8].double()) / 3
    assert torch.allclose(whole[41].double(), expected_41, atol=1e-6)  # t41: only model 1 has it
    if padded:
        assert torch.allclose(whole[50:], whole[:50].double().mean(dim=0).float().expand(6, 6), atol=1e-6)


def test_chat_template_auto_takes_the_inputs_most_common_one(family: dict[str, Path], ray_local, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    common = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    rare = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    models = []
    for index, template in enumerate((common, rare, common)):
        model = tmp_path / f"model-{index}"
        shutil.copytree(family["extended"], model)
        config = json.loads((model / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (model / "tokenizer_config.json").write_text(json.dumps(config))
        models.append(model)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("merge_method: linear\nmodels:\n" + "".join(f"  - model: {m}\n" for m in models) + "chat_template: auto\n")
    out = tmp_path / "out"
    assert main(["merge", str(recipe), str(out), "--quiet"]) == 0
    assert AutoTokenizer.from_pretrained(out).chat_template == common
