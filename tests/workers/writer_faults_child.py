"""Child process of tests/tools/test_writer_faults.py: every writer run into a real fault, one case after another.

``python tests/workers/writer_faults_child.py SPEC.json`` prints one JSON line: case id → what the writer raised
(type, message) and what the ``sat-quant`` CLI makes of it (exit status and line, from ``describe_failure``, the
function ``main`` prints with). The faults are real, nothing is patched:

- ``readonly``: the writer runs with the effective uid/gid of an unprivileged user (65534) when this process is root,
  so the kernel enforces the folders' permission bits (root ignores them); the caller prepared read-only folders;
- ``address-space``: ``RLIMIT_AS`` at this process's current size plus ``margin_mb``;
- ``file-size``: ``RLIMIT_FSIZE`` at ``limit`` bytes (SIGXFSZ ignored, so the write fails with EFBIG);
- ``kill-steps``: the writer SIGKILLed before each of its filesystem steps in turn (tests/workers/kill_steps.py), on
  copies of ``pristine`` under ``out``; the outcomes are reported;
- ``disk-full``: a small tmpfs mounted in a private mount namespace of the fork (needs CAP_SYS_ADMIN; reported as
  ``unavailable`` where the kernel refuses), holding a copy of DST and filled up but for ``slack`` bytes. Only the
  fork sees it, so the fork reports the snapshots of the mount before and after the writer.

Each writer first runs once unlimited (``warm``: lazy imports, thread pools, SAT's model-parallel group, compiled
kernels), so that a limit measured afterwards leaves the writer only its own allocations.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import gc  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
from contextlib import contextmanager  # noqa: E402

import torch  # noqa: E402
from sat.model.official.gpt2_model import GPT2Model  # noqa: E402

import sat_quant  # noqa: E402
from sat_quant._libc import libc  # noqa: E402
from sat_quant.tools.cli import describe_failure, main  # noqa: E402

NOBODY = 65534


def argv_for(kind, src, dst):
    """The ``sat-quant`` command line of a writer (``save`` has none: it is the Python API)."""
    if kind == "convert":
        return ["convert", src, dst, "--quant", "4", "--quant-group-size", "64", "--quiet", "--overwrite"]
    if kind == "reshard":
        return ["reshard", src, dst, "--mp", "2", "--overwrite"]
    if kind == "plan":
        return ["plan", src, "--quant-budget", "5bpp", "-o", dst]
    return [kind, src, dst, "--overwrite"]  # dequantize, merge-lora


_models = {}


def run_writer(kind, src, dst, iteration=1):
    """One writer; ``save`` saves the model loaded from ``src`` (loaded beforehand, outside any limit)."""
    if kind == "save":
        model, args = _models[src]
        return sat_quant.save_checkpoint(model, dst, args=args, iteration=iteration, overwrite=True)
    status = main(argv_for(kind, src, dst))  # SAT_QUANT_DEBUG=1: a failure is raised, not printed
    assert status == 0, status


def preload(src):
    """The model a ``save`` case saves, on torch's int4 kernel: its layout is not the saved one, so a save allocates
    the neutral form of each layer (sat_quant's lut kernel, auto's choice on AVX-512, holds the saved layout and
    a save allocates next to nothing: no limit would make it fail)."""
    if src not in _models:
        args = GPT2Model.get_args(device="cpu", quant_backend="torch", mode="inference")
        _models[src] = sat_quant.from_pretrained(GPT2Model, src, args)


def vm_size():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


@contextmanager
def unprivileged():
    """Effective uid/gid 65534 (no capabilities) while root; nothing to do for another user."""
    if os.geteuid() != 0:
        yield
        return
    groups = os.getgroups()
    os.setgroups([])
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)


@contextmanager
def limited(which, value):
    soft, hard = resource.getrlimit(which)
    resource.setrlimit(which, (value, hard))
    try:
        yield
    finally:
        resource.setrlimit(which, (soft, hard))


CLONE_NEWNS, MS_REC, MS_PRIVATE = 0x00020000, 16384, 1 << 18


def mount_small_disk(case):
    """In this fork: a private mount namespace, a tmpfs at ``case['mount']`` with a copy of ``case['seed']`` at
    DST, and the rest of the tmpfs filled but for ``case['slack']`` bytes. False where mounting is not allowed."""
    import ctypes
    import shutil
    c = libc()
    c.unshare.argtypes = [ctypes.c_int]
    c.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    if c.unshare(CLONE_NEWNS) != 0 or c.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return False
    if c.mount(b"tmpfs", case["mount"].encode(), b"tmpfs", 0, f"size={32 * 2**20}".encode()) != 0:
        return False
    if os.path.isdir(case["seed"]):
        shutil.copytree(case["seed"], case["dst"])
    else:
        shutil.copyfile(case["seed"], case["dst"])
    st = os.statvfs(case["mount"])
    with open(os.path.join(case["mount"], "filler"), "wb") as f:  # the disk full but for the slack
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - case["slack"]))
    return True


def tree_state(path):
    """relative path → size and sha256 of every file under ``path``, and every folder (hidden ones included)."""
    import hashlib
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), path) + "/"] = "dir"
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def run_case(case):
    kind, fault = case["writer"], case["fault"]
    out = {"base_mb": None}
    try:
        if fault == "readonly":
            with unprivileged():
                run_writer(kind, case["src"], case["dst"], case.get("iteration", 1))
        elif fault == "address-space":
            gc.collect()
            libc().malloc_trim(0)
            base = vm_size()
            out["base_mb"] = base // 2**20
            with limited(resource.RLIMIT_AS, base + case["margin_mb"] * 2**20):
                run_writer(kind, case["src"], case["dst"])
        elif fault == "kill-steps":
            from tests.workers.kill_steps import kill_at_every_step
            steps = [(os, "fsync"), (os, "replace"), (os, "rename"), (os, "unlink")]
            out["outcomes"] = kill_at_every_step(case["pristine"], case["out"], lambda target: run_writer(
                kind, case["src"], os.path.join(target, case["name"])), steps)
        elif fault == "disk-full":
            if not mount_small_disk(case):
                return {"type": "unavailable", "message": "mounting a tmpfs is not allowed here"}
            out["before"] = tree_state(case["mount"])
            try:
                run_writer(kind, case["src"], case["dst"])
            finally:
                out["after"] = tree_state(case["mount"])
        elif fault == "file-size":
            with limited(resource.RLIMIT_FSIZE, case["limit"]):
                run_writer(kind, case["src"], case["dst"])
        else:
            raise ValueError(fault)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        status, line = describe_failure(exc)
        out.update(type=type(exc).__name__, classes=[c.__name__ for c in type(exc).__mro__], message=str(exc),
                   status=status, line=line)
        return out
    out.update(type=None)
    return out


def run_forked(case):
    """``run_case`` in a fork: a limit, a uid or a half-done write of one case never reaches the next."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            data = json.dumps(run_case(case)).encode()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            data = json.dumps({"type": "child-crash", "message": repr(exc)}).encode()
        with os.fdopen(write, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        return {"type": "child-died", "message": f"wait status {status}"}
    return json.loads(data)


def child_main(spec_path):
    torch.set_num_threads(1)
    os.environ["SAT_QUANT_DEBUG"] = "1"
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file-size limit fails the write with EFBIG instead
    with open(spec_path) as f:
        spec = json.load(f)
    for kind, (src, dst) in spec["warm"].items():
        if kind == "save":
            preload(src)
        run_writer(kind, src, dst)
    for case in spec["cases"]:
        if case["writer"] == "save":
            preload(case["src"])  # before the fork: the case measures the save alone
    results = {case["id"]: run_forked(case) for case in spec["cases"]}
    print(json.dumps(results))


if __name__ == "__main__":
    child_main(sys.argv[1])
