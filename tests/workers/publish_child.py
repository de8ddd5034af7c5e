"""Child process of tests/tools/test_writers_safety.py: for k = 1, 2, ..., copy OTHER to OUT/k, fork, and in the fork
run the writer KIND from SRC onto OUT/k with --overwrite, SIGKILLing itself before its k-th filesystem change of the
writer (rename, replace, fsync, exchange, rmtree); stop when a run completes. Prints the JSON list of outcomes.

``python tests/workers/publish_child.py KIND SRC OTHER OUT``
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402

import torch  # noqa: E402

import sat_quant  # noqa: E402
import sat_quant.io.commit as commit  # noqa: E402


def run_writer(kind, src, dst):
    if kind == "convert":
        return sat_quant.convert(src, dst, sat_quant.QuantConfig(bits=4, group_size=64), overwrite=True, progress=False)
    if kind == "reshard":
        return sat_quant.reshard(src, dst, 2, overwrite=True)
    return sat_quant.dequantize(src, dst, overwrite=True)


def main(kind, src, other, out):
    torch.set_num_threads(1)  # single-threaded before any work: we fork
    os.makedirs(out)
    outcomes = []
    for k in range(1, 40):
        target = os.path.join(out, str(k))
        shutil.copytree(other, target)
        pid = os.fork()
        if pid == 0:
            count = [0]

            def hook(fn, count=count, k=k):
                def wrapper(*a, **kw):
                    count[0] += 1
                    if count[0] == k:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return fn(*a, **kw)
                return wrapper
            os.rename, os.replace, os.fsync = hook(os.rename), hook(os.replace), hook(os.fsync)
            shutil.rmtree = hook(shutil.rmtree)
            commit.exchange = hook(commit.exchange)
            try:
                run_writer(kind, src, target)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        outcomes.append("killed" if killed else "completed" if os.WEXITSTATUS(status) == 0 else "failed")
        if not killed:
            break
    print(json.dumps(outcomes))


if __name__ == "__main__":
    main(*sys.argv[1:5])
