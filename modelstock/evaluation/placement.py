"""Splitting one model across the devices of an actor: modules in order, cut into contiguous
stages balanced by bytes, activations moved to each module's device by forward pre-hooks.

This is the mechanism of accelerate's big-model dispatch, kept here in a few lines so that it
needs no extra dependency and, above all, so that the hooks are installed even when two stages
share a device: on a machine without GPUs, ``["cpu", "cpu"]`` runs the very code path that moves
activations between GPUs, which is how the tests check that a split model gives the numbers of
an unsplit one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class PlacementUnit:
    """A module that stays whole on one device, and the bytes of the tensors it owns."""

    name: str
    nbytes: int
    whole: bool  # True: the module and all its children (a decoder layer); False: its own tensors only


@dataclass(frozen=True)
class Stage:
    device: str
    units: tuple[PlacementUnit, ...]

    @property
    def nbytes(self) -> int:
        return sum(unit.nbytes for unit in self.units)


@dataclass(frozen=True)
class StagePlan:
    """Which device each unit lives on; stage order is execution order."""

    stages: tuple[Stage, ...]

    @property
    def devices(self) -> list[str]:
        return [stage.device for stage in self.stages]

    @property
    def input_device(self) -> str:
        """Where token ids go: the device of the first stage that holds anything."""
        return next((stage.device for stage in self.stages if stage.units), self.stages[0].device)

    def device_of(self, tensor_name: str) -> str:
        """The device of the unit owning ``tensor_name`` (the longest unit name that prefixes it)."""
        best, device = -1, self.input_device
        for stage in self.stages:
            for unit in stage.units:
                prefix = unit.name + "." if unit.name else ""
                owned = tensor_name.startswith(prefix) and (unit.whole or "." not in tensor_name[len(prefix):])
                if owned and len(unit.name) > best:
                    best, device = len(unit.name), stage.device
        return device

    def describe(self) -> str:
        return ", ".join(f"{stage.device}: {len(stage.units)} modules ({stage.nbytes / 2**20:.1f} MiB)"
                         for stage in self.stages)


def _tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def placement_units(model: nn.Module) -> list[PlacementUnit]:
    """Units in registration order (execution order for decoder-only transformers): every module
    of a class the model marks as not splittable (``_no_split_modules``: its decoder layers), and
    every other module that directly owns parameters or buffers (embeddings, final norm, head, RoPE).
    A tensor shared by two units (tied embeddings) is counted once, with the first."""
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    units: list[PlacementUnit] = []
    seen: set[int] = set()

    def fresh(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        new = [t for t in tensors if id(t) not in seen]
        seen.update(id(t) for t in new)
        return new

    def visit(prefix: str, module: nn.Module) -> None:
        if type(module).__name__ in no_split:
            units.append(PlacementUnit(prefix, _tensor_bytes(fresh([*module.parameters(), *module.buffers()])), True))
            return
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if own:
            units.append(PlacementUnit(prefix, _tensor_bytes(fresh(own)), False))
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return units


def plan_stages(model: nn.Module, devices: Sequence[str]) -> StagePlan:
    """Contiguous stages of about equal bytes, one per device (a unit goes to the stage its
    byte midpoint falls in, so stages never interleave)."""
    if not devices:
        raise ValueError("no device to place the model on")
    units = placement_units(model)
    total = max(1, sum(unit.nbytes for unit in units))
    assigned: list[list[PlacementUnit]] = [[] for _ in devices]
    done = 0
    for unit in units:
        index = min(len(devices) - 1, int((done + unit.nbytes / 2) * len(devices) / total))
        assigned[index].append(unit)
        done += unit.nbytes
    return StagePlan(tuple(Stage(str(device), tuple(group)) for device, group in zip(devices, assigned)))


def move_to(value: Any, device: torch.device) -> Any:
    """Tensors inside (nested) tuples, lists and dicts, moved to ``device``; anything else as is."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True) if value.device != device else value
    if isinstance(value, tuple):
        moved = [move_to(v, device) for v in value]
        return type(value)(*moved) if hasattr(value, "_fields") else tuple(moved)  # named tuples keep their type
    if isinstance(value, list):
        return [move_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: move_to(v, device) for k, v in value.items()}
    return value


@dataclass
class StageHooks:
    """The hooks installed on a placed model, and how often inputs crossed into each stage."""

    handles: list[Any]
    calls: dict[str, int]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def install_stage_hooks(model: nn.Module, plan: StagePlan) -> StageHooks:
    """Before each unit runs, move its inputs to the device its tensors are on.

    The device is read from the unit's first own tensor, not from the plan: a tied head whose
    weight is the input embedding's lives where that embedding lives.
    """
    hooks = StageHooks([], {})
    for stage in plan.stages:
        for unit in stage.units:
            module = model.get_submodule(unit.name)
            tensors = [*module.parameters(recurse=unit.whole), *module.buffers(recurse=unit.whole)]
            device = tensors[0].device if tensors else torch.device(stage.device)
            hooks.calls[unit.name] = 0

            def before(module: nn.Module, args: tuple, kwargs: dict, device: torch.device = device,
                       name: str = unit.name) -> tuple[tuple, dict]:
                hooks.calls[name] += 1
                return move_to(args, device), move_to(kwargs, device)

            hooks.handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
    return hooks
