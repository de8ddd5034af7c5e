"""`sat-quant demo`: what a person reads is the table (no library log above it), one row per format with sane
numbers, the kernel behind each row and a median over several forwards; a failure stays visible."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROW = re.compile(r"^(fp32|int8|int4|int4c|int4cs|nf4|fp4)\s+(.+?)\s+([\d.]+)\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)"
                 r"\s+\(([\d.]+)-([\d.]+)\)$", flags=re.M)


def _demo(*argv):
    return subprocess.run([sys.executable, "-m", "sat_quant.tools.cli", "demo", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="2"))


@pytest.fixture(scope="module")
def demo():
    result = _demo("--repeats", "3", "--seq-len", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_the_table_is_all_that_is_printed(demo):
    """No SAT/deepspeed/xformers log line or warning before (or after) the table, on either stream."""
    lines = demo.stdout.strip().splitlines()
    assert lines[0].startswith("demo model: SAT GPT2Model"), demo.stdout[:2000]
    assert lines[1].split()[:3] == ["format", "kernel", "bits/param"]
    assert demo.stderr.strip() == "", demo.stderr[:2000]
    for noise in ("[INFO]", "[WARNING]", "WARNING[XFORMERS]", "warnings.warn", "model built", "RANK 0"):
        assert noise not in demo.stdout


def test_every_format_has_a_row_with_its_kernel_and_sane_numbers(demo):
    rows = {m.group(1): m.groups()[1:] for m in ROW.finditer(demo.stdout)}
    assert set(rows) == {"fp32", "int8", "int4", "int4c", "int4cs", "nf4", "fp4"}, demo.stdout
    kernels = {name: row[0] for name, row in rows.items()}
    assert kernels["fp32"] == "torch F.linear" and kernels["int8"] == "torch _weight_int8pack_mm"
    assert kernels["int4"] == "torch _weight_int4pack_mm_for_cpu"  # auto: torch's int4 kernel first, lut as fallback
    assert kernels["int4cs"] == "x * t, then torch _weight_int4pack_mm_for_cpu"
    assert kernels["nf4"] in ("sat_quant AVX-512 LUT", "bitsandbytes matmul_4bit", "dequantize + F.linear")
    values = {name: [float(x.replace(",", "")) for x in row[1:]] for name, row in rows.items()}
    fp_bytes = values["fp32"][1]
    assert values["fp32"][0] == 32.0
    for name in ("int8", "int4", "nf4", "fp4"):
        bits, nbytes, max_err, mean_err, median, low, high = values[name]
        assert fp_bytes * (bits / 32.0) * 0.99 < nbytes < fp_bytes * (bits / 32.0) * 1.01
        assert 0 < mean_err <= max_err and 0 < low <= median <= high
    assert values["int8"][3] < values["int4"][3], "int8 must be more accurate than int4"


def test_the_time_is_a_median_with_a_note_on_noise(demo):
    assert "median of 3 forward(s)" in demo.stdout and "A shared CPU is noisy" in demo.stdout


def test_a_failing_demo_is_one_line_with_the_log_before_it():
    """Held-back output comes back when the run fails; our own error line is the last word (exit 1)."""
    result = _demo("--repeats", "1", "--seq-len", "300")  # longer than the model's 256 positions
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("sat-quant demo: error: unexpected ") and "SAT_QUANT_DEBUG=1" in last
    assert "(log before the failure:)" in result.stderr
