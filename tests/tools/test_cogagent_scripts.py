"""CogAgent through CogVLM's own patched scripts on CPU (issue 12): the cli demo's cross-image path on a sat_quant
4-bit checkpoint, and QLoRA through the patched finetune_cogagent_demo.py (patch 0008: deepspeed, gloo, ZeRO 0),
then `sat-quant merge-lora`, then chat with the merged checkpoint.

The model is upstream's CogAgent at a tiny size; ``tests/cogagent_scripts.py`` runs each script in a process where
the tiny class is registered and the cross tower has one block (what a real checkpoint does not need)."""
from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cogvlm_fixture import COGVLM_DIR, cogvlm_available
from tests.cogvlm_scripts import REPO, answers, git_apply, patched_checkout, script_env
from tests.conftest import free_port

pytestmark = pytest.mark.skipif(not cogvlm_available(), reason="needs the CogVLM snapshot (../shared/cogvlm)")

QUESTION = "what is in this image"
TRAIN_ITERS = 4
CROSS_PIX = 28  # the tiny CogAgent's cross_image_pix (CogAgent's own: 1120)
#: the tiny CogAgent's linear layers (LM, visual expert, EVA2-CLIP-E, GLU, cross tower, cross-attention); the LM head
#: stays full precision
LINEARS = 49
#: QLoRA adapts self- and cross-attention (upstream trains cross_attention in full; under QLoRA it is 4-bit)
TARGETS = ["attention.query_key_value", "attention.dense", "cross_attention.query", "cross_attention.key_value",
           "cross_attention.dense"]


def _run(env, script: str, argv, stdin: str = "", *, cwd=None, extra=None, timeout: int = 300):
    """``python -m tests.cogagent_scripts SCRIPT ARGV`` (the tiny CogAgent's process setup, then the script as
    ``python SCRIPT`` runs it) from the checkout, or ``cwd``."""
    return subprocess.run([sys.executable, "-m", "tests.cogagent_scripts", script, *argv], input=stdin,
                          cwd=cwd or env.checkout, capture_output=True, text=True, timeout=timeout,
                          env=script_env(extra))


@pytest.fixture(scope="module")
def cogagent_env(tmp_path_factory):
    """A checkout with every patch (0008 included), the tiny CogAgent as a full-precision SAT checkpoint and as a
    sat_quant int4 checkpoint converted from it, a tokenizer and an image."""
    import sat_quant
    from sat_quant.testing import cogvlm_assets as assets
    from tests.cogagent_fixture import build_tiny_cogagent
    from tests.conftest import save_fp_with_sat
    root = tmp_path_factory.mktemp("cogagent")
    env = argparse.Namespace(root=root, checkout=patched_checkout(COGVLM_DIR, root / "CogVLM"))
    model, args = build_tiny_cogagent(seed=1)
    env.fp = str(save_fp_with_sat(model, args, root / "fp"))
    env.q4 = str(root / "q4")
    sat_quant.convert(env.fp, env.q4, sat_quant.QuantConfig(bits=4, group_size=64), progress=False)
    env.tokenizer = assets.make_tokenizer(str(root / "tokenizer"))
    env.image = assets.make_image(str(root / "image.png"))
    return env


def _cross_pixels(env) -> torch.Tensor:
    """The cross image as CogAgent's chat prepares it: upstream's own processor at cross_image_pix."""
    from PIL import Image
    vision = runpy.run_path(str(env.checkout / "utils" / "utils" / "vision.py"))
    return vision["get_image_processor"](CROSS_PIX)(Image.open(env.image).convert("RGB"))["image"]


def _chat(env, checkpoint: str, sessions: int, probe: Path, flip: int = 0):
    stdin = f"{env.image}\n{QUESTION}\nclear\n" * (sessions - 1) + f"{env.image}\n{QUESTION}\nstop\n"
    return _run(env, "basic_demo/cli_demo_sat.py",
                ["--from_pretrained", checkpoint, "--local_tokenizer", env.tokenizer, "--max_length", "64"], stdin,
                extra={"TINY_COGAGENT_PROBE": str(probe), "TINY_COGAGENT_FLIP_CROSS": str(flip)})


def test_cli_demo_answers_through_the_cross_image_path(cogagent_env, tmp_path):
    """Three chats on the same image and question in one run of cli_demo_sat.py (fp32, CPU); in the second the cross
    image is mirrored on its way into the model. The cross image each prompt forward receives is upstream's
    processing of the user's file in the model's dtype (patch 0003; upstream cast it to fp16), and it changes the
    next-token logits, which are otherwise identical run to run."""
    probe = tmp_path / "probe.pt"
    result = _chat(cogagent_env, cogagent_env.q4, 3, probe, flip=2)
    assert result.returncode == 0, result.stderr[-3000:]
    replies = answers(result.stdout)
    assert len(replies) == 3 and all(r.strip() for r in replies), result.stdout[-2000:]
    log = result.stdout + result.stderr
    assert "int4 (4-bit) model built" in log and re.search(rf"^int4\s+{LINEARS}\s", log, flags=re.MULTILINE), log[-3000:]
    prompts = torch.load(probe)
    assert len(prompts) == 3
    expected = _cross_pixels(cogagent_env)
    assert expected.shape == (1, 3, CROSS_PIX, CROSS_PIX)
    for i, p in enumerate(prompts):
        assert p["cross_image"].dtype == torch.float32
        assert torch.equal(p["cross_image"], torch.flip(expected, dims=[-1]) if i == 1 else expected)
    assert torch.equal(prompts[0]["logits"], prompts[2]["logits"]) and replies[0] == replies[2]
    assert (prompts[0]["logits"] - prompts[1]["logits"]).abs().max() > 1e-3


def test_finetune_cogagent_refuses_bad_input_in_one_line(cogagent_env):
    """The patched script (run as a user runs it) refuses before SAT or deepspeed load: one line, exit 2."""
    result = subprocess.run([sys.executable, "finetune_cogagent_demo.py", "--from_pretrained",
                             str(cogagent_env.root / "no-such-model"), "--use_qlora"],
                            cwd=cogagent_env.checkout / "finetune_demo", capture_output=True, text=True, timeout=120,
                            env=script_env())
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("finetune_cogagent_demo.py: error: --from_pretrained")
    assert "never downloads" in lines[0]


@pytest.fixture(scope="module")
def qlora(cogagent_env):
    """Four QLoRA steps through the patched finetune_cogagent_demo.py on the full-precision tiny CogAgent (the 4-bit
    base is built while it is read), one process as deepspeed's launcher starts it, no GPU and no
    --distributed-backend given; adapters on self- and cross-attention."""
    from sat_quant.testing.cogvlm_assets import make_image
    env = cogagent_env
    root = env.root
    for i, label in enumerate(("red", "blue", "green", "cat")):  # CogVLM's dataset: the file name is the label
        make_image(str(root / "train" / f"{label}.jpg"), seed=i)
    ds_config = root / "ds.json"
    ds_config.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 0},
        "bf16": {"enabled": True}, "optimizer": {"type": "Adam", "params": {"lr": 0.01, "torch_adam": True}}}))
    argv = ["--from_pretrained", env.fp, "--use_qlora", "--lora_rank", "4", "--lora_targets", *TARGETS,
            "--quant-group-size", "64", "--local_tokenizer", env.tokenizer, "--max_length", "64", "--version", "chat",
            "--bf16", "--mode", "finetune", "--split", "1.", "--deepspeed_config", str(ds_config), "--zero-stage", "0",
            "--batch-size", "1", "--eval-batch-size", "1", "--num-workers", "0", "--skip-init", "--seed", "2023",
            "--train-iters", str(TRAIN_ITERS), "--eval-interval", "1000", "--eval-iters", "1",
            "--save-interval", str(TRAIN_ITERS), "--lr-decay-style", "constant", "--train-data", str(root / "train"),
            "--valid-data", str(root / "train"), "--experiment-name", "finetune-cogagent", "--save", "./checkpoints"]
    result = _run(env, "finetune_cogagent_demo.py", argv, cwd=env.checkout / "finetune_demo", extra={
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port())})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    env.train_log = result.stdout + result.stderr
    env.ckpt = str(next((env.checkout / "finetune_demo" / "checkpoints").glob("finetune-cogagent-*")))
    return env


def test_qlora_trains_only_adapters_on_the_4bit_cogagent(qlora):
    log = qlora.train_log
    assert re.search(r"distributed_backend \.+ gloo", log)  # no GPU: gloo, not SAT's default nccl
    # SAT logs each line twice (its own format and logging's): one loss per iteration number
    by_step = {int(i): float(x) for i, x in re.findall(r"iteration\s+(\d+)/\s*\d+ \|.*?total loss ([0-9.E+-]+)", log)}
    losses = [by_step[i] for i in sorted(by_step)]
    assert len(losses) == TRAIN_ITERS and all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    config = json.loads(Path(qlora.ckpt, "model_config.json").read_text())
    assert config["model_class"].split()[0] == "FineTuneTrainCogAgentModel"
    assert config["quant_lora"]["targets"] == TARGETS and config["quantization"]["config"]["format"] == "int4"
    # SAT's training loop saves its own .pt (the state dict under "module")
    saved = torch.load(next(Path(qlora.ckpt).glob("*/mp_rank_00_model_states.pt")), map_location="cpu",
                       weights_only=False)["module"]
    adapters = {k: v for k, v in saved.items() if k.endswith((".lora_A", ".lora_B"))}
    assert any(".cross_attention." in k for k in adapters) and any(".attention.dense." in k for k in adapters)
    # the adapters are all that trained: upstream's full-precision list (encoder, cross_attention, linear_proj,
    # mlp.vision, vit, ...) is 4-bit and frozen under QLoRA
    trainable = int(re.search(r"Total trainable parameters: (\d+)", log).group(1))
    assert trainable == sum(v.numel() for v in adapters.values())
    assert all(v.abs().max() > 0 for k, v in adapters.items() if k.endswith(".lora_B"))  # zero at start: trained


@pytest.fixture(scope="module")
def merged(qlora):
    """The merge command the training printed, run from the folder where training ran; only its ``--import`` names
    the tiny CogAgent's setup instead of ``utils.models`` (which a real checkpoint needs)."""
    command = qlora.train_log.split("fold them into the 4-bit base with:", 1)[1].strip().splitlines()[0]
    assert command.startswith(f"PYTHONPATH={qlora.checkout} sat-quant merge-lora {qlora.ckpt} ")
    assert command.endswith(" --import utils.models")
    command = command.replace(f"PYTHONPATH={qlora.checkout} ", f"PYTHONPATH={qlora.checkout}:{REPO} ")
    command = command.replace("--import utils.models", "--import tests.cogagent_scripts")
    bin_dir = os.path.dirname(sys.executable)
    result = subprocess.run(["bash", "-c", command], cwd=qlora.checkout / "finetune_demo", capture_output=True,
                            text=True, timeout=300,
                            env=script_env({"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}))
    assert result.returncode == 0, result.stderr[-3000:]
    return qlora.ckpt + "-merged"


def test_merged_cogagent_answers_in_the_cli_demo(qlora, merged, tmp_path):
    config = json.loads(Path(merged, "model_config.json").read_text())
    assert not config.get("quant_lora") and config["quantization"]["config"]["format"] == "int4"
    probe = tmp_path / "probe.pt"
    result = _chat(qlora, merged, 1, probe)
    assert result.returncode == 0, result.stderr[-3000:]
    replies = answers(result.stdout)
    assert len(replies) == 1 and replies[0].strip(), result.stdout[-2000:]
    assert "int4 (4-bit) model built" in result.stdout + result.stderr
    (prompt,) = torch.load(probe)
    assert torch.equal(prompt["cross_image"], _cross_pixels(qlora))


#: a user's own evaluation script for CogAgent, as upstream's evaluate_cogvlm_demo.py loads a checkpoint (no upstream
#: script uses FineTuneTestCogAgentModel); it saves the loaded model's state dict and its LoRA-carrying layers
_EVAL_LOAD = """
import argparse, torch
import sat_quant
from utils.models import FineTuneTestCogAgentModel
py_parser = argparse.ArgumentParser(add_help=False)
py_parser = FineTuneTestCogAgentModel.add_model_specific_args(py_parser)
known, args_list = py_parser.parse_known_args()
args = sat_quant.get_args(args_list)
args = argparse.Namespace(**vars(args), **vars(known))
model, args = FineTuneTestCogAgentModel.from_pretrained(args.load, args)
with_lora = sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A"))
torch.save({"state": model.state_dict(), "with_lora": with_lora, "cls": type(model).__name__}, args.save)
"""


def _load_for_eval(qlora, checkout: Path, out: Path) -> subprocess.CompletedProcess:
    script = checkout / "finetune_demo" / "load_for_eval.py"
    script.write_text(_EVAL_LOAD)
    return _run(qlora, str(script), ["--use_qlora", "--lora_rank", "4", "--load", qlora.ckpt, "--save", str(out),
                                     "--mode", "inference", "--skip-init"], cwd=checkout, extra={
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})


def test_finetune_test_class_loads_the_qlora_checkpoint_with_its_adapters(qlora, tmp_path):
    """Patch 0009: ``FineTuneTestCogAgentModel --use_qlora`` (what an evaluation script builds) no longer adds SAT
    0.4.12's broken ``LoraMixin(qlora=True)``: the QLoRA checkpoint loads with the adapters it trained, on the
    quantized layers: the tensors training saved."""
    result = _load_for_eval(qlora, qlora.checkout, tmp_path / "patched.pt")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    loaded = torch.load(tmp_path / "patched.pt", weights_only=False)
    assert loaded["cls"] == "FineTuneTestCogAgentModel"
    reference = torch.load(next(Path(qlora.ckpt).glob("*/mp_rank_00_model_states.pt")), map_location="cpu",
                           weights_only=False)["module"]  # what SAT's training loop saved
    assert loaded["state"].keys() == reference.keys()
    assert all(torch.equal(loaded["state"][k], reference[k]) for k in reference)
    assert any(".cross_attention." in n for n in loaded["with_lora"]) and len(loaded["with_lora"]) >= len(TARGETS)
    upstream = tmp_path / "upstream"  # every patch but 0009: upstream's class
    shutil.copytree(qlora.checkout / "utils", upstream / "utils")
    (upstream / "finetune_demo").mkdir()
    reverse = git_apply(upstream, [REPO / "patches" / "0009-cogagent_model-qlora-eval.patch"], reverse=True)
    assert reverse.returncode == 0, reverse.stderr
    result = _load_for_eval(qlora, upstream, tmp_path / "upstream.pt")
    assert result.returncode != 0 and "sat/model/finetune/lora2.py" in result.stderr  # SAT's mixin: the crash 0009 removes
