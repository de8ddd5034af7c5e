"""Child of tests/tools/test_convert_memory.py: ``sat-quant convert SRC DST --quant BITS`` in this process, then one
JSON line: the resident set after imports, the peak and convert's MB/s line.

argv: SRC DST BITS. The peak is this process's ``VmHWM`` (the most it ever had resident, file pages of memory maps
included), not reset: the imports' own peak is under the baseline taken after them, the rest is the conversion.
``ru_maxrss`` is reported too, but not used: Linux carries a parent's peak across fork and exec into it, so in a
child of a big pytest process it says how big the parent was.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def main(src: str, dst: str, bits: str) -> None:
    import torch
    from sat.model.official.gpt2_model import GPT2Model  # noqa: F401  (SAT's registry knows the class)

    import sat_quant.tools.commands  # noqa: F401  (what the CLI imports after parsing)
    from sat_quant.tools.cli import main as cli
    torch.set_num_threads(2)
    baseline = rss_bytes()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli(["convert", src, dst, "--quant", bits])
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rates = [line for line in out.getvalue().splitlines() if line.startswith("convert: ")]
    print(json.dumps({"status": status, "baseline": baseline, "peak": peak_bytes(), "ru_maxrss": maxrss,
                      "rates": rates}))


if __name__ == "__main__":
    main(*sys.argv[1:])
