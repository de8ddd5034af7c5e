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

Blocks are the ``transformer.layers`` of every SAT model in ``model`` (a *stack*): the model itself and any SAT model
a mixin holds (CogVLM's EVA2-CLIP vision tower), called the way SAT's ``BaseTransformer.forward`` calls them (its
``layer_forward`` hook when a mixin sets one). Stacks are calibrated in the order a forward reaches them (CogVLM:
the vision tower, then the language model with the visual expert's inputs): the samples run through the model
until the first block of a stack not yet calibrated, whose inputs (hidden states, mask, position ids, a mixin's
keyword inputs) a ``layer_forward`` hook captures before stopping the forward there. A calibrated stack is replayed
in later passes: its first block returns the kept full-precision output of its last block and the others pass it
on, so the layers after it (final norm, CogVLM's GLU adapter) see what the full-precision model computes.

Linear layers outside the blocks (CogVLM's GLU adapter, CogAgent's cross-image tower, an LM head with
``--quant-lm-head``) are quantized without calibration and listed; their full-precision weights are read from the
source for the calibration passes and dropped at the end (CogAgent-18B: ~0.9 GB, less than one of its blocks).
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from sat.model.base_model import BaseMixin, BaseModel
from sat.model.transformer import BaseTransformer
from torch import nn
from tqdm import tqdm

from ..algorithms.calibration import collect_hessians
from ..engine.config import QuantConfig
from ..engine.formats import get_format
from ..engine.replace import PlannedLayer, plan_layers, release_freed_memory, weight_to_meta_
from ..errors import QuantConfigError
from ..io.commit import remove_stale_temporaries
from ..io.save import saved_tensors
from ..sat.build import build_with_meta_linears
from ..sat.compat import apply_cpu_compat, install_xformers_cpu_fallback

log = logging.getLogger(__name__)

Sample = Dict[str, Any]
Neutral = Dict[str, Dict[str, torch.Tensor]]
DEFAULT_SPILL_BYTES = 2 * 2**30  # activations kept in memory; beyond that, in files
SPILL_PREFIX = "sat-quant-activations-"  # + the writer's pid: a later run removes a killed run's folder


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
    apply_cpu_compat(model)  # calibration runs on CPU: SAT's triton rotary and xformers' attention need CPU twins
    if "xformers.ops" in sys.modules:  # the model's code imported it (CogVLM's EVA2-CLIP): route its CPU calls to SDPA
        install_xformers_cpu_fallback()
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


class _Reached(Exception):
    """Raised by a capturing hook: the forward reached a stack's first block; nothing past it is computed."""


@dataclass
class Stack:
    """One SAT model's blocks: ``owner`` is the model (``transformer.layers`` run by SAT's ``BaseTransformer``),
    ``prefix`` its name in the root model ('' for the root), ``inside[i]`` the planned linears of block i."""

    prefix: str
    owner: nn.Module
    inside: List[List[PlannedLayer]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.prefix or "the model"

    @property
    def blocks(self) -> int:
        return len(self.owner.transformer.layers)


def _sync_hooks(owner: nn.Module) -> None:
    """SAT's ``BaseModel.forward`` copies the model's hook table into its transformer's (shared with its layers) in
    place before each forward; blocks run on their own need the same copy."""
    owner.transformer.hooks.clear()
    owner.transformer.hooks.update(owner.hooks)


def _set_layer_forward(owner: nn.Module, hook: Optional[Callable]) -> Callable[[], None]:
    """Install ``hook`` as ``owner``'s ``layer_forward`` (in the model's hook table, which SAT copies to its
    transformer at each forward); returns what puts the previous one back."""
    before = owner.hooks.get("layer_forward")
    owner.hooks["layer_forward"] = hook
    _sync_hooks(owner)

    def restore() -> None:
        if before is None:
            owner.hooks.pop("layer_forward", None)
        else:
            owner.hooks["layer_forward"] = before
        _sync_hooks(owner)
    return restore


def capture_first_block_inputs(model: nn.Module, samples: Iterable[Sample], store: ActivationStore,
                               stacks: Optional[List[Stack]] = None,
                               replay: Optional[Dict[str, Tuple[Stack, ActivationStore]]] = None
                               ) -> Tuple[Stack, List[Dict[str, Any]]]:
    """Run each sample until the first block of whichever of ``stacks`` (default: the model's own blocks) it reaches
    first; its hidden states go to ``store``. Returns that stack and, one dict per sample, the rest of what its first
    block is called with (mask, position ids, a mixin's keyword inputs). ``replay``: stacks already calibrated, each
    answering with its kept outputs."""
    stacks = stacks or [Stack("", model)]
    captured: List[Dict[str, Any]] = []
    reached: List[Stack] = []
    current = [0]

    def record(target: Stack):
        def hook(hidden, mask, *args, **kwargs):
            if reached and target is not reached[0]:
                raise QuantConfigError(f"calibration: the samples reach different blocks first ({reached[0].name}, "
                                       f"{target.name}); give every sample the same kind of input (all with an "
                                       f"image, or none).")
            for key in ("layer_id", "output_this_layer", "output_cross_layer"):
                kwargs.pop(key, None)
            if args:
                raise QuantConfigError("calibration: this model's blocks take positional inputs sat_quant cannot "
                                       "replay; calibrate it in Python with sat_quant.quantize_calibrated_.")
            reached[:] = [target]
            store.put(len(captured), hidden)
            captured.append({"mask": mask, "kwargs": kwargs})
            raise _Reached
        return hook

    def replayed(kept: ActivationStore):
        def hook(hidden, mask, *args, layer_id=None, **kwargs):
            return kept.get(current[0], hidden.dtype) if int(layer_id) == 0 else hidden
        return hook

    restores = [_set_layer_forward(s.owner, record(s)) for s in stacks]
    restores += [_set_layer_forward(done.owner, replayed(kept)) for done, kept in (replay or {}).values()]
    try:
        with torch.no_grad():
            for index, sample in enumerate(samples):
                current[0] = index
                try:
                    model(**sample)
                except _Reached:
                    pass
                else:
                    raise QuantConfigError("calibration: a sample ran through the model without reaching a "
                                           "transformer block sat_quant calibrates; check the calibration inputs.")
    finally:
        for restore in reversed(restores):
            restore()
    return reached[0], captured


def run_block(model: nn.Module, index: int, hidden: torch.Tensor, call: Dict[str, Any]) -> torch.Tensor:
    """Block ``index`` of the SAT model ``model`` (a stack's owner) on one sample, called as SAT's
    ``BaseTransformer.forward`` calls it; updates ``call`` with what the block passes on (``output_cross_layer``)."""
    layer_forward = model.transformer.hooks.get("layer_forward")
    out_this, out_cross = {}, {}
    target = layer_forward if layer_forward is not None else model.transformer.layers[index]
    ret = target(hidden, call["mask"], layer_id=torch.tensor(index), **call["kwargs"],
                 output_this_layer=out_this, output_cross_layer=out_cross)
    if isinstance(ret, tuple):
        ret = ret[0]
    call["kwargs"].update(out_cross)
    return ret


def find_stacks(model: nn.Module) -> List[Stack]:
    """The model and every SAT model inside it (a vision tower a mixin holds), each with its own blocks."""
    return [Stack(name, module) for name, module in model.named_modules()
            if isinstance(module, BaseModel) and isinstance(getattr(module.transformer, "layers", None), nn.ModuleList)]


def _assign(stacks: List[Stack], plans: List[PlannedLayer]) -> List[PlannedLayer]:
    """Fills each stack's ``inside``: a planned linear is in block i of the innermost stack holding it, under
    ``transformer.layers.i`` or at key i of a ``ModuleList``/``ModuleDict`` with one entry per block held by a SAT mixin
    (a mixin's per-layer layers: LLaMA's ``mixins.mlp.gate_proj.i``, CogVLM's visual expert ``..._list.i``). Returns
    the linears in no block."""
    def owned(name: str, stack: Stack) -> bool:  # in the stack and in none nested inside it
        inner = [s.prefix for s in stacks if len(s.prefix) > len(stack.prefix) and s.prefix.startswith(stack.prefix)]
        return (not stack.prefix or name.startswith(stack.prefix + ".")) and not any(
            name.startswith(prefix + ".") for prefix in inner)

    def per_block_lists(stack: Stack) -> List[str]:  # held by a SAT mixin or the transformer itself, not by some
        # other module that happens to have as many entries (CogAgent's cross tower: its own ``blocks``)
        return [f"{parent_name}.{name}" if parent_name else name
                for parent_name, parent in stack.owner.named_modules(prefix=stack.prefix)
                if isinstance(parent, (BaseMixin, BaseTransformer))
                for name, m in parent.named_children()
                if isinstance(m, (nn.ModuleList, nn.ModuleDict)) and len(m) == stack.blocks
                and owned(f"{parent_name}.{name}" if parent_name else name, stack)]

    per_block = {id(stack): per_block_lists(stack) for stack in stacks}
    for stack in stacks:
        stack.inside = [[] for _ in range(stack.blocks)]
    outside = []
    for planned in plans:
        placed = False
        for stack in stacks:
            for name in planned.names:
                if not owned(name, stack):
                    continue
                for root in per_block[id(stack)]:
                    head = name[len(root) + 1:].split(".", 1)[0] if name.startswith(root + ".") else ""
                    if head.isdigit():
                        stack.inside[int(head)].append(planned)
                        placed = True
                        break
                if placed:
                    break
            if placed:
                break
        if not placed:
            outside.append(planned)
    return outside


def _refuse_meta_calls(plans: List[PlannedLayer]) -> List[Any]:
    """A block must not call a linear whose weight is not loaded (one sat_quant did not assign to it): say so."""
    def check(module, inputs):
        if module.weight.is_meta:
            raise QuantConfigError(f"calibration: a block calls the linear layer {names[id(module)]}, which sat_quant "
                                   f"did not place in that block; calibrate this model in Python with "
                                   f"sat_quant.quantize_calibrated_ (or --quant-skip the layer).")
    names = {id(p.module): p.names[0] for p in plans}
    return [p.module.register_forward_pre_hook(check) for p in plans]


def _load_full_precision(plans: List[PlannedLayer], source) -> None:
    """Read each layer's full-precision weight from ``source`` (the calibration passes run them). Loaded up front,
    not when first called: some code reads ``.weight`` straight into ``F.linear`` (CogAgent's cross-image tower),
    which a module hook never sees and which computes garbage from a meta weight without an error."""
    for planned in plans:
        if planned.module.weight.is_meta:
            weight = source.get(planned.names[0] + ".weight").to(planned.module.weight.dtype)
            planned.module._parameters["weight"] = nn.Parameter(weight, requires_grad=False)


Consume = Callable[[List[PlannedLayer], Dict[str, torch.Tensor]], None]


@torch.no_grad()
def calibrate_blocks(model: nn.Module, source, config: QuantConfig, samples: List[Sample], *, damp: float = 0.1,
                     act_order: bool = True, store_dtype: Optional[torch.dtype] = torch.bfloat16,
                     spill_bytes: int = DEFAULT_SPILL_BYTES, spill_dir: Optional[str] = None, progress: bool = True,
                     on_block: Optional[Callable[[int], None]] = None) -> BlockCalibration:
    """GPTQ for every calibratable layer inside the blocks of ``model`` and of the SAT models it holds, one block at a
    time, stack after stack (see the module docstring). ``model`` is a ``full_precision_skeleton``; ``source`` the
    full-precision checkpoint's tensors. ``store_dtype=None`` keeps activations in the model's dtype (bitwise the
    in-memory result). ``on_block`` gets each block's index within its stack as it finishes."""
    result = BlockCalibration()

    def quantize(planned: List[PlannedLayer], hessians: Dict[str, torch.Tensor]) -> None:
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

    walk_blocks(model, source, config, samples, result, quantize,
                 wants_hessian=lambda p: get_format(p.spec.format).calibratable, store_dtype=store_dtype,
                 spill_bytes=spill_bytes, spill_dir=spill_dir, progress=progress, on_block=on_block)
    return result


def walk_blocks(model: nn.Module, source, config: QuantConfig, samples: List[Sample], result: BlockCalibration,
                consume: Consume, *, wants_hessian: Callable[[PlannedLayer], bool], store_dtype: Optional[torch.dtype],
                spill_bytes: int, spill_dir: Optional[str], progress: bool,
                on_block: Optional[Callable[[int], None]], desc: str = "calibrating") -> List[PlannedLayer]:
    """Every stack's blocks in forward order, each block's weights loaded and its Hessians collected for the layers
    ``wants_hessian`` picks, then ``consume(block's planned layers, hessians)``. Returns the layers outside."""
    config.validate()
    start = time.perf_counter()
    plans = plan_layers(model, config)
    stacks = find_stacks(model)
    outside = _assign(stacks, plans)
    stacks = [stack for stack in stacks if any(stack.inside)]
    result.uncalibrated = [p.names[0] for p in outside
                           if p.spec is not None and get_format(p.spec.format).calibratable]
    if result.uncalibrated:
        log.warning("calibration: %d layer(s) outside the transformer blocks are quantized without calibration: %s",
                    len(result.uncalibrated), ", ".join(result.uncalibrated[:5]))
    guards = _refuse_meta_calls([p for stack in stacks for block in stack.inside for p in block])
    _load_full_precision(outside, source)
    try:
        remove_stale_temporaries(spill_dir or tempfile.gettempdir(), SPILL_PREFIX)  # a killed run's activations
        with tempfile.TemporaryDirectory(prefix=f"{SPILL_PREFIX}{os.getpid()}-", dir=spill_dir) as folder:
            done: Dict[str, Tuple[Stack, ActivationStore]] = {}
            while len(done) < len(stacks):
                pending = [stack for stack in stacks if stack.prefix not in done]
                store = ActivationStore(store_dtype, spill_bytes, os.path.join(folder, str(len(done))))
                os.makedirs(store.folder)
                stack, calls = capture_first_block_inputs(model, samples, store, pending, done)
                _walk_stack(stack, source, store, calls, result, consume, wants_hessian, progress, on_block, desc)
                done[stack.prefix] = (stack, store)
                result.spilled_bytes += store.spilled
    finally:
        for guard in guards:
            guard.remove()
        for planned in outside:
            weight_to_meta_(planned.module)
        release_freed_memory()
    result.seconds = time.perf_counter() - start
    return outside


def _walk_stack(stack: Stack, source, store: ActivationStore, calls: List[Dict[str, Any]], result: BlockCalibration,
                consume: Consume, wants_hessian, progress, on_block, desc: str) -> None:
    """One stack's blocks in order; ``store`` holds the first block's inputs and ends with the last's outputs (full
    precision: what later stacks replay)."""
    owner = stack.owner
    _sync_hooks(owner)  # run_block calls the blocks directly, not through the model's forward
    act_dtype = next((p.dtype for p in owner.parameters() if p.is_floating_point() and not p.is_meta), torch.float32)
    desc = desc if not stack.prefix else f"{desc} {stack.prefix}"
    for index in tqdm(range(stack.blocks), desc=desc, unit="block", disable=not progress):
        planned = stack.inside[index]
        for p in planned:  # this block's linear weights, full precision, read from the source
            weight = source.get(p.names[0] + ".weight").to(p.module.weight.dtype)
            p.module._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
        measured = {p.names[0]: p for p in planned if p.spec is not None and wants_hessian(p)}

        def run(_model, index=index):
            for i in range(len(calls)):
                store.put(i, run_block(owner, index, store.get(i, act_dtype), calls[i]))

        if measured:
            # a layer the samples never reach (CogVLM's visual expert under text-only samples) is quantized plainly
            hessians = collect_hessians(owner, run, {n: p.module for n, p in measured.items()}, allow_missing=True)
            unreached = [n for n in measured if n not in hessians]
            if unreached:
                result.uncalibrated += unreached
                log.warning("calibration: the samples never reach %d layer(s) of %s (e.g. %s): quantized without "
                            "calibration; calibrate with inputs that use them (CogVLM: image prompts)",
                            len(unreached), stack.name, unreached[0])
        else:
            hessians = {}
            run(owner)
        consume(planned, hessians)
        for p in planned:
            weight_to_meta_(p.module)
        release_freed_memory()
        if on_block is not None:
            on_block(index)


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
           "walk_blocks", "find_stacks", "Stack", "ActivationStore", "BlockCalibration", "DEFAULT_SPILL_BYTES"]
