"""``sat-quant convert``: a full-precision SAT checkpoint folder → a sat_quant checkpoint folder.

The model is built quantized on meta, then each weight is quantized as it is read from the memory-mapped source:
the full-precision model is never materialised. The result is written beside DST and published atomically.
"""
from __future__ import annotations

from typing import List, Optional

from ..engine.config import QuantConfig
from ..io.commit import check_destination, staged_folder
from ..io.load import load_into
from ..oom import oom_guidance
from ..sat.build import build_quantized
from ..sat.checkpoint import save_checkpoint
from .sources import ProgressSource, open_full_precision


def convert(src: str, dst: str, config: QuantConfig, *, imports: Optional[List[str]] = None,
            overwrite: bool = False, progress: bool = True) -> str:
    """Quantize the full-precision SAT checkpoint ``src`` into a sat_quant checkpoint at ``dst``; returns ``dst``."""
    config.validate()
    check_destination(dst, overwrite, src=src, verb="convert")  # before any work
    with oom_guidance(f"converting {src}", quant_bits=config.bits):
        fp = open_full_precision(src, "convert", imports)
        model = build_quantized(fp.args, fp.cls, config)
        load_into(model, ProgressSource(fp.source, enabled=progress))
        with staged_folder(dst, overwrite=overwrite, src=src, verb="convert") as tmp:
            save_checkpoint(model, tmp, args=fp.args, iteration=fp.iteration)
    return dst


__all__ = ["convert"]
