"""Mixed precision by budget: pick each linear's format so the model fits a size with the least error.

Layers differ a lot in how much their quantization error hurts (on all-MiniLM-L6-v2 at int4 g128, alone, the last
block's QKV costs 0.0069 mean cosine, an early attention output 0.0001-0.0002), so spending a budget's spare bytes on
the sensitive layers beats a uniform format. The planner:

1. measures every candidate format on every layer that the base config would quantize: with calibration
   inputs (``run``), the relative squared change of the model's output when only that layer is quantized
   (GPTQ-quantized for ``int4``/``int4c``), or, cheaper (``sensitivity="layer"``), of that layer's own
   output from the calibration Hessian; without inputs, a weight-only proxy, the squared reconstruction
   error ``||W - Q(W)||^2`` (data-free searched values);
2. solves the knapsack greedily: start from each layer's smallest candidate, then repeatedly take the
   upgrade with the largest error drop per extra byte that still fits (errors add up across layers to
   within a few percent on MiniLM, which is what makes per-layer measurements composable).

The result is a :class:`QuantPlan`: exact layer names → ``"fmt:group"``, which is a ``--quant-plan`` file and
a ``QuantConfig.plan``; a model quantized with it saves and reloads like any mixed-precision checkpoint.

Where it runs: wherever the full-precision weights are. ``quantize_to_budget_(model, budget, run=...)``
on a built fp model (the Python API; optional calibration), and ``sat-quant plan SRC --quant-budget 5bpp``
offline on an fp checkpoint (:mod:`sat_quant.tools.plan`: weight proxy, one weight at a time), whose JSON goes to
``sat-quant convert --quant-plan`` or ``from_pretrained`` / any script with ``--quant-plan``.
``sat-quant convert --quant-budget`` does both in one step.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..engine.config import FULL_PRECISION, QuantConfig, parse_plan_value
from ..engine.formats import FORMATS, LayerSpec, get_format
from ..engine.replace import plan_layers, quantize_
from ..errors import QuantConfigError
from .calibration import DEFAULT_MAX_HESSIAN_BYTES, iter_hessians, quantize_calibrated_

# Candidates when none are given: the fast-kernel int4 (group 128: the least scale overhead), int4cs (SINQ
# column scale) at groups 64 and 32, and int8. MiniLM, 128 calibration sentences: 4.3 bits 0.9923, 5.0 bits 0.9947
# (with int4c:64/int4c:32 in int4cs's place, 32 sentences: 0.9881 / 0.9932; benchmarks/RESULTS.md).
DEFAULT_CANDIDATES: Tuple[str, ...] = ("int4:128", "int4cs:64", "int4cs:32", "int8")
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-z]+)\s*$", re.IGNORECASE)


# -- budgets ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Budget:
    """Either bits per parameter of the planned linears (``5.0bpp``) or bytes of the whole model (``10GB``)."""

    bits_per_param: Optional[float] = None
    total_bytes: Optional[int] = None
    text: str = ""

    def __str__(self) -> str:
        return self.text or (f"{self.bits_per_param}bpp" if self.bits_per_param is not None else f"{self.total_bytes}B")


def parse_budget(text: str) -> Budget:
    """``"5.0bpp"`` (bits per parameter of the quantized linears), or a size of the whole model's weights
    after quantization: ``"500MB"``, ``"10GB"`` (powers of 10), ``"9.5GiB"`` (powers of 2)."""
    if isinstance(text, Budget):
        return text
    match = _BUDGET_RE.match(str(text))
    if not match:
        raise QuantConfigError(f"--quant-budget '{text}' is not understood; give bits per parameter like '5.0bpp' "
                               f"or a model size like '500MB', '10GB' or '9.5GiB'.")
    value, unit = float(match.group(1)), match.group(2).lower()
    if unit in ("bpp", "bit", "bits"):
        if not 1.0 <= value <= 32.0:
            raise QuantConfigError(f"--quant-budget {text}: bits per parameter must be between 1 and 32.")
        return Budget(bits_per_param=value, text=str(text).strip())
    if unit not in _UNITS:
        raise QuantConfigError(f"--quant-budget '{text}': unknown unit '{match.group(2)}'; use bpp, MB, GB, MiB or GiB.")
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise QuantConfigError(f"--quant-budget {text}: the size must be positive.")
    return Budget(total_bytes=size, text=str(text).strip())


def parse_candidates(candidates: Sequence[str]) -> List[str]:
    """Check candidate values ("int4c:64", "int8", "fp", ...) and return them in a canonical "fmt[:group]" form."""
    out = []
    for value in candidates:
        if value == FULL_PRECISION:
            out.append(value)
            continue
        try:
            name, group = parse_plan_value(value, None)
        except QuantConfigError:
            raise QuantConfigError(f"--candidates {value}: not a format; give 'fmt' or 'fmt:group' with fmt one of "
                                   f"{', '.join(sorted(FORMATS))}, or 'fp'.") from None
        group = get_format(name).resolve_group_size(group)
        out.append(f"{name}:{group}" if group else name)
    if not out:
        raise QuantConfigError("the planner needs at least one candidate format, e.g. int4:128 int4c:64 int8.")
    return list(dict.fromkeys(out))


# -- the plan ---------------------------------------------------------------------------------------

@dataclass
class Option:
    value: str      # "fmt:group", "fmt" or "fp"
    nbytes: int
    error: float


@dataclass
class LayerCosts:
    name: str
    params: int
    options: List[Option]   # every candidate that fits the layer's shape
    chosen: int = 0         # index into options

    @property
    def choice(self) -> Option:
        return self.options[self.chosen]


@dataclass
class QuantPlan:
    """A solved plan: per-layer formats plus what they cost and the predicted error."""

    layers: List[LayerCosts]
    budget: Budget
    sensitivity: str                 # "output" (measured on calibration inputs) or "weight" (proxy)
    fixed_bytes: int = 0             # everything that is not a planned linear's weight
    base: Dict[str, Any] = field(default_factory=dict)  # the base QuantConfig (skip list, lm head, backend)

    @property
    def plan(self) -> Dict[str, str]:
        return {layer.name: layer.choice.value for layer in self.layers}

    @property
    def planned_bytes(self) -> int:
        return sum(layer.choice.nbytes for layer in self.layers)

    @property
    def bits_per_param(self) -> float:
        params = sum(layer.params for layer in self.layers)
        return 8.0 * self.planned_bytes / max(params, 1)

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + self.planned_bytes

    @property
    def predicted_error(self) -> float:
        return sum(layer.choice.error for layer in self.layers)

    def to_config(self) -> QuantConfig:
        """A QuantConfig that quantizes exactly as planned (other linears per the base config's skip rules)."""
        base = dict(self.base)
        base["plan"] = dict(base.get("plan") or {}, **self.plan)
        return QuantConfig.from_dict(base).validate()

    def to_json(self) -> str:
        """The ``--quant-plan`` file: exact layer names → format (they take precedence over any glob)."""
        return json.dumps(self.plan, indent=1, sort_keys=True)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(self.to_json() + "\n")

    def summary(self) -> str:
        counts: Dict[str, int] = {}
        for layer in self.layers:
            counts[layer.choice.value] = counts.get(layer.choice.value, 0) + 1
        mix = ", ".join(f"{v} x{n}" for v, n in sorted(counts.items()))
        return (f"plan for budget {self.budget}: {self.bits_per_param:.2f} bits/param over {len(self.layers)} layers "
                f"({mix}); model {self.total_bytes / 1e6:.1f} MB; sensitivity: {self.sensitivity}")


def solve(layers: List[LayerCosts], budget_bytes: int) -> bool:
    """Greedy knapsack in place: cheapest option everywhere, then the best error-per-byte upgrades that fit.

    Returns False (every layer left at its cheapest option) when even the cheapest plan does not fit.
    """
    for layer in layers:
        layer.options.sort(key=lambda o: (o.nbytes, o.error))
        layer.chosen = 0
    spent = sum(layer.choice.nbytes for layer in layers)
    if spent > budget_bytes:
        return False
    while True:
        best = None  # (error saved per extra byte, layer, option index)
        for layer in layers:
            cur = layer.choice
            for i, opt in enumerate(layer.options):
                extra, gain = opt.nbytes - cur.nbytes, cur.error - opt.error
                if extra <= 0 or gain <= 0 or spent + extra > budget_bytes:
                    continue
                if best is None or gain / extra > best[0]:
                    best = (gain / extra, layer, i)
        if best is None:
            return True
        _, layer, i = best
        spent += layer.options[i].nbytes - layer.choice.nbytes
        layer.chosen = i


# -- measuring --------------------------------------------------------------------------------------

def _options_for(name: str, out_features: int, in_features: int, candidates: Sequence[str],
                 weight_dtype: torch.dtype) -> List[Tuple[str, Optional[LayerSpec]]]:
    """(candidate, spec) for every candidate that fits this shape; "fp" has no spec."""
    fitting = []
    for value in candidates:
        if value == FULL_PRECISION:
            fitting.append((value, None))
            continue
        fmt_name, group = parse_plan_value(value, None)
        try:
            fitting.append((value, get_format(fmt_name).spec(out_features, in_features, group, where=name)))
        except QuantConfigError:
            continue  # e.g. in_features not divisible by the group: the other candidates remain
    return fitting


def _nbytes(spec: Optional[LayerSpec], numel: int, weight_dtype: torch.dtype) -> int:
    if spec is None:
        return numel * torch.empty((), dtype=weight_dtype).element_size()
    return get_format(spec.format).nbytes(spec)


def _quantized_weight(weight: torch.Tensor, spec: LayerSpec, hessian: Optional[torch.Tensor]) -> torch.Tensor:
    fmt = get_format(spec.format)
    kwargs = {"hessian": hessian} if hessian is not None and fmt.calibratable else {}
    return fmt.dequantize(fmt.quantize(weight, spec, **kwargs), spec)


def weight_costs(name: str, weight: torch.Tensor, candidates: Sequence[str],
                 weight_dtype: Optional[torch.dtype] = None) -> LayerCosts:
    """A layer's options with the data-free proxy: squared reconstruction error of each candidate."""
    w = weight.detach().float()
    dtype = weight_dtype or weight.dtype
    options = []
    for value, spec in _options_for(name, w.shape[0], w.shape[1], candidates, dtype):
        error = 0.0 if spec is None else float(((w - _quantized_weight(w, spec, None)) ** 2).sum())
        options.append(Option(value, _nbytes(spec, w.numel(), dtype), error))
    if not options:
        raise QuantConfigError(f"layer '{name}' {tuple(w.shape)} fits none of the candidates {list(candidates)}; "
                               f"add 'int8' or 'fp' to them.")
    return LayerCosts(name, w.numel(), options)


@torch.no_grad()
def layer_costs(name: str, weight: torch.Tensor, hessian: torch.Tensor, candidates: Sequence[str]) -> LayerCosts:
    """A layer's options measured on its own output: ``tr(dW H dW^T) / tr(W H W^T)``, the relative mean squared
    change of the layer's output over the calibration inputs. No extra forward passes (for big models), but
    blind to how later layers amplify it. Relative beat absolute on MiniLM at 5 bits (0.990 vs 0.988)."""
    w = weight.detach().float()
    h = hessian.float()
    energy = float(((w @ h) * w).sum()) or 1.0
    options = []
    for value, spec in _options_for(name, w.shape[0], w.shape[1], candidates, weight.dtype):
        error = 0.0
        if spec is not None:
            delta = _quantized_weight(w, spec, hessian) - w
            error = float(((delta @ h) * delta).sum()) / energy
        options.append(Option(value, _nbytes(spec, w.numel(), weight.dtype), error))
    if not options:
        raise QuantConfigError(f"layer '{name}' {tuple(w.shape)} fits none of the candidates {list(candidates)}; "
                               f"add 'int8' or 'fp' to them.")
    return LayerCosts(name, w.numel(), options)


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise QuantConfigError("run(model) must return the model's output tensor (or a tuple starting with it), "
                           f"got {type(output).__name__}.")


@torch.no_grad()
def output_costs(model: nn.Module, name: str, module: nn.Module, run: Callable[[nn.Module], Any],
                 reference: torch.Tensor, candidates: Sequence[str], hessian: Optional[torch.Tensor]) -> LayerCosts:
    """A layer's options measured end to end: relative squared change of ``run(model)``'s output when only
    this layer holds the candidate's (dequantized) weight."""
    weight = module.weight
    original = weight.data
    ref = reference.float()
    denom = float((ref ** 2).sum()) or 1.0
    options = []
    for value, spec in _options_for(name, weight.shape[0], weight.shape[1], candidates, weight.dtype):
        if spec is None:
            error = 0.0
        else:
            weight.data = _quantized_weight(original, spec, hessian).to(original.dtype)
            try:
                error = float(((_first_tensor(run(model)).float() - ref) ** 2).sum()) / denom
            finally:
                weight.data = original
        options.append(Option(value, _nbytes(spec, original.numel(), original.dtype), error))
    if not options:
        raise QuantConfigError(f"layer '{name}' {tuple(weight.shape)} fits none of the candidates "
                               f"{list(candidates)}; add 'int8' or 'fp' to them.")
    return LayerCosts(name, original.numel(), options)


def _budget_bytes(budget: Budget, layers: List[LayerCosts], fixed_bytes: int) -> int:
    if budget.bits_per_param is not None:
        params = sum(layer.params for layer in layers)
        return int(math.floor(budget.bits_per_param * params / 8.0))
    return budget.total_bytes - fixed_bytes


def finish_plan(layers: List[LayerCosts], budget: Budget, fixed_bytes: int, sensitivity: str,
                base: QuantConfig) -> QuantPlan:
    """Solve the knapsack and wrap the result; a budget below the cheapest plan names the minimum to ask for."""
    plan = QuantPlan(layers, budget, sensitivity, fixed_bytes, base.to_dict())
    if not solve(layers, _budget_bytes(budget, layers, fixed_bytes)):  # every layer is at its cheapest now
        minimum = (f"{math.ceil(plan.bits_per_param * 100) / 100:.2f}bpp" if budget.bits_per_param is not None
                   else f"{math.ceil(plan.total_bytes / 1e6)}MB")
        raise QuantConfigError(f"--quant-budget {budget} is too small: even every layer at its cheapest candidate "
                               f"({', '.join(sorted({l.choice.value for l in layers}))}) needs "
                               f"{plan.bits_per_param:.2f} bits/param on the quantized layers, "
                               f"{plan.total_bytes / 1e6:.1f} MB in all; ask for at least {minimum}, or add a "
                               f"cheaper candidate.")
    return plan


# -- on a model -------------------------------------------------------------------------------------

def _fixed_bytes(model: nn.Module, planned_weights: Iterable[torch.Tensor]) -> int:
    skip = {id(w) for w in planned_weights}
    seen = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in skip or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


def plan_quantization(model: nn.Module, budget, *, run: Optional[Callable[[nn.Module], Any]] = None,
                      candidates: Sequence[str] = DEFAULT_CANDIDATES, config: Optional[QuantConfig] = None,
                      sensitivity: str = "output", max_hessian_bytes: Optional[int] = None) -> QuantPlan:
    """Plan formats for a full-precision ``model`` to fit ``budget`` ("5.0bpp", "10GB", or a :class:`Budget`).

    ``run(model)`` (optional) calls the model on a few calibration inputs and returns its output tensor: layers
    are then measured end to end and int4/int4c candidates with GPTQ; without it, a weight-only proxy is used.
    ``config`` sets what is planned at all (its skip globs and LM-head rule; default ``QuantConfig(bits=4)``).
    ``sensitivity`` (with ``run``): "output" measures each layer end to end, one ``run`` per layer and
    candidate (MiniLM 5.0 bits: 0.992); "layer" scores each layer's own output change from the calibration
    Hessian, one ``run`` in all (0.990): the choice for big models, where a forward per layer is too slow.
    """
    if sensitivity not in ("output", "layer"):
        raise QuantConfigError(f"sensitivity must be 'output' or 'layer', got {sensitivity!r}.")
    budget = parse_budget(budget)
    candidates = parse_candidates(candidates)
    base = (config or QuantConfig(bits=4)).validate()
    planned = [p for p in plan_layers(model, base) if p.spec is not None]
    if any(p.module.weight.is_meta for p in planned):
        raise QuantConfigError("the planner needs the full-precision weights (this model was built on meta); plan "
                               "an fp checkpoint with `sat-quant plan`, or load the fp model first.")
    fixed = _fixed_bytes(model, [p.module.weight for p in planned])
    layers: List[LayerCosts] = []
    if run is None:
        for p in planned:
            layers.append(weight_costs(p.names[0], p.module.weight, candidates))
        return finish_plan(layers, budget, fixed, "weight", base)
    was_training = model.training
    model.eval()
    try:
        reference = _first_tensor(run(model)).detach().clone()
        modules = {p.names[0]: p.module for p in planned}
        for hessians in iter_hessians(model, run, modules, max_hessian_bytes or DEFAULT_MAX_HESSIAN_BYTES):
            for name, hessian in hessians.items():
                if sensitivity == "layer":
                    layers.append(layer_costs(name, modules[name].weight, hessian, candidates))
                else:
                    layers.append(output_costs(model, name, modules[name], run, reference, candidates, hessian))
    finally:
        model.train(was_training)
    order = {p.names[0]: i for i, p in enumerate(planned)}
    layers.sort(key=lambda layer: order[layer.name])
    return finish_plan(layers, budget, fixed, sensitivity, base)


def quantize_to_budget_(model: nn.Module, budget, *, run: Optional[Callable[[nn.Module], Any]] = None,
                        candidates: Sequence[str] = DEFAULT_CANDIDATES, config: Optional[QuantConfig] = None,
                        sensitivity: str = "output") -> QuantPlan:
    """Plan (:func:`plan_quantization`) and quantize ``model`` in place to fit ``budget``; returns the plan.

    With ``run``, int4/int4c layers are quantized with GPTQ on the same calibration inputs.
    """
    plan = plan_quantization(model, budget, run=run, candidates=candidates, config=config, sensitivity=sensitivity)
    final = plan.to_config()
    if run is not None:
        quantize_calibrated_(model, final, run)
    else:
        quantize_(model, final)
    model.quant_config = final  # save_checkpoint records it in the quantization block
    return plan
