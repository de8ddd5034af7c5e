"""Child process of the checkpoint-safety tests (tests/io/): saves killed mid-write, at every commit step, or under a
file-size limit. ``python tests/workers/save_child.py MODE ARGS...``; the last stdout line is JSON."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402

import torch  # noqa: E402

import sat_quant  # noqa: E402
import sat_quant.io.commit as commit_mod  # noqa: E402
from tests.io.checkpoints import BIGGER, HUGE, build_q4  # noqa: E402
from tests.workers.kill_steps import kill_at_every_step  # noqa: E402


def _child_save_huge(directory, iteration, overwrite):
    model, args = build_q4(HUGE, skip_init=True)
    sat_quant.save_checkpoint(model, directory, args=args, iteration=int(iteration), overwrite=overwrite == "1")
    print(json.dumps("saved"))


def _child_crash_steps(pristine, out, iteration, overwrite):
    """For k = 1, 2, ...: copy ``pristine`` to out/k, fork, and in the fork save the BIGGER model there,
    SIGKILLing itself just before its k-th filesystem change; stop when a save completes."""
    model, args = build_q4(BIGGER, seed=1)
    steps = [(os, "replace"), (os, "rename"), (os, "link"), (shutil, "rmtree"), (commit_mod, "exchange")]
    outcomes = kill_at_every_step(pristine, out, lambda target: sat_quant.save_checkpoint(
        model, target, args=args, iteration=int(iteration), overwrite=overwrite == "1"), steps)
    print(json.dumps(outcomes))


def _child_fsize_limit(directory):
    model, args = build_q4(None)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))
    try:
        sat_quant.save_checkpoint(model, directory, args=args, iteration=2)
        result = {"type": None, "message": ""}
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        result = {"type": type(exc).__name__, "message": str(exc)}
    print(json.dumps(result))


def _child_main(mode, *argv):
    torch.set_num_threads(1)  # single-threaded before any work: the crash-steps child forks
    {"save-huge": _child_save_huge, "crash-steps": _child_crash_steps,
     "fsize-limit": _child_fsize_limit}[mode](*argv)


if __name__ == "__main__":
    _child_main(*sys.argv[1:])
