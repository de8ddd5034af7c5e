"""The patched CogVLM fine-tuning scripts on CPU: QLoRA through SAT's training_main + deepspeed on a sat_quant
4-bit base, then merge (sat-quant merge-lora and the patched merge_model.py), evaluate, and chat."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cogvlm_fixture import COGVLM_DIR, cogvlm_available
from tests.cogvlm_scripts import answers, patched_checkout, run_script, script_env
from tests.conftest import free_port

pytestmark = pytest.mark.skipif(not cogvlm_available(), reason="needs the CogVLM snapshot (../shared/cogvlm)")

TRAIN_ITERS = 4


def _train_env(port_offset: int) -> dict:
    return script_env({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())})


def _run(cwd: Path, argv, port_offset: int, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable] + argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=_train_env(port_offset))


def _lora_sh(checkout: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    """CogVLM's own finetune_demo/finetune_cogvlm_lora.sh (patched), run from its folder as its README says; the
    settings a user would edit come from the environment (patch 0004)."""
    bin_dir = os.path.dirname(sys.executable)  # deepspeed's launcher and sat-quant, from this environment
    env = _train_env(0) | {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"} | env
    return subprocess.run(["bash", "finetune_cogvlm_lora.sh"], cwd=checkout / "finetune_demo", capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def qlora(tmp_path_factory):
    """Four QLoRA iterations through the patched finetune_cogvlm_lora.sh (deepspeed's launcher, gloo, ZeRO 0, bf16,
    torch Adam) on the tiny CogVLM saved in full precision: --use_qlora builds the 4-bit base while it is read.
    No --log-interval is given: the script picks one that shows every step of a 4-step run."""
    from sat_quant.testing import cogvlm_assets as assets
    root = tmp_path_factory.mktemp("qlora")
    env = argparse.Namespace(root=root, checkout=patched_checkout(COGVLM_DIR, root / "CogVLM"))
    env.fp = str(root / "fp")
    assets.save_tiny_checkpoint(env.fp)
    env.tokenizer = assets.make_tokenizer(str(root / "tokenizer"))
    env.image = assets.make_image(str(root / "image.png"))
    for i, label in enumerate(("red", "blue", "green", "cat")):  # CogVLM's dataset: the file name is the label
        assets.make_image(str(root / "train" / f"{label}.jpg"), seed=i)
    assets.make_image(str(root / "test" / "red.jpg"), seed=0)
    env.ds_config = root / "ds.json"
    env.ds_config.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 0},
        "bf16": {"enabled": True}, "optimizer": {"type": "Adam", "params": {"lr": 0.01, "torch_adam": True}}}))
    common = ["--local_tokenizer", env.tokenizer, "--max_length", "300", "--version", "chat", "--bf16",
              "--mode", "finetune", "--split", "1.", "--deepspeed_config", str(env.ds_config), "--zero-stage", "0",
              "--batch-size", "1", "--eval-batch-size", "1", "--num-workers", "0", "--skip-init", "--seed", "2023"]
    env.common = common
    result = _lora_sh(env.checkout, {
        "MODEL_TYPE": env.fp, "VERSION": "chat", "MAX_LENGTH": "300", "LORA_RANK": "4", "LORA": "--use_qlora",
        "TOKENIZER": env.tokenizer, "TRAIN_DATA": str(root / "train"), "VALID_DATA": str(root / "train"),
        "DS_CONFIG": str(env.ds_config), "CHECKPOINT_ACTIVATIONS": "",
        "MASTER_PORT": str(free_port()),
        "EXTRA_ARGS": f"--quant-group-size 64 --train-iters {TRAIN_ITERS} --eval-interval 1000 --eval-iters 1 "
                      f"--save-interval {TRAIN_ITERS} --lr-decay-style constant --bf16 --batch-size 1 "
                      f"--num-workers 0 --zero-stage 0"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    env.train_log = result.stdout + result.stderr
    # the script's own --save ./checkpoints, relative to finetune_demo/ where it ran
    env.ckpt = str(next((env.checkout / "finetune_demo" / "checkpoints").glob("finetune-fp-*")))
    return env


def test_qlora_trains_the_adapters_and_saves_them_with_the_4bit_base(qlora):
    assert "--distributed-backend gloo" in qlora.train_log  # no GPU: not upstream's nccl
    losses = [float(x) for x in re.findall(r"total loss ([0-9.E+-]+)", qlora.train_log)]
    assert len(losses) == TRAIN_ITERS and losses[-1] < losses[0]  # every step of a short run shows its loss
    config = json.loads(Path(qlora.ckpt, "model_config.json").read_text())
    assert config["quant_lora"]["rank"] == 4 and config["quantization"]["config"]["format"] == "int4"


@pytest.fixture(scope="module")
def merged(qlora):
    """The merge command the training printed, run as printed from the folder where training ran."""
    command = qlora.train_log.split("fold them into the 4-bit base with:", 1)[1].strip().splitlines()[0]
    assert command.startswith("PYTHONPATH=") and " sat-quant merge-lora " in command
    bin_dir = os.path.dirname(sys.executable)
    result = subprocess.run(["bash", "-c", command], cwd=qlora.checkout / "finetune_demo", capture_output=True,
                            text=True, timeout=300,
                            env=script_env({"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}))
    assert result.returncode == 0, result.stderr[-3000:]
    dst = qlora.ckpt + "-merged"
    assert Path(dst, "model_config.json").is_file()
    return dst


def test_a_failed_training_is_the_scripts_exit_status(qlora):
    """Upstream's final `set +x` made the script exit 0 after training had died; now its status is the run's."""
    result = _lora_sh(qlora.checkout, {"MODEL_TYPE": str(qlora.root / "no-such-model"), "LORA": "--use_qlora",
                                       "MASTER_PORT": str(free_port())}, timeout=300)
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    assert "finetune_cogvlm_demo.py: error: --from_pretrained" in result.stderr and "never downloads" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("finetune_cogvlm_lora.sh: training failed (exit status 2)")
    assert "Traceback" not in result.stderr


def test_a_note_comes_before_deepspeed_compiles_its_cpu_op(tmp_path, monkeypatch, capsys):
    from sat_quant.tools.patched_scripts import deepspeed_cpu_op_path, note_deepspeed_cpu_build
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "0")
    assert note_deepspeed_cpu_build() and "about 3 minutes" in capsys.readouterr().out
    built = Path(deepspeed_cpu_op_path())
    assert built == tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"  # where torch's loader puts it
    built.parent.mkdir()
    built.write_bytes(b"")
    assert not note_deepspeed_cpu_build() and capsys.readouterr().out == ""


def test_merged_checkpoint_is_a_plain_quantized_checkpoint_that_answers(qlora, merged):
    config = json.loads(Path(merged, "model_config.json").read_text())
    assert not config.get("quant_lora") and not config.get("use_qlora")
    result = run_script(qlora.checkout, "basic_demo/cli_demo_sat.py",
                        ["--from_pretrained", merged, "--local_tokenizer", qlora.tokenizer, "--max_length", "300"],
                        f"{qlora.image}\nwhat is in this image\nstop\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(answers(result.stdout)) == 1 and answers(result.stdout)[0].strip()


def test_patched_merge_model_writes_the_same_tensors_as_merge_lora(qlora, merged):
    from safetensors.torch import load_file
    result = _run(qlora.checkout / "utils", ["merge_model.py", "--from_pretrained", qlora.ckpt], 1)
    assert result.returncode == 0, result.stderr[-3000:]
    out = qlora.checkout / "utils" / "checkpoints" / "merged_model_quantized"
    mine = load_file(str(next(out.glob("*/mp_rank_00_model_states.safetensors"))))
    cli = load_file(str(next(Path(merged).glob("*/mp_rank_00_model_states.safetensors"))))
    assert mine.keys() == cli.keys() and all((mine[k] == cli[k]).all() for k in cli)


def test_patched_evaluate_runs_on_the_qlora_checkpoint(qlora):
    """evaluate_cogvlm_demo.py on the unmerged QLoRA checkpoint: the adapters come back from model_config.json,
    generation runs with last-position logits, and the script reports its metrics."""
    result = _run(qlora.checkout / "finetune_demo", [
        "evaluate_cogvlm_demo.py", "--from_pretrained", qlora.ckpt, "--train-iters", "0",
        "--test-data", str(qlora.root / "test"), "--strict-eval", "--experiment-name", "eval"] + qlora.common, 2)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    log = result.stdout + result.stderr
    assert re.search(r"pred .* label red", log) and "acc_w/o_case" in log
