"""A save that fails part-way (full disk, as OSError or safetensors' own error, at the tensor file or at
'latest'; a real file-size limit) changes nothing and names the cause and the fix."""
import errno
import os

import pytest
import torch
from sat.model.official.gpt2_model import GPT2Model

import sat_quant
from sat_quant import CheckpointError
from tests.io.checkpoints import (
    BIGGER,
    assert_refused,
    gpt2_args,
    leftovers,
    load_logits,
    read_json,
    run_child,
    snapshot,
)


def _partial_write_then(exc):
    def writer(path, tensors):
        with open(path, "wb") as f:
            f.write(b"\0" * 65536)  # part of the file made it to disk before the disk filled up
        raise exc
    return writer


@pytest.mark.parametrize("iteration,overwrite", [(2, False), (1, True)], ids=["new-iteration", "overwrite"])
def test_disk_full_while_writing_tensors_changes_nothing(q4, ckpt, monkeypatch, iteration, overwrite):
    model, args, inputs, ref = q4
    before = snapshot(ckpt)
    monkeypatch.setattr(sat_quant.io.manifest, "write_tensor_file",
                        _partial_write_then(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.save_checkpoint(model, ckpt, args=args, iteration=iteration, overwrite=overwrite)
    assert_refused(excinfo, "the disk is full", os.path.join(ckpt, str(iteration)), "'latest'", "free space")
    assert snapshot(ckpt) == before  # no .tmp leftovers, nothing replaced
    assert torch.equal(load_logits(ckpt, inputs), ref)


def test_disk_full_when_updating_latest_keeps_the_previous_iteration(q4, ckpt, monkeypatch):
    """ENOSPC reported by fsync of 'latest' (delayed allocation): the new iteration's files are in place but
    'latest' still names the old one, which loads bitwise even though model_config.json already changed."""
    _, _, inputs, ref = q4
    torch.manual_seed(1)
    bigger_args = gpt2_args(BIGGER, quant=4)
    bigger = sat_quant.get_model(bigger_args, GPT2Model)
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith("latest.tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.save_checkpoint(bigger, ckpt, args=bigger_args, iteration=2)
    monkeypatch.undo()
    assert_refused(excinfo, "the disk is full", "latest")
    assert leftovers(ckpt) == []
    with open(os.path.join(ckpt, "latest")) as f:
        assert f.read().strip() == "1"
    assert read_json(os.path.join(ckpt, "model_config.json"))["hidden_size"] == 384  # already the new one
    assert torch.equal(load_logits(ckpt, inputs), ref)


@pytest.mark.slow
def test_a_real_write_failure_mid_file_changes_nothing(q4, ckpt):
    """No patching: the child's file-size limit (RLIMIT_FSIZE) makes the kernel fail the tensor write."""
    _, _, inputs, ref = q4
    before = snapshot(ckpt)
    result = run_child("fsize-limit", ckpt)
    assert result["type"] == "CheckpointWriteError", result  # the environment failed the write (exit 1 in the CLI)
    assert "File too large" in result["message"] and "Nothing was replaced" in result["message"], result
    assert snapshot(ckpt) == before
    assert torch.equal(load_logits(ckpt, inputs), ref)
