"""The machine and package versions a benchmark ran on, for the header of RESULTS.md."""
from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe() -> str:
    import torch
    parts = [f"CPU: {cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"]
    if torch.cuda.is_available():
        parts.append(f"GPU: {torch.cuda.get_device_name(0)}")
    versions = []
    for mod in ("torch", "bitsandbytes", "sat"):
        try:
            m = __import__(mod)
            versions.append(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception as exc:  # a missing optional package is reported, not fatal
            versions.append(f"{mod} unavailable ({type(exc).__name__})")
    parts.append("versions: " + ", ".join(versions) + f", python {platform.python_version()}")
    return "\n".join(f"- {p}" for p in parts)


def load_average() -> str:
    """The 1-minute load average: on a shared machine, timings taken under load are noisier (ratios hold better)."""
    try:
        return f"{os.getloadavg()[0]:.1f} (on {os.cpu_count()} cores)"
    except OSError:
        return "unknown"
