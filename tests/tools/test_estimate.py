"""Memory estimator: equals measured bytes on real built models; CogVLM-17B's public shape on meta."""
import os
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch

import sat_quant
from sat_quant import QuantConfig, quant_report
from sat_quant.sat.build import build_on_meta
from sat_quant.tools.estimate import estimate_table, estimate_weights
from tests.cogvlm_fixture import COGVLM_DIR, _cogvlm_model_class, tiny_cogvlm_args
from tests.conftest import SAT_MODELS, sat_args

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = [None, QuantConfig(bits=8), QuantConfig(bits=4), QuantConfig(bits=4, format="nf4", group_size=32),
           QuantConfig(bits=4, plan={"*.attention.*": "int8", "*.mlp.dense_4h_to_h": "fp"})]


@pytest.mark.parametrize("config", CONFIGS, ids=["fp32", "int8", "int4", "nf4-32", "plan"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_estimate_equals_measured_bytes_of_the_built_model(name, config):
    cls = SAT_MODELS[name][0]
    meta = build_on_meta(cls, sat_args(name), torch.float32)
    estimate = estimate_weights(meta, config).weight_bytes
    if config is None:
        model = cls(sat_args(name))
    else:
        model = sat_quant.sat.build.build_quantized(sat_args(name), cls, config)
    assert estimate == quant_report(model).bytes_after


def _kernel_cache_bytes(model) -> int:
    """What the model's quantized layers' kernels hold beyond their neutral tensors (derived, '_' keys)."""
    from sat_quant.engine.layers import QuantLinear
    return sum(t.numel() * t.element_size() for m in model.modules() if isinstance(m, QuantLinear)
               for k, t in m._kernel.items() if k.startswith("_"))


def _run_every_layer_once(model) -> None:
    """A two-row bf16 forward through each quantized layer: the decode path, which builds the kernels' caches."""
    from sat_quant.engine.layers import QuantLinear
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantLinear):
                QuantLinear.forward(m, torch.randn(2, m.in_features, dtype=torch.bfloat16))


@pytest.mark.parametrize("config", [QuantConfig(bits=4), QuantConfig(bits=4, format="int4cs"), QuantConfig(bits=8),
                                    QuantConfig(bits=4, format="nf4"), QuantConfig(bits=4, backend="lut")],
                         ids=["int4", "int4cs", "int8", "nf4", "int4-lut"])
def test_kernel_caches_are_what_the_kernels_keep_after_running(config):
    """The estimate's "kernel caches" on CPU are the bytes the built model's kernels derive and keep once it runs
    (torch's int4 kernel: bf16 scale and zero per group; int8: bf16 row scales; int4cs: bf16 ``t``; lut: its
    table): what a decode step's memory holds beyond the weights."""
    cls = SAT_MODELS["llama"][0]
    expected = estimate_weights(build_on_meta(cls, sat_args("llama"), torch.float32), config, "cpu").kernel_caches
    model = sat_quant.sat.build.build_quantized(sat_args("llama"), cls, config)
    assert _kernel_cache_bytes(model) == 0
    _run_every_layer_once(model)
    assert expected > 0 and _kernel_cache_bytes(model) == expected


def test_kernel_caches_of_ragged_layers_and_on_cuda():
    """int8 on CPU with K not a multiple of 16 keeps a zero-padded copy of its codes; int4cs's per-group bf16
    scales are 1 bit/param at group 32; on CUDA torch's int4 backend also keeps the neutral codes (priced, not run)."""
    model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.Linear(64, 128))
    config = QuantConfig(bits=8, plan={"0": "int8", "1": "int4cs"})
    expected = estimate_weights(model, config, "cpu").kernel_caches
    sat_quant.quantize_(model, config)
    _run_every_layer_once(model)
    assert _kernel_cache_bytes(model) == expected == (2 * 64 + 64 * 48) + (2 * 64 + 4 * 2 * 128)
    on_cuda = estimate_weights(torch.nn.Sequential(torch.nn.Linear(4096, 4096)), QuantConfig(bits=4), "cuda")
    assert on_cuda.kernel_caches == 4 * 32 * 4096 + 4096 * 4096 // 2


@pytest.mark.parametrize("bits", [8, 4])
def test_estimate_equals_measured_bytes_tiny_cogvlm(bits):
    cls = _cogvlm_model_class()
    meta = build_on_meta(cls, tiny_cogvlm_args(skip_init=True), torch.float32)
    model = sat_quant.get_model(tiny_cogvlm_args(skip_init=True, quant=bits), cls)
    assert estimate_weights(meta, QuantConfig(bits=bits)).weight_bytes == quant_report(model).bytes_after


def test_cogvlm_17b_public_shape():
    import json

    from sat.arguments import update_args_with_file

    from sat_quant.sat.loading import fill_script_defaults
    cls = _cogvlm_model_class()
    args = fill_script_defaults(update_args_with_file(cls.get_args(), os.path.join(ROOT, "configs", "cogvlm-chat-17b.json")))
    args.skip_init, args.device, args.fp16, args.bf16 = True, "cpu", False, False
    assert json.load(open(os.path.join(ROOT, "configs", "cogvlm-chat-17b.json")))["image_length"] == (490 // 14) ** 2
    _, columns = estimate_table(cls, args, OrderedDict([("fp16", None), ("int4", QuantConfig(bits=4))]))
    params = columns["fp16"].params
    billions = {k: round(v / 1e9, 2) for k, v in params.items()}
    assert round(sum(params.values()) / 1e9, 2) == 17.64
    assert billions == {"vision tower": 4.28, "vision adapter": 0.14, "visual expert": 6.48, "language model": 6.48,
                        "embeddings + LM head": 0.26}
    fp16 = columns["fp16"].weight_bytes
    assert abs(fp16 - 2 * sum(params.values())) < 0.01 * fp16  # fp16: 2 bytes per parameter (+ tiny buffers)
    int4 = columns["int4"].weight_bytes
    assert int4 < 9.5 * 2**30, int4 / 2**30  # int4 group 128 with fp16 LM head and embeddings: 8.97 GiB


def test_cli_estimate_runs_on_the_17b_config():
    env = dict(os.environ, PYTHONPATH=str(COGVLM_DIR), WANDB_MODE="disabled")
    r = subprocess.run([sys.executable, "-m", "sat_quant.tools.cli", "estimate", "--config",
                        os.path.join(ROOT, "configs", "cogvlm-chat-17b.json"), "--import", "utils.models",
                        "--quant", "4", "--quant-format", "nf4", "--batch", "2", "--seq", "1024"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    header = next(l for l in r.stdout.splitlines() if l.startswith("GiB"))
    assert header.split()[1:] == ["fp16", "bf16", "int8", "int4", "asked"]
    weights = next(l for l in r.stdout.splitlines() if l.startswith("weights")).split()[1:]
    fp16, bf16, int8, int4, nf4 = map(float, weights)
    assert fp16 == bf16 and int8 < 0.55 * fp16 and int4 < int8 and int4 < nf4 < int8
