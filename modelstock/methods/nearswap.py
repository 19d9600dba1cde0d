"""NearSwap (mergekit): take the model's weights where they are near the base's, keep the base's
where they differ much. Per entry, ``w = s * w_1 + (1 - s) * w_0`` with
``s = clamp(t / max(|w_0 - w_1|, 1e-6), 0, 1)``."""

from __future__ import annotations

import torch

from modelstock.methods.base import BaseBlock
from modelstock.methods.define import blend_method

MIN_DIFFERENCE = 1e-6


@blend_method("nearswap", summary="NearSwap: the model's weights where near the base's, the base's elsewhere", max_models=1)
def nearswap(block: BaseBlock, *, t: float) -> torch.Tensor:
    base, model = block.base, block.models[0]
    share = (t / (base - model).abs().clamp_min(MIN_DIFFERENCE)).clamp(0.0, 1.0)
    return share * model + (1 - share) * base
