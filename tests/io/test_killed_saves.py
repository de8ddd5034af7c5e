"""A save killed (SIGKILL, real subprocesses) mid-write or at any step of its commit leaves the previous
checkpoint loadable and bitwise identical; overwrites swap whole folders; a loaded model owns its memory."""
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from sat.model.official.gpt2_model import GPT2Model

import sat_quant
from tests.conftest import run_logits
from tests.io.checkpoints import (
    BIGGER,
    CHILD_ENV,
    ROOT,
    SAVE_CHILD,
    STATES,
    gpt2_args,
    leftovers,
    load_logits,
    run_child,
    snapshot,
    tensor_file,
    wait_for,
)


def test_round_trip_is_bitwise_and_leaves_nothing_behind(q4, ckpt):
    _, _, inputs, ref = q4
    assert torch.equal(load_logits(ckpt, inputs), ref)
    assert torch.equal(load_logits(ckpt, inputs, cls=None), ref)
    assert leftovers(ckpt) == []
    assert sorted(os.listdir(os.path.join(ckpt, "1"))) == sorted(STATES + s for s in (".manifest.json", ".pt",
                                                                                        ".safetensors"))


# -- killed saves -----------------------------------------------------------------------------------

def _kill_mid_tensor_write(d, iteration, overwrite, tmp_path):
    """Start saving the HUGE model in a child, SIGKILL it while its tensor file is being written."""
    with open(tmp_path / "child.err", "w") as err:
        proc = subprocess.Popen([sys.executable, SAVE_CHILD, "save-huge", d, str(iteration),
                                 str(int(overwrite))], cwd=ROOT, env=CHILD_ENV, stdout=subprocess.DEVNULL,
                                stderr=err)
        tmp_dir = os.path.join(d, f".{iteration}.tmp-{proc.pid}-rank0")
        try:
            def writing():
                try:
                    return any(os.path.getsize(os.path.join(tmp_dir, n)) > 0 for n in os.listdir(tmp_dir))
                except FileNotFoundError:
                    return False
            wait_for(writing, proc, "the child started writing its tensor file")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "child.err").read_text()[-3000:]
    assert os.path.isdir(tmp_dir), "killed mid-save: its temporary folder is left behind"
    return tmp_dir


@pytest.mark.slow
def test_sigkill_while_writing_a_new_bigger_iteration_keeps_the_previous_one(q4, ckpt, tmp_path):
    model, args, inputs, ref = q4
    before = snapshot(ckpt)
    tmp_dir = _kill_mid_tensor_write(ckpt, 2, False, tmp_path)
    with open(os.path.join(ckpt, "latest")) as f:
        assert f.read().strip() == "1"
    assert not os.path.exists(os.path.join(ckpt, "2"))
    assert {k: v for k, v in snapshot(ckpt).items() if not k.startswith(".")} == before
    # the leftover temporary folder does not confuse the loader: it loads iteration 1, bitwise
    assert torch.equal(load_logits(ckpt, inputs), ref)
    # nor the next save, which replaces 'latest' as usual
    sat_quant.save_checkpoint(model, ckpt, args=args, iteration=2)
    with open(os.path.join(ckpt, "latest")) as f:
        assert f.read().strip() == "2"
    assert torch.equal(load_logits(ckpt, inputs), ref)
    # the killed writer's temporary folder (its process is gone) was removed by this next save on the folder
    assert not os.path.exists(tmp_dir)


def test_a_save_leaves_a_live_writers_temporary_folder_alone(q4, ckpt, tmp_path):
    """Only temporaries whose process is gone are removed: another writer may still be running."""
    model, args, inputs, ref = q4
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live:
        try:
            theirs = os.path.join(ckpt, f".2.tmp-{live.pid}-rank0")
            os.makedirs(theirs)
            sat_quant.save_checkpoint(model, ckpt, args=args, iteration=2)
            assert os.path.isdir(theirs)
        finally:
            live.kill()
    assert torch.equal(load_logits(ckpt, inputs), ref)


@pytest.mark.slow
def test_sigkill_while_overwriting_iteration_1_keeps_the_old_files(q4, ckpt, tmp_path):
    _, _, inputs, ref = q4
    before = snapshot(ckpt)
    tmp_dir = _kill_mid_tensor_write(ckpt, 1, True, tmp_path)
    assert {k: v for k, v in snapshot(ckpt).items() if not k.startswith(".")} == before
    assert torch.equal(load_logits(ckpt, inputs), ref)
    shutil.rmtree(tmp_dir)  # ~500 MB


@pytest.mark.parametrize("iteration,overwrite", [(2, False), (1, True)], ids=["new-iteration", "overwrite"])
def test_sigkill_at_every_commit_step_leaves_one_whole_checkpoint(q4, ckpt, tmp_path, iteration, overwrite):
    """A child saves the BIGGER model and SIGKILLs itself before its k-th filesystem change (rename, swap,
    link, replace, rmtree), for every k: each result loads, bitwise, as either the old or the new model."""
    _, _, inputs, ref = q4
    out = str(tmp_path / "crashes")
    outcomes = run_child("crash-steps", ckpt, out, str(iteration), str(int(overwrite)))
    assert outcomes[-1] == "completed" and set(outcomes[:-1]) == {"killed"}, outcomes
    assert len(outcomes) >= 5, outcomes  # at least: manifest, move into place, config, latest, cleanup
    dirs = [os.path.join(out, str(k)) for k in range(1, len(outcomes) + 1)]
    new_ref = load_logits(dirs[-1], inputs)
    assert new_ref.shape == ref.shape and not torch.equal(new_ref, ref)
    seen = []
    for k, d in enumerate(dirs, start=1):
        with open(os.path.join(d, "latest")) as f:
            latest = int(f.read())
        logits = load_logits(d, inputs)
        which = "old" if torch.equal(logits, ref) else "new" if torch.equal(logits, new_ref) else "mixed"
        assert which != "mixed", f"killed before step {k}: loaded neither the old nor the new checkpoint"
        if not overwrite:
            assert (latest == 1) == (which == "old"), (k, latest, which)
        else:
            assert latest == 1
        seen.append(which)
    assert seen == sorted(seen, key=["old", "new"].index), seen  # never back to old once new
    assert seen[0] == "old" and seen[-1] == "new"
    assert leftovers(dirs[-1]) == []


def test_overwrite_where_the_filesystem_cannot_swap_folders(q4, ckpt, monkeypatch):
    """Without renameat2(RENAME_EXCHANGE) (another OS, a filesystem without it) an overwrite still completes,
    moving the files one by one (only that fallback has a window where a kill leaves a mixed folder)."""
    _, _, inputs, ref = q4
    torch.manual_seed(1)
    bigger_args = gpt2_args(BIGGER, quant=4)
    bigger = sat_quant.get_model(bigger_args, GPT2Model).eval()
    new_ref = run_logits(bigger, inputs)
    monkeypatch.setattr(sat_quant.io.commit, "exchange", lambda a, b: False)
    sat_quant.save_checkpoint(bigger, ckpt, args=bigger_args, iteration=1, overwrite=True)
    assert torch.equal(load_logits(ckpt, inputs), new_ref)
    assert leftovers(ckpt) == []


def test_overwrite_keeps_other_files_of_the_iteration(q4, ckpt):
    """The atomic swap replaces the folder: files sat_quant does not own (e.g. SAT's optimizer states) stay."""
    model, args, inputs, ref = q4
    other = os.path.join(ckpt, "1", "mp_rank_00_optim_states.pt")
    with open(other, "wb") as f:
        f.write(b"optimizer")
    sat_quant.save_checkpoint(model, ckpt, args=args, iteration=1, overwrite=True)
    with open(other, "rb") as f:
        assert f.read() == b"optimizer"
    assert torch.equal(load_logits(ckpt, inputs), ref)
    assert leftovers(ckpt) == []


def test_loaded_model_owns_its_memory(q4, ckpt):
    """Nothing of the loaded model is a view of the file's memory map: rewriting the file in place afterwards
    (same inode: a copy tool, a careless script) cannot change the model, and its pages are not pinned."""
    _, _, inputs, ref = q4
    model, _ = sat_quant.from_pretrained(GPT2Model, ckpt)
    path = tensor_file(ckpt)
    with open(path, "r+b") as f:
        header = 8 + int.from_bytes(f.read(8), "little")
        f.seek(header)
        f.write(b"\x7f" * (os.path.getsize(path) - header))
    assert torch.equal(run_logits(model.eval(), inputs), ref)
    with open("/proc/self/maps") as f:
        assert path not in f.read()
