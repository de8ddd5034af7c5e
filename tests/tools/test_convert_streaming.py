"""``sat-quant convert`` streams (tools/convert_stream.py): the model is built on meta and each module is read,
quantized and written in turn. Its output must be the in-memory path's, byte for byte: every file of DST (tensor
file, manifest with its sha256, model_config.json, stub, ``latest``), for every format, a mixed plan, fp32, fp16
and bf16 sources, SAT ``.pt`` and sat_quant safetensors sources, and the tiny real CogVLM and CogAgent."""
import os

import pytest
import torch
from sat.model.base_model import get_model as sat_get_model

import sat_quant
from sat_quant import QuantConfig
from sat_quant.io.load import load_into
from sat_quant.sat.build import build_quantized
from sat_quant.sat.checkpoint import save_checkpoint
from sat_quant.tools.sources import open_full_precision
from tests.conftest import SAT_MODELS, sat_args, save_fp_with_sat
from tests.io.checkpoints import snapshot

MIXED = {"*.attention.query_key_value": "int8", "*.mlp.dense_4h_to_h": "int4:64", "*.layers.1.*": "nf4",
         "*.mlp.gate_proj.0": "int4c", "*.attention.dense": "fp"}


def convert_in_memory(src: str, dst: str, config: QuantConfig, imports=None) -> None:
    """The path convert took before streaming: the whole quantized model built and filled, then saved."""
    fp = open_full_precision(src, "convert", imports)
    model = build_quantized(fp.args, fp.cls, config)
    load_into(model, fp.source)
    save_checkpoint(model, dst, args=fp.args, iteration=fp.iteration)


def assert_same_output(src, tmp_path, config, imports=None):
    streamed, reference = str(tmp_path / "streamed"), str(tmp_path / "reference")
    sat_quant.convert(src, streamed, config, imports=imports, progress=False)
    convert_in_memory(src, reference, config, imports)
    got, want = snapshot(streamed), snapshot(reference)
    assert sorted(got) == sorted(want) and len(got) == 5, (sorted(got), sorted(want))
    assert got == want, [name for name in got if got[name] != want[name]]


def fp_checkpoint(tmp_path, name, dtype=None, seed=0):
    torch.manual_seed(seed)
    args = sat_args(name, fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16)
    model = sat_get_model(args, SAT_MODELS[name][0])
    return save_fp_with_sat(model, args, tmp_path / f"fp-{name}")


@pytest.mark.parametrize("name,config", [
    ("gpt2", QuantConfig(bits=4, group_size=64)),
    ("gpt2", QuantConfig(bits=8)),
    ("bert", QuantConfig(bits=4, format="nf4")),
    ("llama", QuantConfig(bits=4, plan=MIXED)),
    ("llama", QuantConfig(bits=4, format="int4c", quantize_lm_head=True, backend="reference")),
], ids=["gpt2-int4", "gpt2-int8", "bert-nf4", "llama-mixed", "llama-int4c-lm-head"])
def test_streamed_convert_writes_the_in_memory_paths_bytes(tmp_path, one_torch_thread, name, config):
    assert_same_output(fp_checkpoint(tmp_path, name), tmp_path, config)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_sources_convert_to_the_same_bytes(tmp_path, one_torch_thread, dtype):
    assert_same_output(fp_checkpoint(tmp_path, "llama", dtype), tmp_path, QuantConfig(bits=4, group_size=64))


def test_a_safetensors_source_converts_to_the_same_bytes(tmp_path, one_torch_thread):
    """A full-precision checkpoint whose tensors are a safetensors file with its manifest (no quantization block)
    is a source like SAT's .pt."""
    from sat_quant.io.manifest import write_rank_files
    from sat_quant.io.save import write_folder_config
    from sat_quant.sat.checkpoint import model_config_dict
    torch.manual_seed(1)
    args = sat_args("gpt2")
    model = sat_get_model(args, SAT_MODELS["gpt2"][0])
    src = str(tmp_path / "fp-st")
    config = model_config_dict(model, args)
    write_rank_files(os.path.join(src, "1"), 1, 0, dict(model.state_dict()), None, config)
    write_folder_config(src, config, 1)
    assert_same_output(src, tmp_path, QuantConfig(bits=4, group_size=64))


def test_cogvlm_and_cogagent_convert_to_the_same_bytes(tmp_path, one_torch_thread):
    """CogVLM's towers are built in fp32 inside a bf16 model, CogAgent's cross tower shares its rope module
    across blocks and has a 2730-column layer stored padded: the meta build must reproduce all of it."""
    from tests.cogagent_fixture import build_tiny_cogagent
    from tests.cogvlm_fixture import build_tiny_cogvlm
    vlm, vlm_args = build_tiny_cogvlm()
    src = save_fp_with_sat(vlm, vlm_args, tmp_path / "fp-cogvlm")
    assert_same_output(src, tmp_path / "cogvlm", QuantConfig(bits=4, group_size=64), imports=["tests.cogvlm_fixture"])
    agent, agent_args = build_tiny_cogagent()
    src = save_fp_with_sat(agent, agent_args, tmp_path / "fp-cogagent")
    assert_same_output(src, tmp_path / "cogagent", QuantConfig(bits=4, group_size=64),
                       imports=["tests.cogagent_fixture"])


def test_convert_reports_read_quantize_and_write_rates(tmp_path, capsys):
    src = fp_checkpoint(tmp_path, "gpt2")
    sat_quant.convert(src, str(tmp_path / "q"), QuantConfig(bits=8), progress=True)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("convert: read ") and line.count("MB/s") == 3, line
    assert ", quantized " in line and ", wrote " in line, line
