"""``sat-quant merge-lora``: fold a QLoRA checkpoint's adapters into its base, offline, into a new folder.

Three things carry "merge" in their name and differ in what they act on: this module's ``merge_lora_checkpoint``
(checkpoint folders), :func:`sat_quant.engine.lora.merge_lora_` (a model in memory) and
``QuantLoraMixin.merge_lora`` (SAT LoraMixin's method name, for scripts that call it on a model).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..engine.lora import merge_lora_
from ..errors import CheckpointError
from ..io.commit import check_destination, staged_folder
from ..io.layout import read_latest, read_model_config
from ..oom import oom_guidance
from ..sat.checkpoint import save_checkpoint
from ..sat.loading import from_pretrained
from .dequantize import write_full_precision
from .sources import import_modules


def merge_lora_checkpoint(src: str, dst: str, *, full_precision: bool = False, imports: Optional[List[str]] = None,
                          overwrite: bool = False, dtype: Optional[torch.dtype] = None) -> str:
    """Fold the LoRA adapters of the QLoRA checkpoint ``src`` into its base and write ``dst``; returns ``dst``.

    By default each adapted layer is re-quantized in its own format, so ``dst`` is a normal sat_quant
    checkpoint (loads with ``from_pretrained``, no LoRA flags); with ``full_precision`` every layer is written
    dequantized as a plain SAT checkpoint (e.g. to quantize again with other settings, or for SAT alone).
    A model-parallel ``src`` is merged to model-parallel size 1.
    """
    import_modules(imports)
    check_destination(dst, overwrite, src=src, verb="merge-lora")
    if not read_model_config(src).get("quant_lora"):
        raise CheckpointError(f"{src} holds no LoRA adapters (its model_config.json has no 'quant_lora' record); "
                              f"there is nothing to merge. It loads as it is with sat_quant.from_pretrained.")
    model, args = from_pretrained(None, src)  # an allocation failure here is reported as loading
    with oom_guidance(f"merging the LoRA adapters of {src}"):
        merged = merge_lora_(model, requantize=not full_precision)
    if merged == 0:
        raise CheckpointError(f"{src} records LoRA settings but no adapter was rebuilt; the checkpoint is inconsistent.")
    args.quant_lora = None
    for flag in ("use_lora", "use_qlora"):  # CogVLM's finetune flags: the merged model has no adapters to add
        if getattr(args, flag, False):
            setattr(args, flag, False)
    iteration = read_latest(src)
    if full_precision:
        return write_full_precision(model, src, dst, iteration, dtype, overwrite=overwrite, verb="merge-lora")
    with staged_folder(dst, overwrite=overwrite, src=src, verb="merge-lora") as tmp:
        save_checkpoint(model, tmp, args=args, iteration=iteration)  # its allocation failures: "saving to"
    return dst


__all__ = ["merge_lora_checkpoint"]
