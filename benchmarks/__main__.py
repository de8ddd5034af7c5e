"""``python -m benchmarks [--quick]``: run every benchmark and write benchmarks/RESULTS.md."""
from __future__ import annotations

import argparse
import datetime
import os

from . import accuracy, kernels, load
from .machine import describe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-reference", action="store_true", help="skip the slow dequantize-per-call reference rows")
    parser.add_argument("--only", choices=["accuracy", "kernels", "load"], default=None, help="run one section")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    ns = parser.parse_args()
    sections = [f"# sat_quant benchmark results\n\nWritten by `python -m benchmarks` on "
                f"{datetime.date.today().isoformat()}.\n\n{describe()}\n"]
    if ns.only in (None, "accuracy"):
        sections.append(accuracy.run())
    if ns.only in (None, "load"):
        sections.append(load.run())
    if ns.only in (None, "kernels"):
        sections.append(kernels.run(include_reference=not ns.no_reference))
    with open(ns.out, "w") as f:
        f.write("\n".join(sections) + "\n")
    print(f"wrote {ns.out}")


if __name__ == "__main__":
    main()
