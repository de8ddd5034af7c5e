"""The C library, for the two calls Python does not expose: malloc_trim and renameat2."""
from __future__ import annotations

import ctypes
import functools
from typing import Optional


@functools.lru_cache(maxsize=1)
def libc() -> Optional[ctypes.CDLL]:
    """The process's C library (errno-aware), or None where it cannot be loaded."""
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
