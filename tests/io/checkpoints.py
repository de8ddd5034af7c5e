"""Shared by the checkpoint-safety tests (tests/io/test_*_saves.py, test_bad_checkpoints.py) and their child
process (tests/workers/save_child.py): model sizes, file helpers, snapshots and child-process runners."""
import hashlib
import json
import os
import subprocess
import sys
import time

import torch
from sat.model.official.gpt2_model import GPT2Model

import sat_quant
from tests.conftest import SAT_MODELS, run_logits

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAVE_CHILD = os.path.join(ROOT, "tests", "workers", "save_child.py")
STATES = "mp_rank_00_model_states"
CHILD_ENV = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=ROOT)
# A model that differs from the tiny GPT-2 in every size, so that pairing its files with the old
# config (or the reverse) cannot load: the crash-at-every-step test would see it.
BIGGER = dict(num_layers=3, hidden_size=384, num_attention_heads=6, vocab_size=1000, max_sequence_length=64)
# Big enough (~500 MB of fp32 embeddings + LM head) that writing, fsyncing and hashing take seconds.
HUGE = dict(num_layers=2, hidden_size=512, num_attention_heads=8, vocab_size=120_000, max_sequence_length=64)


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
    """Run tests/workers/save_child.py with ``argv``; its last stdout line is JSON."""
    out = subprocess.run([sys.executable, SAVE_CHILD, *argv], cwd=ROOT, env=CHILD_ENV,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_q4(arch, seed=0, **overrides):
    torch.manual_seed(seed)
    args = gpt2_args(arch, quant=4, **overrides)
    return sat_quant.get_model(args, GPT2Model).eval(), args


