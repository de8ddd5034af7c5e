"""``sat-quant estimate``: weights by component, KV cache and peak activations, for any SAT model and QuantConfig.

The model is built entirely on the meta device (no memory, seconds even for CogVLM-17B) and priced with
the same per-layer plan and byte counts the real build uses, so for a built model the weight figure
equals ``quant_report(model).bytes_after`` exactly.
"""
from __future__ import annotations

import argparse
import fnmatch
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ..engine.backends import select_backend
from ..engine.config import QuantConfig
from ..engine.formats import get_format
from ..engine.replace import is_target, plan_layers
from ..sat.build import build_on_meta

# (component, globs) in priority order; the first match names a tensor's component.
COMPONENTS: Sequence[Tuple[str, Tuple[str, ...]]] = (
    ("cross vision tower", ("mixins.encoder.*",)),  # CogAgent's high-resolution EVA2-CLIP-L
    ("cross-attention", ("transformer.layers.*.cross_attention.*", "transformer.layers.*.post_cross_attention_*")),
    ("vision tower", ("mixins.eva.vit_model.*", "*vit_model.*")),
    ("vision adapter", ("mixins.eva.linear_proj.*",)),
    ("visual expert", ("mixins.*.vision_*",)),
    ("embeddings + LM head", ("transformer.word_embeddings.*", "transformer.position_embeddings.*",
                              "mixins.lm.*", "*lm_head*", "mixins.*final*")),
    ("language model", ("transformer.*", "mixins.*")),
)


def component_of(name: str) -> str:
    for component, patterns in COMPONENTS:
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return component
    return "other"


@dataclass
class Estimate:
    """Bytes per component (weights), plus KV cache and activations for one forward."""

    weights: Dict[str, int] = field(default_factory=OrderedDict)
    params: Dict[str, int] = field(default_factory=OrderedDict)
    #: what quantized layers' kernels derive and keep once they have run (``Backend.cache_nbytes``)
    kernel_caches: int = 0
    kv_cache: int = 0
    activations: int = 0

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def total(self) -> int:
        return self.weight_bytes + self.kernel_caches + self.kv_cache + self.activations


def estimate_weights(model: nn.Module, config: Optional[QuantConfig], device: str = "cuda") -> Estimate:
    """Price every parameter and buffer of ``model`` (built on meta or real) under ``config``, and the caches the
    quantized layers' kernels keep when they run on ``device`` (the backend ``auto``, or the config's, picks there)."""
    est = Estimate()
    requested = "auto" if config is None or not config.backend else config.backend

    def cache(fmt, spec) -> int:
        return select_backend(requested, fmt, spec, device).cache_nbytes(fmt, spec, torch.device(device))

    plan: Dict[int, Optional[object]] = {}
    if config is not None:
        plan = {id(p.module): p.spec for p in plan_layers(model, config)}
    for prefix, module in model.named_modules():  # each module once, even where it is shared
        pre = prefix + "." if prefix else ""
        spec = plan.get(id(module)) if is_target(module) else None
        tensors = [(n, t) for n, t in list(module._parameters.items()) + list(module._buffers.items()) if t is not None]
        for n, t in tensors:
            component = component_of(pre + n)
            if n == "weight" and spec is not None:
                nbytes = get_format(spec.format).nbytes(spec)
                est.kernel_caches += cache(get_format(spec.format), spec)
            else:
                nbytes = t.numel() * t.element_size()
            est.weights[component] = est.weights.get(component, 0) + nbytes
            if isinstance(t, nn.Parameter):
                est.params[component] = est.params.get(component, 0) + t.numel()
        if hasattr(module, "quantized_nbytes"):  # an already quantized layer: its packed tensors
            component = component_of(pre + "weight")
            est.weights[component] = est.weights.get(component, 0) + module.quantized_nbytes()
            est.kernel_caches += cache(module.fmt, module.spec)
            est.params[component] = est.params.get(component, 0) + module.out_features * module.in_features
    return est


def estimate_runtime(args: argparse.Namespace, batch: int, seq: int, act_bytes: int = 2) -> Tuple[int, int]:
    """(KV cache, peak activations) in bytes for one forward of ``batch`` x ``seq`` tokens.

    KV cache: 2 (K and V) x layers x batch x seq x hidden x act_bytes, plus, for a model with cross-attention
    (CogAgent: ``is_decoder``), its keys and values over the cross image's patches, cached once per image
    (``mems_cross``): 2 x layers x batch x (cross_image_pix / 14)^2 x heads x cross head size x act_bytes.
    Activations: the largest live set of one transformer layer (input, QKV, MLP intermediate, attention scores in
    fp32) plus the logits (batch x seq x vocab x 4 bytes: SAT computes the LM head on every position).
    """
    hidden, layers = args.hidden_size, args.num_layers
    heads = args.num_attention_heads
    inner = getattr(args, "inner_hidden_size", None) or 4 * hidden
    vocab = args.vocab_size
    kv = 2 * layers * batch * seq * hidden * act_bytes
    if getattr(args, "is_decoder", False) and getattr(args, "cross_image_pix", None):
        cross_len = (args.cross_image_pix // 14) ** 2
        cross_width = heads * (getattr(args, "cross_hidden_size_per_attention_head", None) or hidden // heads)
        kv += 2 * layers * batch * cross_len * cross_width * act_bytes
    per_layer = batch * seq * (2 * hidden + 3 * hidden + 2 * inner) * act_bytes + batch * heads * seq * seq * 4
    logits = batch * seq * vocab * 4
    return kv, per_layer + logits


def format_estimates(columns: "OrderedDict[str, Estimate]") -> str:
    names = list(columns)
    components = []
    for est in columns.values():
        components += [c for c in est.weights if c not in components]
    gib = lambda b: f"{b / 2**30:9.2f}"
    lines = [f"{'GiB':<30}" + "".join(f"{n:>12}" for n in names)]
    first = next(iter(columns.values()))
    for c in components:
        params = first.params.get(c, 0)
        label = f"{c} ({params / 1e9:.2f}B)" if params >= 1e7 else c
        lines.append(f"{label:<30}" + "".join(f"{gib(columns[n].weights.get(c, 0)):>12}" for n in names))
    lines.append(f"{'weights':<30}" + "".join(f"{gib(columns[n].weight_bytes):>12}" for n in names))
    lines.append(f"{'kernel caches (run time)':<30}" + "".join(f"{gib(columns[n].kernel_caches):>12}" for n in names))
    lines.append(f"{'KV cache':<30}" + "".join(f"{gib(columns[n].kv_cache):>12}" for n in names))
    lines.append(f"{'activations (peak)':<30}" + "".join(f"{gib(columns[n].activations):>12}" for n in names))
    lines.append(f"{'total':<30}" + "".join(f"{gib(columns[n].total):>12}" for n in names))
    return "\n".join(lines)


def estimate_table(model_cls, args: argparse.Namespace, configs: "OrderedDict[str, Optional[QuantConfig]]",
                   batch: int = 1, seq: int = 2048, device: str = "cuda") -> Tuple[str, "OrderedDict[str, Estimate]"]:
    """One column per named config (None = the model's dtype, unquantized), the model built once on meta per dtype;
    kernel caches as they are on ``device``."""
    columns: "OrderedDict[str, Estimate]" = OrderedDict()
    cache: Dict[torch.dtype, nn.Module] = {}
    for label, config in configs.items():
        dtype = torch.bfloat16 if label == "bf16" else torch.float32 if label == "fp32" else torch.float16
        if dtype not in cache:
            cache[dtype] = build_on_meta(model_cls, args, dtype)
        est = estimate_weights(cache[dtype], config, device)
        act_bytes = 4 if dtype == torch.float32 else 2
        est.kv_cache, est.activations = estimate_runtime(args, batch, seq, act_bytes)
        columns[label] = est
    return format_estimates(columns), columns
