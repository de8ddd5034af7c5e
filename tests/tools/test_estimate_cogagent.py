"""`sat-quant estimate` on CogAgent (issue 12): the public CogAgent-18B shape, and padded bytes on the tiny model."""
import os
from collections import OrderedDict

import torch

import sat_quant
from sat_quant import QuantConfig, get_format, quant_report
from sat_quant.sat.build import build_on_meta
from sat_quant.tools.cli import main as cli_main
from sat_quant.tools.estimate import estimate_table, estimate_weights
from tests.cogagent_fixture import TinyCogAgentModel, tiny_cogagent_args

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "cogagent-chat-18b.json")


def test_estimate_equals_measured_bytes_tiny_cogagent_with_a_padded_layer():
    meta = build_on_meta(TinyCogAgentModel, tiny_cogagent_args(skip_init=True), torch.float32)
    model = sat_quant.get_model(tiny_cogagent_args(skip_init=True, quant=4), TinyCogAgentModel)
    est = estimate_weights(meta, QuantConfig(bits=4))
    assert est.weight_bytes == quant_report(model).bytes_after
    w3 = model.get_submodule("mixins.encoder.vit.model.blocks.0.mlp.w3").spec
    # 2730 columns stored as 2816 (22 groups of 128): codes, fp16 scale and uint8 zero per group
    assert get_format("int4").nbytes(w3) == 1024 * (2816 // 2 + 22 * 2 + 22)
    assert est.weights["cross vision tower"] > 0 and est.weights["cross-attention"] > 0


def test_cogagent_18b_public_shape():
    from sat.arguments import update_args_with_file

    from sat_quant.sat.loading import fill_script_defaults
    cls = TinyCogAgentModel.__mro__[1]  # upstream's CogAgentModel, full-size cross tower (built on meta only)
    args = fill_script_defaults(update_args_with_file(cls.get_args(), CONFIG))
    args.skip_init, args.device, args.fp16, args.bf16 = True, "cpu", False, False
    _, columns = estimate_table(cls, args, OrderedDict([("fp16", None), ("int4", QuantConfig(bits=4))]))
    params = columns["fp16"].params
    billions = {k: round(v / 1e9, 2) for k, v in params.items()}
    # CogAgent-18B: 11B visual (EVA2-CLIP-E 4.4B incl. adapter, visual expert, EVA2-CLIP-L, cross-attention) + 7B LM
    assert round(sum(params.values()) / 1e9, 2) == 18.29  # "CogAgent-18B"
    assert billions == {"vision tower": 4.28, "vision adapter": 0.14, "visual expert": 6.48, "language model": 6.48,
                        "embeddings + LM head": 0.26, "cross vision tower": 0.32, "cross-attention": 0.34}
    int4 = columns["int4"].weight_bytes
    assert int4 < 9.5 * 2**30, int4 / 2**30  # every linear 4-bit (mlp.w3 padded), fp16 LM head and embeddings
    # 6400 cross patches x 32 layers x (K, V) x 1024 cross width in fp16, cached once per image, on top of the text's
    text_kv = 2 * 32 * 2048 * 4096 * 2
    assert columns["int4"].kv_cache == text_kv + 2 * 32 * 6400 * 1024 * 2


def test_cli_estimate_runs_on_the_18b_config(capsys):
    assert cli_main(["estimate", "--config", CONFIG, "--quant", "4", "--quant-format", "nf4", "--batch", "1",
                     "--seq", "2048"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("CogAgentModel: batch 1, sequence 2048")
    rows = {line[:30].strip(): line[30:].split() for line in out.splitlines()[1:]}
    assert rows["GiB"] == ["fp16", "bf16", "int8", "int4", "asked"]
    fp16, bf16, int8, int4, nf4 = map(float, rows["weights"])
    assert fp16 == bf16 and int8 < 0.55 * fp16 and int4 < int8 and int4 < nf4 < int8
    assert "cross vision tower (0.32B)" in rows and "cross-attention (0.34B)" in rows
