"""QuantMixin: the SAT-side handle of a quantized model.

SAT's ``save_checkpoint`` writes into model_config.json every arg declared by any submodule's
``add_model_specific_args``; this mixin declares the sat_quant flags, so a quantized model's
config records ``quant``, ``quant_format``, ... with no change to SAT. It also keeps the
QuantConfig used, for code that needs to know how the model was built.
"""
from __future__ import annotations

from sat.model.base_model import BaseMixin

from ..engine.config import QuantConfig
from .args import add_quant_args


class QuantMixin(BaseMixin):
    def __init__(self, config: QuantConfig) -> None:
        super().__init__()
        self.quant_config = config

    @classmethod
    def add_model_specific_args(cls, parser):
        return add_quant_args(parser)
