"""A corpus of malformed LLM-era inputs, each run through the real CLI in-process: side files
(configs, generation configs, tokenizer files, chat templates), configs that contradict their
weights, inputs of different depths, ``tokenizer:`` blocks, block-FP8 codes and scales, and text
evaluation suites. Each must end as ``tests/test_bad_inputs.py`` demands: exit code 2, one stderr
line naming the file (and tensor), no traceback, no warning, nothing written at the output.

The pristine family is a tiny Llama (synthetic weights) with a real BPE tokenizer, built once per
module; every case tampers with copies. Cases refused before planning ends never start Ray.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_bad_inputs import assert_one_error_line, listing, run_cli
from text_fixtures import corpus_lines, save_tokenizer

from modelstock.evaluation.text_data import ChoiceRow, write_choice_parquet, write_text_parquet
from modelstock.testing.synthetic import LlamaShape, write_family

ST = "model.safetensors"
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
Q = "model.layers.0.self_attn.q_proj.weight"
BLOCK = 8


@dataclass(frozen=True)
class Pristine:
    root: Path
    base: Path
    tuned: list[Path]
    vocab: int
    sets: Path  # docs/ (perplexity) and pick/ (choice)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    root = tmp_path_factory.mktemp("llm-pristine")
    lines = corpus_lines()[:3000]
    save_tokenizer(root / "tokenizer", lines, vocab_size=300)
    vocab = len(json.loads((root / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"])
    shape = LlamaShape(hidden=16, intermediate=32, layers=2, vocab=vocab, heads=2, kv_heads=1)
    base, tuned = write_family(root, shape, finetunes=2, dtype=torch.float32, seed=5)
    for folder in [base, *tuned]:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(root / "tokenizer" / name, Path(folder) / name)
    sets = root / "sets"
    write_text_parquet(str(sets / "docs" / "part-0.parquet"), lines[:12], rows_per_group=4)
    write_choice_parquet(str(sets / "pick" / "part-0.parquet"),
                         [ChoiceRow(lines[i], (lines[i + 1][:30], lines[i + 7][:30]), 0) for i in range(6)])
    return Pristine(root, Path(base), [Path(t) for t in tuned], vocab, sets)


@dataclass
class Case:
    argv: list[str]
    out: Path
    expect: tuple[str, ...]
    ray: bool = False  # refused only once shards (or actors) run


class Workspace:
    def __init__(self, root: Path, pristine: Pristine) -> None:
        self.root, self.pristine = root, pristine
        self.inputs = root / "inputs"
        self.inputs.mkdir()
        self.base = self.copy(pristine.base, "base")
        self.tuned = [self.copy(t, t.name) for t in pristine.tuned]
        self.sets = self.copy(pristine.sets, "sets")
        self.out = root / "out"

    def copy(self, source: Path, name: str) -> Path:
        shutil.copytree(source, self.inputs / name)
        return self.inputs / name

    def merge(self, *expect: str, recipe: str | None = None, extra: str = "", ray: bool = False) -> Case:
        if recipe is None:
            recipe = (f"merge_method: model_stock\nbase_model: {self.base}\nmodels:\n"
                      + "".join(f"  - model: {m}\n" for m in self.tuned) + extra)
        path = self.root / "recipe.yml"
        path.write_text(recipe)
        return Case(["merge", str(path), str(self.out), "--quiet"], self.out, expect, ray)

    def union(self, *expect: str, extra: str = "", ray: bool = False) -> Case:
        recipe = (f"merge_method: linear\nbase_model: {self.base}\nmodels:\n"
                  + "".join(f"  - model: {m}\n    parameters: {{weight: 1.0}}\n" for m in [self.base, *self.tuned])
                  + "tokenizer_source: union\ndtype: float32\n" + extra)
        return self.merge(*expect, recipe=recipe, ray=ray)

    def evaluate(self, *expect: str, models: list[str] | None = None, suite: str | None = None,
                 ray: bool = False) -> Case:
        path = self.root / "suite.yml"
        path.write_text(suite or (
            f"kind: text\nid: {{name: docs, url: {self.sets / 'docs'}}}\n"
            f"ood:\n  - {{name: pick, url: {self.sets / 'pick'}, task: choice}}\n"
            "max_length: 32\nbatch_tokens: 256\nbatch_size: 4\nrows_per_shard: 8\n"))
        models = models if models is not None else [f"m={self.tuned[0]}"]
        return Case(["evaluate", str(path), *models, "--out", str(self.out), "--quiet", "--workers", "1"],
                    self.out, expect, ray)


def edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


def resave(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def make_dir(path: Path) -> Path:
    path.unlink(missing_ok=True)
    path.mkdir()
    (path / "inside.json").write_text("{}")
    return path


# --- side files: one reader, one line naming the file ------------------------------------------

def config_is_a_directory(w: Workspace) -> Case:
    return w.merge(str(make_dir(w.base / "config.json")), "directory")


def finetune_config_is_a_directory(w: Workspace) -> Case:
    return w.merge(str(make_dir(w.tuned[1] / "config.json")), "directory")


def config_not_an_object(w: Workspace) -> Case:
    (w.base / "config.json").write_text("[1, 2]")
    return w.merge(str(w.base / "config.json"), "not a JSON object")


def config_not_utf8(w: Workspace) -> Case:
    (w.base / "config.json").write_bytes(b'{"model_type": "\xff\xfe"}')
    return w.merge(str(w.base / "config.json"), "UTF-8")


def config_with_nan(w: Workspace) -> Case:
    (w.tuned[0] / "config.json").write_text('{"model_type": "llama", "rms_norm_eps": NaN}')
    return w.merge(str(w.tuned[0] / "config.json"), "NaN")


def config_vocab_size_a_string(w: Workspace) -> Case:
    edit_json(w.base / "config.json", lambda c: c.update(vocab_size=str(c["vocab_size"])))
    return w.merge(str(w.base / "config.json"), "'vocab_size'", "positive integer")


def config_layers_a_boolean(w: Workspace) -> Case:
    edit_json(w.tuned[0] / "config.json", lambda c: c.update(num_hidden_layers=True))
    return w.merge(str(w.tuned[0] / "config.json"), "'num_hidden_layers'")


def config_architectures_not_a_list(w: Workspace) -> Case:
    edit_json(w.base / "config.json", lambda c: c.update(architectures="LlamaForCausalLM"))
    return w.merge(str(w.base / "config.json"), "'architectures'")


def generation_config_is_a_directory(w: Workspace) -> Case:
    return w.merge(str(make_dir(w.base / "generation_config.json")), "directory")


def generation_config_not_json(w: Workspace) -> Case:
    (w.base / "generation_config.json").write_text("{'eos_token_id': 2}")
    return w.merge(str(w.base / "generation_config.json"), "not valid JSON")


def generation_config_a_list(w: Workspace) -> Case:
    (w.base / "generation_config.json").write_text("[]")
    return w.merge(str(w.base / "generation_config.json"), "not a JSON object")


def generation_config_eos_a_string(w: Workspace) -> Case:
    (w.base / "generation_config.json").write_text('{"eos_token_id": "two"}')
    return w.merge(str(w.base / "generation_config.json"), "'eos_token_id'")


def special_tokens_map_wrong_type(w: Workspace) -> Case:
    (w.base / "special_tokens_map.json").write_text('{"bos_token": 7}')
    return w.merge(str(w.base / "special_tokens_map.json"), "'bos_token'")


def added_tokens_json_wrong_type(w: Workspace) -> Case:
    (w.base / "added_tokens.json").write_text('{"<x>": "300"}')
    return w.merge(str(w.base / "added_tokens.json"), "'<x>'", "token id")


def chat_template_jinja_not_utf8(w: Workspace) -> Case:
    (w.base / "chat_template.jinja").write_bytes(b"{{ messages \xff }}")
    return w.merge(str(w.base / "chat_template.jinja"), "UTF-8")


def tokenizer_config_corrupt_with_chat_template(w: Workspace) -> Case:
    (w.tuned[1] / "tokenizer_config.json").write_text('{"chat_template": "{{ x }}",')
    return w.merge(str(w.tuned[1] / "tokenizer_config.json"), "not valid JSON", extra="chat_template: auto\n")


def tokenizer_config_chat_template_a_number(w: Workspace) -> Case:
    edit_json(w.base / "tokenizer_config.json", lambda c: c.update(chat_template=3))
    return w.merge(str(w.base / "tokenizer_config.json"), "'chat_template'")


def tokenizer_json_is_a_directory(w: Workspace) -> Case:
    return w.union(str(make_dir(w.tuned[0] / "tokenizer.json")), "directory")


def tokenizer_json_not_json(w: Workspace) -> Case:
    (w.tuned[0] / "tokenizer.json").write_text('{"model": {')
    return w.union(str(w.tuned[0] / "tokenizer.json"), "not valid JSON")


def tokenizer_json_without_model(w: Workspace) -> Case:
    edit_json(w.tuned[1] / "tokenizer.json", lambda t: t.pop("model"))
    return w.union(str(w.tuned[1] / "tokenizer.json"), "'model'")


def tokenizer_json_model_garbage(w: Workspace) -> Case:
    edit_json(w.tuned[1] / "tokenizer.json", lambda t: t.update(model={"type": "Nonsense"}))
    return w.union(str(w.tuned[1]), "cannot load its tokenizer")


def tokenizer_class_does_not_exist(w: Workspace) -> Case:
    edit_json(w.tuned[0] / "tokenizer_config.json", lambda c: c.update(tokenizer_class="NoSuchTokenizerFast"))
    return w.union(str(w.tuned[0] / "tokenizer_config.json"), "'NoSuchTokenizerFast'")


def tokenizer_config_not_an_object(w: Workspace) -> Case:
    (w.base / "tokenizer_config.json").write_text('"PreTrainedTokenizerFast"')
    return w.union(str(w.base / "tokenizer_config.json"), "not a JSON object")


# --- configs that contradict their weights; inputs of different depths --------------------------

def union_finetune_claims_other_vocab_size(w: Workspace) -> Case:
    """The worst case: this merged with exit 0 into a model transformers cannot load."""
    edit_json(w.tuned[0] / "config.json", lambda c: c.update(vocab_size=c["vocab_size"] + 40))
    return w.union(str(w.tuned[0] / "config.json"), "vocab_size", repr(EMBED))


def config_vocab_size_disagrees(w: Workspace) -> Case:
    edit_json(w.tuned[1] / "config.json", lambda c: c.update(vocab_size=c["vocab_size"] - 1))
    return w.merge(str(w.tuned[1] / "config.json"), "vocab_size", "rows")


def config_layers_disagree(w: Workspace) -> Case:
    edit_json(w.base / "config.json", lambda c: c.update(num_hidden_layers=3))
    return w.merge(str(w.base / "config.json"), "num_hidden_layers is 3", "2 layers")


def config_hidden_size_disagrees(w: Workspace) -> Case:
    edit_json(w.tuned[0] / "config.json", lambda c: c.update(hidden_size=32))
    return w.merge(str(w.tuned[0] / "config.json"), "hidden_size is 32", "input_layernorm")


def text_config_vocab_disagrees(w: Workspace) -> Case:
    edit_json(w.base / "config.json", lambda c: (c.pop("vocab_size"), c.update(text_config={"vocab_size": 7})))
    return w.merge(str(w.base / "config.json"), "vocab_size is 7")


def _with_layers(folder: Path, layers: int) -> None:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        for name in [n for n in tensors if n.startswith("model.layers.1.")]:
            tensor = tensors.pop(name) if layers < 2 else tensors[name]
            if layers > 2:
                tensors[name.replace("layers.1.", "layers.2.")] = tensor.clone()

    resave(folder / ST, edit)
    edit_json(folder / "config.json", lambda c: c.update(num_hidden_layers=layers))


def finetune_with_more_layers(w: Workspace) -> Case:
    """Was: the extra layer 'left out' with a warning, exit 0."""
    _with_layers(w.tuned[1], 3)
    return w.merge(str(w.tuned[1]), "3 layers", "has 2", "slices")


def finetune_with_fewer_layers(w: Workspace) -> Case:
    _with_layers(w.tuned[0], 1)
    return w.merge(str(w.tuned[0]), "1 layers", "has 2")


def base_without_config(w: Workspace) -> Case:
    (w.base / "config.json").unlink()
    return w.merge(str(w.base), "no config.json", "could not be loaded")


# --- tokenizer: blocks; NaN under a union vocabulary --------------------------------------------

def token_id_past_vocabulary(w: Workspace) -> Case:
    extra = (f"tokenizer:\n  source: union\n  tokens:\n    '<s>': {{source: {{kind: model_token, model: {w.tuned[0]}, "
             "token_id: 5000}, force: true}\n")
    recipe = (f"merge_method: linear\nbase_model: {w.base}\nmodels:\n"
              + "".join(f"  - model: {m}\n    parameters: {{weight: 1.0}}\n" for m in [w.base, *w.tuned])
              + "dtype: float32\n" + extra)
    return w.merge("tokenizer.tokens", "'<s>'", "5000", str(w.tuned[0]), f"{w.pristine.vocab} rows", recipe=recipe)


def nan_in_finetune_token_under_union(w: Workspace) -> Case:
    """The token only fine-tune 1 has is every input's default row: its NaN was blamed on the base."""
    from transformers import AutoTokenizer

    folder = w.tuned[0]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(["<|only_here|>"])
    tokenizer.save_pretrained(folder)

    def grow(tensors: dict[str, torch.Tensor]) -> None:
        for name in (EMBED, HEAD):
            row = torch.full((1, tensors[name].shape[1]), math.nan if name == EMBED else 0.0)
            tensors[name] = torch.cat([tensors[name], row])

    resave(folder / ST, grow)
    edit_json(folder / "config.json", lambda c: c.update(vocab_size=c["vocab_size"] + 1))
    return w.union(str(folder / ST), repr(EMBED), "NaN or Inf", ray=True)


# --- block FP8 ----------------------------------------------------------------------------------

def _fp8(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None] | None = None) -> None:
    """The folder's projections as block-FP8 codes with float32 scales (blocks of BLOCK x BLOCK)."""
    def quantize(tensors: dict[str, torch.Tensor]) -> None:
        for name in [n for n in tensors if n.endswith("proj.weight")]:
            weight = tensors[name]
            rows, cols = weight.shape
            scales = torch.full((-(-rows // BLOCK), -(-cols // BLOCK)), float(weight.abs().max()) / 448.0)
            tensors[name] = (weight / scales[0, 0]).to(torch.float8_e4m3fn)
            tensors[name + "_scale_inv"] = scales
        if edit is not None:
            edit(tensors)

    resave(folder / ST, quantize)
    edit_json(folder / "config.json", lambda c: c.update(quantization_config={
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}))


def _poison_code(tensors: dict[str, torch.Tensor]) -> None:
    codes = tensors[Q].view(torch.uint8).clone()
    codes[3, 5] = 0x7F  # E4M3FN's NaN
    tensors[Q] = codes.view(torch.float8_e4m3fn)


def fp8_nan_code(w: Workspace) -> Case:
    """Was: NotImplementedError: "isfinite" not implemented for 'Float8_e4m3fn'."""
    _fp8(w.tuned[1], _poison_code)
    return w.merge(str(w.tuned[1] / ST), repr(Q), "NaN or Inf", ray=True)


def fp8_nan_scale(w: Workspace) -> Case:
    _fp8(w.tuned[0], lambda t: t[Q + "_scale_inv"].__setitem__((1, 0), math.nan))
    return w.merge(str(w.tuned[0] / ST), repr(Q + "_scale_inv"), "NaN or Inf", ray=True)


def fp8_infinite_scale_in_copied_tensor(w: Workspace) -> Case:
    _fp8(w.base, lambda t: t[Q + "_scale_inv"].__setitem__((0, 1), math.inf))
    return w.merge(str(w.base / ST), repr(Q + "_scale_inv"), "NaN or Inf", extra="exclude: ['*q_proj*']\n", ray=True)


def fp8_one_dimensional_codes(w: Workspace) -> Case:
    """Was: an IndexError."""
    name = "model.layers.0.input_layernorm.weight"

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = tensors[name].to(torch.float8_e4m3fn)
        tensors[name + "_scale_inv"] = torch.tensor(1.0)

    _fp8(w.tuned[0], edit)
    return w.merge(str(w.tuned[0]), repr(name), "matrices")


def fp8_scale_wrong_shape(w: Workspace) -> Case:
    _fp8(w.tuned[0], lambda t: t.update({Q + "_scale_inv": torch.ones(1, 2)}))
    return w.merge(str(w.tuned[0]), repr(Q + "_scale_inv"), "block scales")


def fp8_scale_missing(w: Workspace) -> Case:
    _fp8(w.tuned[1], lambda t: t.pop(Q + "_scale_inv"))
    return w.merge(str(w.tuned[1]), repr(Q), "without its block scales")


# --- evaluation suites --------------------------------------------------------------------------

def _docs(w: Workspace) -> Path:
    return w.sets / "docs" / "part-0.parquet"


def eval_set_not_parquet(w: Workspace) -> Case:
    _docs(w).write_text("text\nhello\n")
    return w.evaluate(str(_docs(w)), "not a readable Parquet file")


def eval_set_empty_file(w: Workspace) -> Case:
    _docs(w).write_bytes(b"")
    return w.evaluate(str(_docs(w)), "Parquet")


def eval_set_no_files(w: Workspace) -> Case:
    _docs(w).unlink()
    return w.evaluate(str(w.sets / "docs"), "no .parquet files")


def eval_set_only_empty_strings(w: Workspace) -> Case:
    write_text_parquet(str(_docs(w)), ["", "", ""])
    return w.evaluate("docs", "all empty")


def eval_set_no_rows(w: Workspace) -> Case:
    write_text_parquet(str(_docs(w)), [])
    return w.evaluate("docs", "no row")


def eval_set_missing_text_column(w: Workspace) -> Case:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a b c"]}), str(_docs(w)))
    return w.evaluate(str(_docs(w)), "'text' column", "body")


def eval_set_text_column_integers(w: Workspace) -> Case:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), str(_docs(w)))
    return w.evaluate(str(_docs(w)), "'text'", "expected string")


def eval_set_null_text(w: Workspace) -> Case:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array(["some words here", None], pa.string())}), str(_docs(w)))
    return w.evaluate(str(_docs(w)), "row 1", "null")


def _pick(w: Workspace, **columns: object) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = w.sets / "pick" / "part-0.parquet"
    table = {"prompt": ["the cat", "a dog"], "choices": [["sat", "ran"], ["barked", "flew"]], "answer": [0, 0]}
    table.update(columns)  # type: ignore[arg-type]
    pq.write_table(pa.table(table), str(path))
    return path


def eval_choice_answer_out_of_range(w: Workspace) -> Case:
    return w.evaluate(str(_pick(w, answer=[0, 2])), "row 1", "'answer' 2")


def eval_choice_negative_answer(w: Workspace) -> Case:
    return w.evaluate(str(_pick(w, answer=[-1, 0])), "row 0", "'answer' -1")


def eval_choice_one_choice(w: Workspace) -> Case:
    return w.evaluate(str(_pick(w, choices=[["sat"], ["barked", "flew"]])), "row 0", "at least two")


def eval_choice_choices_a_string(w: Workspace) -> Case:
    return w.evaluate(str(_pick(w, choices=["sat|ran", "barked|flew"])), "'choices'", "list of strings")


def eval_choice_answer_a_string(w: Workspace) -> Case:
    return w.evaluate(str(_pick(w, answer=["0", "1"])), "'answer'", "integer")


def eval_choice_no_rows(w: Workspace) -> Case:
    write_choice_parquet(str(w.sets / "pick" / "part-0.parquet"), [])
    return w.evaluate("pick", "no rows")


def eval_duplicate_model_names(w: Workspace) -> Case:
    return w.evaluate("'m'", "twice", models=[f"m={w.tuned[0]}", f"m={w.tuned[1]}"])


def eval_token_ids_past_vocabulary(w: Workspace) -> Case:
    """The tokenizer knows a token the embeddings have no row for; a row uses it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(w.tuned[0])
    tokenizer.add_tokens(["<|beyond|>"])
    tokenizer.save_pretrained(w.tuned[0])
    write_text_parquet(str(_docs(w)), ["plain words first", "then <|beyond|> the rows"])
    return w.evaluate(str(_docs(w)), "row 1", "past the vocabulary", str(w.tuned[0]))


def eval_model_config_is_a_directory(w: Workspace) -> Case:
    make_dir(w.tuned[0] / "tokenizer_config.json")
    return w.evaluate(str(w.tuned[0] / "tokenizer_config.json"), "directory")


def eval_model_tokenizer_class_unknown(w: Workspace) -> Case:
    edit_json(w.tuned[0] / "tokenizer_config.json", lambda c: c.update(tokenizer_class="Gpt9Tokenizer"))
    return w.evaluate("'Gpt9Tokenizer'", "not a transformers tokenizer class")


def eval_model_with_nan_weights(w: Workspace) -> Case:
    """Was: the table said nan and eval.json held a bare NaN, exit 0."""
    resave(w.tuned[0] / ST, lambda t: t["model.norm.weight"].__setitem__(3, math.nan))
    return w.evaluate(str(w.tuned[0]), "'model.norm.weight'", "NaN or Inf", ray=True)


CORPUS: dict[str, Callable[[Workspace], Case]] = {
    fn.__name__: fn
    for fn in [
        config_is_a_directory, finetune_config_is_a_directory, config_not_an_object, config_not_utf8, config_with_nan,
        config_vocab_size_a_string, config_layers_a_boolean, config_architectures_not_a_list,
        generation_config_is_a_directory, generation_config_not_json, generation_config_a_list,
        generation_config_eos_a_string, special_tokens_map_wrong_type, added_tokens_json_wrong_type,
        chat_template_jinja_not_utf8, tokenizer_config_corrupt_with_chat_template, tokenizer_config_chat_template_a_number,
        tokenizer_json_is_a_directory, tokenizer_json_not_json, tokenizer_json_without_model, tokenizer_json_model_garbage,
        tokenizer_class_does_not_exist, tokenizer_config_not_an_object,
        union_finetune_claims_other_vocab_size, config_vocab_size_disagrees, config_layers_disagree,
        config_hidden_size_disagrees, text_config_vocab_disagrees, finetune_with_more_layers, finetune_with_fewer_layers,
        base_without_config,
        token_id_past_vocabulary, nan_in_finetune_token_under_union,
        fp8_nan_code, fp8_nan_scale, fp8_infinite_scale_in_copied_tensor, fp8_one_dimensional_codes,
        fp8_scale_wrong_shape, fp8_scale_missing,
        eval_set_not_parquet, eval_set_empty_file, eval_set_no_files, eval_set_only_empty_strings, eval_set_no_rows,
        eval_set_missing_text_column, eval_set_text_column_integers, eval_set_null_text,
        eval_choice_answer_out_of_range, eval_choice_negative_answer, eval_choice_one_choice,
        eval_choice_choices_a_string, eval_choice_answer_a_string, eval_choice_no_rows,
        eval_duplicate_model_names, eval_token_ids_past_vocabulary, eval_model_config_is_a_directory,
        eval_model_tokenizer_class_unknown, eval_model_with_nan_weights,
    ]
}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_bad_llm_input_exits_2_with_one_line_and_leaves_no_output(
    name: str, pristine: Pristine, tmp_path: Path, request: pytest.FixtureRequest, capsys, caplog
) -> None:
    workspace = Workspace(tmp_path, pristine)
    case = CORPUS[name](workspace)
    # Merges plan for more than a moment (tokenizers): without a shared Ray the CLI would start its own.
    if case.ray or case.argv[0] == "merge":
        request.getfixturevalue("ray_local")
    inputs_before = {p: p.read_bytes() for p in workspace.inputs.rglob("*") if p.is_file()}
    caplog.set_level(logging.WARNING)

    code, lines = run_cli(case.argv, capsys)

    assert code == 2, "\n".join(lines)
    assert_one_error_line(lines, case.expect)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert not case.out.exists(), listing(case.out)
    assert {p: p.read_bytes() for p in workspace.inputs.rglob("*") if p.is_file()} == inputs_before


def test_corpus_size() -> None:
    assert len(CORPUS) >= 40


# --- the same inputs, untampered, pass (the checks refuse nonsense, not models) -----------------

def test_pristine_union_merge_and_its_output_pass_every_check(pristine: Pristine, tmp_path: Path, ray_local,
                                                              capsys) -> None:
    from transformers import AutoTokenizer

    from modelstock.evaluation.datasets import load_suite
    from modelstock.evaluation.preflight import check_evaluation_inputs
    from modelstock.evaluation.scoring import ModelSource

    workspace = Workspace(tmp_path, pristine)
    case = workspace.union()
    code, lines = run_cli(case.argv, capsys)
    assert code == 0, lines
    config = json.loads((workspace.out / "config.json").read_text())
    rows = load_file(workspace.out / "model-00001-of-00001.safetensors")[EMBED].shape[0] \
        if (workspace.out / "model-00001-of-00001.safetensors").exists() else None
    assert rows is None or rows == config["vocab_size"]
    assert len(AutoTokenizer.from_pretrained(workspace.out)) <= config["vocab_size"]
    evaluation = workspace.evaluate(models=[f"merged={workspace.out}"])
    check_evaluation_inputs([ModelSource("merged", (str(workspace.out),))], load_suite(evaluation.argv[1]))


def test_fp8_checkpoint_evaluates_as_its_dequantized_weights(pristine: Pristine, tmp_path: Path) -> None:
    """``modelstock evaluate`` reads block FP8: the model loaded from codes + scales has the weights
    transformers' own dequantization gives (in float64), so the same logits."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    from modelstock.evaluation.causal_lm import load_causal_lm

    workspace = Workspace(tmp_path, pristine)
    folder = workspace.tuned[0]
    _fp8(folder)
    stored = load_file(folder / ST)
    lm = load_causal_lm(str(folder), dtype="float32")
    parameters = dict(lm.model.named_parameters())
    for name, tensor in stored.items():
        if name.endswith("_scale_inv"):
            continue
        expected = (_dequantize_fp8_weight(tensor, stored[name + "_scale_inv"], [BLOCK, BLOCK], torch.float64)
                    if tensor.dtype == torch.float8_e4m3fn else tensor.double())
        assert torch.equal(parameters[name].double(), expected.float().double()), name
    reference = AutoModelForCausalLM.from_pretrained(pristine.tuned[0]).eval()
    ids = torch.tensor([[1, 5, 9, 20]])
    with torch.no_grad():
        ours, theirs = lm.model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=0.5)  # FP8 rounding: close to the unquantized model, not equal
    assert not torch.equal(ours, theirs)


def test_eval_json_never_holds_a_bare_nan(tmp_path: Path) -> None:
    from modelstock.evaluation.text_table import TextEvalRow, TextEvalTable

    table = TextEvalTable([TextEvalRow("m", "docs", "id", "perplexity", nll=1e6, tokens=1)], "docs", [])
    assert math.isinf(table.id_value("m"))  # exp overflows: infinite perplexity, not an OverflowError
    table.write(str(tmp_path))
    text = (tmp_path / "eval.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["models"][0]["id_perplexity"] is None
