"""sat_quant: quantization for SwissArmyTransformer models, applied while the model is built.

Public API (see README.md):
- flags: ``add_quant_args``, ``validate_quant_args``
- config: ``QuantConfig``
- building: ``get_model`` (drop-in for SAT's), ``quantize_`` (an already built model), ``linear_weights_on_meta``
- checkpoints: ``save_checkpoint``, ``from_pretrained`` (SAT layout, safetensors, atomic, verified),
  ``convert`` / ``dequantize`` / ``reshard`` (offline, on checkpoint folders)
- fine-tuning: ``QuantLoraMixin`` (SAT mixin), ``add_lora_``, ``merge_lora_`` (LoRA on quantized layers),
  ``merge_lora`` (offline, on a QLoRA checkpoint)
- layers: ``QuantLinear``, ``QuantColumnParallelLinear``, ``QuantRowParallelLinear``
- report: ``quant_report``, ``QuantReport``
- quality: ``quantize_calibrated_`` (GPTQ from a few inputs), ``plan_quantization`` / ``quantize_to_budget_``
  (per-layer formats to fit ``--quant-budget``), ``QuantPlan``
- scripts (patches/): ``sat_quant.scripts.load_for_inference``; ``oom_guidance`` (advice instead of a bare OOM)
- CPU helpers: ``apply_cpu_compat``, ``install_xformers_cpu_fallback``
"""
from .args import add_quant_args, get_args, validate_quant_args
from .calibration import quantize_calibrated_
from .build import get_model, linear_weights_on_meta, quantize_, quantized_class
from .checkpoint import CheckpointError, save_checkpoint
from .config import QuantConfig
from .convert import convert, dequantize, merge_lora, reshard
from .errors import QuantBackendError, QuantConfigError, QuantError
from .formats import FORMATS, get_format
from .layers import QuantColumnParallelLinear, QuantLinear, QuantRowParallelLinear
from .loading import from_pretrained
from .lora import QuantLoraMixin, add_lora_, merge_lora_
from .mixin import QuantMixin
from .oom import QuantOutOfMemoryError, oom_guidance
from .planner import QuantPlan, plan_quantization, quantize_to_budget_
from .report import QuantReport, quant_report

__version__ = "0.1.0"


def __getattr__(name):  # the CPU compat layer imports xformers lazily; keep `import sat_quant` light
    if name in ("apply_cpu_compat", "install_xformers_cpu_fallback"):
        from . import compat
        return getattr(compat, name)
    raise AttributeError(name)


__all__ = ["add_quant_args", "get_args", "validate_quant_args", "QuantConfig",
           "get_model", "quantize_", "quantized_class", "linear_weights_on_meta",
           "save_checkpoint", "from_pretrained", "convert", "dequantize", "reshard", "merge_lora", "add_lora_", "merge_lora_",
           "QuantLoraMixin",
           "QuantLinear", "QuantColumnParallelLinear", "QuantRowParallelLinear", "QuantMixin",
           "QuantReport", "quant_report", "quantize_calibrated_", "plan_quantization", "quantize_to_budget_",
           "QuantPlan", "FORMATS", "get_format", "apply_cpu_compat", "install_xformers_cpu_fallback",
           "QuantError", "QuantConfigError", "QuantOutOfMemoryError", "oom_guidance", "QuantBackendError", "CheckpointError", "__version__"]
