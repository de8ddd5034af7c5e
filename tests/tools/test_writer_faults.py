"""Every writer (convert, dequantize, reshard, merge-lora, plan ``-o``, save_checkpoint) against real faults of its
environment, in a child process (tests/workers/writer_faults_child.py), nothing patched:

- read-only folders: DST, a folder inside it (DST/1) or the folder that holds it, with permissions enforced by the
  kernel (the child takes the effective uid/gid 65534 when the tests run as root, who ignores permission bits);
- an address-space limit (``RLIMIT_AS``) a little above what the child has mapped once warmed up, on a model big
  enough that the writer's own allocations cannot fit;
- a file-size limit (``RLIMIT_FSIZE``) smaller than the files the writer writes;
- a full disk: DST on a small tmpfs, filled up but for a little slack (where the kernel lets the child mount one;
  the injected ENOSPC tests of test_writers_safety.py and tests/io/test_failed_saves.py run everywhere).

What must hold for each: the writer fails with one sentence that names the cause (and, for memory, is a
QuantOutOfMemoryError), the ``sat-quant`` CLI exits 1 (the environment, not the input), DST is byte for byte what it
was, and no temporary folder or file is left anywhere.
"""
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest
import torch
from sat.model.base_model import get_model as sat_get_model
from sat.model.official.gpt2_model import GPT2Model

import sat_quant
from sat_quant import QuantConfig
from tests.conftest import sat_args, save_fp_with_sat
from tests.io.checkpoints import CHILD_ENV, ROOT, snapshot

CHILD = os.path.join(ROOT, "tests", "workers", "writer_faults_child.py")
NOBODY = 65534
# the source each writer reads
SOURCE = {"convert": "fp", "dequantize": "q4", "reshard": "q4", "merge-lora": "lora", "plan": "fp", "save": "q4"}
# read-only: DST itself, a folder inside it (its iteration), the folder that would hold it (DST absent)
READ_ONLY = {kind: ("dst", "inner", "parent") for kind in SOURCE}
READ_ONLY["plan"] = ("dst", "parent")  # plan's DST is a file
# RLIMIT_AS margin above the warmed-up child's size, in MiB, and the step the failure must be reported in. The
# wide model's (1 layer, hidden 512, MLP 32768) fp32 file is 137 MiB, its int4 file 23 MiB: loading the int4 file
# needs 64-96 MiB, dequantizing it > 200 MiB, so dequantize fails in its own write step at 150. A save streams the
# tensors it holds (safetensors writes from their memory) and, on torch's int4 kernel, allocates only the neutral form
# of the largest int4 layer (8 MiB): it fails at 4.
ADDRESS_SPACE = {"convert": (64, "while converting"), "dequantize": (150, "in full precision to"),
                 "reshard": (32, "while resharding"), "merge-lora": (32, "while loading"),
                 "plan": (64, "while planning"), "save": (4, "while saving to")}
FILE_SIZE = {kind: 64 * 1024 for kind in SOURCE}
FILE_SIZE["plan"] = 64  # bytes: a plan file is small
WIDE = dict(num_layers=1, hidden_size=512, num_attention_heads=8, inner_hidden_size=32768, vocab_size=1000,
            max_sequence_length=64)


def _is_root():
    return os.geteuid() == 0


def _chown_tree(path, uid):
    for root, dirs, files in os.walk(path):
        for name in [root] + [os.path.join(root, n) for n in dirs + files]:
            os.lchown(name, uid, uid)


def _make_writable(path):
    for root, dirs, _ in os.walk(path):
        os.chmod(root, 0o755)
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)


def _write_sources(root, arch, seed):
    """A full-precision SAT checkpoint (SAT's own save), its int4 conversion and a QLoRA checkpoint of that."""
    torch.manual_seed(seed)
    args = sat_args("gpt2", **arch) if arch else sat_args("gpt2")
    model = sat_get_model(args, GPT2Model)
    save_fp_with_sat(model, args, os.path.join(root, "fp"))
    del model
    sat_quant.convert(os.path.join(root, "fp"), os.path.join(root, "q4"), QuantConfig(bits=4, group_size=64),
                      progress=False)
    q, q_args = sat_quant.from_pretrained(GPT2Model, os.path.join(root, "q4"))
    q.add_mixin("lora", sat_quant.QuantLoraMixin.from_args(q_args), reinit=True)
    sat_quant.save_checkpoint(q, os.path.join(root, "lora"), args=q_args)
    return {k: os.path.join(root, k) for k in ("fp", "q4", "lora")}


def _dst_name(kind):
    return "plan.json" if kind == "plan" else "dst"


@pytest.fixture(scope="module")
def faults():
    """Sources, one folder per case (DST prepared as the case needs), the child's results, snapshots before/after."""
    root = tempfile.mkdtemp(prefix="sat-quant-faults-")  # not pytest's 0700 tmp: the unprivileged uid must read it
    os.chmod(root, 0o755)
    try:
        tiny = _write_sources(os.path.join(root, "tiny"), None, 0)
        wide = _write_sources(os.path.join(root, "wide"), WIDE, 1)
        cases, case_dirs = [], {}
        seeds = {kind: tiny["q4"] for kind in SOURCE}
        seeds["plan"] = os.path.join(root, "older-plan.json")
        with open(seeds["plan"], "w") as f:
            f.write('{"an older plan": true}\n')

        def case_folder(case_id, kind, with_dst):
            parent = os.path.join(root, "cases", case_id)
            os.makedirs(parent)
            dst = os.path.join(parent, _dst_name(kind))
            if with_dst and kind == "plan":
                with open(dst, "w") as f:
                    f.write('{"an older plan": true}\n')
            elif with_dst:
                shutil.copytree(tiny["q4"], dst)  # a real checkpoint the user wants kept
            case_dirs[case_id] = parent
            return parent, dst

        for kind in SOURCE:
            for where in READ_ONLY[kind]:
                case_id = f"readonly-{where}-{kind}"
                parent, dst = case_folder(case_id, kind, with_dst=where != "parent")
                if _is_root():
                    _chown_tree(parent, NOBODY)  # the user's own folder, which the user made read-only
                if where == "dst":
                    os.chmod(dst, 0o444 if kind == "plan" else 0o555)
                elif where == "inner":
                    os.chmod(os.path.join(dst, "1"), 0o555)
                else:
                    os.chmod(parent, 0o555)
                # save: a new iteration into a read-only folder; an overwrite of a read-only iteration
                cases.append({"id": case_id, "writer": kind, "fault": "readonly", "src": tiny[SOURCE[kind]],
                              "dst": dst, "iteration": 1 if where == "inner" else 2})
            case_id = f"address-space-{kind}"
            _, dst = case_folder(case_id, kind, with_dst=True)
            cases.append({"id": case_id, "writer": kind, "fault": "address-space", "src": wide[SOURCE[kind]], "dst": dst,
                          "margin_mb": ADDRESS_SPACE[kind][0]})
            case_id = f"disk-full-{kind}"
            parent, _ = case_folder(case_id, kind, with_dst=False)
            mount = os.path.join(parent, "mnt")
            os.makedirs(mount)
            cases.append({"id": case_id, "writer": kind, "fault": "disk-full", "src": tiny[SOURCE[kind]],
                          "mount": mount, "dst": os.path.join(mount, _dst_name(kind)), "seed": seeds[kind],
                          "slack": 0 if kind == "plan" else 512 * 1024})
            case_id = f"file-size-{kind}"
            _, dst = case_folder(case_id, kind, with_dst=True)
            cases.append({"id": case_id, "writer": kind, "fault": "file-size", "src": tiny[SOURCE[kind]], "dst": dst,
                          "limit": FILE_SIZE[kind]})
        pristine = os.path.join(root, "kill-pristine")
        os.makedirs(pristine)
        shutil.copyfile(seeds["plan"], os.path.join(pristine, "plan.json"))
        cases.append({"id": "kill-steps-plan", "writer": "plan", "fault": "kill-steps", "src": tiny["fp"],
                      "pristine": pristine, "out": os.path.join(root, "kill-plan"), "name": "plan.json"})
        warm = {kind: (tiny[SOURCE[kind]], os.path.join(root, "warm", _dst_name(kind) + "-" + kind))
                for kind in SOURCE}
        os.makedirs(os.path.join(root, "warm"))
        spec = os.path.join(root, "spec.json")
        with open(spec, "w") as f:
            json.dump({"warm": warm, "cases": cases}, f)
        before = {case_id: snapshot(d) for case_id, d in case_dirs.items()}
        listing = {case_id: sorted(os.listdir(d)) for case_id, d in case_dirs.items()}
        # fixed malloc thresholds and one arena: freed blocks go back to the kernel, so the measured size is what is
        # mapped; a second arena reserves 64 MiB of address space up front and serves allocations inside it unseen
        env = dict(CHILD_ENV, MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
        child = subprocess.run([sys.executable, CHILD, spec], cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=600)
        assert child.returncode == 0, child.stderr[-4000:]
        results = json.loads(child.stdout.strip().splitlines()[-1])
        after = {case_id: snapshot(d) for case_id, d in case_dirs.items()}
        after_listing = {case_id: sorted(os.listdir(d)) for case_id, d in case_dirs.items()}
        kill_dirs = sorted(os.listdir(os.path.join(root, "kill-plan")), key=int)
        killed = {k: snapshot(os.path.join(root, "kill-plan", k)) for k in kill_dirs}
        yield {"results": results, "killed": killed, "kill_root": os.path.join(root, "kill-plan"), "tiny": tiny,
               "old_plan": snapshot(pristine), "before": before, "after": after, "listing": listing,
               "after_listing": after_listing, "cases": {c["id"]: c for c in cases}}
    finally:
        _make_writable(root)
        shutil.rmtree(root, ignore_errors=True)


def _check_failed_cleanly(faults, case_id):
    """The writer failed, the CLI would say so in one line with exit 1, and nothing changed on disk."""
    result = faults["results"][case_id]
    assert result["type"] is not None, f"{case_id}: the writer succeeded"
    assert result["type"] not in ("child-crash", "child-died"), result
    assert result["status"] == 1, result  # the environment, not the input
    assert "\n" not in result["line"] and "Traceback" not in result["line"], result
    assert faults["after"][case_id] == faults["before"][case_id], f"{case_id}: DST changed"
    assert faults["after_listing"][case_id] == faults["listing"][case_id], f"{case_id}: left {faults['after_listing']}"
    return result


@pytest.mark.parametrize("case_id", [f"readonly-{w}-{k}" for k in SOURCE for w in READ_ONLY[k]])
def test_a_read_only_destination_is_refused_and_left_as_it_was(faults, case_id):
    result = _check_failed_cleanly(faults, case_id)
    case = faults["cases"][case_id]
    assert result["type"] == "CheckpointWriteError", result
    assert "read-only" in result["line"] and "chmod" in result["line"], result  # what is wrong and the fix
    named = os.path.dirname(case["dst"]) if case_id.startswith("readonly-parent") else case["dst"]
    assert named in result["line"], result
    if case_id.startswith("readonly-dst") and case["writer"] == "plan":
        assert stat.S_IMODE(os.stat(case["dst"]).st_mode) == 0o444


@pytest.mark.parametrize("kind", list(SOURCE))
def test_an_address_space_limit_is_an_out_of_memory_error_and_writes_nothing(faults, kind):
    result = _check_failed_cleanly(faults, f"address-space-{kind}")
    assert result["type"] == "QuantOutOfMemoryError" and "MemoryError" in result["classes"], result
    assert "ran out of cpu memory" in result["line"] and ADDRESS_SPACE[kind][1] in result["line"], result
    assert "what to change" in result["line"], result


@pytest.mark.parametrize("kind", list(SOURCE))
def test_a_file_size_limit_fails_the_write_and_changes_nothing(faults, kind):
    result = _check_failed_cleanly(faults, f"file-size-{kind}")
    assert result["type"] == "CheckpointWriteError", result
    assert "File too large" in result["line"], result
    assert "unchanged" in result["line"] or "Nothing was replaced" in result["line"], result


@pytest.mark.parametrize("kind", list(SOURCE))
def test_a_full_disk_fails_the_write_and_changes_nothing(faults, kind):
    result = faults["results"][f"disk-full-{kind}"]
    if result["type"] == "unavailable":
        pytest.skip("this kernel does not let the test mount a tmpfs; the injected ENOSPC tests cover the writers")
    result = _check_failed_cleanly(faults, f"disk-full-{kind}")
    assert result["type"] == "CheckpointWriteError", result
    assert "the disk is full" in result["line"], result
    assert result["after"] == result["before"], "DST (or the disk around it) changed, or a temporary was left"
    assert any(k == _dst_name(kind) or k.startswith(_dst_name(kind) + "/") for k in result["before"])


def test_plan_killed_at_every_step_leaves_the_old_or_the_new_plan_file_and_the_next_run_cleans_up(faults):
    """``plan -o`` writes one file through write_text_atomic (a temporary, fsync, os.replace): SIGKILLed before each
    step, the plan file is the old one or the new one, and the next run removes the killed run's temporary."""
    from sat_quant.tools.cli import main
    outcomes = faults["results"]["kill-steps-plan"]["outcomes"]
    assert outcomes[-1] == "completed" and set(outcomes[:-1]) == {"killed"} and len(outcomes) >= 3, outcomes
    old, new = faults["old_plan"]["plan.json"], faults["killed"][str(len(outcomes))]["plan.json"]
    assert old != new
    seen = []
    for k, files in faults["killed"].items():
        which = "old" if files["plan.json"] == old else "new" if files["plan.json"] == new else "mixed"
        assert which != "mixed", f"killed before step {k}: the plan file is neither the old nor the new one"
        seen.append(which)
    assert seen[0] == "old" and seen == sorted(seen, key=["old", "new"].index), seen
    assert any(len(files) > 1 for files in faults["killed"].values()), "no kill left a temporary to clean up"
    for k in faults["killed"]:  # the next run on each folder
        folder = os.path.join(faults["kill_root"], k)
        assert main(["plan", faults["tiny"]["fp"], "--quant-budget", "5bpp", "-o", os.path.join(folder, "plan.json")]) == 0
        assert os.listdir(folder) == ["plan.json"], os.listdir(folder)
