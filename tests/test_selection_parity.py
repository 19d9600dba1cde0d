"""Every selecting method against ``mergekit-yaml`` (issue 23): ties, breadcrumbs(_ties), sce, and the
random ones where they are comparable (dare_*, della* at density 1; DARE's kept fraction and rescale).

Checkpoints: a tiny Llama base with 3 fine-tunes whose task vectors point in opposite directions
(cosine < 0 between the first two), stored as float32 (no equal magnitudes) and as bfloat16 (float32
task vectors of bf16 weights repeat values: thousands of entries share a cutoff's score). Recipes
use fp32 math and bf16 output, 2 and 3 fine-tunes, densities below and above 0.5, per-model,
per-filter and gradient values. Every deterministic merge must be within one bf16 rounding step of
mergekit's, element by element:

- float32 checkpoints: of mergekit as it is;
- bf16 checkpoints: of mergekit with its sorts made stable (``torch.sort``/``argsort``/``topk``
  patched in its ``sparsify`` and ``sce`` modules only). mergekit's own CPU sorts are unstable beyond
  16 entries, so which of equal scores it keeps is its introsort's choice; there, every entry where
  we differ from plain mergekit beyond a rounding step is one where stable mergekit differs too.

mergekit runs once for the module, in one subprocess (plain recipes, then the patched ones).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from modelstock.api import merge_recipe_in_memory
from modelstock.recipe import parse_recipe

mergekit_sparsify = pytest.importorskip("mergekit.sparsify")

SCRIPT = """
import json, sys
import torch, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

class StableTorch:
    # torch, except that the sorts mergekit selects with keep equal scores in index order.
    def __getattr__(self, name):
        return getattr(torch, name)
    @staticmethod
    def sort(x, dim=-1, descending=False, **kw):
        return torch.sort(x, dim=dim, descending=descending, stable=True)
    @staticmethod
    def argsort(x, dim=-1, descending=False, **kw):
        return torch.argsort(x, dim=dim, descending=descending, stable=True)
    @staticmethod
    def topk(x, k, largest=True, **kw):
        index = torch.argsort(x, descending=largest, stable=True)[:k]
        return x[index], index

for stable, config_path, out in json.loads(sys.argv[1]):
    if stable:
        import mergekit.merge_methods.sce as sce, mergekit.sparsify as sparsify
        sparsify.torch = sce.torch = StableTorch()
    text = open(config_path, encoding="utf-8").read()
    options = MergeOptions(cuda=False, lazy_unpickle=False, copy_tokenizer=False, write_model_card=False,
                           async_write=False, quiet=True, random_seed=0)
    options.apply_global_options()
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), out, options=options, config_source=text)
"""


def make_family(root: Path, dtype: torch.dtype) -> list[Path]:
    """base, then 3 fine-tunes: +u, -u (opposite directions) and a weak independent one."""
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(3)
    model = LlamaForCausalLM(tiny_llama_config()).to(dtype)
    paths = [root / "base", *(root / f"ft{i}" for i in range(3))]
    model.save_pretrained(paths[0], safe_serialization=True)
    base = {k: v.float().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(4)
    shared = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    for path, direction, own in zip(paths[1:], (1.0, -1.0, 0.0), (0.6, 0.6, 1.0)):
        state = {}
        for name, tensor in base.items():
            scale = 0.02 * (tensor.abs().mean() + 1e-3)
            state[name] = (tensor + scale * (direction * shared[name] + own * torch.randn(tensor.shape, generator=g))).to(dtype)
        model.load_state_dict(state)
        model.save_pretrained(path, safe_serialization=True)
    return paths


def recipes(paths: list[Path]) -> dict[str, dict]:
    base, ft = str(paths[0]), [str(p) for p in paths[1:]]

    def r(method: str, models: list[tuple[int, dict]], parameters: dict | None = None, out: str = "bfloat16") -> dict:
        return {"merge_method": method, "base_model": base, "dtype": "float32", "out_dtype": out,
                "models": [{"model": ft[i], "parameters": p} for i, p in models], "parameters": parameters or {}}

    return {
        "ties_2": r("ties", [(0, {"weight": 0.5, "density": 0.3}), (1, {"weight": 0.4, "density": 0.7})]),
        "ties_3": r("ties", [(0, {"weight": 1.0, "density": [0.2, 0.8]}),
                             (1, {"weight": 0.6, "density": [{"filter": "mlp", "value": 0.6}, {"value": 0.4}]}),
                             (2, {"weight": -0.3, "density": 0.5})], {"rescale": True}),
        # The recipe.
        "breadcrumbs_ties_2": r("breadcrumbs_ties", [(0, {"weight": 0.5, "density": 0.8, "gamma": 0.02}),
                                                     (1, {"weight": 0.4, "density": 0.7, "gamma": 0.05})]),
        "breadcrumbs_ties_3": r("breadcrumbs_ties", [(0, {"weight": 0.6}), (1, {"weight": 0.3}),
                                                     (2, {"weight": 0.9, "gamma": 0.1})],
                                {"density": 0.35, "gamma": 0.02, "rescale": True, "normalize": True}),
        "breadcrumbs_3": r("breadcrumbs", [(0, {"weight": 1.0, "density": [0.3, 0.9]}),
                                           (1, {"weight": 0.5, "density": 0.6, "gamma": 0.05}),
                                           (2, {"weight": 0.7, "density": 0.2})], {"lambda": 1.2}),
        "sce_2": r("sce", [(0, {}), (1, {})], {"select_topk": 0.6}),
        "sce_3": r("sce", [(0, {}), (1, {}), (2, {})], {"select_topk": [0.3, 0.7]}),
        # Random methods at density 1: nothing is drawn, the rest is deterministic.
        "dare_ties_3": r("dare_ties", [(i, {"weight": w}) for i, w in enumerate((0.5, 0.4, 0.3))]),
        "dare_linear_2": r("dare_linear", [(0, {"weight": 0.7}), (1, {"weight": 0.4})]),
        "della_3": r("della", [(i, {"weight": w, "density": 1.0}) for i, w in enumerate((0.5, 0.4, 0.3))]),
        "della_linear_2": r("della_linear", [(0, {"weight": 0.7}), (1, {"weight": 0.4})]),
        # Statistics only: kept fraction and the L1 rescale of the kept entries.
        "dare_linear_stats": r("dare_linear", [(0, {"weight": 1.0, "density": 0.3})], out="float32"),
    }


DETERMINISTIC = [name for name in recipes([Path("x")] * 4) if not name.endswith("_stats")]
STABLE_ONLY = [name for name in DETERMINISTIC if not name.startswith(("dare", "della"))]


def load(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """{kind: (paths, {name: mergekit output}, {name: stable-mergekit output})} for f32 and bf16 checkpoints."""
    root = tmp_path_factory.mktemp("selection-parity")
    families = {kind: make_family(root / kind, dtype) for kind, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16))}
    jobs, outputs = [], {}
    for kind, paths in families.items():
        for name, recipe in recipes(paths).items():
            for stable in (False, True) if kind == "bf16" and name in STABLE_ONLY else (False,):
                config = root / f"{kind}-{name}-{int(stable)}.yml"
                config.write_text(yaml.safe_dump(recipe))
                outputs[kind, name, stable] = root / f"out-{kind}-{name}-{int(stable)}"
                jobs.append((stable, str(config), str(outputs[kind, name, stable])))
    jobs.sort(key=lambda job: job[0])  # the patch stays applied: plain runs first
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(jobs)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return {"families": families, "outputs": {key: load(path) for key, path in outputs.items()}}


def ours(paths: list[Path], name: str) -> dict[str, torch.Tensor]:
    states = {str(p): load(p) for p in paths}
    merged, _ = merge_recipe_in_memory(parse_recipe(recipes(paths)[name]), states)
    return merged


def steps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in representable steps of their (common) dtype, +0 == -0."""
    bits = {torch.bfloat16: torch.int16, torch.float32: torch.int32}[a.dtype]
    width = a.element_size() * 8

    def key(t: torch.Tensor) -> torch.Tensor:
        raw = t.contiguous().view(bits).to(torch.int64)
        magnitude = raw & ((1 << (width - 1)) - 1)
        return torch.where(raw < 0, -magnitude, magnitude)

    return (key(a) - key(b)).abs()


def test_steps_apart_can_fail():
    one = torch.ones(3, dtype=torch.bfloat16)
    assert int(steps_apart(one, one).max()) == 0
    assert int(steps_apart(one, one * (1 + 2**-6)).max()) == 2


@pytest.mark.parametrize("kind", ["f32", "bf16"])
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_within_one_rounding_step_of_mergekit(runs, kind, name):
    paths = runs["families"][kind]
    merged = ours(paths, name)
    stable = kind == "bf16" and name in STABLE_ONLY
    oracle = runs["outputs"][kind, name, stable]
    plain = runs["outputs"][kind, name, False]
    base = load(paths[0])
    assert sorted(merged) == sorted(oracle)
    for tensor, expected in oracle.items():
        actual = merged[tensor]
        assert actual.dtype == expected.dtype == torch.bfloat16, tensor
        distance = steps_apart(actual, expected)
        assert int(distance.max()) <= 1, (name, kind, tensor, int(distance.max()), float((distance > 1).double().mean()))
        if stable:
            # Against mergekit as it is, only its own choice among equal scores separates us.
            beyond = steps_apart(actual, plain[tensor]) > 1
            assert not (beyond & (steps_apart(expected, plain[tensor]) == 0)).any(), (name, tensor)
    assert any(not torch.equal(merged[t].float(), base[t].float()) for t in merged), name


def test_bf16_checkpoints_tie_at_the_cutoff_so_the_stable_oracle_matters(runs):
    """The bf16 case is not vacuous: mergekit's unstable sort keeps other equal entries than its stable one."""
    differ = [name for name in STABLE_ONLY
              if any(not torch.equal(a, runs["outputs"]["bf16", name, True][t])
                     for t, a in runs["outputs"]["bf16", name, False].items())]
    assert {"ties_2", "breadcrumbs_ties_2", "sce_2"} <= set(differ), differ


def test_dare_kept_fraction_and_rescale_as_mergekit(runs):
    """DARE's draws differ by design (ours seeded per tensor); both keep ~density of each task vector
    and scale the kept entries by |d|_1 / |kept d|_1 (mergekit's L1 rescale)."""
    paths = runs["families"]["f32"]
    base, model = load(paths[0]), load(paths[1])
    for source, merged in (("modelstock", ours(paths, "dare_linear_stats")),
                           ("mergekit", runs["outputs"]["f32", "dare_linear_stats", False])):
        kept_total = count = 0
        for tensor, out in merged.items():
            delta = model[tensor].double() - base[tensor].double()
            change = out.double() - base[tensor].double()
            kept = change != 0
            kept_total += int(kept.sum())
            count += delta.numel()
            if delta.numel() >= 1000:
                scale = float(delta.abs().sum() / delta[kept].abs().sum())
                # Within float32 roundings of the scale, scale * d and w_0 + scale * d (a wrong
                # scale or mask is off by orders of magnitude more).
                error = (change[kept] - scale * delta[kept]).abs()
                bound = 2**-21 * (out.double()[kept].abs() + (scale * delta[kept]).abs())
                assert bool((error <= bound).all()), (source, tensor, float(error.max()))
        sigma = (0.3 * 0.7 / count) ** 0.5
        assert abs(kept_total / count - 0.3) < 5 * sigma, (source, kept_total / count)


@pytest.mark.parametrize("seed", range(20))
def test_small_tensors_keep_what_mergekit_keeps(seed):
    """Up to 16 entries mergekit's CPU sorts are insertion sorts, hence stable: there its selection
    among equal magnitudes is defined, and ours must be the same (TIES and Breadcrumbs, in-process)."""
    import modelstock

    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(4, 17, (1,), generator=g))
    delta = (torch.randint(-3, 4, (n,), generator=g) * 0.25).float()  # many equal magnitudes
    density, gamma = float(torch.rand(1, generator=g)) * 0.8 + 0.1, float(torch.rand(1, generator=g)) * 0.3
    base = torch.zeros(n)
    theirs = {
        "ties": mergekit_sparsify.magnitude(delta, density),
        "breadcrumbs": mergekit_sparsify.magnitude_outliers(delta, density, gamma=gamma),
    }
    for method, expected in theirs.items():
        parameters = {"normalize": False} if method == "ties" else {}
        model = {"weight": 1.0, "density": density, **({"gamma": gamma} if method == "breadcrumbs" else {})}
        merged, _ = modelstock.merge_state_dicts(method, [{"w": delta}], base={"w": base}, parameters=parameters,
                                                 model_parameters=[model])
        assert torch.equal(merged["w"], expected), (method, delta.tolist(), density, gamma)


@pytest.mark.parametrize("count", [2, 3])
def test_sce_scores_are_the_variances_mergekit_ranks(count):
    """mergekit's ``sce_mask`` ranks ``torch.var`` of the float32 task vectors (fp32 math). Where a
    fine-tune's change exceeds its weight, rounding d_i to float32 changes ~10 % of the variances in
    their last bit against those of the exact differences: ours must be mergekit's, bit for bit."""
    from modelstock.methods import sce
    from modelstock.methods.base import BaseBlock, TensorParameters

    g = torch.Generator().manual_seed(count)
    base = 0.02 * torch.randn(64, 80, generator=g)
    models = [base + 0.01 * torch.randn(64, 80, generator=g) for _ in range(count)]
    expected = torch.var(torch.stack([m - base for m in models]), dim=0, unbiased=False)
    exact = torch.stack([m.double() - base.double() for m in models]).var(dim=0, unbiased=False).float()
    assert int((exact != expected).sum()) > 100  # the case this test is about
    block = BaseBlock("w", (64, 80), 0, 64, models, base)
    params = TensorParameters(sce.SceParameters(select_topk=0.5), ())
    for compute in (torch.float32, torch.float64):
        assert torch.equal(sce.variances(block, params, compute)[0], expected)
