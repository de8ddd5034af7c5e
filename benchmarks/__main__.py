"""``python -m benchmarks [--only SECTION]``: run the benchmarks and write benchmarks/RESULTS.md (one section with
``--only``, keeping the others)."""
from __future__ import annotations

import argparse
import datetime
import os

from . import accuracy, e2e, eval_memory, full_size, kernels, load, notes, prefill, startup
from .machine import describe


def _replace_section(document: str, section: str) -> str:
    """Swap the '## Title:' section of ``document`` that ``section`` starts with (append it if absent)."""
    title = section.split("\n", 1)[0].split(":")[0]
    parts = document.split("\n## ")
    for i, part in enumerate(parts):
        if i and ("## " + part).split(":")[0] == title:
            parts[i] = section[3:].rstrip("\n") + "\n"
            return "\n## ".join(parts)
    return document.rstrip("\n") + "\n\n" + section + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-reference", action="store_true", help="skip the slow dequantize-per-call reference rows")
    parser.add_argument("--only", choices=["accuracy", "kernels", "prefill", "load", "e2e", "eval_memory", "startup", "notes",
                                           "full_size"], default=None,
                        help="run one section (full_size, up to ~45 min, runs only when asked)")
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
    if ns.only in (None, "prefill"):
        sections.append(prefill.run())
    if ns.only in (None, "e2e"):
        sections.append(e2e.run())
    if ns.only in (None, "eval_memory"):
        sections.append(eval_memory.run())
    if ns.only in (None, "startup"):
        sections.append(startup.run())
    if ns.only in (None, "notes"):
        sections.append(notes.run())
    if ns.only == "full_size":
        sections.append(full_size.run())
    if ns.only and os.path.exists(ns.out):  # keep the other sections of an earlier full run
        sections = _replace_section(open(ns.out).read(), sections[1])
    else:
        sections = "\n".join(s.rstrip("\n") + "\n" for s in sections)
    with open(ns.out, "w") as f:
        f.write(sections)
    print(f"wrote {ns.out}")


if __name__ == "__main__":
    main()
