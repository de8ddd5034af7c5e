"""Convert's data path in bounded memory: the quantized model built on meta, then its checkpoint tensors produced
from the full-precision source one module at a time, as the writer reaches them.

Why: a full-precision CogVLM-17B is 35 GB and its int4 checkpoint 9 GB; holding either would not fit a 24 GiB
machine beside the other. The model built here has no storage at all (every tensor on meta): it gives the names,
shapes, dtypes, the per-layer formats and the quantization block, exactly as the model a load would build. Each
module's tensors are then read from the source (its float weight quantized with the layer's format, everything else
cast to the model's dtype, as ``io.load.fill`` would), written and dropped, so the peak is about one module's full
precision tensors plus their quantization temporaries, whatever the model's size. The bytes written are the ones
the in-memory path (build, fill, ``save_checkpoint``) writes: a layer's saved tensors are its format's kernel-neutral
ones, which the backends' ``prepare``/``to_neutral`` round trip leaves unchanged.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Dict, Iterator, Optional

import torch
from torch import nn

from ..engine.config import QuantConfig
from ..engine.layers import QuantLinear
from ..engine.replace import everything_on_meta, plan_layers, quant_layer_for, release_freed_memory, set_submodule
from ..io.save import expected_layout, saved_tensors
from ..io.tensorfile import TensorStream
from ..sat.args import params_dtype
from ..sat.build import attach_quant_mixin, record_in_args


def quantized_on_meta(args: argparse.Namespace, model_cls: type, config: QuantConfig) -> nn.Module:
    """``model_cls(args)`` quantized per ``config`` with every tensor on meta: the model ``sat.build.build_quantized``
    builds for a checkpoint (same modules, names, dtypes, per-layer formats, QuantMixin and ``args`` record), but
    with no storage. ``build_quantized`` itself cannot run on meta: it fills what stays full precision."""
    with everything_on_meta():
        model = model_cls(args, params_dtype=params_dtype(args))
        plans = plan_layers(model, config)  # every shape error at once, as a load reports them
        linear_weights = {id(p.module.weight) for p in plans}
        # a layer left full precision gets the dtype of the model's other parameters, as quantize_ gives it
        fp_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point() and id(p) not in linear_weights),
                        torch.float32)
        for planned in plans:
            module = planned.module
            if planned.spec is None:
                module._parameters["weight"] = nn.Parameter(module.weight.to(fp_dtype),
                                                            requires_grad=module.weight.requires_grad)
                continue
            layer = _meta_layer(module, planned.spec, config.backend)
            for name in planned.names:
                set_submodule(model, name, layer)
    if getattr(args, "fp16", False):
        model.half()
    elif getattr(args, "bf16", False):
        model.bfloat16()
    attach_quant_mixin(model, config)
    record_in_args(args, model, config)
    return model


def _meta_layer(module: nn.Module, spec, backend: str) -> QuantLinear:
    """The quantized layer ``engine.replace.quantize_`` puts in ``module``'s place, on meta (reference kernels: the
    only ones that accept meta; the backend asked for is recorded, and picked at load)."""
    layer = quant_layer_for(module, spec, "reference", torch.device("meta"))
    layer.backend_request = backend
    return layer


@dataclass
class Throughput:
    """Bytes and seconds of each stage of a conversion, for the MB/s line it ends with."""

    read_bytes: int = 0
    read_s: float = 0.0
    quantized_bytes: int = 0  # full-precision bytes that went through a format's quantize
    quantize_s: float = 0.0
    written_bytes: int = 0
    total_s: float = 0.0  # the whole write, production included

    def summary(self) -> str:
        write_s = max(self.total_s - self.read_s - self.quantize_s, 1e-9)
        rate = lambda n, s: f"{n / 1e6:,.0f} MB in {s:.1f} s ({n / 1e6 / max(s, 1e-9):,.0f} MB/s)"
        return (f"read {rate(self.read_bytes, self.read_s)}, quantized {rate(self.quantized_bytes, self.quantize_s)}, "
                f"wrote {rate(self.written_bytes, write_s)}")


def converted_stream(model: nn.Module, source, stats: Throughput,
                     quantized: Optional[Dict[str, Dict[str, torch.Tensor]]] = None) -> TensorStream:
    """The checkpoint tensors of ``model`` (built by ``quantized_on_meta``, checked against ``source`` by
    ``io.load.check_fits``) produced from ``source`` one module at a time, in ``expected_layout`` order.
    ``quantized`` holds layers already quantized (by calibration), by name: their tensors are taken from it."""
    layout = expected_layout(model)
    stats.written_bytes = sum(torch.Size(shape).numel() * dtype.itemsize for shape, dtype in layout.values())
    return TensorStream(layout, _module_groups(model, source, stats, quantized or {}))


def _read(source, name: str, stats: Throughput) -> torch.Tensor:
    start = time.perf_counter()
    tensor = source.get(name)  # owned: no page of the source's map stays resident
    stats.read_s += time.perf_counter() - start
    stats.read_bytes += tensor.numel() * tensor.element_size()
    return tensor


def _module_groups(model: nn.Module, source, stats: Throughput,
                   quantized: Dict[str, Dict[str, torch.Tensor]]) -> Iterator[Dict[str, torch.Tensor]]:
    """One dict per module owning saved tensors, the same modules and values ``io.load.fill`` then
    ``io.save.model_tensor_stream`` would give; each is dropped before the next is read."""
    have = source.layout()
    for prefix, module in model.named_modules():  # each module once, even where it is shared
        pre = prefix + "." if prefix else ""
        group = {pre + n: _read(source, pre + n, stats).to(t.dtype) for n, t in saved_tensors(module)}
        if isinstance(module, QuantLinear):
            names = list(module.fmt.layout(module.spec))
            if prefix in quantized:  # calibrated: quantized already, dropped once written
                group.update({pre + n: t for n, t in quantized.pop(prefix).items()})
            elif all(pre + n in have for n in names):  # already packed in the source: passed through as load does
                group.update({pre + n: _read(source, pre + n, stats) for n in names})
            else:
                weight = _read(source, pre + "weight", stats)
                start = time.perf_counter()
                with torch.no_grad():
                    neutral = module.fmt.quantize(weight, module.spec)
                stats.quantize_s += time.perf_counter() - start
                stats.quantized_bytes += weight.numel() * weight.element_size()
                group.update({pre + n: t.contiguous() for n, t in neutral.items()})
                del weight, neutral
        if group:
            size = sum(t.numel() * t.element_size() for t in group.values())
            yield group
            del group
            release_freed_memory(2 * size)  # the group and its temporaries go back to the OS


__all__ = ["quantized_on_meta", "converted_stream", "Throughput"]
