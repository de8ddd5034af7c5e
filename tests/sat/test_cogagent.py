"""CogAgent (issue 12): the real ``CogAgentModel`` at tiny size, quantized at build in fp32, bf16 and fp16.

Its cross tower (EVA2-CLIP-L, plain ``nn.Linear``) keeps the real block shape, so ``mlp.w3`` has 2730 input columns:
no 4-bit group divides it and the ragged (zero-padded) layout runs in every 4-bit case here.
"""
import fnmatch

import pytest
import torch
from sat.mpu.layers import ColumnParallelLinear, RowParallelLinear
from torch import nn

import sat_quant
from sat_quant import QuantLinear, get_format
from tests.cogagent_fixture import (
    TINY_CROSS_LAYERS,
    TinyCogAgentModel,
    build_tiny_cogagent,
    tiny_cogagent_args,
    tiny_cogagent_inputs,
)
from tests.conftest import run_logits

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# relative L2 logit error vs the fp32 model, random weights (measured: int8 0.02, int4 0.21, nf4 0.24); the
# half-precision builds add their own rounding on top
MAX_REL = {"int8": 0.05, "int4": 0.4, "nf4": 0.45}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def linear_names(model: nn.Module):
    """Every linear layer of the model, found without sat_quant: torch's and SAT's linear classes, by isinstance."""
    return {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, ColumnParallelLinear, RowParallelLinear))}


@pytest.fixture(scope="module")
def cogagent_fp():
    model, _ = build_tiny_cogagent()
    inputs = tiny_cogagent_inputs()
    return model, model.state_dict(), inputs, run_logits(model, inputs)


def test_tiny_cogagent_is_the_real_class_with_every_part(cogagent_fp):
    from utils.models import CogAgentModel
    model, _, inputs, ref = cogagent_fp
    assert isinstance(model, CogAgentModel) and type(model).__mro__[1] is CogAgentModel
    tower = model.mixins["encoder"].vit.model
    assert len(tower.blocks) == TINY_CROSS_LAYERS and tower.blocks[0].mlp.w3.in_features == 2730
    assert all(layer.is_decoder for layer in model.transformer.layers)  # cross-attention in every layer
    # the high-resolution image reaches the logits through cross-attention
    other = dict(inputs, cross_image=inputs["cross_image"].flip(-1))
    assert rel(run_logits(model, other), ref) > 1e-3


@pytest.mark.parametrize("dtype,fmt", [("fp32", "int8"), ("fp32", "int4"), ("bf16", "int4"), ("fp16", "int4"),
                                       ("bf16", "nf4")])
def test_cogagent_quantized_at_build_every_linear_counted(cogagent_fp, dtype, fmt):
    fp_model, state, inputs, ref = cogagent_fp
    expected = {n for n in linear_names(fp_model) if not fnmatch.fnmatchcase(n, "*lm_head*")}
    cross = {n for n in expected if n.startswith("mixins.encoder.")}
    cross_attention = {n for n in expected if ".cross_attention." in n}
    assert len(cross) == 7 * TINY_CROSS_LAYERS + 1 and len(cross_attention) == 3 * len(fp_model.transformer.layers)
    assert any(n.startswith("mixins.mlp.vision_") for n in expected)  # the rebuilt mlp mixin's visual expert

    args = tiny_cogagent_args(skip_init=True, quant=get_format(fmt).bits, quant_format=fmt,
                              bf16=dtype == "bf16", fp16=dtype == "fp16")
    model = sat_quant.get_model(args, TinyCogAgentModel).eval()
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quantized == expected and not linear_names(model) - {n for n in linear_names(fp_model) if "lm_head" in n}
    report = model.quant_report
    assert report.rows[fmt].layers == len(expected) and set(report.layers) == expected
    specs = [m.spec for m in model.modules() if isinstance(m, QuantLinear)]
    assert report.rows[fmt].bytes_after == sum(get_format(fmt).nbytes(s) for s in specs)
    w3 = model.mixins["encoder"].vit.model.blocks[0].mlp.w3
    if get_format(fmt).grouped:  # 2730 columns: one zero-padded last group, still on a fast kernel
        assert w3.spec.padding > 0 and w3.spec.padded_in_features % w3.spec.group_size == 0
        assert w3.backend.name != "reference"

    model.load_state_dict(state, strict=False)  # each fp32 weight quantized as it arrives
    assert next(p for p in model.parameters() if p.is_floating_point()).dtype == DTYPES[dtype]
    with torch.no_grad():
        logits = model(**tiny_cogagent_inputs(dtype=DTYPES[dtype]))[0]
    assert logits.dtype == DTYPES[dtype] and torch.isfinite(logits).all()
    assert rel(logits, ref) < MAX_REL[fmt], rel(logits, ref)


def test_quant_4_on_cogagent_needs_no_skip():
    """Before ragged groups, ``--quant 4`` refused CogAgent (mlp.w3: 2730 columns) unless '*.mlp.w3' was skipped."""
    config = sat_quant.validate_quant_args(tiny_cogagent_args(quant=4))
    from sat_quant.engine.replace import plan_layers
    from sat_quant.sat.build import build_on_meta
    meta = build_on_meta(TinyCogAgentModel, tiny_cogagent_args(), torch.float32)
    plans = {p.names[0]: p.spec for p in plan_layers(meta, config)}
    w3 = plans["mixins.encoder.vit.model.blocks.0.mlp.w3"]
    assert (w3.in_features, w3.group_size, w3.padded_in_features) == (2730, 128, 2816)


def test_tiny_cross_tower_config_is_upstreams_but_for_depth():
    """The tiny tower copies Eva2LargeEncoder's hard-coded EVA2-CLIP-L config: upstream's, built on meta, agrees."""
    from utils.models import eva_clip_L_hf

    from sat_quant.engine.replace import everything_on_meta
    from sat_quant.testing.cogvlm_assets import _EVA2_L_CONFIG
    with everything_on_meta():
        full = eva_clip_L_hf.Eva2LargeEncoder(image_size=1120)
    expected = {"embed_dim": _EVA2_L_CONFIG["embed_dim"], "vision_cfg": dict(_EVA2_L_CONFIG["vision_cfg"], image_size=1120)}
    assert full.config == expected and len(full.model.blocks) == 24
    assert full.model.blocks[0].mlp.w3.in_features == 2730 and full.model.patch_embed.num_patches == 6400


def test_cross_tower_attention_runs_the_quantized_kernels(cogagent_fp):
    """EVA2-CLIP-L's attention reads ``q_proj.weight`` (k, v) into ``F.linear``: each must run its layer's kernel
    (on a CPU without native bf16 the dense bf16 GEMM it replaces is several times slower), once per forward. The
    tower never runs its last block (upstream takes the penultimate features)."""
    _, state, _, ref = cogagent_fp
    model = sat_quant.get_model(tiny_cogagent_args(skip_init=True, quant=4, bf16=True), TinyCogAgentModel).eval()
    model.load_state_dict(state, strict=False)
    calls = {}
    for name, module in model.mixins["encoder"].named_modules():
        if name.endswith(("attn.q_proj", "attn.k_proj", "attn.v_proj")):
            assert isinstance(module, QuantLinear)
            kernel = module._linear

            def counted(x, _kernel=kernel, _name=name):  # a spy: counts, then runs the real kernel
                calls[_name] = calls.get(_name, 0) + 1
                return _kernel(x)
            module._linear = counted
    with torch.no_grad():
        logits = model(**tiny_cogagent_inputs(dtype=torch.bfloat16))[0]
    ran = {f"vit.model.blocks.{i}.attn.{p}" for i in range(TINY_CROSS_LAYERS - 1) for p in ("q_proj", "k_proj", "v_proj")}
    assert ran and set(calls) == ran and set(calls.values()) == {1}, calls
    assert rel(logits, ref) < MAX_REL["int4"]
