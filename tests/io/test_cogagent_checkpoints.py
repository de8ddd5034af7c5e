"""CogAgent checkpoints (issue 12): save/load, `sat-quant convert` of a full-precision tiny
CogAgent, dequantize back to [out, in], and model parallel 1 <-> 2 (torchrun, gloo on CPU; offline reshard).
The cross tower's ``mlp.w3`` (2730 input columns) is stored zero-padded to whole groups in every 4-bit case."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import sat_quant
from sat_quant import QuantLinear
from tests.cogagent_fixture import TinyCogAgentModel, build_tiny_cogagent, tiny_cogagent_args, tiny_cogagent_inputs
from tests.conftest import run_logits, save_fp_with_sat
from tests.io.test_parallel import torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
W3 = "mixins.encoder.vit.model.blocks.0.mlp.w3"
ENV = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sat_quant.tools.cli", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=ENV)


def tensors(folder, rank: int = 0):
    return load_file(os.path.join(folder, "1", f"mp_rank_{rank:02d}_model_states.safetensors"))


@pytest.fixture(scope="module")
def cogagent_fp(tmp_path_factory):
    """The fp32 tiny CogAgent, its SAT checkpoint, inputs, and its int4 group-64 quantization in memory."""
    model, args = build_tiny_cogagent()
    src = save_fp_with_sat(model, args, tmp_path_factory.mktemp("cogagent") / "fp")
    inputs = tiny_cogagent_inputs()
    # group 64: every row-parallel layer's columns split evenly at mp=2 (cross dense: 128 -> 64 per rank)
    q = sat_quant.get_model(tiny_cogagent_args(skip_init=True, quant=4, quant_group_size=64), TinyCogAgentModel).eval()
    q.load_state_dict(model.state_dict(), strict=False)
    return src, inputs, q, run_logits(q, inputs)


def test_save_then_load_gives_identical_logits(cogagent_fp, tmp_path):
    _, inputs, q, expected = cogagent_fp
    dst = str(tmp_path / "q")
    sat_quant.save_checkpoint(q, dst, args=tiny_cogagent_args(skip_init=True, quant=4, quant_group_size=64))
    block = json.load(open(os.path.join(dst, "model_config.json")))["quantization"]
    assert block["layers"][W3] == {"format": "int4", "group_size": 64, "shape": [1024, 2730]}
    saved = tensors(dst)
    assert tuple(saved[W3 + ".qweight"].shape) == (1024, 2752 // 2) and tuple(saved[W3 + ".scale"].shape) == (1024, 43)
    loaded, _ = sat_quant.from_pretrained(None, dst)
    assert isinstance(loaded, TinyCogAgentModel) and isinstance(loaded.get_submodule(W3), QuantLinear)
    assert torch.equal(run_logits(loaded.eval(), inputs), expected)


def test_cli_convert_full_precision_cogagent_then_dequantize(cogagent_fp, tmp_path):
    src, inputs, q, expected = cogagent_fp
    dst = str(tmp_path / "q")
    r = cli("convert", src, dst, "--quant", "4", "--quant-group-size", "64", "--import", "tests.cogagent_fixture",
            "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    loaded, args = sat_quant.from_pretrained(None, dst)
    assert len(args.quantization["layers"]) == len(q.quant_report.layers)  # every linear but the LM head
    assert torch.equal(run_logits(loaded.eval(), inputs), expected)  # = quantizing in memory
    assert W3 in sat_quant.inspect_checkpoint(dst)
    back = str(tmp_path / "fp-again")
    sat_quant.dequantize(dst, back)
    fp, _ = sat_quant.from_pretrained(None, back)
    w3 = fp.get_submodule(W3).weight
    assert type(fp.get_submodule(W3)) is torch.nn.Linear and tuple(w3.shape) == (1024, 2730)
    assert torch.equal(w3, q.get_submodule(W3).weight.to(w3.dtype))


def test_model_parallel_1_to_2_and_back(cogagent_fp, tmp_path):
    """torchrun mp=2 loads the mp=1 checkpoint (split on load) and saves mp=2 shards equal to `sat-quant reshard`'s;
    reshard 2 -> 1 gives back the mp=1 tensors bit for bit."""
    _, inputs, q, expected = cogagent_fp
    q1 = str(tmp_path / "q1")
    sat_quant.save_checkpoint(q, q1, args=tiny_cogagent_args(skip_init=True, quant=4, quant_group_size=64))
    r = torchrun("mp_cogagent_worker.py", q1, str(tmp_path), timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    logits = torch.load(tmp_path / "cogagent_mp2.pt")
    assert ((logits - expected).norm() / expected.norm()).item() < 0.02  # same codes; split sums reorder only
    sat_quant.reshard(q1, str(tmp_path / "to2"), 2)  # = `sat-quant reshard SRC DST --mp 2`
    for rank in (0, 1):
        ours, theirs = tensors(tmp_path / "to2", rank), tensors(tmp_path / "q-mp2", rank)
        assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert tuple(ours[W3 + ".qweight"].shape) == (1024, 2752 // 2)  # replicated whole on each rank
    sat_quant.reshard(str(tmp_path / "q-mp2"), str(tmp_path / "to1"), 1)
    original, merged = tensors(q1), tensors(tmp_path / "to1")
    assert set(original) == set(merged) and all(torch.equal(original[k], merged[k]) for k in original)
