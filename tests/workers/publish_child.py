"""Child process of tests/tools/test_writers_safety.py: the writer KIND from SRC onto a copy of OTHER with --overwrite,
SIGKILLed before each of its filesystem steps in turn (tests/workers/kill_steps.py). Prints the JSON outcomes.

``python tests/workers/publish_child.py KIND SRC OTHER OUT``
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402

import sat_quant  # noqa: E402
import sat_quant.io.commit as commit  # noqa: E402
from tests.workers.kill_steps import kill_at_every_step  # noqa: E402


def run_writer(kind, src, dst):
    if kind == "convert":
        return sat_quant.convert(src, dst, sat_quant.QuantConfig(bits=4, group_size=64), overwrite=True, progress=False)
    if kind == "reshard":
        return sat_quant.reshard(src, dst, 2, overwrite=True)
    if kind == "merge-lora":
        return sat_quant.merge_lora_checkpoint(src, dst, overwrite=True)
    return sat_quant.dequantize(src, dst, overwrite=True)


def main(kind, src, other, out):
    torch.set_num_threads(1)  # single-threaded before any work: we fork
    warm = tempfile.mkdtemp()  # one unhooked run first: lazy imports and SAT's model-parallel group, not in every fork
    run_writer(kind, src, os.path.join(warm, "dst"))
    shutil.rmtree(warm)
    steps = [(os, "rename"), (os, "replace"), (shutil, "rmtree"), (commit, "exchange")]
    if kind != "merge-lora":  # merge-lora fsyncs the files of a save and of a publish: its other steps are enough
        steps.append((os, "fsync"))
    outcomes = kill_at_every_step(other, out, lambda target: run_writer(kind, src, target), steps)
    print(json.dumps(outcomes))


if __name__ == "__main__":
    main(*sys.argv[1:5])
