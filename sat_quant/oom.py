"""Out-of-memory guidance: turn a bare CUDA/CPU OOM during build, load or generation into advice.

``with oom_guidance("loading weights", need_bytes=...)`` re-raises an allocation failure as
:class:`QuantOutOfMemoryError`, which names the step, the peak memory so far, the device's capacity, the
estimate for the step (from :mod:`sat_quant.memory` or the checkpoint's size) and what to change. The
original error stays attached as ``__cause__``. Anything that is not an allocation failure passes through.
"""
from __future__ import annotations

import errno
import os
import resource
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator, List, Optional, Union

from .errors import QuantError

if TYPE_CHECKING:  # torch is imported where it is used: the CLI's error path must not pay for it
    import torch

# what torch's CPU allocator and CUDA caching allocator say when an allocation fails
_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "defaultcpuallocator")


class QuantOutOfMemoryError(QuantError, MemoryError):
    """An allocation failed inside a sat_quant step; the message says how much was in use and what to change."""


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's OutOfMemoryError, Python's MemoryError and the CPU allocator's RuntimeError."""
    import torch  # this module stays importable without torch: the CLI's error path uses it
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or getattr(exc, "errno", None) == errno.ENOMEM:
        return True  # ENOMEM: an mmap (torch.load's, safetensors') or a thread refused under an address-space limit
    text = str(exc).lower()
    if f"(os error {errno.ENOMEM})" in text:  # safetensors' own error type around a failed mmap
        return True
    return isinstance(exc, RuntimeError) and any(m in text for m in _OOM_MARKERS)


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def _cpu_capacity() -> Optional[int]:
    """The tighter of physical memory, a cgroup limit and this process's address-space limit (RLIMIT_AS)."""
    limits: List[int] = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = open(path).read().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 2**60:
            limits.append(int(value))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft not in (resource.RLIM_INFINITY, -1):
        limits.append(soft)
    return min(limits) if limits else None


def memory_state(device: Optional[torch.device] = None) -> tuple:
    """(peak bytes so far, capacity bytes or None, device label) for ``device`` (CUDA) or this process (CPU)."""
    import torch
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        peak = torch.cuda.max_memory_reserved(index)
        _, total = torch.cuda.mem_get_info(index)
        return peak, total, f"cuda:{index}"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return peak, _cpu_capacity(), "cpu"


def advice(stage: str, *, peak: int, capacity: Optional[int], device_label: str,
           need_bytes: Optional[int] = None, quant_bits: Optional[int] = None, model_parallel_size: int = 1,
           generating: bool = False) -> str:
    """The message of a QuantOutOfMemoryError: what happened, the numbers, and what to change, most useful first."""
    cap = f" of {_gib(capacity)}" if capacity else ""
    lines = [f"sat_quant ran out of {device_label} memory while {stage}.",
             f"  peak so far: {_gib(peak)}{cap}"]
    if need_bytes is not None:
        lines.append(f"  estimate for this step: {_gib(need_bytes)} (see `sat-quant estimate --config "
                     f"model_config.json --quant 4 --batch B --seq S` for the breakdown)")
    todo = []
    if quant_bits is None:
        todo.append("quantize: --quant 4 keeps ~1/4 of fp16 weight memory (--quant 8: ~1/2)")
    elif quant_bits == 8:
        todo.append("use --quant 4 instead of --quant 8 (about half the weight memory again)")
    todo.append("fit a size with a per-layer plan: `sat-quant convert SRC DST --quant-budget 10GB` (or a smaller "
                "budget), then load DST")
    todo.append(f"spread the model over more GPUs: torchrun --nproc_per_node {model_parallel_size * 2} "
                f"with --model-parallel-size {model_parallel_size * 2}")
    if generating:
        todo.append("lower --max_length (the KV cache grows with it) or the batch size")
    else:
        todo.append("load a pre-quantized checkpoint (`sat-quant convert SRC DST --quant 4`): it never holds "
                    "full-precision weights")
    lines.append("  what to change: " + "; ".join(todo) + ".")
    return "\n".join(lines)


NeedBytes = Union[int, Callable[[], Optional[int]], None]  # a callable is priced only after a failure


@contextmanager
def oom_guidance(stage: str, *, device: Optional[torch.device] = None, need_bytes: NeedBytes = None,
                 quant_bits: Optional[int] = None, model_parallel_size: int = 1,
                 generating: bool = False) -> Iterator[None]:
    """Re-raise an allocation failure inside the block as a QuantOutOfMemoryError with guidance."""
    try:
        yield
    except QuantOutOfMemoryError:
        raise
    except BaseException as exc:
        if not is_out_of_memory(exc):
            raise
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # let the caller (or the user's next try) start from a clean allocator
        peak, capacity, label = memory_state(device)
        if callable(need_bytes):
            try:
                need_bytes = need_bytes()
            except Exception:  # an estimate is a hint; never hide the OOM behind a failure to compute it
                need_bytes = None
        raise QuantOutOfMemoryError(advice(stage, peak=peak, capacity=capacity, device_label=label,
                                           need_bytes=need_bytes, quant_bits=quant_bits,
                                           model_parallel_size=model_parallel_size,
                                           generating=generating)) from exc
