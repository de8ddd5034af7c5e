"""GPTQ one transformer block at a time, reading each block's full-precision weights from the source checkpoint.

Why: ``algorithms.calibration.quantize_calibrated_`` needs the whole full-precision model in memory (35 GB for
CogVLM-17B). Here the model is built with every linear weight on meta (the small rest, embeddings and norms, is
read from the source), the calibration samples are run up to the first block once, and their inputs to that block
are kept. Then, block by block: its linear weights are read from the source, the kept inputs run through it with
forward hooks accumulating each linear's ``H = E[x x^T]`` (the same accumulation, in the same order, as the in-memory
path), its outputs become the next block's inputs, its calibratable layers get GPTQ against H (the others their
format's usual quantization), and its weights go back to meta. Memory: the quantized layers so far, one block in
full precision, and the activations (one hidden state per sample, kept in ``store_dtype`` and spilled to disk above
a budget).

As in ``quantize_calibrated_``, every block's H comes from full-precision activations (block i's inputs are the
full-precision outputs of block i-1), so on a model that fits in memory the two give the same tensors: bitwise
when activations are kept in the model's own dtype (the default for fp16/bf16 models); kept in bf16 for an fp32
model, each block's inputs are rounded to bf16 (8 bits of mantissa), which moves H by ~0.4% and can flip a few
rounding decisions of GPTQ.

Blocks are ``model.transformer.layers``, called the way SAT's ``BaseTransformer.forward`` calls them (its
``layer_forward`` hook when a mixin sets one); what the samples give the first block (mask, position ids, a
mixin's keyword inputs) is captured by a ``layer_forward`` hook that stops the forward there. Linear layers outside
the blocks (an LM head with ``--quant-lm-head``, a vision tower) are quantized without calibration and listed.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from tqdm import tqdm

from ..algorithms.calibration import collect_hessians
from ..engine.config import QuantConfig
from ..engine.formats import get_format
from ..engine.replace import PlannedLayer, plan_layers, release_freed_memory, weight_to_meta_
from ..errors import QuantConfigError
from ..io.save import saved_tensors
from ..sat.build import build_with_meta_linears
from ..sat.compat import apply_cpu_compat

log = logging.getLogger(__name__)

Sample = Dict[str, Any]
Neutral = Dict[str, Dict[str, torch.Tensor]]
DEFAULT_SPILL_BYTES = 2 * 2**30  # activations kept in memory; beyond that, in files


class _StopAtFirstBlock(Exception):
    """Raised by the capturing hook: nothing past the first block's inputs is computed."""


def full_precision_skeleton(model_cls: type, args, source) -> nn.Module:
    """``model_cls(args)`` with every target linear's weight on meta and everything else read from ``source`` (cast
    to the model's dtype, as a load does), in eval mode, with the CPU fallbacks on (SAT's rotary needs triton)."""
    model = build_with_meta_linears(model_cls, args)
    if getattr(args, "fp16", False):
        model.half()
    elif getattr(args, "bf16", False):
        model.bfloat16()
    have = source.layout()
    with torch.no_grad():
        for prefix, module in model.named_modules():
            pre = prefix + "." if prefix else ""
            for name, tensor in saved_tensors(module):
                if not tensor.is_meta and pre + name in have:
                    tensor.copy_(source.get(pre + name))
    apply_cpu_compat(model)
    return model.eval()


class ActivationStore:
    """One tensor per sample: kept in memory (in ``dtype``) up to ``budget`` bytes, the rest in files under ``folder``
    (read back one at a time). A block's outputs replace its inputs as they are produced."""

    def __init__(self, dtype: Optional[torch.dtype], budget: int, folder: str) -> None:
        self.dtype, self.budget, self.folder = dtype, budget, folder
        self.items: List[Any] = []
        self.in_memory = 0
        self.spilled = 0

    def put(self, index: int, tensor: torch.Tensor) -> None:
        kept = tensor.detach().to(self.dtype) if self.dtype is not None else tensor.detach()
        if index < len(self.items) and isinstance(self.items[index], torch.Tensor):
            self.in_memory -= self.items[index].numel() * self.items[index].element_size()
        size = kept.numel() * kept.element_size()
        if self.in_memory + size > self.budget:
            path = os.path.join(self.folder, f"{index}.pt")
            torch.save(kept.clone(), path)
            self.spilled += size
            kept = path
        else:
            self.in_memory += size
        if index < len(self.items):
            self.items[index] = kept
        else:
            self.items.append(kept)

    def get(self, index: int, dtype: torch.dtype) -> torch.Tensor:
        item = self.items[index]
        tensor = torch.load(item, weights_only=True) if isinstance(item, str) else item
        return tensor.to(dtype)

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class BlockCalibration:
    """What calibrating block by block produced: the neutral tensors of every calibrated layer, and what it did."""

    neutral: Neutral = field(default_factory=dict)
    uncalibrated: List[str] = field(default_factory=list)  # calibratable layers outside the blocks (quantized RTN)
    seconds: float = 0.0
    spilled_bytes: int = 0


def capture_first_block_inputs(model: nn.Module, samples: Iterable[Sample], store: ActivationStore
                               ) -> List[Dict[str, Any]]:
    """Run each sample until the first block; its hidden states go to ``store``, the rest of what the block is
    called with (mask, position ids, a mixin's keyword inputs) is returned, one dict per sample."""
    captured: List[Dict[str, Any]] = []

    def record(hidden, mask, *args, **kwargs):
        for key in ("layer_id", "output_this_layer", "output_cross_layer"):
            kwargs.pop(key, None)
        if args:
            raise QuantConfigError("calibration: this model's blocks take positional inputs sat_quant cannot replay; "
                                   "calibrate it in Python with sat_quant.quantize_calibrated_.")
        store.put(len(captured), hidden)
        captured.append({"mask": mask, "kwargs": kwargs})
        raise _StopAtFirstBlock

    hooks = model.hooks
    before = hooks.get("layer_forward")
    hooks["layer_forward"] = record
    try:
        with torch.no_grad():
            for sample in samples:
                try:
                    model(**sample)
                except _StopAtFirstBlock:
                    pass
                else:
                    raise QuantConfigError("calibration: a sample ran through the model without reaching its first "
                                           "transformer block; check the calibration inputs.")
    finally:
        if before is None:
            hooks.pop("layer_forward", None)
        else:
            hooks["layer_forward"] = before
        model.transformer.hooks.clear()
        model.transformer.hooks.update(hooks)
    return captured


def run_block(model: nn.Module, index: int, hidden: torch.Tensor, call: Dict[str, Any]) -> torch.Tensor:
    """Block ``index`` on one sample, called as SAT's ``BaseTransformer.forward`` calls it; updates ``call`` with
    what the block passes on to the next one (``output_cross_layer``)."""
    layer_forward = model.transformer.hooks.get("layer_forward")
    out_this, out_cross = {}, {}
    target = layer_forward if layer_forward is not None else model.transformer.layers[index]
    ret = target(hidden, call["mask"], layer_id=torch.tensor(index), **call["kwargs"],
                 output_this_layer=out_this, output_cross_layer=out_cross)
    if isinstance(ret, tuple):
        ret = ret[0]
    call["kwargs"].update(out_cross)
    return ret


def _by_block(model: nn.Module, plans: List[PlannedLayer], blocks: int
              ) -> Tuple[List[List[PlannedLayer]], List[PlannedLayer]]:
    """Each planned linear's block: under ``transformer.layers.i``, or at index i of a ``ModuleList`` with one entry
    per block (a mixin's per-layer layers: LLaMA's ``mixins.mlp.gate_proj.i``, CogVLM's visual expert lists)."""
    per_block = [name for name, m in model.named_modules()
                 if isinstance(m, nn.ModuleList) and len(m) == blocks and name]
    inside: List[List[PlannedLayer]] = [[] for _ in range(blocks)]
    outside = []
    for planned in plans:
        index = None
        for name in planned.names:
            for root in per_block:
                rest = name[len(root) + 1:] if name.startswith(root + ".") else ""
                head = rest.split(".", 1)[0]
                if head.isdigit():
                    index = int(head)
                    break
            if index is not None:
                break
        if index is None:
            outside.append(planned)
        else:
            inside[index].append(planned)
    return inside, outside


def _refuse_meta_calls(plans: List[PlannedLayer]) -> List[Any]:
    """A block must not call a linear whose weight is not loaded (one sat_quant did not assign to it): say so."""
    def check(module, inputs):
        if module.weight.is_meta:
            raise QuantConfigError(f"calibration: a block calls the linear layer {names[id(module)]}, which sat_quant "
                                   f"did not place in that block; calibrate this model in Python with "
                                   f"sat_quant.quantize_calibrated_ (or --quant-skip the layer).")
    names = {id(p.module): p.names[0] for p in plans}
    return [p.module.register_forward_pre_hook(check) for p in plans]


@torch.no_grad()
def calibrate_blocks(model: nn.Module, source, config: QuantConfig, samples: List[Sample], *, damp: float = 0.1,
                     act_order: bool = True, store_dtype: Optional[torch.dtype] = torch.bfloat16,
                     spill_bytes: int = DEFAULT_SPILL_BYTES, spill_dir: Optional[str] = None, progress: bool = True,
                     on_block: Optional[Callable[[int], None]] = None) -> BlockCalibration:
    """GPTQ for every calibratable layer inside ``model.transformer.layers``, one block at a time (see the module
    docstring). ``model`` is a ``full_precision_skeleton``; ``source`` the full-precision checkpoint's tensors.
    ``store_dtype=None`` keeps activations in the model's dtype (bitwise the in-memory result)."""
    config.validate()
    start = time.perf_counter()
    plans = plan_layers(model, config)
    blocks = len(model.transformer.layers)
    inside, outside = _by_block(model, plans, blocks)
    result = BlockCalibration()
    result.uncalibrated = [p.names[0] for p in outside
                           if p.spec is not None and get_format(p.spec.format).calibratable]
    if result.uncalibrated:
        log.warning("calibration: %d layer(s) outside the transformer blocks are quantized without calibration: %s",
                    len(result.uncalibrated), ", ".join(result.uncalibrated[:5]))
    guards = _refuse_meta_calls(plans)
    try:
        _calibrate(model, source, samples, inside, result, damp=damp, act_order=act_order, store_dtype=store_dtype,
                   spill_bytes=spill_bytes, spill_dir=spill_dir, progress=progress, on_block=on_block)
    finally:
        for guard in guards:
            guard.remove()
    result.seconds = time.perf_counter() - start
    return result


def _calibrate(model, source, samples, inside, result, *, damp, act_order, store_dtype, spill_bytes, spill_dir,
               progress, on_block) -> None:
    blocks = len(inside)
    with tempfile.TemporaryDirectory(prefix="sat-quant-activations-", dir=spill_dir) as folder:
        store = ActivationStore(store_dtype, spill_bytes, folder)
        calls = capture_first_block_inputs(model, samples, store)
        act_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point() and not p.is_meta),
                         torch.float32)
        bar = tqdm(range(blocks), desc="calibrating", unit="block", disable=not progress)
        for index in bar:
            planned = inside[index]
            for p in planned:  # this block's linear weights, full precision, read from the source
                weight = source.get(p.names[0] + ".weight").to(p.module.weight.dtype)
                p.module._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
            calibrated = {p.names[0]: p for p in planned if p.spec is not None
                          and get_format(p.spec.format).calibratable}

            def run(_model, index=index):
                for i in range(len(calls)):
                    out = run_block(model, index, store.get(i, act_dtype), calls[i])
                    store.put(i, out)

            if calibrated:
                hessians = collect_hessians(model, run, {n: p.module for n, p in calibrated.items()})
            else:
                hessians = {}
                run(model)
            for p in planned:
                if p.spec is None:
                    continue
                fmt = get_format(p.spec.format)
                name = p.names[0]
                if name in hessians:
                    result.neutral[name] = fmt.quantize(p.module.weight, p.spec, hessian=hessians.pop(name),
                                                        damp=damp, act_order=act_order)
                else:
                    result.neutral[name] = fmt.quantize(p.module.weight, p.spec)
            for p in planned:
                weight_to_meta_(p.module)
            release_freed_memory()
            if on_block is not None:
                on_block(index)
        result.spilled_bytes = store.spilled


def estimate_seconds(model: nn.Module, config: QuantConfig, tokens: int) -> float:
    """A rough time for ``calibrate_blocks``: the blocks' forward (2 flops per token and weight), H (2 per token and
    input pair), GPTQ (about 8 per output and input pair, in Python-driven column blocks) over this CPU's matmul
    speed, measured here on a 512 x 512 product. Good to a factor of two; it says minutes or hours."""
    flops = 0.0
    for planned in plan_layers(model, config):
        out_features, in_features = planned.module.weight.shape
        flops += 2.0 * tokens * out_features * in_features
        if planned.spec is not None and get_format(planned.spec.format).calibratable:
            flops += 2.0 * tokens * in_features ** 2 + 8.0 * out_features * in_features ** 2
    a = torch.randn(512, 512)
    start = time.perf_counter()
    for _ in range(8):
        a @ a
    speed = 8 * 2 * 512 ** 3 / max(time.perf_counter() - start, 1e-9)
    return flops / speed


__all__ = ["estimate_seconds", "full_precision_skeleton", "capture_first_block_inputs", "run_block", "calibrate_blocks",
           "ActivationStore", "BlockCalibration", "DEFAULT_SPILL_BYTES"]
