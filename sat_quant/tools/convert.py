"""``sat-quant convert``: a full-precision SAT checkpoint folder → a sat_quant checkpoint folder, in bounded memory.

The quantized model is built on meta (no storage); its checkpoint is then written one module at a time, each read
from the memory-mapped source, quantized, written and dropped (:mod:`sat_quant.tools.convert_stream`). Neither the
full-precision nor the quantized model is ever held: the peak is about the largest module's tensors, so a 35 GB
checkpoint converts on a machine with far less memory. The result is written beside DST and published atomically.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..algorithms.planner import DEFAULT_CANDIDATES
from ..engine.config import QuantConfig
from ..errors import QuantConfigError
from ..io.commit import check_destination, staged_folder
from ..io.load import check_fits
from ..io.save import save_model
from ..oom import oom_guidance
from ..sat.checkpoint import model_config_dict
from .calibrate_blocks import (
    DEFAULT_SPILL_BYTES,
    calibrate_blocks,
    estimate_seconds,
    find_stacks,
    full_precision_skeleton,
)
from .calibration_data import DEFAULT_TOKENIZER, image_samples, load_tokenizer, read_calibration_file, text_samples
from .convert_stream import Throughput, converted_stream, quantized_on_meta
from .plan_blocks import plan_blocks
from .sources import ProgressSource, open_full_precision

log = logging.getLogger(__name__)


@dataclass
class Calibration:
    """``--calibrate FILE``: GPTQ block by block on the file's samples (see :mod:`sat_quant.tools.calibrate_blocks`).

    ``dry_run`` prints the time estimate and writes nothing. With ``budget``, a first pass over the blocks scores
    every layer's candidates on its own output (the calibrated planner, layer-local) and the knapsack picks the
    formats; the second pass is the GPTQ calibration of that plan."""

    file: str
    samples: Optional[int] = 128
    tokenizer: str = DEFAULT_TOKENIZER
    dry_run: bool = False
    spill_bytes: int = DEFAULT_SPILL_BYTES
    budget: Optional[str] = None  # --quant-budget: plan per layer on the samples first (planner.layer_costs)
    candidates: Sequence[str] = DEFAULT_CANDIDATES


def convert(src: str, dst: str, config: QuantConfig, *, imports: Optional[List[str]] = None,
            overwrite: bool = False, progress: bool = True, calibration: Optional[Calibration] = None) -> str:
    """Quantize the full-precision SAT checkpoint ``src`` into a sat_quant checkpoint at ``dst``; returns ``dst``.

    With ``progress``, a bar while it runs and one line of read / quantize / write MB/s at the end (always logged).
    With ``calibration``, the int4/int4c layers of the transformer blocks get GPTQ on its samples first.
    """
    config.validate()
    check_destination(dst, overwrite, src=src, verb="convert")  # before any work
    with oom_guidance(f"converting {src}", quant_bits=config.bits):
        fp = open_full_precision(src, "convert", imports)
        quantized = None
        if calibration is not None:
            calibrated = _calibrate(fp, config, calibration, progress)
            if calibrated is None:
                return dst  # a dry run: the estimate was printed, nothing written
            quantized, config = calibrated
        model = quantized_on_meta(fp.args, fp.cls, config)
        source = ProgressSource(fp.source, enabled=progress)
        check_fits(model, source)  # every name, shape and dtype before anything is written
        stats = Throughput()
        with staged_folder(dst, overwrite=overwrite, src=src, verb="convert") as tmp:
            start = time.perf_counter()
            save_model(model, tmp, model_config_dict(model, fp.args), iteration=fp.iteration,
                       tensors=converted_stream(model, source, stats, quantized))
            stats.total_s = time.perf_counter() - start
        source.bar.close()
    log.info("convert %s: %s", src, stats.summary())
    if progress:
        print(f"convert: {stats.summary()}")
    return dst


def _calibrate(fp, config: QuantConfig, calibration: Calibration, progress: bool):
    """The calibrated layers' tensors by name and the config they follow (a budget's plan, or ``config``); None
    after a dry run (which prints the estimate)."""
    kind, items = read_calibration_file(calibration.file, calibration.samples)
    vision_model = hasattr(fp.args, "image_length") and isinstance(getattr(fp.args, "eva_args", None), dict)
    if kind == "images" and not vision_model:
        raise QuantConfigError(f"--calibrate {calibration.file} holds image prompts, but {fp.cls.__name__} is not "
                               f"a CogVLM/CogAgent model; pass a file of text lines.")
    if kind == "text" and vision_model:
        raise QuantConfigError(f"--calibrate {calibration.file} holds text lines, but {fp.cls.__name__} takes image "
                               f'prompts: pass JSONL, one {{"image": "photo.jpg", "text": "question"}} per line.')
    skeleton = full_precision_skeleton(fp.cls, fp.args, fp.source)
    if kind == "images":
        dtype = next(p.dtype for p in skeleton.parameters() if p.is_floating_point())
        samples = image_samples(items, fp.args, calibration.tokenizer, dtype)
    else:
        tokenizer = load_tokenizer(calibration.tokenizer)
        samples = text_samples(items, tokenizer, int(fp.args.max_sequence_length), int(fp.args.vocab_size))
    tokens = sum(s["input_ids"].numel() for s in samples)
    one_pass = estimate_seconds(skeleton, config, tokens)  # the planning pass (with a budget) takes about as long
    estimate = one_pass * (2 if calibration.budget else 1)
    how_long = f"{estimate:.0f} s" if estimate < 90 else f"{estimate / 60:.0f} min"
    stacks = find_stacks(skeleton)
    blocks = " + ".join(f"{len(s.owner.transformer.layers)} ({s.name})" for s in reversed(stacks)) \
        if len(stacks) > 1 else str(len(skeleton.transformer.layers))
    steps = "planning then calibration" if calibration.budget else "calibration"
    print(f"convert --calibrate: {len(samples)} samples, {tokens} tokens, {blocks} blocks: "
          f"about {how_long} of {steps} (a rough estimate from this CPU's matmul speed), then the conversion")
    if calibration.dry_run:
        return None
    fp16 = getattr(fp.args, "fp16", False) or getattr(fp.args, "bf16", False)
    store_dtype = None if fp16 else torch.bfloat16
    if calibration.budget:
        plan = plan_blocks(skeleton, fp.source, config, samples, calibration.budget, candidates=calibration.candidates,
                           store_dtype=store_dtype, spill_bytes=calibration.spill_bytes, progress=progress)
        print(plan.summary())
        config = plan.to_config()
    result = calibrate_blocks(skeleton, fp.source, config, samples, progress=progress, store_dtype=store_dtype,
                              spill_bytes=calibration.spill_bytes)
    log.info("calibration: %d layers in %.0f s (estimated %.0f s; %d MB of activations spilled to disk)",
             len(result.neutral), result.seconds, one_pass, result.spilled_bytes // 10**6)
    return result.neutral, config


__all__ = ["convert", "Calibration"]
