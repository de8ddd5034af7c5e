"""Compile a C++ source shipped in ``sat_quant/csrc`` into a shared library at first use, and cache it.

Why not ``torch.utils.cpp_extension.load``: sat_quant's kernels use a plain C ABI (called through ctypes), so they
need no torch headers and compile in about a second instead of about a minute. They still live in torch's
extension cache (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), under a name that hashes the
source, the flags and the compiler, so an edit or another compiler rebuilds and nothing stale is loaded.
The build writes a temporary file and renames it: processes that build at the same time (torchrun ranks) never
load a half-written library.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Tuple

log = logging.getLogger("sat_quant.engine.kernels")

CSRC = Path(__file__).resolve().parent.parent / "csrc"
#: set to 1 to never build or load sat_quant's C++ kernels (the backends that need them report it and ``auto``
#: picks the next one)
DISABLE_ENV = "SAT_QUANT_NO_CPU_KERNELS"
BUILD_TIMEOUT_S = 300


def cache_root() -> Path:
    """torch's extension cache (what ``torch.utils.cpp_extension`` uses, without importing it: that import is slow
    and warns about CUDA on CPU-only machines)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    try:
        from torch._appdirs import user_cache_dir
        return Path(user_cache_dir(appname="torch_extensions"))
    except Exception:  # a private torch helper: fall back to its usual answer
        return Path.home() / ".cache" / "torch_extensions"


def compiler() -> str:
    return os.environ.get("CXX") or "c++"


def build_library(name: str, source: str, flags: Sequence[str]) -> Tuple[Optional[Path], Optional[str]]:
    """``(path, None)`` of the built (or cached) library, or ``(None, reason)`` when it cannot be had."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None, f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
    src = CSRC / source
    if not src.is_file():
        return None, f"kernel source {src} is not installed with the package"
    cxx = compiler()
    digest = hashlib.sha256(src.read_bytes() + "\0".join([cxx, *flags]).encode()).hexdigest()[:16]
    out_dir = cache_root() / f"sat_quant_{name}_{digest}"
    lib = out_dir / f"{name}.so"
    if lib.is_file():
        return lib, None
    if shutil.which(cxx) is None:
        return None, f"no C++ compiler: '{cxx}' not found (set CXX, or install g++)"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=out_dir)
        os.close(fd)
    except OSError as exc:
        return None, f"cannot write the kernel cache {out_dir}: {exc}"
    cmd = [cxx, *flags, "-o", tmp, str(src)]
    log.info("sat_quant: compiling %s (once, cached in %s)", src.name, out_dir)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _remove(tmp)
        return None, f"compiling {src.name} failed: {exc}"
    if proc.returncode != 0:
        _remove(tmp)
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        return None, f"compiling {src.name} failed (exit {proc.returncode}): {tail}"
    os.replace(tmp, lib)
    return lib, None


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
