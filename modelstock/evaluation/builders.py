"""Model builders: turn a checkpoint folder's ``config.json`` into a torch module, then load the
weights through ``modelstock.checkpoint.reader`` (safetensors byte ranges; never torch.load).

The builder is named by the config key ``modelstock_builder``; without it, a config whose
``architectures`` names a ``transformers`` image classifier uses the ``transformers`` builder.
Every built module maps pixels (batch, C, H, W) to logits (batch, classes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from modelstock import storage
from modelstock.checkpoint.reader import open_checkpoint, read_tensor
from modelstock.checkpoint.side_files import read_json_side_file
from modelstock.errors import IncompatibleModels, InvalidCheckpoint

BUILDER_KEY = "modelstock_builder"
Builder = Callable[[Mapping[str, Any]], nn.Module]
_BUILDERS: dict[str, Builder] = {}


def register_builder(name: str) -> Callable[[Builder], Builder]:
    def decorate(builder: Builder) -> Builder:
        _BUILDERS[name] = builder
        return builder

    return decorate


def builder_names() -> list[str]:
    return sorted(_BUILDERS)


class ReferenceCNN(nn.Module):
    """A small CNN for tests and the demo: two convolutions, global average pooling, a linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels))


class ReferenceMLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int = 10, hidden: int = 64) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.layers(pixels)


@register_builder("reference-cnn")
def build_reference_cnn(config: Mapping[str, Any]) -> nn.Module:
    return ReferenceCNN(int(config.get("in_channels", 1)), int(config.get("num_classes", 10)), int(config.get("width", 16)))


@register_builder("reference-mlp")
def build_reference_mlp(config: Mapping[str, Any]) -> nn.Module:
    return ReferenceMLP(int(config["in_features"]), int(config.get("num_classes", 10)), int(config.get("hidden", 64)))


class LogitsOf(nn.Module):
    """Adapts a transformers image classifier (``pixel_values`` in, output with ``.logits``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).logits

    def load_checkpoint_state(self, state: Mapping[str, torch.Tensor], url: str) -> None:
        """Load a checkpoint's tensors the way transformers does, strictly.

        transformers 5 renames some weights on load (checkpoints keep the legacy names, e.g. ViT's
        ``attention.attention.key`` vs the module's ``k_proj``), so the state goes through
        ``from_pretrained(None, config=..., state_dict=...)``, which applies that conversion; any
        missing, unexpected or mis-shaped tensor is an error rather than a random init.
        """
        model_class: Any = type(self.model)  # a transformers PreTrainedModel class
        loaded, info = model_class.from_pretrained(
            None, config=self.model.config, state_dict=dict(state), output_loading_info=True
        )
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            problems = sorted(str(k) for k in info.get(kind) or [])
            if problems:
                raise IncompatibleModels(f"{url}: tensor {problems[0]} is {kind.replace('_', ' ')[:-1]} ({len(problems)} in all)")
        self.model = loaded.eval()


@register_builder("transformers")
def build_transformers_classifier(config: Mapping[str, Any]) -> nn.Module:
    """Any ``*ForImageClassification`` class of transformers (ViT, CLIP vision tower + head, ...),
    built from the config alone: no download, no remote code."""
    import transformers

    architectures = config.get("architectures") or []
    names = [a for a in architectures if isinstance(a, str) and a.endswith("ForImageClassification")]
    if not names or not hasattr(transformers, names[0]):
        hint = ("; a language model is evaluated with a text suite (kind: text)"
                if any(isinstance(a, str) and a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures) else "")
        raise InvalidCheckpoint(f"config.json: architectures {architectures} name no transformers image classifier{hint}")
    model_class = getattr(transformers, names[0])
    hf_config = model_class.config_class.from_dict(dict(config))
    return LogitsOf(model_class(hf_config).eval())


def read_config(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return read_config_in(storage.resolve(url, storage_options))


def read_config_in(folder: storage.Location) -> dict[str, Any]:
    """``config.json`` of a checkpoint folder, as a JSON object."""
    location = folder.join("config.json")
    config = read_json_side_file(location)
    if config is None:
        raise InvalidCheckpoint(f"{location.url}: missing (a model to evaluate is built from its config.json)")
    return config


def builder_for(config: Mapping[str, Any], url: str = "config.json") -> Builder:
    name = config.get(BUILDER_KEY) or ("transformers" if config.get("architectures") else None)
    if name not in _BUILDERS:
        raise InvalidCheckpoint(
            f"{url}: no model builder {name!r} (set {BUILDER_KEY!r} in config.json to one of {builder_names()})"
        )
    return _BUILDERS[name]


def read_state_dict(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint (a writable copy), by ranged reads."""
    checkpoint = open_checkpoint(url, storage_options)
    return {name: read_tensor(location).clone() for name, location in checkpoint.tensors.items()}


def load_weights(module: nn.Module, state: Mapping[str, torch.Tensor], url: str) -> nn.Module:
    """Load ``state`` strictly: every tensor present, none extra, every shape equal."""
    custom = getattr(module, "load_checkpoint_state", None)
    if callable(custom):
        custom(state, url)
        return module.eval()
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise IncompatibleModels(
            f"{url}: tensor {name!r} is {'missing from the checkpoint' if missing else 'not in the model'} "
            f"({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise IncompatibleModels(f"{url}: tensor {name!r} has shape {list(tensor.shape)}, "
                                     f"model expects {list(expected[name].shape)}")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return module.eval()


def build_model(url: str, storage_options: Mapping[str, Any] | None = None) -> nn.Module:
    """The module described by ``url``/config.json with the weights of the checkpoint at ``url``."""
    config = read_config(url, storage_options)
    module = builder_for(config, url)(config)
    return load_weights(module, read_state_dict(url, storage_options), url)


@torch.no_grad()
def logits_in_batches(module: nn.Module, inputs: torch.Tensor, batch_size: int,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Logits of ``inputs`` (rows, ...) in batches; returned on the CPU."""
    outputs = [module(inputs[i : i + batch_size].to(device)).float().cpu() for i in range(0, inputs.shape[0], batch_size)]
    return torch.cat(outputs) if outputs else torch.empty(0)
