"""``model, args = sat_quant.from_pretrained(X)`` then ``sat_quant.save_checkpoint(model, X, ...)``: saving into the
folder the model was loaded from. X's last good checkpoint is never lost (a save without overwrite is refused, even
over a plain SAT ``.pt``; an overwrite is old-or-new at every instant, even when killed), the loaded model holds no
view of X's files (so it keeps working when the save replaces and deletes them), and X loads back bitwise."""
import json
import os
import subprocess
import sys

import pytest
import torch
from sat.model.official.gpt2_model import GPT2Model

import sat_quant
from sat_quant import CheckpointError
from tests.conftest import run_logits, sat_args, save_fp_with_sat
from tests.io.checkpoints import CHILD_ENV, ROOT, STATES, leftovers, load_logits, snapshot
from tests.workers.save_into_source_child import changed

CHILD = os.path.join(ROOT, "tests", "workers", "save_into_source_child.py")


def _mapped_files():
    with open("/proc/self/maps") as f:
        return f.read()


def _assert_owns_its_memory(model, folder):
    maps = _mapped_files()
    assert not [line for line in maps.splitlines() if os.path.realpath(folder) in line], \
        "the loaded model maps files of the folder it came from"


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_model_saved_back_into_the_folder_it_came_from_keeps_working_and_reloads_bitwise(q4, ckpt):
    _, _, inputs, ref = q4
    model, args = sat_quant.from_pretrained(GPT2Model, ckpt)
    _assert_owns_its_memory(model, ckpt)
    changed(model.eval())
    new_ref = run_logits(model, inputs)
    assert not torch.equal(new_ref, ref)
    before = snapshot(ckpt)
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        sat_quant.save_checkpoint(model, ckpt, args=args)  # no overwrite: X's checkpoint stays
    assert snapshot(ckpt) == before
    expected = _state(model)
    sat_quant.save_checkpoint(model, ckpt, args=args, overwrite=True)  # replaces (and deletes) the files it came from
    assert torch.equal(run_logits(model, inputs), new_ref)  # the loaded model still works, unchanged
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert leftovers(ckpt) == [] and snapshot(ckpt) != before
    reloaded, _ = sat_quant.from_pretrained(GPT2Model, ckpt)
    got = reloaded.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert torch.equal(run_logits(reloaded.eval(), inputs), new_ref)


def test_quantizing_a_full_precision_folder_in_place_needs_overwrite_and_keeps_the_weights_until_then(fp_models,
                                                                                                        tmp_path):
    """X holds SAT's full-precision .pt (no sat_quant file): loading it with --quant 4 and saving into X must not
    silently replace the full-precision weights with a quantized checkpoint."""
    fp_model, _, inputs, _ = fp_models["gpt2"]
    folder = save_fp_with_sat(fp_model, sat_args("gpt2"), tmp_path / "fp")
    model, args = sat_quant.from_pretrained(GPT2Model, folder, args=sat_args("gpt2", quant=4))
    _assert_owns_its_memory(model, folder)  # torch.load(mmap=True) of X's .pt: nothing of it kept
    ref = run_logits(model.eval(), inputs)
    before = snapshot(folder)
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.save_checkpoint(model, folder, args=args)
    assert f"{STATES}.pt" in str(excinfo.value) and "overwrite=True" in str(excinfo.value)
    assert snapshot(folder) == before
    sat_quant.save_checkpoint(model, folder, args=args, iteration=2)  # a new iteration beside it is fine
    assert snapshot(folder)[f"1/{STATES}.pt"] == before[f"1/{STATES}.pt"]
    assert torch.equal(run_logits(model, inputs), ref)
    assert torch.equal(load_logits(folder, inputs), ref)  # latest = 2, the quantized one, bitwise


def test_a_save_into_the_folder_it_came_from_killed_at_any_step_leaves_the_old_or_the_new_checkpoint(q4, ckpt,
                                                                                                     tmp_path):
    """A child loads X, changes it, saves it into X with overwrite, and SIGKILLs itself before its k-th filesystem
    step (rename, replace, link, exchange, rmtree, a folder's fsync), for every k: X then loads bitwise as the old or the new."""
    _, _, inputs, ref = q4
    out = str(tmp_path / "runs")
    child = subprocess.run([sys.executable, CHILD, ckpt, out], cwd=ROOT, env=CHILD_ENV, capture_output=True,
                           text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    outcomes = json.loads(child.stdout.strip().splitlines()[-1])
    assert outcomes[-1] == "completed" and set(outcomes[:-1]) == {"killed"} and len(outcomes) >= 9, outcomes
    new_ref = load_logits(os.path.join(out, str(len(outcomes))), inputs)
    assert not torch.equal(new_ref, ref)
    seen = []
    for k in range(1, len(outcomes) + 1):
        got = load_logits(os.path.join(out, str(k)), inputs)
        which = "old" if torch.equal(got, ref) else "new" if torch.equal(got, new_ref) else "mixed"
        assert which != "mixed", f"killed before step {k}: the folder is neither the old nor the new checkpoint"
        seen.append(which)
    assert seen[0] == "old" and seen == sorted(seen, key=["old", "new"].index), seen
    assert leftovers(os.path.join(out, str(len(outcomes)))) == []
