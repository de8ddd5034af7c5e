"""sat_quant: quantization for SwissArmyTransformer models, applied while the model is built.

The public API, by job (README.md has runnable examples):

- flags: ``add_quant_args``, ``validate_quant_args``, ``get_args`` (SAT's, plus ``--quant*``, validated)
- config: ``QuantConfig``; ``get_format`` (a format by name)
- building: ``get_model`` (drop-in for SAT's), ``quantized_class`` (a SAT class that quantizes itself, for SAT's own
  entry points), ``quantize_`` (an already built model)
- checkpoints: ``save_checkpoint``, ``from_pretrained`` (SAT's layout, safetensors, atomic, verified)
- offline jobs on checkpoint folders: ``convert``, ``dequantize``, ``reshard``, ``merge_lora_checkpoint``,
  ``inspect_checkpoint``, ``plan_checkpoint``
- fine-tuning: ``QuantLoraMixin`` (SAT mixin), ``add_lora_`` / ``merge_lora_`` (LoRA on a model in memory)
- quality: ``quantize_calibrated_`` (GPTQ from a few inputs), ``plan_quantization`` / ``quantize_to_budget_`` and
  ``QuantPlan`` (per-layer formats to fit ``--quant-budget``)
- inspection: ``quant_report`` / ``QuantReport``, ``QuantLinear`` (what a quantized layer is)
- errors: ``QuantError`` and its kinds; ``oom_guidance`` (advice instead of a bare out-of-memory error)
- CPU: ``apply_cpu_compat``, ``install_xformers_cpu_fallback``

Everything else is reachable in its layer (``sat_quant.engine``, ``.algorithms``, ``.io``, ``.sat``, ``.tools``; see
docs/ARCHITECTURE.md). Names are imported on first use, so ``import sat_quant`` does not import SAT or deepspeed.
Once SAT is imported, its own ``AutoModel.from_pretrained``, ``Model.from_pretrained`` and ``load_checkpoint``
(``--load``) read sat_quant checkpoints too (:mod:`sat_quant.sat.native`).
"""
from __future__ import annotations

import importlib
from typing import Any, List

import wrapt

from ._version import __version__ as __version__
from .errors import CheckpointError as CheckpointError
from .errors import QuantBackendError as QuantBackendError
from .errors import QuantConfigError as QuantConfigError
from .errors import QuantError as QuantError

# public name → the module (relative to this package) that defines it
_LAZY = {
    "add_quant_args": "sat.args", "validate_quant_args": "sat.args", "get_args": "sat.args",
    "QuantConfig": "engine.config", "get_format": "engine.formats",
    "get_model": "sat.build", "quantized_class": "sat.build", "quantize_": "engine.replace",
    "save_checkpoint": "sat.checkpoint", "from_pretrained": "sat.loading",
    "convert": "tools.convert", "dequantize": "tools.dequantize", "reshard": "tools.reshard",
    "merge_lora_checkpoint": "tools.merge_lora", "inspect_checkpoint": "tools.inspect_checkpoint",
    "plan_checkpoint": "tools.plan",
    "QuantLoraMixin": "sat.lora_mixin", "add_lora_": "engine.lora", "merge_lora_": "engine.lora",
    "quantize_calibrated_": "algorithms.calibration", "plan_quantization": "algorithms.planner",
    "quantize_to_budget_": "algorithms.planner", "QuantPlan": "algorithms.planner",
    "quant_report": "engine.report", "QuantReport": "engine.report", "QuantLinear": "engine.layers",
    "oom_guidance": "oom", "QuantOutOfMemoryError": "oom",
    "apply_cpu_compat": "sat.compat", "install_xformers_cpu_fallback": "sat.compat", "KVCacheMixin": "sat.kv_cache",
    "cache_cross_image": "sat.generation",
}


def _install_sat_loaders(sat_module: Any) -> None:
    """Runs once SAT is imported (now, if it already is): SAT's own loaders then read sat_quant checkpoints."""
    importlib.import_module(".sat.native", __name__).install(sat_module)


wrapt.register_post_import_hook(_install_sat_loaders, "sat")


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sat_quant' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> List[str]:
    return sorted(__all__)


__all__ = sorted(["__version__", "CheckpointError", "QuantBackendError", "QuantConfigError", "QuantError", *_LAZY])
