"""Checkpoints are never half-written and never half-loaded.

- a save killed (SIGKILL, real subprocesses) mid-write or at any step of its commit, or failing on a full
  disk, leaves the previous checkpoint loadable and bitwise identical;
- every kind of bad input (truncated or altered file, missing/mis-shaped tensor, unknown format version,
  a block that does not describe the tensors, the wrong model, a pickle that would run code, broken
  ``latest``/model_config.json, --quant flags that contradict the checkpoint) is refused with an error
  that names the file and the fix, before anything is loaded.

Run as a script, this file is the child process of the kill tests (see ``_child_main``).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":  # child process of the kill tests
    sys.path.insert(0, ROOT)

import errno  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from sat.model.official.gpt2_model import GPT2Model  # noqa: E402

import sat_quant  # noqa: E402
from sat_quant import CheckpointError, QuantConfigError  # noqa: E402
from sat_quant.checkpoint import TensorSource, load_into, quantization_block  # noqa: E402
from tests.conftest import SAT_MODELS, run_logits, sat_args  # noqa: E402

STATES = "mp_rank_00_model_states"
CHILD_ENV = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=ROOT)
# A model that differs from the tiny GPT-2 in every size, so that pairing its files with the old
# config (or the reverse) cannot load: the crash-at-every-step test would see it.
BIGGER = dict(num_layers=3, hidden_size=384, num_attention_heads=6, vocab_size=1000, max_sequence_length=64)
# Big enough (~500 MB of fp32 embeddings + LM head) that writing, fsyncing and hashing take seconds.
HUGE = dict(num_layers=2, hidden_size=512, num_attention_heads=8, vocab_size=120_000, max_sequence_length=64)


# -- helpers ----------------------------------------------------------------------------------------

def gpt2_args(arch=None, **overrides):
    kw = dict(arch or SAT_MODELS["gpt2"][1], device="cpu", fp16=False, bf16=False, skip_init=False, quant=None,
              mode="inference")
    kw.update(overrides)
    return GPT2Model.get_args(**kw)


def tensor_file(d, it=1):
    return os.path.join(d, str(it), STATES + ".safetensors")


def manifest_file(d, it=1):
    return os.path.join(d, str(it), STATES + ".manifest.json")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def snapshot(d):
    """relative path → sha256 of every file under d (hidden temporaries included)."""
    out = {}
    for root, _, files in os.walk(d):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, d)] = sha256(path)
    return out


def leftovers(d):
    return sorted(os.path.relpath(os.path.join(root, n), d) for root, dirs, files in os.walk(d)
                  for n in dirs + files if ".tmp" in n)


def load_logits(d, inputs, cls=GPT2Model, **kw):
    model, _ = sat_quant.from_pretrained(cls, str(d), **kw)
    return run_logits(model.eval(), inputs)


def assert_refused(excinfo, *needles):
    """The error names the file (and the fix): every needle appears in the message."""
    msg = str(excinfo.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in error message:\n{msg}"


def rewrite_tensors(d, edit):
    """Rewrite the tensor file through ``edit(dict) -> dict`` and make the manifest match it again, so that
    only the per-tensor checks can catch what ``edit`` did (size and sha256 are right)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    path = tensor_file(d)
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
        metadata = f.metadata()
    tensors = edit(tensors)
    save_file(tensors, path, metadata=metadata)
    manifest = read_json(manifest_file(d))
    manifest.update(bytes=os.path.getsize(path), sha256=sha256(path),
                    tensors={k: {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape)}
                             for k, t in tensors.items()})
    write_json(manifest_file(d), manifest)


def edit_config_files(d, edit):
    """Apply ``edit`` to model_config.json and to the manifest's copies (its block and model config)."""
    config = read_json(os.path.join(d, "model_config.json"))
    edit(config)
    write_json(os.path.join(d, "model_config.json"), config)
    manifest = read_json(manifest_file(d))
    inner = dict(manifest.get("model_config", {}), quantization=manifest["quantization"])
    edit(inner)
    manifest["quantization"] = inner.pop("quantization")
    if "model_config" in manifest:
        manifest["model_config"] = inner
    write_json(manifest_file(d), manifest)


def wait_for(condition, proc, what, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"the child exited ({proc.returncode}) before {what}")
        time.sleep(0.002)
    raise AssertionError(f"timed out waiting for {what}")


def run_child(*argv, timeout=600):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], cwd=ROOT, env=CHILD_ENV,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def q4(fp_models):
    """The tiny GPT-2, int4 at build, filled from the fp32 weights; its inputs and logits."""
    _, state, inputs, _ = fp_models["gpt2"]
    args = sat_args("gpt2", skip_init=True, quant=4)
    model = sat_quant.get_model(args, GPT2Model).eval()
    model.load_state_dict(state, strict=False)
    return model, args, inputs, run_logits(model, inputs)


@pytest.fixture
def ckpt(q4, tmp_path):
    """A good checkpoint (iteration 1) of q4, freshly saved."""
    model, args, _, _ = q4
    d = str(tmp_path / "ckpt")
    sat_quant.save_checkpoint(model, d, args=args)
    return d


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
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "save-huge", d, str(iteration),
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
    assert os.path.isdir(tmp_dir)  # another process's temporary folder is not ours to delete
    shutil.rmtree(tmp_dir)  # ~500 MB


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
    monkeypatch.setattr(sat_quant.checkpoint, "_exchange", lambda a, b: False)
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


# -- failed saves -----------------------------------------------------------------------------------

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
    monkeypatch.setattr(sat_quant.checkpoint, "_write_tensor_file",
                        _partial_write_then(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.save_checkpoint(model, ckpt, args=args, iteration=iteration, overwrite=overwrite)
    assert_refused(excinfo, "the disk is full", os.path.join(ckpt, str(iteration)), "'latest'", "free space")
    assert snapshot(ckpt) == before  # no .tmp leftovers, nothing replaced
    assert torch.equal(load_logits(ckpt, inputs), ref)


def test_disk_full_as_safetensors_reports_it(q4, ckpt, monkeypatch):
    """safetensors raises its own SafetensorError (text: '... (os error 28)'), not OSError."""
    from safetensors import SafetensorError
    model, args, inputs, ref = q4
    before = snapshot(ckpt)
    monkeypatch.setattr("safetensors.torch.save_file", lambda tensors, path, metadata=None: _partial_write_then(
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))(path, tensors))
    with pytest.raises(CheckpointError, match="the disk is full"):
        sat_quant.save_checkpoint(model, ckpt, args=args, iteration=2)
    assert snapshot(ckpt) == before
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
    assert result["type"] == "CheckpointError", result
    assert "File too large" in result["message"] and "Nothing was replaced" in result["message"], result
    assert snapshot(ckpt) == before
    assert torch.equal(load_logits(ckpt, inputs), ref)


# -- bad input --------------------------------------------------------------------------------------

def test_truncated_tensor_file(q4, ckpt):
    path = tensor_file(ckpt)
    os.truncate(path, os.path.getsize(path) // 2)
    for verify in (True, False):  # the size check runs even without the checksum
        with pytest.raises(CheckpointError) as excinfo:
            sat_quant.from_pretrained(GPT2Model, ckpt, verify=verify)
        assert_refused(excinfo, path, "truncated", "re-save or re-convert")
    # truncated with a manifest that matches it (e.g. regenerated from the partial copy): the file itself
    manifest = read_json(manifest_file(ckpt))
    manifest.update(bytes=os.path.getsize(path), sha256=sha256(path))
    write_json(manifest_file(ckpt), manifest)
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, ckpt)
    assert_refused(excinfo, path, "not a readable safetensors file", "truncated or corrupted")


def test_flipped_bytes_fail_the_checksum(ckpt):
    path = tensor_file(ckpt)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        chunk = f.read(16)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    assert os.path.getsize(path) == size
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, ckpt)
    assert_refused(excinfo, path, "sha256", "re-save or re-convert")


def test_missing_tensor(ckpt):
    gone = "transformer.layers.1.attention.dense.scale"
    rewrite_tensors(ckpt, lambda t: {k: v for k, v in t.items() if k != gone})
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, ckpt)
    assert_refused(excinfo, tensor_file(ckpt), f"{gone}: missing from the checkpoint", "model class and its sizes")


def test_tensor_with_wrong_shape_or_dtype(ckpt):
    def edit(t):
        t["transformer.final_layernorm.weight"] = t["transformer.final_layernorm.weight"][:128].clone()
        t["transformer.layers.0.mlp.dense_h_to_4h.zero"] = t["transformer.layers.0.mlp.dense_h_to_4h.zero"].float()
        return t
    rewrite_tensors(ckpt, edit)
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, ckpt)
    assert_refused(excinfo, tensor_file(ckpt), "2 problems",
                   "transformer.final_layernorm.weight: checkpoint has [128] torch.float32, model needs [256]",
                   "dense_h_to_4h.zero: checkpoint has [1024, 2] torch.float32, model needs [1024, 2] torch.uint8")


def test_unknown_format_version(ckpt):
    edit_config_files(ckpt, lambda c: c["quantization"].update(format_version=99))
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, ckpt)
    assert_refused(excinfo, manifest_file(ckpt), "format_version 99", "upgrade sat_quant")
    # the manifest's own version, too
    manifest = read_json(manifest_file(ckpt))
    manifest["format_version"] = 99
    write_json(manifest_file(ckpt), manifest)
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, ckpt)
    assert_refused(excinfo, manifest_file(ckpt), "format_version 99", "upgrade sat_quant")


def test_block_says_int4_but_tensors_are_int8(fp_models, q4, tmp_path):
    _, state, inputs, _ = fp_models["gpt2"]
    args = sat_args("gpt2", skip_init=True, quant=8)
    int8 = sat_quant.get_model(args, GPT2Model).eval()
    int8.load_state_dict(state, strict=False)
    d = str(tmp_path / "int8")
    sat_quant.save_checkpoint(int8, d, args=args)
    int4_block = quantization_block(q4[0])

    def relabel(config):
        config["quantization"] = int4_block
        config.update(quant=4, quant_format="int4")
    edit_config_files(d, relabel)
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, d)
    assert_refused(excinfo, tensor_file(d), "does not fit this model",
                   "attention.dense.qweight: checkpoint has [256, 256] torch.int8, model needs [256, 128] torch.uint8",
                   "the quantization block describes these tensors")


@pytest.mark.parametrize("how", ["hidden_size", "other_class"])
def test_checkpoint_into_a_model_of_other_sizes(ckpt, how):
    from sat.model.official.llama_model import LLaMAModel
    kw = dict(overwrite_args={"hidden_size": 512}) if how == "hidden_size" else dict(cls=LLaMAModel)
    cls = kw.pop("cls", GPT2Model)
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(cls, ckpt, **kw)
    assert_refused(excinfo, tensor_file(ckpt), "does not fit this model", "model class and its sizes")
    if how == "hidden_size":
        assert_refused(excinfo, "checkpoint has [256] torch.float32, model needs [512] torch.float32")
    else:
        assert_refused(excinfo, "mixins.gpt2-final.lm_head.weight: in the checkpoint but not in the model")


class _WritesAFile:
    """Unpickling this calls open(marker, "w"): arbitrary code, as far as a loader is concerned."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_pt_whose_pickle_would_run_code_is_refused(tmp_path, legacy):
    """A full-precision SAT checkpoint (.pt, no manifest) loaded with --quant goes through torch.load with
    weights_only=True: the payload never runs."""
    fp_args = sat_args("gpt2")
    d = tmp_path / "fp"
    (d / "1").mkdir(parents=True)
    (d / "latest").write_text("1")
    from sat.model.base_model import get_model as sat_get_model
    from sat.training.model_io import extract_model_specific_args_to_dump
    write_json(d / "model_config.json", extract_model_specific_args_to_dump(fp_args, sat_get_model(fp_args, GPT2Model)))
    marker = str(tmp_path / "pwned")
    pt = str(d / "1" / f"{STATES}.pt")
    torch.save({"module": {"transformer.word_embeddings.weight": _WritesAFile(marker)}}, pt,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, str(d), args=sat_args("gpt2", quant=4))
    assert_refused(excinfo, pt, "weights_only=True", "refuses it", "trusted code")
    assert not os.path.exists(marker)
    # the payload is live: an unsafe load would have run it
    torch.load(pt, weights_only=False)
    assert os.path.exists(marker)


def test_latest_missing_or_wrong(ckpt):
    latest = os.path.join(ckpt, "latest")
    with open(latest, "w") as f:
        f.write("7")
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, ckpt)
    assert_refused(excinfo, latest, "names iteration 7", os.path.join(ckpt, "7"),
                   "point 'latest' at an existing iteration folder")
    with open(latest, "w") as f:
        f.write("one")
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, ckpt)
    assert_refused(excinfo, latest, "not an iteration number")
    os.unlink(latest)
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, ckpt)
    assert_refused(excinfo, latest, "does not exist", "not a SAT checkpoint directory")


def test_model_config_missing(ckpt):
    path = os.path.join(ckpt, "model_config.json")
    os.unlink(path)
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, ckpt)
    assert_refused(excinfo, path, "does not exist", "SAT's save_checkpoint writes")


def test_quant_flags_that_contradict_the_checkpoint(q4, ckpt):
    with pytest.raises(QuantConfigError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, ckpt, args=sat_args("gpt2", quant=8))
    assert_refused(excinfo, ckpt, "already quantized to 4-bit (int4 group 128)", "--quant 8",
                   "Drop the --quant flags")
    # flags that agree are fine
    _, _, inputs, ref = q4
    assert torch.equal(load_logits(ckpt, inputs, args=sat_args("gpt2", quant=4)), ref)


def test_a_refused_load_leaves_the_model_untouched(q4, ckpt):
    """load_into checks every tensor before copying any: a model it refuses is exactly as it was."""
    model, args, inputs, ref = q4
    gone = "transformer.layers.1.mlp.dense_4h_to_h.qweight"

    def edit(t):
        t = {k: (v + 1 if v.is_floating_point() else v) for k, v in t.items()}  # every other tensor differs
        del t[gone]
        return t
    rewrite_tensors(ckpt, edit)
    with pytest.raises(CheckpointError, match=f"{gone}: missing"):
        load_into(model, TensorSource(tensor_file(ckpt)))
    assert torch.equal(run_logits(model, inputs), ref)


# -- child processes --------------------------------------------------------------------------------

def _build(arch, seed=0, **overrides):
    torch.manual_seed(seed)
    args = gpt2_args(arch, quant=4, **overrides)
    return sat_quant.get_model(args, GPT2Model).eval(), args


def _child_save_huge(directory, iteration, overwrite):
    model, args = _build(HUGE, skip_init=True)
    sat_quant.save_checkpoint(model, directory, args=args, iteration=int(iteration), overwrite=overwrite == "1")
    print(json.dumps("saved"))


def _child_crash_steps(pristine, out, iteration, overwrite):
    """For k = 1, 2, ...: copy ``pristine`` to out/k, fork, and in the fork save the BIGGER model there,
    SIGKILLing itself just before its k-th filesystem change; stop when a save completes."""
    import sat_quant.checkpoint as ckpt_mod
    model, args = _build(BIGGER, seed=1)
    os.makedirs(out)
    steps = [(os, "replace"), (os, "rename"), (os, "link"), (shutil, "rmtree"), (ckpt_mod, "_exchange")]
    outcomes = []
    for k in range(1, 40):
        target = os.path.join(out, str(k))
        shutil.copytree(pristine, target)
        pid = os.fork()
        if pid == 0:  # the fork: count filesystem changes, die before the k-th
            count = [0]

            def hook(fn):
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
                sat_quant.save_checkpoint(model, target, args=args, iteration=int(iteration),
                                          overwrite=overwrite == "1")
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        outcomes.append("killed" if killed else "completed" if os.WEXITSTATUS(status) == 0 else "failed")
        if not killed:
            break
    print(json.dumps(outcomes))


def _child_fsize_limit(directory):
    model, args = _build(None)
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
