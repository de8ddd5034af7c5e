"""``sat-quant convert --quant-budget B --calibrate FILE``: the calibrated planner, one transformer block at a time.

The same walk over the blocks as the calibration (:func:`sat_quant.tools.calibrate_blocks.walk_blocks`: one block's
weights in full precision, its inputs kept between blocks), scoring each layer's candidates on its own output from
its calibration Hessian instead of quantizing it; then the knapsack of :mod:`sat_quant.algorithms.planner`.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..algorithms.planner import (
    DEFAULT_CANDIDATES,
    LayerCosts,
    QuantPlan,
    finish_plan,
    layer_costs,
    parse_budget,
    parse_candidates,
    weight_costs,
)
from ..engine.config import QuantConfig
from ..engine.replace import PlannedLayer, plan_layers
from .calibrate_blocks import DEFAULT_SPILL_BYTES, BlockCalibration, Sample, walk_blocks


@torch.no_grad()
def plan_blocks(model: nn.Module, source, config: QuantConfig, samples: List[Sample], budget, *,
                candidates: Sequence[str] = DEFAULT_CANDIDATES, store_dtype: Optional[torch.dtype] = torch.bfloat16,
                spill_bytes: int = DEFAULT_SPILL_BYTES, spill_dir: Optional[str] = None,
                progress: bool = True) -> QuantPlan:
    """The calibrated planner (layer-local sensitivity) one block at a time: each planned layer inside a block is
    scored on its own output from its calibration Hessian (``planner.layer_costs``, GPTQ for int4/int4c
    candidates), the others (outside the blocks, or never reached) with the weight proxy on the same relative
    scale; then the knapsack. Bitwise ``plan_quantization(model, budget,
    run=..., sensitivity="layer")`` on a model that fits in memory, with the same activations' dtype."""
    budget, candidates = parse_budget(budget), parse_candidates(candidates)
    base = config.validate()
    costs: Dict[str, LayerCosts] = {}

    def score(planned: List[PlannedLayer], hessians: Dict[str, torch.Tensor]) -> None:
        for p in planned:
            if p.spec is None:
                continue
            name = p.names[0]
            hessian = hessians.pop(name, None)
            costs[name] = (layer_costs(name, p.module.weight, hessian, candidates) if hessian is not None
                           else _relative_weight_costs(name, p.module.weight, candidates))

    result = BlockCalibration()
    outside = walk_blocks(model, source, base, samples, result, score, wants_hessian=lambda p: True,
                          store_dtype=store_dtype, spill_bytes=spill_bytes, spill_dir=spill_dir, progress=progress,
                          on_block=None, desc="planning")
    planned = [p for p in plan_layers(model, base) if p.spec is not None]
    for p in outside:
        if p.spec is not None:
            costs[p.names[0]] = _relative_weight_costs(p.names[0], source.get(p.names[0] + ".weight"), candidates,
                                                       p.module.weight.dtype)
    weights = {p.names[0] + ".weight" for p in planned}
    fixed = sum(math.prod(shape) * dtype.itemsize for name, (shape, dtype) in source.layout().items()
                if name not in weights)
    return finish_plan([costs[p.names[0]] for p in planned], budget, fixed, "layer", base)


def _relative_weight_costs(name: str, weight: torch.Tensor, candidates: Sequence[str],
                           weight_dtype: Optional[torch.dtype] = None) -> LayerCosts:
    """A layer without calibration inputs (outside the blocks, or never reached) on the scale of ``layer_costs``:
    the weight proxy's squared error over the weight's energy (``layer_costs`` with H = identity)."""
    costs = weight_costs(name, weight, candidates, weight_dtype)
    energy = float((weight.detach().float() ** 2).sum()) or 1.0
    for option in costs.options:
        option.error /= energy
    return costs


__all__ = ["plan_blocks"]
