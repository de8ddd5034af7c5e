"""Registry of weight formats, by name. ``--quant-format`` accepts these names.

Each format module registers itself with ``@register_format``; importing them here fills ``FORMATS``.
"""
from __future__ import annotations

from typing import Dict, List

from ...errors import QuantConfigError
from . import float4, int4, int4c, int4cs, int8  # noqa: F401  (each registers its formats)
from .base import FORMATS, LayerSpec, WeightFormat, pack_nibbles, register_format, unpack_nibbles

#: what ``--quant 8`` / ``--quant 4`` pick without ``--quant-format``
DEFAULT_FORMAT_FOR_BITS: Dict[int, str] = {f.bits: f.name for f in FORMATS.values() if f.default_for_bits}


def get_format(name: str) -> WeightFormat:
    """Look a format up by name; unknown names get the list of known ones."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise QuantConfigError(f"unknown quantization format {name!r}; --quant-format takes one of "
                               f"{', '.join(sorted(FORMATS))}.") from None


def format_names() -> List[str]:
    return sorted(FORMATS)


__all__ = ["FORMATS", "DEFAULT_FORMAT_FOR_BITS", "LayerSpec", "WeightFormat", "get_format", "format_names",
           "pack_nibbles", "register_format", "unpack_nibbles"]
