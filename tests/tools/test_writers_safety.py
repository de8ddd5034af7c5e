"""Every offline writer (convert, dequantize, reshard, merge-lora) as a careless user runs it: DST overlapping SRC,
DST a file, a full disk part-way, a kill at every filesystem step of the publish, leftovers of a killed run.

What must hold: the source is never touched; DST is the old complete folder or the new complete one, never empty or
mixed; a failure removes the writer's own temporaries and names the cause; the next run cleans a dead run's leftovers.
"""
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from sat.model.official.gpt2_model import GPT2Model

import sat_quant
from sat_quant import CheckpointError, QuantConfig
from sat_quant.io.commit import TMP_MARK
from tests.conftest import run_logits, sat_args, save_fp_with_sat
from tests.io.checkpoints import ROOT, snapshot

WRITERS = ["convert", "dequantize", "reshard", "merge-lora"]


def run_writer(kind, src, dst, overwrite=False):
    """One writer on folders ``src`` → ``dst`` (each reads the kind of source it needs)."""
    if kind == "convert":
        return sat_quant.convert(src, dst, QuantConfig(bits=4, group_size=64), overwrite=overwrite, progress=False)
    if kind == "dequantize":
        return sat_quant.dequantize(src, dst, overwrite=overwrite)
    if kind == "reshard":
        return sat_quant.reshard(src, dst, 2, overwrite=overwrite)
    return sat_quant.merge_lora_checkpoint(src, dst, overwrite=overwrite)


@pytest.fixture(scope="module")
def sources(fp_models, tmp_path_factory):
    """A full-precision SAT checkpoint, its int4 conversion and a QLoRA checkpoint of it, written once."""
    root = tmp_path_factory.mktemp("writers")
    model, _, inputs, _ = fp_models["gpt2"]
    save_fp_with_sat(model, sat_args("gpt2"), root / "fp")
    sat_quant.convert(str(root / "fp"), str(root / "q4"), QuantConfig(bits=4, group_size=64), progress=False)
    q, q_args = sat_quant.from_pretrained(GPT2Model, str(root / "q4"))
    mixin = sat_quant.QuantLoraMixin.from_args(q_args)
    q.add_mixin("lora", mixin, reinit=True)
    with torch.no_grad():
        for name, p in q.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.01)
    sat_quant.save_checkpoint(q, str(root / "lora"), args=q_args)
    return {"convert": str(root / "fp"), "dequantize": str(root / "q4"), "reshard": str(root / "q4"),
            "merge-lora": str(root / "lora"), "inputs": inputs}


def copy_source(sources, kind, where):
    shutil.copytree(sources[kind], where)
    return str(where)


def leftovers(parent):
    return sorted(n for n in os.listdir(parent) if TMP_MARK in n or ".tmp-" in n)


@pytest.mark.parametrize("kind", WRITERS)
@pytest.mark.parametrize("how", ["same", "symlink", "inside", "around"])
def test_a_destination_overlapping_the_source_is_refused_even_with_overwrite(sources, tmp_path, kind, how):
    src = copy_source(sources, kind, tmp_path / "work" / "src")
    before = snapshot(str(tmp_path / "work"))
    dst = {"same": src, "symlink": str(tmp_path / "link"), "inside": os.path.join(src, "out"),
           "around": str(tmp_path / "work")}[how]
    if how == "symlink":
        os.symlink(src, dst)
    with pytest.raises(CheckpointError) as excinfo:
        run_writer(kind, src, dst, overwrite=True)
    message = str(excinfo.value)
    assert dst in message and src in message and "overlaps the source" in message
    assert snapshot(str(tmp_path / "work")) == before  # nothing written, nothing deleted


@pytest.mark.parametrize("kind", WRITERS)
def test_a_destination_that_is_a_file_is_refused_and_kept(sources, tmp_path, kind):
    dst = tmp_path / "notes.txt"
    dst.write_text("mine")
    with pytest.raises(CheckpointError, match="exists and is not a folder"):
        run_writer(kind, sources[kind], str(dst), overwrite=True)
    assert dst.read_text() == "mine"


@pytest.mark.parametrize("kind", WRITERS)
def test_overwrite_replaces_the_whole_destination_and_leaves_no_temporaries(sources, tmp_path, kind):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "stale-file").write_text("from an older run")
    with pytest.raises(CheckpointError, match="--overwrite"):
        run_writer(kind, sources[kind], str(dst))
    assert (dst / "stale-file").exists()
    run_writer(kind, sources[kind], str(dst), overwrite=True)
    assert not (dst / "stale-file").exists() and (dst / "latest").exists()
    assert leftovers(str(tmp_path)) == []
    sat_quant.from_pretrained(GPT2Model, str(dst), overwrite_args={"model_parallel_size": 1})  # it loads


@pytest.mark.parametrize("kind", WRITERS)
def test_a_full_disk_part_way_leaves_the_old_destination_and_no_temporaries(sources, tmp_path, kind, monkeypatch):
    dst = str(tmp_path / "dst")
    run_writer(kind, sources[kind], dst)
    before = snapshot(dst)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr("sat_quant.io.commit.fsync_tree", full)  # every writer publishes through it
    with pytest.raises(CheckpointError) as excinfo:
        run_writer(kind, sources[kind], dst, overwrite=True)
    assert "the disk is full" in str(excinfo.value) and f"{dst} is unchanged" in str(excinfo.value)
    monkeypatch.undo()
    assert snapshot(dst) == before
    assert leftovers(str(tmp_path)) == []


def test_a_killed_runs_temporary_folder_is_removed_by_the_next_run_and_a_live_ones_kept(sources, tmp_path):
    dst = str(tmp_path / "dst")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".dst{TMP_MARK}{int(dead.stdout)}"
    stale.mkdir()
    (stale / "half-written").write_bytes(b"\0" * 1024)
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live:
        try:
            running = tmp_path / f".dst{TMP_MARK}{live.pid}"
            running.mkdir()
            run_writer("convert", sources["convert"], dst)
            assert not stale.exists() and running.is_dir()
        finally:
            live.kill()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["convert", "dequantize", "reshard", "merge-lora"])
def test_a_kill_at_every_step_of_the_publish_leaves_the_old_or_the_new_destination(sources, tmp_path, kind):
    """A child counts the writer's filesystem steps (rename, replace, fsync, exchange, rmtree) and SIGKILLs itself
    before the k-th, for every k (at least 8 instants): DST then loads bitwise as the old folder or the new one,
    never empty or mixed, and the next run on it completes and removes the killed run's temporaries."""
    inputs = sources["inputs"]
    src = sources[kind]
    other = str(tmp_path / "other")  # what DST holds before: the other writer's output, so old and new differ
    if kind == "convert":
        sat_quant.dequantize(sources["dequantize"], other)
    elif kind == "reshard":  # mp 2 int4 over an int8 folder: loaded at mp 1 the two differ
        sat_quant.convert(sources["convert"], other, QuantConfig(bits=8), progress=False)
    else:
        sat_quant.convert(sources["convert"], other, QuantConfig(bits=8), progress=False)
    out = str(tmp_path / "runs")
    child = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "workers", "publish_child.py"), kind, src,
                            other, out], cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=ROOT))
    assert child.returncode == 0, child.stderr[-3000:]
    outcomes = json.loads(child.stdout.strip().splitlines()[-1])
    assert outcomes[-1] == "completed" and set(outcomes[:-1]) == {"killed"} and len(outcomes) >= 9, outcomes
    logits = lambda d: run_logits(sat_quant.from_pretrained(GPT2Model, d, overwrite_args={"model_parallel_size": 1})[0]
                                  .eval(), inputs)
    ref_old, ref_new = logits(other), logits(os.path.join(out, str(len(outcomes))))
    assert not torch.equal(ref_old, ref_new)
    seen = []
    for k in range(1, len(outcomes) + 1):
        got = logits(os.path.join(out, str(k)))
        which = "old" if torch.equal(got, ref_old) else "new" if torch.equal(got, ref_new) else "mixed"
        assert which != "mixed", f"killed before step {k}: DST is neither the old nor the new folder"
        seen.append(which)
    assert seen[0] == "old" and seen == sorted(seen, key=["old", "new"].index), seen
    for k in range(1, len(outcomes)):  # the next run on each DST removes what the killed one left
        run_writer(kind, src, os.path.join(out, str(k)), overwrite=True)
    assert leftovers(out) == []
