"""Startup benchmark: how long ``import sat_quant`` and ``sat-quant --help`` take in fresh processes.

Each command runs in 5 fresh processes after one unmeasured run (warm: files in the page cache); the first
measured process after that is reported separately as "first" (the closest to cold this machine allows without
dropping the page cache). Compared in the same run with ``import torch`` and ``import sat`` (what they avoid).
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import List

RUNS = 5
COMMANDS = {
    "import sat_quant": [sys.executable, "-c", "import sat_quant"],
    "sat-quant --help": [sys.executable, "-m", "sat_quant.tools.cli", "--help"],
    "import torch (reference)": [sys.executable, "-c", "import torch"],
    "import sat (reference: SAT itself)": [sys.executable, "-c", "import sat"],
}


def _seconds(cmd: List[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def run() -> str:
    rows = []
    for label, cmd in COMMANDS.items():
        _seconds(cmd)  # unmeasured: fills the page cache and Python's bytecode cache
        times = [_seconds(cmd) for _ in range(RUNS)]
        rows.append(f"| {label} | {times[0]:.2f} | {statistics.median(times):.2f} | {max(times):.2f} |")
    return "\n".join([
        "## Startup: `import sat_quant` and `sat-quant --help` in fresh processes",
        "",
        f"Seconds per fresh process, {RUNS} runs after a warm-up (`python -m benchmarks --only startup`). Target: "
        "at most 1.5 s each on this 2-core machine. Neither imports torch, SAT or deepspeed (tested in "
        "tests/tools/test_cli.py); a subcommand loads them after its flags parse.",
        "",
        "| command | first | median | max |",
        "|---|---|---|---|",
        *rows,
        "",
    ])


if __name__ == "__main__":
    print(run())
