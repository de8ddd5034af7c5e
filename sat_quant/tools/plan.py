"""``sat-quant plan``: per-layer formats for a full-precision checkpoint folder to fit ``--quant-budget``, offline.

The model is built with its linear weights on meta (names and shapes only); each weight is then read from the
memory-mapped checkpoint, measured with the data-free proxy and dropped, so memory stays near one layer's. The
knapsack itself is :mod:`sat_quant.algorithms.planner`.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

from ..algorithms.planner import (
    DEFAULT_CANDIDATES,
    QuantPlan,
    finish_plan,
    parse_budget,
    parse_candidates,
    weight_costs,
)
from ..engine.config import QuantConfig
from ..engine.replace import plan_layers
from ..errors import CheckpointError
from ..oom import oom_guidance
from ..sat.build import build_with_meta_linears
from .sources import open_full_precision


def plan_checkpoint(src: str, budget, *, candidates: Sequence[str] = DEFAULT_CANDIDATES,
                    config: Optional[QuantConfig] = None, imports: Optional[List[str]] = None) -> QuantPlan:
    """Plan an fp SAT checkpoint folder offline with the weight proxy (``sat-quant plan``)."""
    budget = parse_budget(budget)
    candidates = parse_candidates(candidates)
    base = (config or QuantConfig(bits=4)).validate()
    with oom_guidance(f"planning {src}", quant_bits=base.bits):
        return _plan(src, budget, candidates, base, imports)


def _plan(src: str, budget, candidates, base: QuantConfig, imports: Optional[List[str]]) -> QuantPlan:
    fp = open_full_precision(src, "plan", imports)  # the parts built for real take the checkpoint's dtype
    cls, source = fp.cls, fp.source
    model = build_with_meta_linears(cls, fp.args)
    planned = [p for p in plan_layers(model, base) if p.spec is not None]
    layout = source.layout()
    weights = {p.names[0] + ".weight" for p in planned}
    missing = sorted(weights - set(layout))
    if missing:
        raise CheckpointError(f"{src}: no tensor {missing[0]} (and {len(missing) - 1} more) in the checkpoint; "
                              f"is it the checkpoint of this model class ({cls.__name__})?")
    fixed = sum(math.prod(shape) * dtype.itemsize
                for name, (shape, dtype) in layout.items() if name not in weights)
    layers = [weight_costs(p.names[0], source.get(p.names[0] + ".weight"), candidates) for p in planned]
    del model
    return finish_plan(layers, budget, fixed, "weight", base)


__all__ = ["plan_checkpoint"]
