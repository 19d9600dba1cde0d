"""Evaluation: Parquet shards, projections (class subset / mapping), builders, and the Ray evaluator
against plain single-process evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from modelstock.errors import IncompatibleModels, InvalidCheckpoint, InvalidRecipe
from modelstock.evaluation.builders import BUILDER_KEY, ReferenceCNN, build_model
from modelstock.evaluation.datasets import (
    DatasetSpec,
    EvalSuite,
    load_suite,
    plan_dataset_shards,
    read_shard,
    write_pixels_parquet,
)
from modelstock.evaluation.metrics import ood_mean, predict, top1_correct
from modelstock.evaluation.scoring import ModelSource
from pipeline.cli import main
from pipeline.evaluate import RayEvaluator, evaluate_models


def save_cnn(folder: Path, model: torch.nn.Module, width: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({BUILDER_KEY: "reference-cnn", "width": width, "num_classes": 10}))
    return str(folder)


def random_images(n: int, seed: int, channels: int = 1, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, channels, size, size, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    return images, labels


def plain_correct(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  subset: list[int] | None = None, mapping: dict[int, int] | None = None) -> int:
    """An independent single-process evaluation: one forward pass over everything, argmax by hand."""
    with torch.no_grad():
        logits = model.eval()(images)
    if mapping is not None:
        keys = sorted(mapping)
        predictions = [mapping[keys[i]] for i in logits[:, keys].argmax(1).tolist()]
    elif subset is not None:
        masked = torch.full_like(logits, float("-inf"))
        masked[:, subset] = logits[:, subset]
        predictions = masked.argmax(1).tolist()
    else:
        predictions = logits.argmax(1).tolist()
    return sum(int(predicted == label) for predicted, label in zip(predictions, labels.tolist()))


# --- metrics ---------------------------------------------------------------------------------

def test_class_subset_masks_logits_outside_the_subset() -> None:
    logits = torch.tensor([[9.0, 1.0, 2.0, 0.0], [0.0, 5.0, 1.0, 7.0]])
    # Unmasked: predictions 0 and 3. Restricted to {1, 2}: 2 and 1 (still in model class ids).
    assert predict(logits).tolist() == [0, 3]
    assert predict(logits, class_subset=[2, 1]).tolist() == [2, 1]
    assert top1_correct(logits, torch.tensor([2, 1]), class_subset=[1, 2]) == 2
    assert top1_correct(logits, torch.tensor([2, 1])) == 0


def test_class_mapping_translates_model_classes_to_dataset_labels() -> None:
    # ObjectNet-style: model classes 0..5; dataset label 0 <- model {1, 4}, label 1 <- model {2}.
    mapping = {1: 0, 4: 0, 2: 1}
    logits = torch.tensor([
        [9.0, 1.0, 0.5, 0.0, 3.0, 0.0],   # best mapped: 4 -> label 0
        [0.0, 1.0, 2.0, 9.0, 0.0, 0.0],   # best mapped: 2 -> label 1 (3 is unmapped)
        [0.0, 2.0, 1.0, 0.0, 0.0, 9.0],   # best mapped: 1 -> label 0
    ])
    assert predict(logits, class_mapping=mapping).tolist() == [0, 1, 0]
    assert top1_correct(logits, torch.tensor([0, 1, 1]), class_mapping=mapping) == 2
    with pytest.raises(ValueError):
        predict(logits, class_subset=[1], class_mapping=mapping)


def test_ood_mean_is_the_unweighted_mean() -> None:
    assert ood_mean({"a": 0.5, "b": 0.25, "id": 1.0}, ["a", "b"]) == pytest.approx(0.375)
    assert ood_mean({"id": 1.0}, []) is None


# --- datasets and suites ---------------------------------------------------------------------

def test_shards_follow_row_groups_and_cover_every_row(tmp_path: Path) -> None:
    images, labels = random_images(250, seed=0)
    write_pixels_parquet(str(tmp_path / "d" / "a.parquet"), images[:130], labels[:130], rows_per_group=20)
    write_pixels_parquet(str(tmp_path / "d" / "b.parquet"), images[130:], labels[130:], rows_per_group=50)
    spec = DatasetSpec(name="d", url=str(tmp_path / "d"))
    shards = plan_dataset_shards(spec, rows_per_shard=40)
    assert [s.rows for s in shards] == [40, 40, 40, 10, 50, 50, 20]
    assert [s.index for s in shards] == list(range(7))
    read = [read_shard(s) for s in shards]
    assert torch.equal(torch.cat([r.inputs for r in read]), images)
    assert torch.equal(torch.cat([r.labels for r in read]), labels)


def test_suite_yaml_with_subset_and_mapping(tmp_path: Path) -> None:
    path = tmp_path / "suite.yml"
    path.write_text(
        "id: {name: in, url: s3://b/in}\n"
        "ood:\n"
        "  - {name: r200, url: s3://b/r, class_subset: [1, 3, 5]}\n"
        "  - {name: objectnet, url: s3://b/o, class_mapping: {409: 0, 530: 1}}\n"
        "batch_size: 16\n"
    )
    suite = load_suite(path)
    assert suite.ood[0].class_subset == (1, 3, 5)
    assert suite.ood[1].class_mapping == {409: 0, 530: 1}
    assert suite.ood_names == ["r200", "objectnet"] and suite.selection_set.name == "in"
    path.write_text("id: {name: in, url: x}\nood: [{name: o, url: y, class_subset: [1], class_mapping: {1: 0}}]\n")
    with pytest.raises(InvalidRecipe, match="not both"):
        load_suite(path)
    path.write_text("id: {name: in, url: x}\nood: [{name: in, url: y}]\n")
    with pytest.raises(InvalidRecipe, match="used twice"):
        load_suite(path)


def test_parquet_metadata_carries_subset_and_mapping(tmp_path: Path) -> None:
    images, labels = random_images(10, seed=1)
    write_pixels_parquet(str(tmp_path / "s.parquet"), images, labels, class_subset=(1, 2))
    write_pixels_parquet(str(tmp_path / "m.parquet"), images, labels, class_mapping={3: 0})
    (subset_shard,) = plan_dataset_shards(DatasetSpec(name="s", url=str(tmp_path / "s.parquet")), 100)
    (mapping_shard,) = plan_dataset_shards(DatasetSpec(name="m", url=str(tmp_path / "m.parquet")), 100)
    assert read_shard(subset_shard).class_subset == (1, 2)
    assert read_shard(mapping_shard).class_mapping == {3: 0}
    assert json.loads(pq.read_schema(tmp_path / "s.parquet").metadata[b"modelstock.shape"]) == [1, 8, 8]


# --- builders --------------------------------------------------------------------------------

def test_builder_loads_reference_weights_through_the_reader(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ReferenceCNN(width=4)
    url = save_cnn(tmp_path / "cnn", model, width=4)
    built = build_model(url)
    images, _ = random_images(5, seed=2)
    assert torch.equal(built(images), model.eval()(images))
    (tmp_path / "cnn" / "config.json").write_text(json.dumps({BUILDER_KEY: "reference-cnn", "width": 8}))
    with pytest.raises(IncompatibleModels, match="shape"):
        build_model(url)
    (tmp_path / "cnn" / "config.json").write_text(json.dumps({BUILDER_KEY: "no-such-builder"}))
    with pytest.raises(InvalidCheckpoint, match="no model builder"):
        build_model(url)


def tiny_clip_config():
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16},
        vision_config={"image_size": 8, "patch_size": 4, "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "num_channels": 3},
        projection_dim=16,
        num_labels=5,
    )


def test_clip_vision_tower_with_linear_head_builds_from_config(tmp_path: Path) -> None:
    from transformers import CLIPForImageClassification

    torch.manual_seed(0)
    reference = CLIPForImageClassification(tiny_clip_config()).eval()
    reference.save_pretrained(tmp_path / "clip")
    assert (tmp_path / "clip" / "model.safetensors").exists()
    built = build_model(str(tmp_path / "clip"))
    pixels = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(built(pixels), reference(pixel_values=pixels).logits, atol=1e-6)
        assert built(pixels).shape == (4, 5)


# --- the Ray evaluator -----------------------------------------------------------------------

@pytest.fixture
def cnn_and_data(tmp_path: Path) -> tuple[str, torch.nn.Module, EvalSuite, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(3)
    model = ReferenceCNN(width=4)
    url = save_cnn(tmp_path / "cnn", model, width=4)
    data = {name: random_images(n, seed=i) for i, (name, n) in enumerate([("id", 230), ("sub", 120), ("map", 90)])}
    for name, (images, labels) in data.items():
        write_pixels_parquet(str(tmp_path / name / "part-0.parquet"), images, labels, rows_per_group=25)
    suite = EvalSuite(
        id=DatasetSpec(name="id", url=str(tmp_path / "id")),
        ood=[
            DatasetSpec(name="sub", url=str(tmp_path / "sub"), class_subset=(0, 3, 7)),
            DatasetSpec(name="map", url=str(tmp_path / "map"), class_mapping={1: 0, 2: 0, 5: 7, 9: 3}),
        ],
        batch_size=16,
        rows_per_shard=50,
    )
    return url, model, suite, data


def test_parallel_evaluation_equals_single_process(cnn_and_data, tmp_path: Path, ray_local) -> None:
    url, model, suite, data = cnn_and_data
    with RayEvaluator(workers=2, batch_size=suite.batch_size, progress=False) as evaluator:
        shards = evaluator.shards(suite.datasets, suite.rows_per_shard)
        assert len(shards) == 5 + 3 + 2
        scores = evaluator.score([ModelSource("cnn", (url,))], shards)
        assert evaluator.workers == 2
        table = evaluator.evaluate([ModelSource("cnn", (url,))], suite)
    assert sorted((s.dataset, s.shard) for s in scores) == sorted((s.dataset.name, s.index) for s in shards)
    expected = {
        "id": plain_correct(model, *data["id"]),
        "sub": plain_correct(model, *data["sub"], subset=[0, 3, 7]),
        "map": plain_correct(model, *data["map"], mapping={1: 0, 2: 0, 5: 7, 9: 3}),
    }
    for row in table.rows:
        assert (row.correct, row.total) == (expected[row.dataset], len(data[row.dataset][1])), row
    assert table.ood_mean("cnn") == pytest.approx((expected["sub"] / 120 + expected["map"] / 90) / 2)
    assert expected["sub"] != plain_correct(model, *data["sub"])  # the mask matters on this data
    written = table.write(str(tmp_path / "results"))
    assert [Path(u).name for u in written] == ["eval.json", "eval.parquet", "eval.png"]
    rows = pq.read_table(tmp_path / "results" / "eval.parquet").to_pylist()
    assert {(r["dataset"], r["correct"]) for r in rows} == set(expected.items())
    assert "OOD mean" in table.format()


def test_soup_source_is_the_uniform_average(cnn_and_data, tmp_path: Path, ray_local) -> None:
    url, model, suite, data = cnn_and_data
    torch.manual_seed(9)
    other = ReferenceCNN(width=4)
    other_url = save_cnn(tmp_path / "other", other, width=4)
    average = ReferenceCNN(width=4)
    average.load_state_dict({k: (v + other.state_dict()[k]) / 2 for k, v in model.state_dict().items()})
    table = evaluate_models([ModelSource("avg", (url, other_url))], suite, workers=2, progress=False)
    assert table.rows[0].correct == plain_correct(average, *data["id"])


def test_tiny_vit_merged_by_the_pipeline_is_evaluated_end_to_end(tmp_path: Path, ray_local) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    from modelstock.recipe import parse_recipe
    from pipeline.driver import MergeRequest, run_merge

    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32, num_labels=10)
    torch.manual_seed(0)
    base = ViTForImageClassification(config)
    base.save_pretrained(tmp_path / "base")
    generator = torch.Generator().manual_seed(1)
    finetunes = []
    for index in range(2):
        tuned = ViTForImageClassification(config)
        tuned.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in base.state_dict().items()})
        tuned.save_pretrained(tmp_path / f"ft-{index}")
        finetunes.append(str(tmp_path / f"ft-{index}"))
    recipe = parse_recipe({"merge_method": "model_stock", "base_model": str(tmp_path / "base"),
                           "models": [{"model": u} for u in finetunes]})
    run_merge(MergeRequest(recipe=recipe, out_url=str(tmp_path / "merged"), shard_size=20_000, progress=False))
    assert len(list((tmp_path / "merged").glob("model-*.safetensors"))) > 1

    images, labels = random_images(120, seed=5, channels=3)
    write_pixels_parquet(str(tmp_path / "vit-data" / "p.parquet"), images, labels, rows_per_group=30)
    suite = EvalSuite(id=DatasetSpec(name="rand", url=str(tmp_path / "vit-data")), batch_size=32, rows_per_shard=30)
    sources = [ModelSource("merged", (str(tmp_path / "merged"),)), ModelSource("ft-0", (finetunes[0],))]
    table = evaluate_models(sources, suite, workers=2, progress=False)

    merged, info = ViTForImageClassification.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    merged.eval()

    def hf_correct(model: torch.nn.Module) -> int:
        with torch.no_grad():
            return int((model(pixel_values=images).logits.argmax(1) == labels).sum())

    assert table.rows[0].correct == hf_correct(merged)
    assert table.rows[1].correct == hf_correct(ViTForImageClassification.from_pretrained(finetunes[0]).eval())


def test_cli_evaluate_and_merge_with_eval(cnn_and_data, tmp_path: Path, ray_local, capsys) -> None:
    url, model, suite, data = cnn_and_data
    suite_path = tmp_path / "suite.yml"
    suite_path.write_text(
        f"id: {{name: id, url: {tmp_path / 'id'}}}\n"
        f"ood: [{{name: sub, url: {tmp_path / 'sub'}, class_subset: [0, 3, 7]}}]\n"
        "rows_per_shard: 50\n"
    )
    assert main(["evaluate", str(suite_path), f"mine={url}", "--out", str(tmp_path / "ev"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "mine" in out and (tmp_path / "ev" / "eval.json").exists()
    expected = plain_correct(model, *data["id"]) / 230
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["models"][0]["id_accuracy"] == pytest.approx(expected)

    torch.manual_seed(4)
    second = save_cnn(tmp_path / "second", ReferenceCNN(width=4), width=4)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {url}\n  - model: {second}\n")
    merged = tmp_path / "merged"
    assert main(["merge", str(recipe), str(merged), "--eval", str(suite_path), "--quiet"]) == 0
    assert (merged / "modelstock-manifest.json").exists()
    assert json.loads((merged / "eval" / "eval.json").read_text())["models"][0]["model"] == "merged"
    assert main(["evaluate", str(tmp_path / "missing.yml"), url, "--quiet"]) == 2
