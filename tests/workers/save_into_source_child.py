"""Child process of tests/io/test_save_into_source.py: load a checkpoint, change it, save it back into the folder it
was loaded from (overwrite), SIGKILLed before each filesystem step of the save in turn (tests/workers/kill_steps.py).

``python tests/workers/save_into_source_child.py PRISTINE OUT`` prints the JSON outcomes.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import json  # noqa: E402
import shutil  # noqa: E402

import torch  # noqa: E402
from sat.model.official.gpt2_model import GPT2Model  # noqa: E402

import sat_quant  # noqa: E402
import sat_quant.io.commit as commit  # noqa: E402
import sat_quant.io.save as save  # noqa: E402
from tests.workers.kill_steps import kill_at_every_step  # noqa: E402


def changed(model):
    """What a user does between load and save (a fine-tuning step, say): every full-precision parameter moves."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.mul_(1.5)
    return model


def load_change_save(folder):
    model, args = sat_quant.from_pretrained(GPT2Model, folder)
    sat_quant.save_checkpoint(changed(model), folder, args=args, iteration=1, overwrite=True)


def main(pristine, out):
    torch.set_num_threads(1)  # single-threaded before any work: we fork
    sat_quant.from_pretrained(GPT2Model, pristine)  # SAT's model-parallel group and lazy imports, before the forks
    steps = [(os, "replace"), (os, "rename"), (os, "link"), (shutil, "rmtree"), (commit, "exchange"),
             (save, "fsync_dir")]  # the save's commit points (a folder's entries made durable)
    print(json.dumps(kill_at_every_step(pristine, out, load_change_save, steps)))


if __name__ == "__main__":
    main(*sys.argv[1:3])
