"""The sat-quant command line: startup, unknown subcommands and formats (the demo: test_demo.py)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
