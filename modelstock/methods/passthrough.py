"""Passthrough (mergekit): one model's tensor as it is, optionally scaled (``scale``, per model).

With ``slices`` this stacks layers of several models or several depths of one model
(frankenmerges, depth up-scaling); each output tensor comes from exactly one input.
"""

from __future__ import annotations

import torch

from modelstock.methods.base import ModelsBlock
from modelstock.methods.define import blend_method


@blend_method("passthrough", summary="Passthrough: one model's tensors as they are (slices stack layers)",
              max_models=1)
def passthrough(block: ModelsBlock, *, scale: tuple[float | None, ...] = (None,)) -> torch.Tensor:
    (tensor,) = block.models
    return tensor if scale[0] is None else tensor * scale[0]
