"""sat_quant: quantization for SwissArmyTransformer models, applied while the model is built.

Public API (see README.md):
- flags: ``add_quant_args``, ``validate_quant_args``
- config: ``QuantConfig``
- building: ``get_model`` (drop-in for SAT's), ``quantize_`` (an already built model), ``linear_weights_on_meta``
- checkpoints: ``save_checkpoint``, ``from_pretrained`` (SAT layout, safetensors, atomic, verified)
- layers: ``QuantLinear``, ``QuantColumnParallelLinear``, ``QuantRowParallelLinear``
- report: ``quant_report``, ``QuantReport``
- CPU helpers: ``apply_cpu_compat``, ``install_xformers_cpu_fallback``
"""
from .args import add_quant_args, get_args, validate_quant_args
from .build import get_model, linear_weights_on_meta, quantize_, quantized_class
from .checkpoint import CheckpointError, save_checkpoint
from .loading import from_pretrained
from .config import QuantConfig
from .errors import QuantBackendError, QuantConfigError, QuantError
from .formats import FORMATS, get_format
from .layers import QuantColumnParallelLinear, QuantLinear, QuantRowParallelLinear
from .mixin import QuantMixin
from .report import QuantReport, quant_report

__version__ = "0.1.0"


def __getattr__(name):  # the CPU compat layer imports xformers lazily; keep `import sat_quant` light
    if name in ("apply_cpu_compat", "install_xformers_cpu_fallback"):
        from . import compat
        return getattr(compat, name)
    raise AttributeError(name)


__all__ = ["save_checkpoint", "from_pretrained", "CheckpointError", "add_quant_args", "get_args", "validate_quant_args", "get_model", "quantize_", "quantized_class", "linear_weights_on_meta",
           "QuantConfig", "QuantError", "QuantConfigError", "QuantBackendError", "FORMATS", "get_format",
           "QuantLinear", "QuantColumnParallelLinear", "QuantRowParallelLinear", "QuantMixin", "QuantReport",
           "quant_report", "apply_cpu_compat", "install_xformers_cpu_fallback", "__version__"]
