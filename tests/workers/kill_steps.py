"""Kill a writer before each of its filesystem steps in turn (used by the save and publish child processes).

For k = 1, 2, ...: copy ``pristine`` to ``out/k``, fork, and in the fork wrap each ``(owner, name)`` function so
that the process SIGKILLs itself just before the k-th call among all of them, then run ``write(out/k)``; stop at
the first run that completes. The caller must be single-threaded in torch before forking.
"""
import os
import shutil
import signal
from typing import Callable, List, Sequence, Tuple


def kill_at_every_step(pristine: str, out: str, write: Callable[[str], None],
                       steps: Sequence[Tuple[object, str]], max_steps: int = 60) -> List[str]:
    """Outcome of each run: "killed", then "completed" (or "failed") for the last one."""
    os.makedirs(out)
    outcomes: List[str] = []
    for k in range(1, max_steps + 1):
        target = os.path.join(out, str(k))
        shutil.copytree(pristine, target)
        pid = os.fork()
        if pid == 0:  # the fork: count the steps, die before the k-th
            count = [0]

            def hook(fn, count=count, k=k):
                def wrapper(*a, **kw):
                    count[0] += 1
                    if count[0] == k:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return fn(*a, **kw)
                return wrapper
            for owner, name in steps:
                if hasattr(owner, name):
                    setattr(owner, name, hook(getattr(owner, name)))
            try:
                write(target)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        outcomes.append("killed" if killed else "completed" if os.WEXITSTATUS(status) == 0 else "failed")
        if not killed:
            break
    return outcomes
