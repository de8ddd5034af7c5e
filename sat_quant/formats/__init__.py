"""Registry of weight formats, by name. ``--quant-format`` accepts these names."""
from __future__ import annotations

from typing import Dict, List

from ..errors import QuantConfigError
from .base import LayerSpec, WeightFormat, pack_nibbles, unpack_nibbles
from .float4 import FP4, NF4
from .int4 import Int4Grouped
from .int4c import Int4Compact
from .int8 import Int8PerChannel

FORMATS: Dict[str, WeightFormat] = {f.name: f for f in (Int8PerChannel(), Int4Grouped(), Int4Compact(), NF4(), FP4())}
DEFAULT_FORMAT_FOR_BITS = {8: "int8", 4: "int4"}


def get_format(name: str) -> WeightFormat:
    """Look a format up by name; unknown names get the list of known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise QuantConfigError(f"unknown quantization format '{name}'; --quant-format takes one of "
                               f"{', '.join(sorted(FORMATS))}.") from None


def format_names() -> List[str]:
    return sorted(FORMATS)


__all__ = ["FORMATS", "DEFAULT_FORMAT_FOR_BITS", "LayerSpec", "WeightFormat", "get_format", "format_names",
           "pack_nibbles", "unpack_nibbles"]
