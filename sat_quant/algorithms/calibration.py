"""Optional calibration: a few real inputs make 4-bit weights markedly better (GPTQ).

Round-to-nearest treats every input column alike; real activations are far from alike (all-MiniLM-L6-v2's
LayerNorm outputs have channels with 200-600x the median mean square), so errors in those columns cost the
most. :func:`collect_hessians` records ``H = E[x x^T]`` of each linear's input while the caller runs the
full-precision model on its own inputs; :func:`quantize_calibrated_` then quantizes the ``int4``/``int4c``
layers with GPTQ against H (other formats as usual) and installs the result.

Cost (measured on one thread of a 2-core CPU shared with other jobs): H of a 4096-input layer is 64 MB in
float32; the scale search + GPTQ of a 4096 x 4096 layer take ~4-6 s (round to nearest: 0.1 s), on top of the
calibration forward passes. On MiniLM (32 sentences one at a time, 24 layers) the whole job takes ~3 s.

``run(model)`` is whatever calls the model on calibration data (sat_quant cannot know a model's inputs):
e.g. ``lambda m: minilm.embed(m, tokenizer, sentences, batch_size=1)``. Run sentences one at a time (or
mask padding out) so padding tokens do not enter H.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List

import torch
from torch import nn

from ..engine.config import QuantConfig
from ..engine.formats import get_format
from ..engine.replace import plan_layers, quantize_, weight_to_meta_
from ..engine.report import QuantReport
from ..errors import QuantConfigError

RunFn = Callable[[nn.Module], Any]
DEFAULT_MAX_HESSIAN_BYTES = 2 * 2**30   # layers per calibration pass: 2 GiB of float32 H (32 layers of 4096)


def _hessian_chunks(modules: Dict[str, nn.Module], max_bytes: int) -> List[List[str]]:
    """Split layers into groups whose H fit ``max_bytes`` together (each group costs one run of the model)."""
    chunks: List[List[str]] = [[]]
    used = 0
    for name, module in modules.items():
        size = 4 * module.weight.shape[1] ** 2
        if chunks[-1] and used + size > max_bytes:
            chunks.append([])
            used = 0
        chunks[-1].append(name)
        used += size
    return [c for c in chunks if c]


@torch.no_grad()
def collect_hessians(model: nn.Module, run: RunFn, modules: Dict[str, nn.Module],
                     allow_missing: bool = False) -> Dict[str, torch.Tensor]:
    """``{name: E[x x^T]}`` (float32 [in, in]) of each given linear's input over one ``run(model)``.

    Forward hooks see every call of the layer (a layer used twice contributes twice); the model must still
    hold full-precision weights. A layer ``run`` never calls is an error, or, with ``allow_missing``, left out.
    """
    sums: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {}
    handles = []

    def hook(name):
        def accumulate(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            if name not in sums:
                sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
                counts[name] = 0
            sums[name].addmm_(x.t(), x)
            counts[name] += x.shape[0]
        return accumulate

    for name, module in modules.items():
        handles.append(module.register_forward_hook(hook(name)))
    try:
        run(model)
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in modules if n not in sums]
    if missing and not allow_missing:
        raise QuantConfigError(f"calibration: run(model) never called {len(missing)} layer(s), e.g. {missing[:3]}; "
                               f"the calibration inputs must reach every layer being calibrated.")
    return {n: sums[n] / max(counts[n], 1) for n in modules if n in sums}


def iter_hessians(model: nn.Module, run: RunFn, modules: Dict[str, nn.Module],
                  max_bytes: int = DEFAULT_MAX_HESSIAN_BYTES) -> Iterable[Dict[str, torch.Tensor]]:
    """Hessians a chunk of layers at a time (one ``run`` per chunk), so their memory stays under ``max_bytes``."""
    for chunk in _hessian_chunks(modules, max_bytes):
        yield collect_hessians(model, run, {n: modules[n] for n in chunk})


@torch.no_grad()
def quantize_calibrated_(model: nn.Module, config: QuantConfig, run: RunFn, *, damp: float = 0.1,
                         act_order: bool = True, max_hessian_bytes: int = DEFAULT_MAX_HESSIAN_BYTES) -> QuantReport:
    """``quantize_(model, config)`` with GPTQ for every ``int4``/``int4c`` layer, calibrated by ``run(model)``.

    ``model`` must be full precision (already built, weights loaded). Other formats quantize as usual. Each
    calibrated layer's float weight is freed (moved to meta) as soon as its GPTQ result is held.
    """
    config.validate()
    plans = plan_layers(model, config)
    calibrated = {p.names[0]: p for p in plans if p.spec is not None and get_format(p.spec.format).calibratable}
    if any(p.module.weight.is_meta for p in calibrated.values()):
        raise QuantConfigError("quantize_calibrated_ needs the full-precision weights; load them first "
                               "(a model built with --quant on meta has none).")
    neutral: Dict[str, Dict[str, torch.Tensor]] = {}
    modules = {name: p.module for name, p in calibrated.items()}
    for hessians in iter_hessians(model, run, modules, max_hessian_bytes):
        for name, hessian in hessians.items():
            planned = calibrated[name]
            fmt_quantize = get_format(planned.spec.format).quantize
            neutral[name] = fmt_quantize(planned.module.weight, planned.spec, hessian=hessian, damp=damp,
                                         act_order=act_order)
        for name in hessians:
            weight_to_meta_(calibrated[name].module)
    report = quantize_(model, config, init_std=None)
    for name, tensors in neutral.items():
        model.get_submodule(name).load_neutral_(tensors)
    return report


__all__ = ["collect_hessians", "iter_hessians", "quantize_calibrated_", "DEFAULT_MAX_HESSIAN_BYTES"]
