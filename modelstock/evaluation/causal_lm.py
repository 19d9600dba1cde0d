"""Causal language models for evaluation: built empty from ``config.json`` with transformers
(never remote code), filled tensor by tensor through our safetensors reader from any fsspec URL
(no local download, never torch.load), optionally split across several devices, and paired with
the checkpoint's own tokenizer.

Loading is strict: a tensor the model lacks, a tensor the checkpoint lacks or a shape that
differs is an error naming the tensor. Tied weights (a head sharing the input embedding) follow
transformers: the checkpoint may hold either name (or both), the model keeps one tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelstock import storage
from modelstock.checkpoint.reader import Checkpoint, TensorLocation, open_checkpoint, tensor_from_bytes
from modelstock.checkpoint.tokenizer import load_tokenizer
from modelstock.dtypes import to_torch
from modelstock.errors import IncompatibleModels, InvalidCheckpoint
from modelstock.evaluation.builders import read_config, read_config_in
from modelstock.evaluation.placement import StageHooks, StagePlan, install_stage_hooks, plan_stages
from modelstock.evaluation.sizing import Footprint, ModelShape, footprint
from modelstock.quantization import FP8_CODES, SCALE_SUFFIX, BlockFP8, all_finite, check_scales, dequantize, quantization_of

log = logging.getLogger(__name__)

# Adjacent tensors of one file are fetched in one ranged read of up to this size (a Llama's
# norm weights are a few KB: one request each would be latency-bound on object stores);
# READ_AHEAD reads are in flight at once, so peak read memory is READ_AHEAD x READ_BLOCK_BYTES.
READ_BLOCK_BYTES = 64 * 2**20
READ_AHEAD = 4
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class CausalLMConfig:
    """A validated config.json: the transformers config and the library class that builds it."""

    url: str
    hf_config: Any
    model_class: type
    quantization: BlockFP8 | None = None  # block-FP8 weights, dequantized as they are read

    @property
    def shape(self) -> ModelShape:
        text = self.hf_config.get_text_config()
        hidden = int(getattr(text, "hidden_size", 0) or 0)
        return ModelShape(
            vocab_size=int(getattr(text, "vocab_size", 0) or 0),
            hidden_size=hidden,
            intermediate_size=int(getattr(text, "intermediate_size", 0) or 4 * hidden),
            num_attention_heads=int(getattr(text, "num_attention_heads", 0) or 0),
        )

    def dtype(self, requested: str, checkpoint: Checkpoint) -> torch.dtype:
        """``auto``: the config's dtype, else the first floating tensor's (as ``from_pretrained(dtype="auto")``)."""
        if requested != "auto":
            return DTYPES[requested]
        configured = getattr(self.hf_config, "dtype", None) or getattr(self.hf_config, "torch_dtype", None)
        if isinstance(configured, str) and configured in DTYPES:
            return DTYPES[configured]
        if isinstance(configured, torch.dtype) and configured in DTYPES.values():
            return configured
        for location in checkpoint.tensors.values():
            if location.entry.dtype in FP8_CODES:
                return torch.bfloat16  # dequantized codes: as a merge writes them (DEQUANTIZED_DTYPE)
            dtype = to_torch(location.entry.dtype)
            if dtype.is_floating_point:
                return dtype
        return torch.float32


def causal_lm_config(raw: Mapping[str, Any], url: str) -> CausalLMConfig:
    """Validate config.json as a transformers causal LM; remote code is refused, never run."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    where = f"{url.rstrip('/')}/config.json"
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        if "auto_map" in raw:
            raise InvalidCheckpoint(f"{where}: model_type {model_type!r} needs remote code (auto_map); "
                                    "remote code is never run, only transformers' own architectures load")
        raise InvalidCheckpoint(f"{where}: model_type {model_type!r} is not a transformers architecture")
    architectures = [a for a in raw.get("architectures") or [] if isinstance(a, str)]
    config_class = CONFIG_MAPPING[model_type]
    # Block-FP8 weights are dequantized as they stream in: the model is built unquantized.
    quantization = quantization_of(raw, where)
    try:
        hf_config = config_class.from_dict({k: v for k, v in raw.items() if k not in ("auto_map", "quantization_config")})
    except (TypeError, ValueError) as exc:
        raise InvalidCheckpoint(f"{where}: not a valid {config_class.__name__} ({exc})") from None
    found = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(hf_config), None)
    model_class: type | None = found[0] if isinstance(found, tuple) else found  # some types map to several classes
    if model_class is not None and "auto_map" in raw and model_class.__name__ not in architectures:
        raise InvalidCheckpoint(f"{where}: architectures {architectures} need remote code (auto_map); "
                                "remote code is never run")
    if model_class is None:
        raise InvalidCheckpoint(f"{where}: model_type {model_type!r} has no causal LM class in transformers")
    return CausalLMConfig(url, hf_config, model_class, quantization)


def read_causal_lm_config(url: str, storage_options: Mapping[str, Any] | None = None) -> CausalLMConfig:
    return causal_lm_config(read_config(url, storage_options), url)


def model_footprint(url: str, storage_options: Mapping[str, Any] | None, batch_tokens: int, max_length: int,
                    dtype: str = "auto", ingredients: int = 1) -> Footprint:
    """Memory needed to evaluate the checkpoint at ``url``: headers and config.json only."""
    config = read_causal_lm_config(url, storage_options)
    checkpoint = open_checkpoint(url, storage_options)
    target = config.dtype(dtype, checkpoint)
    weights = 0
    for name, location in checkpoint.tensors.items():
        if config.quantization is not None and name.endswith(SCALE_SUFFIX):
            continue  # block scales are folded into their weights
        stored = to_torch(location.entry.dtype)
        numel = location.entry.nbytes // stored.itemsize
        weights += numel * (target.itemsize if stored.is_floating_point else stored.itemsize)
    return footprint(url, weights, config.shape, batch_tokens, max_length, target, ingredients)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (no memory, no random init cost) and buffers for real.

    Non-persistent buffers such as RoPE's ``inv_freq`` are computed in ``__init__`` and are not in
    checkpoints, so unlike ``with torch.device("meta")`` they must be built on the CPU. The patch
    is process-wide while active (accelerate's ``init_empty_weights`` works the same way): build
    one model at a time.
    """
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=False)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def empty_causal_lm(config: CausalLMConfig, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config.hf_config, dtype=dtype, trust_remote_code=False)
    return model.eval()


def parameter_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Each parameter's names: several for tied weights (``lm_head.weight`` and ``model.embed_tokens.weight``)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {group[0]: group for group in names.values()}


def _read_blocks(checkpoint: Checkpoint) -> list[list[TensorLocation]]:
    """Tensors grouped into reads: adjacent in one file, up to READ_BLOCK_BYTES per read."""
    by_file: dict[str, list[TensorLocation]] = {}
    for location in checkpoint.tensors.values():
        by_file.setdefault(location.file.url, []).append(location)
    blocks: list[list[TensorLocation]] = []
    for locations in by_file.values():
        block: list[TensorLocation] = []
        for location in sorted(locations, key=lambda loc: loc.entry.start):
            if block and (location.entry.end - block[0].entry.start > READ_BLOCK_BYTES
                          or location.entry.start != block[-1].entry.end):
                blocks.append(block)
                block = []
            block.append(location)
        if block:
            blocks.append(block)
    return blocks


def stream_tensors(checkpoint: Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of ``checkpoint`` (read-only views), READ_AHEAD block reads in flight."""

    def read(block: list[TensorLocation]) -> tuple[list[TensorLocation], bytes | bytearray]:
        return block, storage.read_range(block[0].file, block[0].entry.start, block[-1].entry.end)

    blocks = _read_blocks(checkpoint)
    with ThreadPoolExecutor(max_workers=READ_AHEAD) as pool:
        pending = [pool.submit(read, block) for block in blocks[:READ_AHEAD]]
        for index in range(len(blocks)):
            block, blob = pending.pop(0).result()
            if index + READ_AHEAD < len(blocks):
                pending.append(pool.submit(read, blocks[index + READ_AHEAD]))
            view = memoryview(blob)
            origin = block[0].entry.start
            for location in block:
                entry = location.entry
                part = view[entry.start - origin : entry.end - origin]
                yield location.name, tensor_from_bytes(part, entry.dtype, entry.shape)


def dequantized_tensors(tensors: Iterator[tuple[str, torch.Tensor]], checkpoint: Checkpoint,
                        quantization: BlockFP8 | None) -> Iterator[tuple[str, torch.Tensor]]:
    """``tensors`` with block-FP8 codes replaced by their float32 weights (codes x block scales);
    a weight waits for its scales when they come later in the files (they are small and adjacent)."""
    if quantization is None:
        yield from tensors
        return
    catalog = {name: (loc.entry.dtype, loc.entry.shape) for name, loc in checkpoint.tensors.items()}
    check_scales(checkpoint.url, catalog, quantization)
    quantized = {name for name, (dtype, _) in catalog.items() if dtype in FP8_CODES}
    scales = {quantization.scale_of(name): name for name in quantized}
    pending: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if name not in quantized and name not in scales:
            yield name, tensor
            continue
        pending[name] = tensor
        weight = scales.get(name, name)
        scale = quantization.scale_of(weight)
        if weight in pending and scale in pending:
            yield weight, dequantize(pending.pop(weight), pending.pop(scale), quantization.block, 0, torch.float32)


def fill_parameters(model: nn.Module, tensors: Iterator[tuple[str, torch.Tensor]], plan: StagePlan, dtype: torch.dtype,
                    url: str) -> None:
    """Put each checkpoint tensor, cast to ``dtype``, on its stage's device; strictly."""
    aliases = parameter_aliases(model)
    owner = {name: canonical for canonical, group in aliases.items() for name in group}
    persistent_buffers = {name for name in model.state_dict() if name not in owner}
    loaded: set[str] = set()
    for name, tensor in tensors:
        if not all_finite(tensor):
            # Metrics of such a model are NaN, never a number to report: refused, naming the tensor.
            raise InvalidCheckpoint(f"{url}: tensor {name!r}: contains NaN or Inf values")
        if name in persistent_buffers:
            target = model.get_buffer(name)
            _check_shape(url, name, tensor, target)
            target.copy_(tensor)
            loaded.add(name)
            continue
        if name not in owner:
            raise IncompatibleModels(f"{url}: tensor {name!r} is not in the model ({type(model).__name__})")
        canonical = owner[name]
        if canonical in loaded:
            continue  # the tied twin was already loaded (transformers keeps the first, too)
        expected = model.get_parameter(canonical)
        _check_shape(url, name, tensor, expected)
        target_dtype = dtype if tensor.is_floating_point() else tensor.dtype
        value = tensor.to(device=plan.device_of(canonical), dtype=target_dtype, copy=True)
        parameter = nn.Parameter(value, requires_grad=False)
        for alias in aliases[canonical]:
            module_name, _, leaf = alias.rpartition(".")
            model.get_submodule(module_name)._parameters[leaf] = parameter
        loaded.add(canonical)
    missing = sorted(set(aliases) - loaded) + sorted(persistent_buffers - loaded)
    if missing:
        raise IncompatibleModels(f"{url}: tensor {missing[0]!r} is missing from the checkpoint "
                                 f"({len(missing)} missing)")


def _check_shape(url: str, name: str, tensor: torch.Tensor, expected: torch.Tensor) -> None:
    if tuple(tensor.shape) != tuple(expected.shape):
        raise IncompatibleModels(f"{url}: tensor {name!r} has shape {list(tensor.shape)}, "
                                 f"model expects {list(expected.shape)}")


def _place_buffers(model: nn.Module, plan: StagePlan) -> None:
    for name, buffer in list(model.named_buffers()):
        device = torch.device(plan.device_of(name))
        if buffer.device != device:
            module_name, _, leaf = name.rpartition(".")
            model.get_submodule(module_name)._buffers[leaf] = buffer.to(device)


@dataclass
class CausalLM:
    """A loaded model, its tokenizer and where its layers live."""

    name: str
    model: nn.Module
    tokenizer: Any
    plan: StagePlan
    hooks: StageHooks
    dtype: torch.dtype

    @property
    def input_device(self) -> torch.device:
        return torch.device(self.plan.input_device)


def build_causal_lm(name: str, config: CausalLMConfig, tensors: Iterator[tuple[str, torch.Tensor]], tokenizer: Any,
                    devices: Sequence[str], dtype: torch.dtype) -> CausalLM:
    """Empty model, stage plan, weights onto their devices, buffers after them, hooks."""
    model = empty_causal_lm(config, dtype)
    plan = plan_stages(model, devices)
    fill_parameters(model, tensors, plan, dtype, name)
    _place_buffers(model, plan)
    hooks = install_stage_hooks(model, plan)
    log.info("%s: %s", name, plan.describe())
    return CausalLM(name, model, tokenizer, plan, hooks, dtype)


def load_causal_lm(url: str, storage_options: Mapping[str, Any] | None = None, devices: Sequence[str] = ("cpu",),
                   dtype: str = "auto") -> CausalLM:
    """The causal LM at ``url``, its weights streamed from storage straight onto ``devices``."""
    folder = storage.resolve(url, storage_options)
    config = causal_lm_config(read_config_in(folder), url)
    checkpoint = open_checkpoint(url, storage_options)
    target = config.dtype(dtype, checkpoint)
    tokenizer = load_tokenizer(folder)
    tensors = dequantized_tensors(stream_tensors(checkpoint), checkpoint, config.quantization)
    return build_causal_lm(url, config, tensors, tokenizer, devices, target)


def read_checkpoint_state(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, as writable copies (an in-memory soup's ingredient); block-FP8
    weights dequantized."""
    checkpoint = open_checkpoint(url, storage_options)
    quantization = quantization_of(read_config(url, storage_options), f"{url.rstrip('/')}/config.json")
    tensors = dequantized_tensors(stream_tensors(checkpoint), checkpoint, quantization)
    return {name: tensor.clone() for name, tensor in tensors}
