"""A corpus of malformed or inconsistent inputs, each run through the real CLI in-process.

Every case is generated here from a small pristine family (base + 2 fine-tunes, safetensors,
one of them also sharded with an index): a file is truncated, a header rewritten, an index
edited, a recipe broken, ... Each must end the same way: exit code 2, exactly one line on
stderr naming the file (and the tensor where one is involved) and what is wrong, no
traceback, no warnings logged, and nothing left at the output location (absent, or exactly
what was there before).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelstock.testing.synthetic import LlamaShape, write_family, write_model
from pipeline.cli import main

SHAPE = LlamaShape(hidden=16, intermediate=32, layers=1, vocab=32, heads=2, kv_heads=1)
T = "model.layers.0.self_attn.q_proj.weight"  # the tensor most cases tamper with
FIRST = "lm_head.weight"  # first tensor in merge (natural) order
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Pristine:
    root: Path
    base: Path
    tuned: list[Path]
    sharded: Path  # finetune-1 again, as an index + 3 shards


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    root = tmp_path_factory.mktemp("pristine")
    base, tuned = write_family(root, SHAPE, finetunes=2, dtype=torch.float32, seed=11)
    sharded = root / "finetune-1-sharded"
    write_model(str(sharded), SHAPE, torch.float32, seed=11, variant=1, shard_size=5_000)
    assert (sharded / "model.safetensors.index.json").exists()
    return Pristine(root, Path(base), [Path(t) for t in tuned], sharded)


# ----------------------------------------------------------------------------------------------
# Building blocks for the cases
# ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    recipe: Path
    out: str
    expect: tuple[str, ...]  # substrings the one stderr line must contain
    extra: list[str] = field(default_factory=list)
    out_before: list[str] | None = None  # set by the runner when the output pre-exists


class Workspace:
    """A per-case folder: copies of the pristine models to tamper with, and a recipe."""

    def __init__(self, root: Path, pristine: Pristine) -> None:
        self.root = root
        self.pristine = pristine
        self.inputs = root / "inputs"
        self.inputs.mkdir()
        self.base = self.copy(pristine.base, "base")
        self.tuned = [self.copy(t, t.name) for t in pristine.tuned]
        self.out = root / "out"
        self.current = self.recipe()

    def copy(self, source: Path, name: str) -> Path:
        target = self.inputs / name
        shutil.copytree(source, target)
        return target

    def recipe(self, text: str | None = None, *, base: Path | str | None = None,
               models: list[Path | str] | None = None, extra: str = "") -> Path:
        if text is None:
            base = self.base if base is None else base
            models = self.tuned if models is None else models
            text = (
                f"merge_method: model_stock\nbase_model: {base}\nmodels:\n"
                + "".join(f"  - model: {m}\n" for m in models)
                + extra
            )
        path = self.root / "recipe.yml"
        path.write_text(text)
        self.current = path
        return path

    def case(self, *expect: str, recipe: Path | None = None, out: str | None = None, extra=()) -> Case:
        return Case(recipe or self.current, out or str(self.out), tuple(expect), list(extra))


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_safetensors(path: Path, header: dict | bytes, data: bytes) -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


def edit_header(path: Path, edit: Callable[[dict], None]) -> None:
    header, data = read_safetensors(path)
    edit(header)
    write_safetensors(path, header, data)


def first_float(path: Path, tensor: str, value: float) -> None:
    """Overwrite the first element of an F32 tensor in place."""
    header, data = read_safetensors(path)
    begin = header[tensor]["data_offsets"][0]
    patched = data[:begin] + struct.pack("<f", value) + data[begin + 4 :]
    write_safetensors(path, header, patched)


def resave(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def shift(header: dict, name: str, by: int) -> None:
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + by, end + by]


def last_tensor(header: dict) -> str:
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])


# ----------------------------------------------------------------------------------------------
# The corpus: name -> builder(Workspace) -> Case
# ----------------------------------------------------------------------------------------------

ST = "model.safetensors"


def _file(w: Workspace) -> Path:
    return w.tuned[0] / ST


def truncated_data(w: Workspace) -> Case:
    raw = _file(w).read_bytes()
    _file(w).write_bytes(raw[:-6])
    return w.case(str(_file(w)), "truncated")


def truncated_to_prefix(w: Workspace) -> Case:
    _file(w).write_bytes(_file(w).read_bytes()[:5])
    return w.case(str(_file(w)), "too short")


def empty_safetensors_file(w: Workspace) -> Case:
    _file(w).write_bytes(b"")
    return w.case(str(_file(w)), "too short")


def header_length_beyond_file(w: Workspace) -> Case:
    raw = _file(w).read_bytes()
    _file(w).write_bytes((len(raw) + 100).to_bytes(8, "little") + raw[8:])
    return w.case(str(_file(w)), "runs past the end")


def header_over_limit(w: Workspace) -> Case:
    raw = _file(w).read_bytes()
    _file(w).write_bytes((2**40).to_bytes(8, "little") + raw[8:])
    return w.case(str(_file(w)), "exceeds the safetensors limit")


def header_invalid_json(w: Workspace) -> Case:
    _, data = read_safetensors(_file(w))
    write_safetensors(_file(w), b'{"a": {"dtype": "F32",, }', data)
    return w.case(str(_file(w)), "not valid JSON")


def header_not_utf8(w: Workspace) -> Case:
    header, data = read_safetensors(_file(w))
    text = json.dumps(header).encode().replace(T.encode(), T.encode()[:-2] + b"\xff\xfe")
    write_safetensors(_file(w), text, data)
    return w.case(str(_file(w)), "UTF-8")


def header_not_an_object(w: Workspace) -> Case:
    _, data = read_safetensors(_file(w))
    write_safetensors(_file(w), b"[1, 2, 3]", data)
    return w.case(str(_file(w)), "JSON object")


def header_huge_integer(w: Workspace) -> Case:
    header, data = read_safetensors(_file(w))
    text = json.dumps(header).replace(f'"{T}": {{"dtype": "F32", "shape": [16',
                                      f'"{T}": {{"dtype": "F32", "shape": [{"9" * 5000}')
    assert "9" * 5000 in text
    write_safetensors(_file(w), text.encode(), data)
    return w.case(str(_file(w)))


def duplicate_names(w: Workspace) -> Case:
    header, data = read_safetensors(_file(w))
    items = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in header.items()]
    items.append(f"{json.dumps(T)}: {json.dumps(header[T])}")
    write_safetensors(_file(w), ("{" + ", ".join(items) + "}").encode(), data)
    return w.case(str(_file(w)), repr(T), "twice")


def overlapping_offsets(w: Workspace) -> Case:
    edit_header(_file(w), lambda h: shift(h, T, -4))
    return w.case(str(_file(w)), repr(T), "overlaps")


def non_contiguous_offsets(w: Workspace) -> Case:
    edit_header(_file(w), lambda h: shift(h, T, +4))
    return w.case(str(_file(w)), repr(T), "gap")


def offsets_out_of_range(w: Workspace) -> Case:
    def edit(h: dict) -> None:
        last = last_tensor(h)
        begin, end = h[last]["data_offsets"]
        h[last]["shape"][0] += 4  # a bigger tensor whose bytes run past the end of the file
        h[last]["data_offsets"] = [begin, end + (end - begin) * 4 // (h[last]["shape"][0] - 4)]

    edit_header(_file(w), edit)
    return w.case(str(_file(w)), "truncated")


def negative_offset(w: Workspace) -> Case:
    edit_header(_file(w), lambda h: h[T].update(data_offsets=[-4, h[T]["data_offsets"][1]]))
    return w.case(str(_file(w)), repr(T), "data_offsets")


def offsets_reversed(w: Workspace) -> Case:
    edit_header(_file(w), lambda h: h[T].update(data_offsets=h[T]["data_offsets"][::-1]))
    return w.case(str(_file(w)), repr(T), "after end")


def unknown_dtype(w: Workspace) -> Case:
    edit_header(_file(w), lambda h: h[T].update(dtype="F33"))
    return w.case(str(_file(w)), repr(T), "unknown dtype")


def shape_times_dtype_mismatch(w: Workspace) -> Case:
    edit_header(_file(w), lambda h: h[T].update(shape=[16, 15]))
    return w.case(str(_file(w)), repr(T), "needs 960 bytes")


def shape_not_integers(w: Workspace) -> Case:
    edit_header(_file(w), lambda h: h[T].update(shape=[16, "16"]))
    return w.case(str(_file(w)), repr(T), "shape")


def unknown_header_field(w: Workspace) -> Case:
    edit_header(_file(w), lambda h: h[T].update(offsets=[0, 1]))
    return w.case(str(_file(w)), repr(T), "unknown header fields")


def metadata_not_strings(w: Workspace) -> Case:
    edit_header(_file(w), lambda h: h.update(__metadata__={"format": 1}))
    return w.case(str(_file(w)), "__metadata__")


def pickle_named_safetensors(w: Workspace) -> Case:
    torch.save({"w": torch.zeros(3)}, _file(w))  # a zip/pickle wearing a .safetensors name
    return w.case(str(_file(w)))


def _sharded(w: Workspace) -> tuple[Path, dict]:
    folder = w.copy(w.pristine.sharded, "finetune-1-sharded")
    w.recipe(models=[folder, w.tuned[1]])
    return folder, json.loads((folder / "model.safetensors.index.json").read_text())


def _write_index(folder: Path, index: dict) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def index_names_missing_shard(w: Workspace) -> Case:
    folder, index = _sharded(w)
    index["weight_map"][T] = "model-00009-of-00009.safetensors"
    _write_index(folder, index)
    return w.case(str(folder / "model-00009-of-00009.safetensors"), "missing")


def shard_missing(w: Workspace) -> Case:
    folder, index = _sharded(w)
    victim = sorted(set(index["weight_map"].values()))[1]
    (folder / victim).unlink()
    return w.case(str(folder / victim), "missing")


def index_names_tensor_missing_from_shard(w: Workspace) -> Case:
    folder, index = _sharded(w)
    shard = index["weight_map"][T]
    index["weight_map"]["model.layers.0.ghost.weight"] = shard
    _write_index(folder, index)
    return w.case(str(folder / shard), "'model.layers.0.ghost.weight'", "not in this shard")


def index_maps_tensor_to_wrong_shard(w: Workspace) -> Case:
    folder, index = _sharded(w)
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][T] = next(s for s in shards if s != index["weight_map"][T])
    _write_index(folder, index)
    return w.case(str(folder), repr(T), "not mapped to this shard")


def index_invalid_json(w: Workspace) -> Case:
    folder, _ = _sharded(w)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {')
    return w.case(str(folder / "model.safetensors.index.json"), "not valid JSON")


def index_without_weight_map(w: Workspace) -> Case:
    folder, _ = _sharded(w)
    _write_index(folder, {"metadata": {}})
    return w.case(str(folder / "model.safetensors.index.json"), "weight_map")


def index_points_to_pickle(w: Workspace) -> Case:
    folder, index = _sharded(w)
    index["weight_map"][T] = "pytorch_model.bin"
    _write_index(folder, index)
    return w.case(str(folder / "model.safetensors.index.json"), repr(T), "pytorch_model.bin")


def index_points_outside_folder(w: Workspace) -> Case:
    folder, index = _sharded(w)
    index["weight_map"][T] = "../base/model.safetensors"
    _write_index(folder, index)
    return w.case(str(folder / "model.safetensors.index.json"), repr(T), "../base/model.safetensors")


def tensor_missing_in_one_model(w: Workspace) -> Case:
    resave(_file(w), lambda t: t.pop(T))
    return w.case(str(w.tuned[0]), repr(T), "missing")


def shape_mismatch(w: Workspace) -> Case:
    resave(_file(w), lambda t: t.update({T: t[T].reshape(8, 32).contiguous()}))
    return w.case(str(_file(w)), repr(T), "shape [8, 32]")


def integer_tensor_where_base_is_float(w: Workspace) -> Case:
    """Mixed floating-point dtypes merge (cast, as mergekit); an integer tensor cannot."""
    resave(_file(w), lambda t: t.update({T: t[T].to(torch.int32)}))
    return w.case(str(_file(w)), repr(T), "I32")


def nan_weights(w: Workspace) -> Case:
    first_float(_file(w), T, math.nan)
    return w.case(str(_file(w)), repr(T), "NaN or Inf", extra=["--shard-size", "1000", "--workers", "2"])


def inf_weights_in_base(w: Workspace) -> Case:
    first_float(w.base / ST, FIRST, math.inf)
    return w.case(str(w.base / ST), repr(FIRST), "NaN or Inf", extra=["--shard-size", "1000", "--workers", "2"])


def nan_in_copied_tensor(w: Workspace) -> Case:
    first_float(w.base / ST, "model.norm.weight", -math.inf)
    recipe = w.recipe(extra="exclude: ['model.norm.*']\n")
    return w.case(str(w.base / ST), "'model.norm.weight'", "NaN or Inf", recipe=recipe)


def zero_element_tensor(w: Workspace) -> Case:
    for folder in [w.base, *w.tuned]:
        resave(folder / ST, lambda t: t.update({"model.empty.weight": torch.zeros(0, 16)}))
    return w.case(str(w.base / ST), "'model.empty.weight'", "zero elements")


def only_pickle_bin(w: Workspace) -> Case:
    folder = w.inputs / "pickled"
    folder.mkdir()
    torch.save({T: torch.zeros(2)}, folder / "pytorch_model.bin")
    (folder / "config.json").write_text("{}")
    return w.case(str(folder), "pickle", "pytorch_model.bin", recipe=w.recipe(models=[folder, w.tuned[1]]))


def only_pt_file(w: Workspace) -> Case:
    folder = w.inputs / "pt"
    folder.mkdir()
    torch.save({T: torch.zeros(2)}, folder / "model.pt")
    return w.case(str(folder), "pickle", "model.pt", recipe=w.recipe(base=folder))


def empty_folder(w: Workspace) -> Case:
    folder = w.inputs / "empty"
    folder.mkdir()
    return w.case(str(folder), "empty or missing", recipe=w.recipe(models=[folder, w.tuned[1]]))


def missing_local_folder(w: Workspace) -> Case:
    folder = w.inputs / "no-such-model"
    return w.case(str(folder), "missing", recipe=w.recipe(models=[w.tuned[0], folder]))


def folder_without_weights(w: Workspace) -> Case:
    (w.tuned[0] / ST).rename(w.tuned[0] / "weights.npz")
    return w.case(str(w.tuned[0]), "weights.npz")


def base_config_not_json(w: Workspace) -> Case:
    (w.base / "config.json").write_text("{ not json")
    return w.case(str(w.base / "config.json"), "not valid JSON")


def recipe_bad_yaml(w: Workspace) -> Case:
    recipe = w.recipe("merge_method: model_stock\nmodels: [\n  - model: x\n")
    return w.case(str(recipe), "invalid YAML", recipe=recipe)


def recipe_missing_file(w: Workspace) -> Case:
    recipe = w.root / "no-such-recipe.yml"
    return w.case(str(recipe), "not found", recipe=recipe)


def recipe_not_a_mapping(w: Workspace) -> Case:
    recipe = w.recipe("- merge_method: model_stock\n")
    return w.case(str(recipe), "mapping", recipe=recipe)


def recipe_unknown_method(w: Workspace) -> Case:
    recipe = w.recipe(w.recipe().read_text().replace("model_stock", "model_soup_deluxe"))
    return w.case(str(recipe), "model_soup_deluxe", recipe=recipe)


def recipe_unknown_key(w: Workspace) -> Case:
    recipe = w.recipe(extra="shard_everything: true\n")
    return w.case(str(recipe), "shard_everything", "unknown key", recipe=recipe)


def recipe_parameter_wrong_type(w: Workspace) -> Case:
    recipe = w.recipe(extra="parameters:\n  filter_wise: 'yes please'\n")
    return w.case(str(recipe), "filter_wise", recipe=recipe)


def recipe_unknown_parameter(w: Workspace) -> Case:
    recipe = w.recipe(extra="parameters:\n  densty: 0.5\n")
    return w.case(str(recipe), "densty", recipe=recipe)


def recipe_unknown_dtype(w: Workspace) -> Case:
    recipe = w.recipe(extra="dtype: float13\n")
    return w.case(str(recipe), "float13", recipe=recipe)


def recipe_one_finetune(w: Workspace) -> Case:
    recipe = w.recipe(models=[w.tuned[0]])
    return w.case(str(recipe), "at least 2", recipe=recipe)


def recipe_base_among_finetunes(w: Workspace) -> Case:
    recipe = w.recipe(models=[w.base, w.tuned[0], w.tuned[1]])
    return w.case(str(recipe), str(w.base), "also listed", recipe=recipe)


def recipe_model_twice(w: Workspace) -> Case:
    recipe = w.recipe(models=[w.tuned[0], f"{w.tuned[0]}/"])
    return w.case(str(recipe), str(w.tuned[0]), "twice", recipe=recipe)


def recipe_no_base_for_model_stock(w: Workspace) -> Case:
    recipe = w.recipe("merge_method: model_stock\nmodels:\n" + "".join(f"  - model: {m}\n" for m in w.tuned))
    return w.case(str(recipe), "base_model", recipe=recipe)


def output_equals_input(w: Workspace) -> Case:
    return w.case(str(w.tuned[0]), "overlaps", out=str(w.tuned[0]))


def output_inside_input(w: Workspace) -> Case:
    return w.case("overlaps", str(w.base), out=str(w.base / "merged"))


def input_inside_output(w: Workspace) -> Case:
    return w.case("overlaps", str(w.inputs), out=str(w.inputs))


def output_not_empty(w: Workspace) -> Case:
    w.out.mkdir()
    (w.out / "notes.txt").write_text("mine")
    return w.case(str(w.out), "not empty", "--overwrite")


def storage_options_not_json(w: Workspace) -> Case:
    return w.case("--storage-options", "not valid JSON", extra=["--storage-options", "{key: 1"])


def storage_options_not_object(w: Workspace) -> Case:
    return w.case("--storage-options", "JSON object", extra=["--storage-options", "[1, 2]"])


def shard_size_not_a_size(w: Workspace) -> Case:
    return w.case("--shard-size", "lots", extra=["--shard-size", "lots"])


def workers_not_a_number(w: Workspace) -> Case:
    return w.case("--workers", "two", extra=["--workers", "two"])


CORPUS: dict[str, Callable[[Workspace], Case]] = {
    fn.__name__: fn
    for fn in [
        truncated_data, truncated_to_prefix, empty_safetensors_file, header_length_beyond_file,
        header_over_limit, header_invalid_json, header_not_utf8, header_not_an_object, header_huge_integer,
        duplicate_names, overlapping_offsets, non_contiguous_offsets, offsets_out_of_range, negative_offset,
        offsets_reversed, unknown_dtype, shape_times_dtype_mismatch, shape_not_integers, unknown_header_field,
        metadata_not_strings, pickle_named_safetensors,
        index_names_missing_shard, shard_missing, index_names_tensor_missing_from_shard,
        index_maps_tensor_to_wrong_shard, index_invalid_json, index_without_weight_map, index_points_to_pickle,
        index_points_outside_folder,
        tensor_missing_in_one_model, shape_mismatch, integer_tensor_where_base_is_float,
        nan_weights, inf_weights_in_base, nan_in_copied_tensor, zero_element_tensor,
        only_pickle_bin, only_pt_file, empty_folder, missing_local_folder, folder_without_weights,
        base_config_not_json,
        recipe_bad_yaml, recipe_missing_file, recipe_not_a_mapping, recipe_unknown_method, recipe_unknown_key,
        recipe_parameter_wrong_type, recipe_unknown_parameter, recipe_unknown_dtype, recipe_one_finetune,
        recipe_base_among_finetunes, recipe_model_twice, recipe_no_base_for_model_stock,
        output_equals_input, output_inside_input, input_inside_output, output_not_empty,
        storage_options_not_json, storage_options_not_object, shard_size_not_a_size, workers_not_a_number,
    ]
}
# Cases run with an empty output folder already in place (the rest: no output folder).
PRE_EXISTING_OUTPUT = {"nan_weights", "truncated_data", "recipe_unknown_key", "base_config_not_json"}


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    return code, err.splitlines()


def assert_one_error_line(lines: list[str], expect: tuple[str, ...]) -> str:
    assert len(lines) == 1, "stderr:\n" + "\n".join(lines)
    line = lines[0]
    assert line.startswith("modelstock: error: "), line
    assert "Traceback" not in line
    for fragment in expect:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_bad_input_exits_2_with_one_line_and_leaves_no_output(
    name: str, pristine: Pristine, tmp_path: Path, ray_local, capsys, caplog
) -> None:
    workspace = Workspace(tmp_path, pristine)
    case = CORPUS[name](workspace)
    out = Path(case.out)
    if name in PRE_EXISTING_OUTPUT:
        out.mkdir()
    before = listing(out)
    inputs_before = {p: p.read_bytes() for p in workspace.inputs.rglob("*") if p.is_file()}
    caplog.set_level(logging.WARNING)

    code, lines = run_cli(["merge", str(case.recipe), case.out, "--quiet", *case.extra], capsys)

    assert code == 2, "\n".join(lines)
    assert_one_error_line(lines, case.expect)
    # --quiet prints warnings: there must be none besides the error line.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    # Nothing left behind: the output is absent or exactly as before (empty, or the user's files).
    assert not out.exists() or listing(out) == before, listing(out)
    # The inputs are never touched.
    assert {p: p.read_bytes() for p in workspace.inputs.rglob("*") if p.is_file()} == inputs_before


def test_corpus_size() -> None:
    assert len(CORPUS) >= 30


def test_nan_found_mid_merge_leaves_nothing_even_with_shards_in_flight(
    pristine: Pristine, tmp_path: Path, ray_local, capsys
) -> None:
    """NaN in the last tensor of the merge order: other shards are written (or in flight) when the
    worker finds it; the driver must wait for them and remove everything."""
    workspace = Workspace(tmp_path, pristine)
    last = "model.norm.weight"
    first_float(workspace.tuned[1] / ST, last, math.nan)
    code, lines = run_cli(
        ["merge", str(workspace.recipe()), str(workspace.out), "--quiet", "--shard-size", "600", "--workers", "2"],
        capsys,
    )
    assert code == 2
    assert_one_error_line(lines, (str(workspace.tuned[1] / ST), repr(last), "NaN or Inf"))
    import time

    time.sleep(1.0)  # a straggling worker would write within this window
    assert not workspace.out.exists(), listing(workspace.out)


# ----------------------------------------------------------------------------------------------
# Object storage: 403, missing bucket, missing object
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def s3_family(s3, pristine: Pristine) -> tuple[object, str, list[str]]:
    base = s3.upload(pristine.base, "inputs/base")
    tuned = [s3.upload(t, f"inputs/{t.name}") for t in pristine.tuned]
    return s3, base, tuned


def s3_recipe(tmp_path: Path, base: str, tuned: list[str]) -> Path:
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"merge_method: model_stock\nbase_model: {base}\nmodels:\n" + "".join(f"  - model: {t}\n" for t in tuned))
    return recipe


def s3_listing(s3, prefix: str) -> list[str]:
    return sorted(s3.fs.find(f"{s3.name}/{prefix}"))


def test_s3_access_denied(s3_family, tmp_path: Path, ray_local, capsys, monkeypatch) -> None:
    """moto checks credentials once INITIAL_NO_AUTH_ACTION_COUNT requests have been served: with
    the count at 0 every request with unknown credentials is answered 403."""
    import moto.settings
    from moto.core.authorization import ActionAuthenticatorMixin

    s3, base, tuned = s3_family
    recipe = s3_recipe(tmp_path, base, tuned)
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setattr(ActionAuthenticatorMixin, "request_count", 0)
    code, lines = run_cli(
        ["merge", str(recipe), s3.url("out"), "--quiet", "--storage-options", json.dumps(s3.options)], capsys
    )
    monkeypatch.undo()
    assert code == 2
    line = assert_one_error_line(lines, ("access denied",))
    assert s3.url("inputs") in line
    assert s3_listing(s3, "out") == []


def test_s3_bucket_does_not_exist(s3_family, tmp_path: Path, ray_local, capsys) -> None:
    s3, base, tuned = s3_family
    missing = "s3://no-such-bucket-7f3a/base"
    recipe = s3_recipe(tmp_path, missing, tuned)
    code, lines = run_cli(
        ["merge", str(recipe), s3.url("out"), "--quiet", "--storage-options", json.dumps(s3.options)], capsys
    )
    assert code == 2
    assert_one_error_line(lines, (missing, "missing"))
    assert s3_listing(s3, "out") == []


def test_s3_object_missing_from_index(s3_family, pristine: Pristine, tmp_path: Path, ray_local, capsys) -> None:
    s3, base, tuned = s3_family
    sharded = s3.upload(pristine.sharded, "inputs/sharded")
    index = json.loads(s3.fs.cat_file(f"{s3.name}/inputs/sharded/model.safetensors.index.json"))
    victim = sorted(set(index["weight_map"].values()))[0]
    s3.fs.rm_file(f"{s3.name}/inputs/sharded/{victim}")
    recipe = s3_recipe(tmp_path, base, [sharded, tuned[1]])
    code, lines = run_cli(
        ["merge", str(recipe), s3.url("out"), "--quiet", "--storage-options", json.dumps(s3.options)], capsys
    )
    assert code == 2
    assert_one_error_line(lines, (f"{sharded}/{victim}", "missing"))
    assert s3_listing(s3, "out") == []


def test_one_line_in_a_real_process(pristine: Pristine, tmp_path: Path) -> None:
    """Outside pytest's log capture: the real console script prints exactly one line."""
    workspace = Workspace(tmp_path, pristine)
    recipe = workspace.recipe(extra="unknown_thing: 1\n")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "merge", str(recipe), str(workspace.out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [done.stderr.strip()], done.stderr
    assert "unknown_thing" in done.stderr and str(recipe) in done.stderr
    assert not workspace.out.exists()
