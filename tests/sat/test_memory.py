"""Building with --quant never holds the full-precision model: peak RSS of a subprocess."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_peak(mode: str) -> dict:
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "workers", "rss_probe.py"), mode], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_quant4_build_peaks_below_40_percent_of_fp32():
    fp32 = build_peak("fp32")
    q4 = build_peak("quant4")
    assert fp32["params"] >= 300_000_000 and q4["params"] == fp32["params"]
    # measured above the interpreter's baseline (torch + SAT imports), which both builds share
    fp32_growth = fp32["peak"] - fp32["baseline"]
    q4_growth = q4["peak"] - q4["baseline"]
    assert fp32_growth > 4 * 300_000_000 * 0.9, "the fp32 build should materialise ~4 bytes/param"
    assert q4_growth < 0.40 * fp32_growth, (q4_growth / 2**20, fp32_growth / 2**20)
