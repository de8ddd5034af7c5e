"""`sat-quant demo` runs end to end and prints one row per format with sane numbers."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_prints_every_format():
    result = subprocess.run([sys.executable, "-m", "sat_quant.tools.cli", "demo", "--repeats", "1", "--seq-len", "8"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, WANDB_MODE="disabled"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {m.group(1): [float(x.replace(",", "")) for x in m.group(2).split()]
            for m in re.finditer(r"^(fp32|int8|int4|nf4|fp4)\s+([\d.,\s]+)$", result.stdout, flags=re.M)}
    assert set(rows) == {"fp32", "int8", "int4", "nf4", "fp4"}
    bits, fp_bytes = rows["fp32"][0], rows["fp32"][1]
    assert bits == 32.0
    for name in ("int8", "int4", "nf4", "fp4"):
        b, nbytes, max_err, mean_err, ms = rows[name]
        assert nbytes < fp_bytes * (b / 32.0) * 1.01 and nbytes > fp_bytes * (b / 32.0) * 0.99
        assert 0 < mean_err <= max_err and ms > 0
    assert rows["int8"][3] < rows["int4"][3], "int8 must be more accurate than int4"


def test_unknown_subcommand_fails_cleanly():
    result = subprocess.run([sys.executable, "-m", "sat_quant.tools.cli", "frobnicate"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "invalid choice" in result.stderr
