"""Save once, load fast: round trips through sat_quant's and SAT's own checkpoint code, convert, inspect."""
import json
import os
import subprocess
import sys

import pytest
import torch
from sat.training.model_io import save_checkpoint as sat_save_checkpoint

import sat_quant
from sat_quant import QuantConfig, QuantLinear
from sat_quant.tools.convert import convert
from tests.cogvlm_fixture import (
    COGVLM_DIR,
    _cogvlm_model_class,
    build_tiny_cogvlm,
    tiny_cogvlm_args,
    tiny_cogvlm_inputs,
)
from tests.conftest import SAT_MODELS, run_logits, sat_args, save_fp_with_sat

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BITS = {"int8": 8, "int4": 4, "int4cs": 4, "nf4": 4, "fp4": 4}


def quantize_in_memory(name, state, config):
    args = sat_args(name, skip_init=True)
    model = sat_quant.sat.build.build_quantized(args, SAT_MODELS[name][0], config).eval()
    model.load_state_dict(state, strict=False)
    return model


@pytest.fixture(scope="module")
def fp_checkpoints(fp_models, tmp_path_factory):
    out = {}
    for name, (model, _, _, _) in fp_models.items():
        path = tmp_path_factory.mktemp(f"fp-{name}")
        out[name] = save_fp_with_sat(model, sat_args(name), path)
    return out


@pytest.mark.parametrize("name,fmt", [("gpt2", "int8"), ("gpt2", "int4"), ("gpt2", "nf4"), ("gpt2", "fp4"),
                                      ("llama", "int4"), ("llama", "int4cs"), ("bert", "nf4")])
def test_convert_then_load_equals_quantizing_in_memory(fp_models, fp_checkpoints, tmp_path, name, fmt):
    _, state, inputs, _ = fp_models[name]
    config = QuantConfig(bits=BITS[fmt], format=fmt)
    expected = run_logits(quantize_in_memory(name, state, config), inputs)
    dst = str(tmp_path / "q")
    convert(fp_checkpoints[name], dst, config, progress=False)
    model, args = sat_quant.from_pretrained(SAT_MODELS[name][0], dst)
    assert torch.equal(run_logits(model.eval(), inputs), expected)
    assert args.quantization["layers"] and all(isinstance(m, QuantLinear) for n, m in model.named_modules()
                                                if n in args.quantization["layers"])
    # save the loaded model again and load it back: still bitwise equal
    sat_quant.save_checkpoint(model, str(tmp_path / "again"), args=args)
    again, _ = sat_quant.from_pretrained(None, str(tmp_path / "again"))
    assert torch.equal(run_logits(again.eval(), inputs), expected)


def test_mixed_precision_round_trip(fp_models, tmp_path):
    _, state, inputs, _ = fp_models["llama"]
    plan = {"*.attention.query_key_value": "int8", "*.mlp.dense_4h_to_h": "int4:64", "*.layers.1.*": "nf4",
            "*.attention.dense": "fp"}
    model = quantize_in_memory("llama", state, QuantConfig(bits=4, plan=plan))
    kinds = {n: (m.fmt.name, m.spec.group_size) for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert {k for k in kinds.values()} == {("int8", None), ("int4", 64), ("nf4", 64), ("int4", 128)}
    expected = run_logits(model, inputs)
    sat_quant.save_checkpoint(model, str(tmp_path), args=sat_args("llama"))
    block = json.load(open(tmp_path / "model_config.json"))["quantization"]
    assert {n: (l["format"], l["group_size"]) for n, l in block["layers"].items()} == kinds
    loaded, _ = sat_quant.from_pretrained(SAT_MODELS["llama"][0], str(tmp_path))
    assert {n: (m.fmt.name, m.spec.group_size) for n, m in loaded.named_modules() if isinstance(m, QuantLinear)} == kinds
    assert torch.equal(run_logits(loaded.eval(), inputs), expected)


def test_sat_save_checkpoint_then_sat_from_pretrained(fp_models, tmp_path):
    """SAT's own save_checkpoint (gloo, inference mode) + SAT's own from_pretrained restore the model."""
    _, state, inputs, _ = fp_models["gpt2"]
    cls = sat_quant.quantized_class(SAT_MODELS["gpt2"][0])
    args = sat_args("gpt2", skip_init=True, quant=4, quant_format="nf4")
    from sat.model.base_model import get_model as sat_get_model
    model = sat_get_model(args, cls).eval()  # SAT's own get_model builds the quantized class quantized
    assert isinstance(model.transformer.layers[0].attention.dense, QuantLinear)
    model.load_state_dict(state, strict=False)
    expected = run_logits(model, inputs)
    args.save, args.mode = str(tmp_path), "inference"
    sat_save_checkpoint(1, model, None, None, args)
    saved = json.load(open(tmp_path / "model_config.json"))
    assert saved["quant"] == 4 and saved["quant_format"] == "nf4" and saved["quantization"]["layers"]
    pt = torch.load(tmp_path / "1" / "mp_rank_00_model_states.pt", weights_only=True)
    assert any(k.endswith(".qweight") for k in pt["module"]) and not any(k.endswith("query_key_value.weight")
                                                                       for k in pt["module"])
    # SAT's own from_pretrained: quant flags and the block come back from model_config.json
    restored, restored_args = cls.from_pretrained(str(tmp_path), args=sat_args("gpt2"))
    assert torch.equal(run_logits(restored.eval(), inputs), expected)
    # and sat_quant's loader reads SAT's .pt layout too
    loaded, _ = sat_quant.from_pretrained(None, str(tmp_path))
    assert torch.equal(run_logits(loaded.eval(), inputs), expected)


def test_cli_convert_inspect_dequantize(fp_models, fp_checkpoints, tmp_path):
    _, state, inputs, ref = fp_models["gpt2"]
    dst = str(tmp_path / "q4")
    run = lambda *a: subprocess.run([sys.executable, "-m", "sat_quant.tools.cli", *a], cwd=ROOT, capture_output=True,
                                    text=True, timeout=300)
    r = run("convert", fp_checkpoints["gpt2"], dst, "--quant", "4", "--quant-skip", "*.layers.1.mlp.*")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "quantizing" in r.stderr  # tqdm progress bar
    r = run("inspect", dst)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [l for l in r.stdout.splitlines() if l.startswith("transformer.")]
    assert len(lines) == 6 and all(" int4 " in l and " 128 " in l for l in lines)
    manifest = json.load(open(os.path.join(dst, "1", "mp_rank_00_model_states.manifest.json")))
    total = int(r.stdout.splitlines()[-1].split()[-1].replace(",", ""))
    assert total == manifest["bytes"] - _safetensors_header_bytes(os.path.join(dst, "1", manifest["file"]))
    # DST exists: refused without --overwrite
    r = run("convert", fp_checkpoints["gpt2"], dst, "--quant", "8")
    assert r.returncode == 2 and "already exists" in r.stderr and "--overwrite" in r.stderr
    # dequantize → a plain full-precision SAT checkpoint that SAT's own from_pretrained loads
    deq = str(tmp_path / "deq")
    r = run("dequantize", dst, deq)
    assert r.returncode == 0, r.stderr[-2000:]
    fp_again, _ = SAT_MODELS["gpt2"][0].from_pretrained(deq, args=sat_args("gpt2"))
    q_model, _ = sat_quant.from_pretrained(None, dst)
    assert "quantization" not in json.load(open(os.path.join(deq, "model_config.json")))
    # the dequantized model computes what the quantized one does, up to the kernels' bf16 activations
    fp_logits, q_logits = run_logits(fp_again.eval(), inputs), run_logits(q_model.eval(), inputs)
    assert ((fp_logits - q_logits).norm() / fp_logits.norm()).item() < 0.02
    assert not torch.equal(fp_logits, ref), "dequantized weights are the quantized ones, not the originals"


def _safetensors_header_bytes(path):
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_cogvlm_round_trip(tmp_path):
    fp_model, fp_args = build_tiny_cogvlm()
    inputs = tiny_cogvlm_inputs()
    src = save_fp_with_sat(fp_model, fp_args, tmp_path / "fp")
    config = QuantConfig(bits=4, format="int4")
    expected_model = sat_quant.get_model(tiny_cogvlm_args(skip_init=True, quant=4), _cogvlm_model_class()).eval()
    expected_model.load_state_dict(fp_model.state_dict(), strict=False)
    expected = run_logits(expected_model, inputs)
    dst = str(tmp_path / "q")
    convert(src, dst, config, progress=False)
    loaded, _ = sat_quant.from_pretrained(None, dst, args=tiny_cogvlm_args())
    assert type(loaded).__name__ == "CogVLMModel"
    assert torch.equal(run_logits(loaded.eval(), inputs), expected)
    layers = json.load(open(os.path.join(dst, "model_config.json")))["quantization"]["layers"]
    assert any(".vit_model." in n for n in layers) and any("linear_proj" in n for n in layers)


def test_full_precision_checkpoint_with_quant_streams_into_a_quantized_model(fp_models, fp_checkpoints):
    """from_pretrained(fp checkpoint, --quant 4) quantizes each weight as it is read from the mmapped .pt."""
    _, state, inputs, _ = fp_models["gpt2"]
    expected = run_logits(quantize_in_memory("gpt2", state, QuantConfig(bits=4)), inputs)
    model, args = sat_quant.from_pretrained(SAT_MODELS["gpt2"][0], fp_checkpoints["gpt2"],
                                            args=sat_args("gpt2", quant=4))
    assert torch.equal(run_logits(model.eval(), inputs), expected)
    assert args.quantization["config"]["format"] == "int4"


def test_both_sat_save_paths_dump_the_quant_args_and_block(fp_models):
    """SAT's inference save and its deepspeed save (save_ds_checkpoint) both write model_config.json from
    extract_model_specific_args_to_dump, which collects every module's add_model_specific_args."""
    from sat.training.model_io import extract_model_specific_args_to_dump
    args = sat_args("llama", quant=8, quant_skip=["*.dense"], skip_init=True)
    model = sat_quant.get_model(args, SAT_MODELS["llama"][0])
    dumped = extract_model_specific_args_to_dump(args, model)
    assert dumped["quant"] == 8 and dumped["quant_format"] == "int8" and dumped["quant_skip"] == ["*.dense"]
    block = dumped["quantization"]
    assert block["format_version"] == 1 and block["config"]["format"] == "int8"
    assert set(block["layers"]) == {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert not any(n.endswith(".dense") for n in block["layers"])


def test_cli_convert_cogvlm_with_import(tmp_path):
    fp_model, fp_args = build_tiny_cogvlm()
    src = save_fp_with_sat(fp_model, fp_args, tmp_path / "fp")
    env = dict(os.environ, PYTHONPATH=str(COGVLM_DIR), WANDB_MODE="disabled")
    r = subprocess.run([sys.executable, "-m", "sat_quant.tools.cli", "convert", src, str(tmp_path / "q"), "--quant", "8",
                        "--import", "utils.models", "--quiet"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "sat_quant.tools.cli", "inspect", str(tmp_path / "q")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=env)
    assert "model_class CogVLMModel" in r.stdout and "mixins.eva.linear_proj.linear_proj" in r.stdout
    r = subprocess.run([sys.executable, "-m", "sat_quant.tools.cli", "convert", src, str(tmp_path / "q2"), "--quant", "8"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, WANDB_MODE="disabled"))
    assert r.returncode == 2 and "CogVLMModel" in r.stderr and "--import" in r.stderr


def test_load_reports_each_phase(fp_models, fp_checkpoints, tmp_path, caplog):
    """from_pretrained measures reading, sha256 verification and the repack into kernel layouts separately, over
    exactly the bytes each phase handled, and prints one line of MB/s (benchmarks/full_size.py reports them)."""
    from safetensors import safe_open

    from sat_quant.io.layout import checkpoint_tensor_path, read_latest
    dst = str(tmp_path / "q")
    convert(fp_checkpoints["llama"], dst, QuantConfig(bits=4, format="int4"), progress=False)
    with caplog.at_level("INFO"):
        model, _ = sat_quant.from_pretrained(SAT_MODELS["llama"][0], dst)
    times = model.quant_load_times
    tensor_file = checkpoint_tensor_path(dst, read_latest(dst), 0)
    with safe_open(tensor_file, framework="pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert times.read_bytes == stored and times.verify_bytes == os.path.getsize(tensor_file)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and times.repack_bytes == sum(m.quantized_nbytes() for m in layers)
    assert times.read_s > 0 and times.verify_s > 0 and times.repack_s > 0
    assert all(rate > 0 for rate in times.mb_per_s().values())
    assert f"sat_quant: loaded {dst}: read {stored / 1e6:.1f} MB at " in caplog.text
