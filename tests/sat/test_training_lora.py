"""QLoRA in SAT's own training loop: ``training_main`` + deepspeed on CPU, a 4-bit GPT-2 base, QuantLoraMixin.

One real run (tests/workers/lora_train_worker.py, a separate process with the environment SAT and deepspeed read):
the loss goes down on a fixed batch, only the adapters train, the quantized base is bitwise unchanged,
SAT's deepspeed checkpoint holds ``...base.qweight`` and ``...lora_A/B`` with the LoRA settings in
model_config.json, ``sat_quant.from_pretrained`` rebuilds the adapters and gives the trained model's outputs,
and ``sat-quant merge-lora`` turns it into a normal quantized checkpoint.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import sat_quant
from sat_quant.engine.lora import LoraQuantLinear
from sat_quant.sat.lora_mixin import QuantLoraMixin
from tests.conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _run_worker(tmp_path_factory.mktemp("qlora"))


def _run_worker(out, *extra):
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "workers", "lora_train_worker.py"), str(out),
                             *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:  # the first run on a machine also compiles deepspeed's small CPU comm op (~45 s, cached after)
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        log, _ = proc.communicate()
        raise AssertionError(f"training_main timed out:\n{log[-3000:]}") from None
    assert proc.returncode == 0, log[-4000:]
    return torch.load(out / "result.pt"), out


def _logits(model, ids):
    seq = ids.shape[1]
    with torch.no_grad():
        return model(input_ids=ids, position_ids=torch.arange(seq).unsqueeze(0).expand_as(ids),
                     attention_mask=torch.ones(1, 1, seq, seq).tril())[0].float()


def test_training_main_with_deepspeed_trains_only_the_adapters(trained):
    result, _ = trained
    losses = result["losses"]
    assert len(losses) == 8 and losses[-1] < 0.8 * losses[0], losses
    assert result["base_same"], "the quantized base changed during training"
    assert result["trainable"] and all(n.endswith((".lora_A", ".lora_B")) for n in result["trainable"])
    assert len(result["trainable"]) == 2 * 8  # 2 layers x 4 targets, A and B each


def test_sat_checkpoint_names_and_settings(trained):
    result, _ = trained
    save = result["save"]
    config = json.load(open(os.path.join(save, "model_config.json")))
    assert config["quant_lora"]["rank"] == 8 and config["quant_lora"]["alpha"] == 16.0
    assert config["lora_rank"] == 8 and config["layer_range"] == [0, 1]
    # the quantization block names the layers as the model is built (before wrapping)
    assert "transformer.layers.0.attention.query_key_value" in config["quantization"]["layers"]
    state = torch.load(os.path.join(save, "8", "mp_rank_00_model_states.pt"), weights_only=True)["module"]
    prefix = "transformer.layers.0.attention.query_key_value."
    assert {prefix + n for n in ("base.qweight", "base.scale", "base.zero", "lora_A", "lora_B")} <= set(state)
    assert state[prefix + "lora_B"].abs().sum() > 0


def test_from_pretrained_rebuilds_the_adapters_and_the_outputs(trained):
    result, _ = trained
    model, args = sat_quant.from_pretrained(None, result["save"], overwrite_args={"bf16": True})
    assert isinstance(model.mixins["lora"], QuantLoraMixin)
    assert sum(isinstance(m, LoraQuantLinear) for m in model.modules()) == 8
    assert torch.equal(_logits(model.eval(), result["input_ids"]), result["logits"].float())


def test_merge_lora_cli_gives_a_normal_quantized_checkpoint(trained, tmp_path):
    result, _ = trained
    adapted, _ = sat_quant.from_pretrained(None, result["save"])
    expected = _logits(adapted.eval(), result["input_ids"])
    run = lambda *a: subprocess.run([sys.executable, "-m", "sat_quant.tools.cli", "merge-lora", *a], cwd=ROOT,
                                    capture_output=True, text=True, timeout=120)
    r = run(result["save"], str(tmp_path / "merged"))
    assert r.returncode == 0, r.stderr[-3000:]
    config = json.load(open(tmp_path / "merged" / "model_config.json"))
    assert not config.get("quant_lora") and config["quantization"]["layers"]
    merged, _ = sat_quant.from_pretrained(None, str(tmp_path / "merged"))
    assert not any(isinstance(m, LoraQuantLinear) for m in merged.modules())
    gap = lambda m: ((_logits(m.eval(), result["input_ids"]) - expected).norm() / expected.norm()).item()
    base_only, _ = sat_quant.from_pretrained(None, result["save"])
    for m in base_only.modules():
        if isinstance(m, LoraQuantLinear):
            torch.nn.init.zeros_(m.lora_B)
    assert gap(merged) < 0.5 * gap(base_only), (gap(merged), gap(base_only))  # the merge carries the adaptation
    sat_quant.merge_lora_checkpoint(result["save"], str(tmp_path / "fp"), full_precision=True)  # the Python API
    fp_config = json.load(open(tmp_path / "fp" / "model_config.json"))
    assert "quantization" not in fp_config and "quant_lora" not in fp_config
    fp, _ = sat_quant.from_pretrained(None, str(tmp_path / "fp"))  # a plain SAT checkpoint
    assert not any(isinstance(m, sat_quant.QuantLinear) for m in fp.modules())
    assert gap(fp) < 0.02, gap(fp)  # exact weights; only the adapted model's bf16 kernels differ
    # re-quantized merge = quantizing the full-precision merge: the only error is the format's own rounding
    sat_quant.convert(str(tmp_path / "fp"), str(tmp_path / "fp-q"), sat_quant.QuantConfig(bits=4), progress=False)
    from safetensors.torch import load_file
    ours = load_file(tmp_path / "merged" / "8" / "mp_rank_00_model_states.safetensors")
    theirs = load_file(tmp_path / "fp-q" / "8" / "mp_rank_00_model_states.safetensors")
    packed = [k for k in ours if k.endswith((".qweight", ".scale", ".zero"))]
    assert len(packed) == 3 * 8 and all(torch.equal(ours[k], theirs[k]) for k in packed)
    with pytest.raises(sat_quant.CheckpointError, match="no LoRA adapters"):
        sat_quant.merge_lora_checkpoint(str(tmp_path / "merged"), str(tmp_path / "again"))
    assert not (tmp_path / "again").exists()


def test_deepspeed_checkpoint_with_numpy_rng_state_still_loads_safely(trained, tmp_path):
    """On a GPU SAT also saves numpy's RNG state in the .pt; weights_only loading accepts exactly that."""
    import random
    import shutil

    import numpy as np
    result, _ = trained
    copy_dir = tmp_path / "ckpt"
    shutil.copytree(result["save"], copy_dir)
    pt = copy_dir / "8" / "mp_rank_00_model_states.pt"
    sd = torch.load(pt, weights_only=True)
    sd.update(np_rng_state=np.random.get_state(), random_rng_state=random.getstate())
    torch.save(sd, pt)
    model, _ = sat_quant.from_pretrained(None, str(copy_dir), overwrite_args={"bf16": True})
    assert torch.equal(_logits(model.eval(), result["input_ids"]), result["logits"].float())


def test_sat_load_checkpoint_rebuilds_the_adapters(trained):
    """SAT's own load_checkpoint (wrapped by sat_quant) of a QLoRA checkpoint into a quantized model built without
    the mixin adds the checkpoint's adapters and gives the trained model's outputs."""
    from sat.model.official.gpt2_model import GPT2Model
    from sat.training.model_io import load_checkpoint

    from tests.conftest import sat_args
    result, _ = trained
    args = sat_args("gpt2", quant=4, skip_init=True, bf16=True)
    model = sat_quant.get_model(args, GPT2Model)
    assert load_checkpoint(model, args, load_path=result["save"]) == 8
    assert isinstance(model.mixins["lora"], QuantLoraMixin)
    assert torch.equal(_logits(model.eval(), result["input_ids"]), result["logits"].float())


def test_training_main_load_starts_from_a_sat_quant_checkpoint(tmp_path):
    """--load in training_main on a checkpoint written by `sat-quant convert`: SAT's own load_checkpoint (wrapped)
    fills the 4-bit base, the fresh adapters keep their init (fine-tuning), and training goes on from there."""
    from tests.conftest import build_fp, save_fp_with_sat
    model, args = build_fp("gpt2", seed=7)
    fp = save_fp_with_sat(model, args, tmp_path / "fp")
    sat_quant.convert(fp, str(tmp_path / "q4"), sat_quant.QuantConfig(bits=4), progress=False)
    result, _ = _run_worker(tmp_path / "run", "--load", str(tmp_path / "q4"))
    loaded, _ = sat_quant.from_pretrained(None, str(tmp_path / "q4"))
    saved = {n: m.neutral_tensors() for n, m in loaded.named_modules() if isinstance(m, sat_quant.QuantLinear)}
    assert len(saved) == 8 and set(result["base"]) == {n + ".base" for n in saved}
    assert all(torch.equal(result["base"][n + ".base"][k], v) for n, t in saved.items() for k, v in t.items())
    losses = result["losses"]
    assert losses[-1] < 0.8 * losses[0], losses


def test_cpu_training_setups_sat_cannot_finish_are_refused_up_front(tmp_path):
    import argparse

    from sat_quant.sat.training import finish_cpu_training_args
    base = dict(zero_stage=0, fp16=False, bf16=False, save=str(tmp_path), deepspeed_config=None, batch_size=2,
                gradient_accumulation_steps=1, lr=1e-3, weight_decay=0.0, checkpoint_activations=False)
    with pytest.raises(sat_quant.QuantConfigError, match="cannot save an fp32 ZeRO-0 deepspeed run.*--bf16"):
        finish_cpu_training_args(argparse.Namespace(**base), "finetune")
    with pytest.raises(sat_quant.QuantConfigError, match="--zero-stage 2 needs a GPU"):
        finish_cpu_training_args(argparse.Namespace(**dict(base, zero_stage=2)), "finetune")
    with pytest.raises(sat_quant.QuantConfigError, match="fp16 training needs a GPU"):
        finish_cpu_training_args(argparse.Namespace(**dict(base, fp16=True)), "finetune")
