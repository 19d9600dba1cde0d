"""Merges from and to s3:// through s3fs against a real S3-protocol server on loopback."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from modelstock.checkpoint.reader import open_checkpoint
from modelstock.output import MANIFEST_FILE
from modelstock.recipe import parse_recipe
from modelstock.testing.synthetic import LlamaShape, write_family
from pipeline.cli import main
from pipeline.driver import MergeRequest, run_merge

SHAPE = LlamaShape(hidden=32, intermediate=64, layers=2, vocab=128, heads=4, kv_heads=2)


def test_inspect_reads_headers_only_with_ranged_gets(s3, tmp_path: Path, capsys) -> None:
    write_family(tmp_path, SHAPE, finetunes=0, dtype=torch.float32)
    url = s3.upload(tmp_path / "base", "base")
    s3.server.clear()
    assert main(["inspect", url, "--storage-options", json.dumps(s3.options)]) == 0
    assert "model.layers.1.mlp.up_proj.weight" in capsys.readouterr().out
    gets = s3.server.gets(".safetensors")
    assert gets and all(r.range for r in gets), gets


def test_merge_s3_to_s3_inside_workers_with_ranged_reads_only(s3, tmp_path: Path, ray_local) -> None:
    base, tuned = write_family(tmp_path / "local", SHAPE, finetunes=2, dtype=torch.bfloat16, seed=5)
    base_url = s3.upload(Path(base), "inputs/base")
    tuned_urls = [s3.upload(Path(t), f"inputs/{Path(t).name}") for t in tuned]
    recipe = parse_recipe({
        "merge_method": "model_stock",
        "base_model": base_url,
        "models": [{"model": u} for u in tuned_urls],
    })
    local = run_merge(MergeRequest(
        recipe=parse_recipe({"merge_method": "model_stock", "base_model": base, "models": [{"model": t} for t in tuned]}),
        out_url=str(tmp_path / "local-out"), shard_size=20_000, progress=False,
    ))
    s3.server.clear()
    out_url = s3.url("merged")
    result = run_merge(
        MergeRequest(recipe=recipe, out_url=out_url, storage_options=s3.options, shard_size=20_000, progress=False)
    )
    assert len(result.shards) >= 3
    assert all(s.node_id for s in result.shards)

    # Every GET of an input safetensors object is a byte-range request, never the whole object.
    input_gets = [r for r in s3.server.gets(".safetensors") if "/inputs/" in r.path]
    assert input_gets and all(r.range and r.range.startswith("bytes=") for r in input_gets), input_gets
    # Bytes asked for ≈ the tensors needed plus the headers: nothing fetched twice.
    asked = sum(int(end) - int(start) + 1 for r in input_gets for start, end in [r.range[6:].split("-")])
    tensor_bytes = sum(open_checkpoint(u, s3.options).total_bytes for u in [base_url, *tuned_urls])
    assert tensor_bytes <= asked <= tensor_bytes + 3 * 64 * 1024

    # Identical to the same merge done on local files.
    manifest = json.loads(s3.fs.cat_file(f"{s3.name}/merged/{MANIFEST_FILE}"))
    assert [s["sha256"] for s in manifest["shards"]] == [s.sha256 for s in local.shards]
    for shard in manifest["shards"]:
        data = s3.fs.cat_file(f"{s3.name}/merged/{shard['file']}")
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    downloaded = tmp_path / "downloaded"
    s3.fs.get(f"{s3.name}/merged/", str(downloaded), recursive=True)
    merged = load_file(downloaded / result.shards[0].file)
    assert merged


def test_storage_options_per_url_prefix(s3, tmp_path: Path, ray_local, capsys) -> None:
    """One --storage-options document, options per URL prefix: the longest matching prefix wins over
    the document's global keys (here a dead endpoint that would fail every S3 call)."""
    from modelstock.storage import options_for

    base, tuned = write_family(tmp_path / "local", SHAPE, finetunes=2, dtype=torch.float32, seed=6)
    base_url = s3.upload(Path(base), "inputs/base")
    tuned_urls = [s3.upload(Path(t), f"inputs/{Path(t).name}") for t in tuned]
    document = {"endpoint_url": "http://127.0.0.1:9", f"s3://{s3.name}/": s3.options, "hf://": {"token": "unused"}}
    assert options_for(base_url, document)["endpoint_url"] == s3.options["endpoint_url"]
    assert options_for("hf://org/model", document) == {"endpoint_url": "http://127.0.0.1:9", "token": "unused"}
    assert options_for(str(tmp_path), {"anon": True}) == {"anon": True}  # a plain document: every URL
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"merge_method: model_stock\nbase_model: {base_url}\nmodels:\n"
                      + "".join(f"  - model: {u}\n" for u in tuned_urls))
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--quiet",
                 "--storage-options", json.dumps(document)]) == 0
    assert (tmp_path / "out" / MANIFEST_FILE).exists()
