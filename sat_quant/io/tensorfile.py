"""Tensor files: safetensors streamed to disk one tensor at a time, hashed while written and fsynced; safetensors or
SAT ``.pt`` read one tensor at a time.

Reading never runs pickled code (``weights_only=True``) and never keeps more than ``_REMAP_BYTES`` of a file's
memory map resident (a safetensors map is re-opened; the pages of a memory-mapped ``.pt`` are handed back with
``madvise(MADV_DONTNEED)`` once a tensor is copied), so reading a 35 GB checkpoint needs memory for what the
caller keeps only: a file page touched through a map counts in the process's resident set until it is dropped.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import struct
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, NamedTuple, Optional, Tuple, Union

import torch

from .._libc import libc
from ..errors import CheckpointError
from ..oom import is_out_of_memory

_REMAP_BYTES = 16 * 2**20


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 * 2**20), b""):
            h.update(chunk)
    return h.hexdigest()


#: safetensors' dtype codes (the header's "dtype" field)
_ST_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}

Layout = Dict[str, Tuple[Tuple[int, ...], torch.dtype]]


class TensorStream(NamedTuple):
    """Tensors to write without holding them all: the full ``layout`` (name → shape, dtype, in file order) up front,
    then ``groups`` yielding dicts of those tensors (e.g. one module's), produced only as the writer reaches them."""
    layout: Layout
    groups: Iterable[Dict[str, torch.Tensor]]


def layout_of(tensors: Dict[str, torch.Tensor]) -> Layout:
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}


def write_tensor_file(path: str, tensors: Union[Dict[str, torch.Tensor], TensorStream]) -> str:
    """Write a safetensors file, fsynced, and return its sha256 (hashed while writing: no second read).

    Hand-written because ``safetensors.torch.save_file`` needs every tensor at once, and a quantized layer's saved
    (kernel-neutral) tensors are new tensors unpacked from its kernel layout: holding all of them is a second copy
    of the weights. Here the header comes from the layout, then each group's tensors are produced, written straight
    from their storage and dropped, one at a time. The format is safetensors' own (8-byte header length, JSON
    header, data); files are read back by the safetensors library.
    """
    stream = tensors if isinstance(tensors, TensorStream) else TensorStream(layout_of(tensors), [tensors])
    header: Dict[str, Any] = {"__metadata__": {"format": "pt", "producer": "sat_quant"}}
    offset = 0
    for name, (shape, dtype) in stream.layout.items():
        if dtype not in _ST_CODES:
            raise CheckpointError(f"{name}: dtype {dtype} cannot be stored in safetensors by sat_quant.")
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    digest = hashlib.sha256()
    order = iter(stream.layout)
    wanted = next(order, None)
    pending: Dict[str, torch.Tensor] = {}
    with open(path, "wb") as f:  # created with the umask's permissions, like every other file we write
        for chunk in (struct.pack("<Q", len(blob)), blob):
            f.write(chunk)
            digest.update(chunk)
        for group in stream.groups:
            pending.update(group)
            while wanted is not None and wanted in pending:
                tensor = pending.pop(wanted).detach()
                shape, dtype = stream.layout[wanted]
                if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                    raise CheckpointError(f"{wanted}: {list(tensor.shape)} {tensor.dtype} does not match its header "
                                          f"entry {list(shape)} {dtype}; nothing was saved.")
                data = tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(data)
                digest.update(data)
                wanted = next(order, None)
        if wanted is not None or pending:
            raise CheckpointError(f"the tensors to save did not match their layout (next expected {wanted!r}, "
                                  f"unexpected {sorted(pending)[:3]}); nothing was saved.")
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


@dataclass
class LoadTimes:
    """Where a load spent its time, per phase (the phases overlap: verification runs in a thread beside reading):
    reading tensors out of the file, hashing it, and repacking the neutral layout into the kernels' layout."""
    read_bytes: int = 0
    read_s: float = 0.0
    verify_bytes: int = 0
    verify_s: float = 0.0
    repack_bytes: int = 0
    repack_s: float = 0.0

    def add(self, other: "LoadTimes") -> "LoadTimes":
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def mb_per_s(self) -> Dict[str, Optional[float]]:
        """MB/s (10^6 bytes) of each phase; None for a phase that did not run."""
        return {phase: (getattr(self, f"{phase}_bytes") / 1e6 / getattr(self, f"{phase}_s")
                        if getattr(self, f"{phase}_s") > 0 else None) for phase in ("read", "verify", "repack")}

    def describe(self) -> str:
        rates = self.mb_per_s()
        return ", ".join(f"{phase} {getattr(self, f'{phase}_bytes') / 1e6:.1f} MB at {rate:.0f} MB/s"
                         for phase, rate in rates.items() if rate is not None)


class TensorSource:
    """Reads named tensors from a safetensors file or a SAT .pt, one at a time, with bounded residency."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.times = LoadTimes()
        self._handle = None
        self._mapped_bytes = 0
        self._pending_check: Optional[Future] = None
        self._lent: Optional[torch.Tensor] = None  # the last view of a mapped .pt handed out (owned=False)
        self._file_mapped = False
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            self._open = lambda: safe_open(path, framework="pt", device="cpu")
            try:
                self._handle = self._open()
            except Exception as exc:  # safetensors raises its own error types for bad headers
                if is_out_of_memory(exc):
                    raise
                raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); "
                                      f"it may be truncated or corrupted.") from None
            self._shapes = {}
            for k in self._handle.keys():
                sl = self._handle.get_slice(k)
                self._shapes[k] = (tuple(sl.get_shape()), _st_dtype(sl.get_dtype(), path, k))
        else:
            self._state = torch_load_safely(path)
            self._file_mapped = _memory_mapped(path)
            self._shapes = {k: (tuple(v.shape), v.dtype) for k, v in self._state.items()
                            if isinstance(v, torch.Tensor)}

    def layout(self) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
        return self._shapes

    def check_while_reading(self, check: Callable[[], None]) -> None:
        """Run ``check`` (the file's sha256) in a thread while tensors are read and repacked: hashlib and file
        reads release the GIL, so verification overlaps the load instead of adding a pass before it."""
        def timed_check() -> None:
            start = time.perf_counter()
            check()
            self.times.verify_s += time.perf_counter() - start
            self.times.verify_bytes += os.path.getsize(self.path)

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sat_quant-verify")
        self._pending_check = pool.submit(timed_check)
        pool.shutdown(wait=False)  # the submitted check still runs to its end; ``finish`` waits for it

    def finish(self) -> None:
        """Wait for ``check_while_reading``'s check and raise what it raised: whatever was read from this source
        must then be discarded (the loaders drop the model they were filling)."""
        pending, self._pending_check = self._pending_check, None
        if pending is not None:
            pending.result()

    def get(self, name: str, *, owned: bool = True) -> torch.Tensor:
        """The tensor ``name``; with ``owned`` (default) in memory of its own, never a view of the file's map.

        ``owned=False`` may return a view of the memory map (it pins the map while referenced): for a
        caller that copies it right away (``param.copy_``), saving a temporary copy.
        """
        start = time.perf_counter()  # a view handed out (owned=False) is read by its caller's copy: not counted
        if self._handle is None:
            self._return_lent_pages()
            t = self._state[name]
            if not owned:
                self._lent = t if self._file_mapped else None  # its pages are dropped at the next read
                return t
            t = copy_out_of_map(t) if self._file_mapped else t.clone()
            return self._counted(t, start)
        shape, dtype = self._shapes[name]
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if self._mapped_bytes and self._mapped_bytes + nbytes > _REMAP_BYTES:
            self._remap()
        # safetensors' tensors are views of its memory map: one kept by the model (an int4 scale, a
        # whole int8 qweight) would pin the map, and every page touched through it, for good
        t = self._handle.get_tensor(name)
        self._mapped_bytes += nbytes
        if owned:
            t = self._counted(t.clone(), start)
            if self._mapped_bytes > _REMAP_BYTES:  # a large tensor: its pages go now, not at the next read
                self._remap()
        return t

    def _counted(self, tensor: torch.Tensor, start: float) -> torch.Tensor:
        self.times.read_s += time.perf_counter() - start
        self.times.read_bytes += tensor.numel() * tensor.element_size()
        return tensor

    def _return_lent_pages(self) -> None:
        """The caller of ``get(owned=False)`` copied that view before asking for the next tensor: drop its pages."""
        lent, self._lent = self._lent, None
        if lent is not None:
            release_mapped_pages(lent)

    def _remap(self) -> None:
        """Drop the memory map (file pages touched through it otherwise stay resident) and open a new one."""
        self._handle = None
        self._handle = self._open()
        self._mapped_bytes = 0


_MADV_DONTNEED = 4


def release_mapped_pages(tensor: torch.Tensor) -> None:
    """Drop this process's pages of a tensor that views a read-only file mapping (a ``.pt`` loaded with ``mmap``).

    They stay in the page cache, and a later read faults them in again from the file, so nothing is lost; without
    this every page read stays in the resident set until the map is closed, i.e. the whole checkpoint by the end of
    a conversion. Only for file mappings never written to: on anonymous memory MADV_DONTNEED would zero the data.
    """
    if tensor.is_contiguous():
        start, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    else:
        start, nbytes = tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()
    madvise = getattr(libc(), "madvise", None)
    if madvise is None or nbytes == 0:
        return
    page = os.sysconf("SC_PAGE_SIZE")
    first = start - start % page
    end = start + nbytes
    end += -end % page
    madvise(ctypes.c_void_p(first), ctypes.c_size_t(end - first), ctypes.c_int(_MADV_DONTNEED))


def copy_out_of_map(tensor: torch.Tensor) -> torch.Tensor:
    """An owned copy of a tensor viewing a file mapping, read ``_REMAP_BYTES`` at a time, each part's pages
    dropped once copied: the resident set grows by the copy only, not by the copy and the file's pages."""
    if not tensor.is_contiguous() or tensor.numel() * tensor.element_size() <= _REMAP_BYTES:
        copy = tensor.clone()
        release_mapped_pages(tensor)
        return copy
    flat = tensor.reshape(-1)
    out = torch.empty_like(flat)
    step = max(1, _REMAP_BYTES // tensor.element_size())
    for i in range(0, flat.numel(), step):
        out[i:i + step].copy_(flat[i:i + step])
        release_mapped_pages(flat[i:i + step])
    return out.view(tensor.shape)


def _memory_mapped(path: str) -> bool:
    """Whether ``torch_load_safely`` memory-maps ``path`` (zip-format ``.pt``; the legacy format is read to memory)."""
    import zipfile
    return zipfile.is_zipfile(path)


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _st_dtype(name: str, path: str, tensor: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name; an unknown one is refused (never read as bytes)."""
    try:
        return _ST_DTYPES[name]
    except KeyError:
        raise CheckpointError(f"{path}: tensor {tensor} has dtype {name}, which sat_quant does not read; the file "
                              f"was not written by sat_quant or SAT (re-save or re-convert the checkpoint).") from None


def _numpy_rng_globals() -> list:
    """What SAT's deepspeed checkpoints pickle besides tensors: numpy's RNG state (a uint32 array). These few
    numpy types rebuild plain arrays only; any other global is still refused by weights_only."""
    try:
        import numpy as np
        core = getattr(np, "_core", None) or np.core
        return [np.ndarray, np.dtype, core.multiarray._reconstruct, type(np.dtype(np.uint32))]
    except (ImportError, AttributeError):
        return []


#: what any ``torch.load`` of sat_quant's ``.pt`` stub stops with (see ``write_stub``)
STUB_MESSAGE = ("this is a sat_quant checkpoint (its tensors are in the .safetensors file beside this .pt): "
                "pip install sat-quant, then import sat_quant before loading it")


class _StubRefusal:
    """Pickles as ``torch.device(STUB_MESSAGE)``: weights_only loading allows the call and it raises
    ``Invalid device string: '<STUB_MESSAGE>'``, so SAT without sat_quant stops with that one sentence (not a
    list of missing keys) and no code of ours is referenced by the pickle."""

    def __reduce__(self):
        return (torch.device, (STUB_MESSAGE,))


def write_stub(path: str) -> None:
    """The ``.pt`` SAT looks for beside the tensors: loading it fails at once with ``STUB_MESSAGE``."""
    torch.save({"module": _StubRefusal()}, path)


def torch_load_safely(path: str) -> Dict[str, torch.Tensor]:
    """A SAT .pt, memory-mapped and with weights_only=True: a pickle that would run code is refused."""
    import pickle
    try:
        # files from torch < 1.6 (legacy format) cannot be memory-mapped; weights_only holds for them too
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            sd = torch.load(path, map_location="cpu", mmap=_memory_mapped(path), weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = str(exc).splitlines()
        detail = next((l.strip() for l in lines if "Unsupported" in l), lines[0] if lines else "")
        raise CheckpointError(f"{path} contains pickled code or objects that are not plain tensors; sat_quant "
                              f"loads checkpoints with weights_only=True and refuses it. Re-save it from "
                              f"trusted code as a plain state dict. ({detail})") from None
    except (RuntimeError, EOFError, OSError) as exc:
        if is_out_of_memory(exc):
            raise  # an allocation failure, not a damaged file: oom_guidance around the step explains it
        if STUB_MESSAGE in str(exc):
            raise CheckpointError(f"{path} is sat_quant's stub for SAT, not the tensors: they are in the .safetensors "
                                  f"file beside it, which is missing with its manifest; restore them or re-save.") from None
        raise CheckpointError(f"{path} cannot be read as a torch checkpoint ({exc}); it may be truncated.") from None
    if not isinstance(sd, dict) or not isinstance(sd.get("module"), dict):
        raise CheckpointError(f"{path} is not a SAT checkpoint (expected a dict with a 'module' state dict).")
    return sd["module"]


__all__ = ["sha256_file", "write_tensor_file", "TensorStream", "layout_of", "Layout", "TensorSource", "torch_load_safely",
           "write_stub", "STUB_MESSAGE", "release_mapped_pages"]
