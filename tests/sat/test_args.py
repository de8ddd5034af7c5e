"""The --quant flag matrix, parsed through SAT's own get_args, and every refusal's message."""
import argparse
import itertools
import json

import pytest
import torch

import sat_quant
from sat_quant import QuantConfigError, add_quant_args, validate_quant_args
from tests.conftest import SAT_MODELS, model_inputs, run_logits

DTYPE_FLAGS = {"fp32": [], "fp16": ["--fp16"], "bf16": ["--bf16"]}
ARCH = ["--num-layers", "2", "--hidden-size", "256", "--num-attention-heads", "4", "--vocab-size", "1000",
        "--max-sequence-length", "64", "--mode", "inference"]


def parse(extra):
    return sat_quant.get_args(ARCH + extra)


@pytest.mark.parametrize("quant,dtype", itertools.product([None, "4", "8"], DTYPE_FLAGS))
def test_cpu_matrix_builds_and_runs(quant, dtype):
    """Every --quant × {--fp16, --bf16, neither} combination works on CPU, end to end."""
    extra = DTYPE_FLAGS[dtype] + (["--quant", quant] if quant else [])
    args = parse(extra)
    assert args.device == "cpu"
    config = validate_quant_args(args)
    assert (config is None) == (quant is None)
    model = sat_quant.get_model(args, SAT_MODELS["gpt2"][0])
    logits = run_logits(model, model_inputs("gpt2"))
    assert torch.isfinite(logits).all()
    expected = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert model.transformer.word_embeddings.weight.dtype == expected


def test_both_fp16_and_bf16_is_refused_before_sat_asserts():
    with pytest.raises(QuantConfigError, match="--fp16 and --bf16.*only one"):
        parse(["--quant", "4", "--fp16", "--bf16"])
    with pytest.raises(QuantConfigError, match="only one"):
        validate_quant_args(argparse.Namespace(quant=4, fp16=True, bf16=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("dtype", DTYPE_FLAGS)
def test_cuda_device_without_cuda_is_refused_naming_the_flag(dtype):
    ns = argparse.Namespace(quant=4, fp16=dtype == "fp16", bf16=dtype == "bf16", device=0)
    with pytest.raises(QuantConfigError, match="--device 0 asks for CUDA"):
        validate_quant_args(ns)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("quant", [[], ["--quant", "4"]], ids=["no-quant", "quant"])
def test_cuda_device_without_cuda_is_refused_before_sat_parses(quant):
    """SAT itself would fail with a raw 'Found no NVIDIA driver'; sat_quant names the flag first, with or without
    --quant."""
    with pytest.raises(QuantConfigError, match="--device 0 asks for CUDA"):
        parse(["--device", "0"] + quant)
    ns = argparse.Namespace(quant=None, fp16=False, bf16=False, device=0)
    with pytest.raises(QuantConfigError, match="--device 0 asks for CUDA"):
        validate_quant_args(ns)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quant,dtype", itertools.product(["4", "8"], DTYPE_FLAGS))
def test_cuda_matrix_builds_and_runs(quant, dtype):
    args = parse(DTYPE_FLAGS[dtype] + ["--quant", quant, "--device", "0"])
    model = sat_quant.get_model(args, SAT_MODELS["gpt2"][0])
    inputs = {k: v.cuda() for k, v in model_inputs("gpt2").items()}
    assert torch.isfinite(run_logits(model, inputs)).all()


@pytest.mark.parametrize("extra,message", [
    (["--quant", "8", "--quant-format", "nf4"], "nf4 is a 4-bit format but --quant is 8"),
    (["--quant", "4", "--quant-backend", "bitsandbytes"], "--quant-backend bitsandbytes cannot run --quant-format int4"),
    (["--quant", "4", "--quant-format", "nf4", "--quant-backend", "torch"], "--quant-backend torch cannot run"),
    (["--quant", "4", "--quant-group-size", "-3"], "--quant-group-size -3"),
])
def test_bad_combinations_name_the_flag(extra, message):
    with pytest.raises(QuantConfigError, match=message):
        parse(extra)


@pytest.mark.parametrize("bits", [3, 16, "four"])
def test_bits_outside_4_and_8(bits):
    with pytest.raises(QuantConfigError, match="--quant 4 or --quant 8"):
        validate_quant_args(argparse.Namespace(quant=bits, fp16=False, bf16=False, device="cpu"))


def test_argparse_refuses_quant_3_and_unknown_format():
    with pytest.raises(SystemExit):
        parse(["--quant", "3"])
    # formats are checked against the registry (argparse choices would import torch for --help): the error lists them
    with pytest.raises(QuantConfigError, match="unknown quantization format 'int3'.*int4c"):
        parse(["--quant", "4", "--quant-format", "int3"])


def test_format_alone_implies_bits_and_defaults_per_width():
    assert validate_quant_args(parse(["--quant-format", "nf4"])).bits == 4
    assert validate_quant_args(parse(["--quant", "8"])).format == "int8"
    config = validate_quant_args(parse(["--quant", "4"]))
    assert config.format == "int4" and sat_quant.get_format(config.format).resolve_group_size(None) == 128


def test_add_quant_args_keeps_an_existing_quant_option():
    """CogVLM's scripts define --quant themselves (choices=[8, 4]); adding ours must not conflict."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quant", choices=[8, 4], type=int, default=None)
    add_quant_args(parser)
    args = parser.parse_args(["--quant", "4", "--quant-format", "nf4", "--quant-skip", "*.vit_model.*"])
    assert validate_quant_args(args).format == "nf4"
    assert args.quant_skip == ["*.vit_model.*"]


def test_quant_plan_file(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"*.attention.*": "int8", "*.mlp.dense_4h_to_h": "fp"}))
    config = validate_quant_args(parse(["--quant", "4", "--quant-plan", str(plan)]))
    assert config.format_for("transformer.layers.0.attention.dense") == "int8"
    assert config.format_for("transformer.layers.0.mlp.dense_4h_to_h") is None
    assert config.format_for("transformer.layers.0.mlp.dense_h_to_4h") == "int4"
    plan.write_text("{not json")
    with pytest.raises(QuantConfigError, match="--quant-plan .*not valid JSON"):
        parse(["--quant", "4", "--quant-plan", str(plan)])
