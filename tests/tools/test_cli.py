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


def test_help_and_import_need_neither_torch_nor_sat():
    """Startup: `sat-quant --help` (and a mistyped flag) and `import sat_quant` import no torch, SAT or deepspeed;
    the subcommands' work is loaded after parsing (timings: benchmarks)."""
    code = ("import sys, contextlib, io\n"
            "import sat_quant\n"
            "from sat_quant.tools.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n"
            "        main(['--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'sat', 'deepspeed'})\n"
            "print(heavy)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_an_unknown_format_is_one_line_listing_the_known_ones():
    result = subprocess.run([sys.executable, "-m", "sat_quant.tools.cli", "convert", "a", "b", "--quant-format", "int3"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, WANDB_MODE="disabled"))
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and last.startswith("sat-quant convert: error: ") and "int4c" in last, result.stderr
