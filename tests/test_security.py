"""Security: no pickle is ever loaded, credentials never leak, names never become paths."""

from __future__ import annotations

import builtins
import json
import logging
import pickle
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file, save_file

from modelstock.output import MANIFEST_FILE
from modelstock.testing.synthetic import LlamaShape, write_family
from pipeline.cli import main

SHAPE = LlamaShape(hidden=16, intermediate=32, layers=1, vocab=32, heads=2, kv_heads=1)
SECRET = "SENTINEL-secret-4d1f9c0b7e"
TOKEN = "SENTINEL-token-93be21aa05"


class Trap:
    """Unpickling this creates the marker file: proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def plant_traps(folder: Path, marker: Path) -> None:
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt"):
        (folder / name).write_bytes(pickle.dumps(Trap(marker)))


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    base, tuned = write_family(tmp_path_factory.mktemp("family"), SHAPE, finetunes=2, dtype=torch.float32, seed=4)
    return Path(base), [Path(t) for t in tuned]


def recipe_file(path: Path, base: object, tuned: list) -> Path:
    path.write_text(f"merge_method: model_stock\nbase_model: {base}\nmodels:\n" + "".join(f"  - model: {t}\n" for t in tuned))
    return path


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    for target, name in ((pickle, "load"), (pickle, "loads"), (torch, "load"), (pickle, "Unpickler")):
        monkeypatch.setattr(target, name, refuse)


def test_pickles_beside_safetensors_are_ignored_never_loaded(
    family, tmp_path: Path, ray_local, capsys, no_unpickling
) -> None:
    import shutil

    marker = tmp_path / "UNPICKLED"
    base, tuned = family
    copies = []
    for folder in [base, *tuned]:
        copy = tmp_path / folder.name
        shutil.copytree(folder, copy)
        plant_traps(copy, marker)
        copies.append(copy)
    out = tmp_path / "out"
    code = main(["merge", str(recipe_file(tmp_path / "r.yml", copies[0], copies[1:])), str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert not marker.exists()
    assert (out / MANIFEST_FILE).exists()
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt")]
    # Sanity: the trap works, so its absence above means something.
    import _pickle

    _pickle.loads(pickle.dumps(Trap(marker)))
    assert marker.exists()


def test_pickle_only_inputs_are_refused_without_unpickling(
    family, tmp_path: Path, ray_local, capsys, no_unpickling
) -> None:
    marker = tmp_path / "UNPICKLED"
    base, tuned = family
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    plant_traps(pickled, marker)
    # A pickle wearing a safetensors name, too.
    disguised = tmp_path / "disguised"
    disguised.mkdir()
    (disguised / "model.safetensors").write_bytes(pickle.dumps(Trap(marker)))
    for bad in (pickled, disguised):
        capsys.readouterr()
        code = main(["merge", str(recipe_file(tmp_path / "r.yml", base, [bad, tuned[0]])), str(tmp_path / "out"), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and str(bad) in err and len(err.splitlines()) == 1, err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


# -- credentials ------------------------------------------------------------------------------------


def secret_options(s3) -> dict:
    return {**s3.options, "secret": SECRET, "token": TOKEN}


def assert_no_secret(text: str, where: str) -> None:
    assert SECRET not in text, f"secret leaked in {where}"
    assert TOKEN not in text, f"session token leaked in {where}"


def ray_session_logs() -> str:
    node = ray._private.worker.global_worker.node
    logs = Path(node.get_logs_dir_path())
    return "\n".join(p.read_text(errors="replace") for p in logs.glob("*") if p.is_file() and p.stat().st_size < 20_000_000)


def test_credentials_never_appear_in_logs_errors_or_outputs(
    s3, family, tmp_path: Path, ray_local, capsys, caplog
) -> None:
    # Everything the CLI logs with --verbose: our loggers at DEBUG, third-party ones at INFO.
    for name in ("modelstock", "pipeline", "cluster"):
        caplog.set_level(logging.DEBUG, logger=name)
    caplog.handler.setLevel(logging.DEBUG)
    base, tuned = family
    base_url = s3.upload(base, "in/base")
    tuned_urls = [s3.upload(t, f"in/{t.name}") for t in tuned]
    options = json.dumps(secret_options(s3))

    code = main(["merge", str(recipe_file(tmp_path / "r.yml", base_url, tuned_urls)), s3.url("out"),
                 "--verbose", "--storage-options", options])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    written = s3.fs.find(f"{s3.name}/out")
    assert f"{s3.name}/out/{MANIFEST_FILE}" in written
    for key in written:
        assert_no_secret(s3.fs.cat_file(key).decode("utf-8", errors="replace"), key)

    # A failing merge prints an error: the credentials are not in it either.
    code = main(["merge", str(recipe_file(tmp_path / "r.yml", base_url, [*tuned_urls[:1], s3.url("in/gone")])),
                 s3.url("out2"), "--verbose", "--storage-options", options])
    failed = capsys.readouterr()
    assert code == 2 and "in/gone" in failed.err
    code = main(["inspect", s3.url("in/gone"), "--storage-options", options])
    inspected = capsys.readouterr()
    assert code == 2

    assert_no_secret(captured.out + captured.err + failed.out + failed.err + inspected.err, "CLI output")
    assert_no_secret(caplog.text, "logs (DEBUG, every logger)")
    assert_no_secret(ray_session_logs(), "Ray session logs")


# -- names are data, never paths ------------------------------------------------------------------


def test_index_pointing_outside_the_folder_is_refused(family, tmp_path: Path, ray_local, capsys) -> None:
    base, tuned = family
    outside = tmp_path / "evil.safetensors"
    save_file({"x": torch.zeros(2)}, outside)
    for target in ("../evil.safetensors", str(outside), "sub/../../evil.safetensors", "..\\evil.safetensors"):
        folder = tmp_path / "sharded"
        folder.mkdir(exist_ok=True)
        save_file({"x": torch.zeros(2)}, folder / "model-00001-of-00001.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": target}}))
        capsys.readouterr()
        code = main(["merge", str(recipe_file(tmp_path / "r.yml", base, [folder, tuned[0]])), str(tmp_path / "out"), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and "not a .safetensors file beside the index" in err, err


HOSTILE_NAMES = [
    "../x", "../../escape.weight", "/abs/path.weight", "a/../../b", "..\\win.weight", "sub/dir/w", ".modelstock/lock.json",
]


def test_tensor_names_with_path_characters_write_only_inside_out(tmp_path: Path, ray_local, capsys) -> None:
    models = []
    for index in range(3):
        folder = tmp_path / "inputs" / f"m{index}"
        folder.mkdir(parents=True)
        generator = torch.Generator().manual_seed(index)
        save_file({name: torch.randn(4, 4, generator=generator) for name in HOSTILE_NAMES}, folder / "model.safetensors")
        models.append(folder)
    out = tmp_path / "deep" / "out"
    recipe = recipe_file(tmp_path / "r.yml", models[0], models[1:])
    before = set(tmp_path.rglob("*"))
    code = main(["merge", str(recipe), str(out), "--quiet", "--shard-size", "100"])
    assert code == 0, capsys.readouterr().err
    created = set(tmp_path.rglob("*")) - before
    assert created and all(p == out.parent or p == out or out in p.parents for p in created), sorted(created)
    assert not (Path("/abs") / "path.weight").exists()
    merged = {}
    for shard in out.glob("model-*.safetensors"):
        merged.update(load_file(shard))
    assert set(merged) == set(HOSTILE_NAMES)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(HOSTILE_NAMES)
    assert all(f.startswith("model-") and "/" not in f for f in index["weight_map"].values())
