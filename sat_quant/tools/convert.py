"""``sat-quant convert``: a full-precision SAT checkpoint folder → a sat_quant checkpoint folder, in bounded memory.

The quantized model is built on meta (no storage); its checkpoint is then written one module at a time, each read
from the memory-mapped source, quantized, written and dropped (:mod:`sat_quant.tools.convert_stream`). Neither the
full-precision nor the quantized model is ever held: the peak is about the largest module's tensors, so a 35 GB
checkpoint converts on a machine with far less memory. The result is written beside DST and published atomically.
"""
from __future__ import annotations

import logging
import time
from typing import List, Optional

from ..engine.config import QuantConfig
from ..io.commit import check_destination, staged_folder
from ..io.load import check_fits
from ..io.save import save_model
from ..oom import oom_guidance
from ..sat.checkpoint import model_config_dict
from .convert_stream import Throughput, converted_stream, quantized_on_meta
from .sources import ProgressSource, open_full_precision

log = logging.getLogger(__name__)


def convert(src: str, dst: str, config: QuantConfig, *, imports: Optional[List[str]] = None,
            overwrite: bool = False, progress: bool = True) -> str:
    """Quantize the full-precision SAT checkpoint ``src`` into a sat_quant checkpoint at ``dst``; returns ``dst``.

    With ``progress``, a bar while it runs and one line of read / quantize / write MB/s at the end (always logged).
    """
    config.validate()
    check_destination(dst, overwrite, src=src, verb="convert")  # before any work
    with oom_guidance(f"converting {src}", quant_bits=config.bits):
        fp = open_full_precision(src, "convert", imports)
        model = quantized_on_meta(fp.args, fp.cls, config)
        source = ProgressSource(fp.source, enabled=progress)
        check_fits(model, source)  # every name, shape and dtype before anything is written
        stats = Throughput()
        with staged_folder(dst, overwrite=overwrite, src=src, verb="convert") as tmp:
            start = time.perf_counter()
            save_model(model, tmp, model_config_dict(model, fp.args), iteration=fp.iteration,
                       tensors=converted_stream(model, source, stats))
            stats.total_s = time.perf_counter() - start
        source.bar.close()
    log.info("convert %s: %s", src, stats.summary())
    if progress:
        print(f"convert: {stats.summary()}")
    return dst


__all__ = ["convert"]
