"""Quantize at build on real SAT models (GPT-2, BERT, LLaMA) and the tiny real CogVLMModel."""
import copy
import fnmatch

import pytest
import torch
from torch import nn

import sat_quant
from sat_quant import QuantConfig, QuantLinear, quant_report
from sat_quant.engine.config import LM_HEAD_PATTERNS
from sat_quant.engine.formats import FORMATS
from sat_quant.engine.replace import is_target, linear_weights_on_meta
from tests.cogvlm_fixture import _cogvlm_model_class, build_tiny_cogvlm, tiny_cogvlm_args, tiny_cogvlm_inputs
from tests.conftest import SAT_MODELS, run_logits, sat_args

FORMAT_NAMES = sorted(FORMATS)
BITS = {name: fmt.bits for name, fmt in FORMATS.items()}
# Relative L2 error of the logits vs fp32 on random-init weights. Per weight, the rounding error is
# ~step/sqrt(12): about 0.25% of the row max for int8 and 3-6% of the group max for the 4-bit formats;
# it passes through two blocks and the LM head, so we allow ~5x the weight error.
MAX_REL_LOGIT_ERROR = {"int8": 0.02, "int4": 0.25, "int4c": 0.25, "int4cs": 0.25, "nf4": 0.25, "fp4": 0.35}
# The quantized model against fp32 run with the *dequantized* weights: this isolates the machinery
# (replacement, kernels, SAT semantics) from quantization error. CPU kernels take bf16 activations.
MAX_REL_MACHINERY_ERROR = 0.02
# Tiny CogVLM with random weights: the image passes a 2-layer EVA tower (hidden 1792, post-LN), the GLU
# adapter and the visual expert before the LM, and each random-weight stage amplifies relative noise
# (measured: int8 0.03, int4 0.36, nf4 0.38, fp4 0.51). The machinery check above stays at 2%.
COGVLM_MAX_REL_LOGIT_ERROR = {"int8": 0.05, "int4": 0.5, "int4c": 0.5, "int4cs": 0.5, "nf4": 0.5, "fp4": 0.65}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def target_names(model: nn.Module):
    return sorted(n for n, m in model.named_modules() if is_target(m))


def dequantized_twin(fp_model: nn.Module, quant_model: nn.Module) -> nn.Module:
    """fp_model with every linear that quant_model quantized replaced by its dequantized weight."""
    twin = copy.deepcopy(fp_model)
    qmods = dict(quant_model.named_modules())
    for name, module in twin.named_modules():
        q = qmods.get(name)
        if isinstance(q, QuantLinear):
            with torch.no_grad():
                module.weight.copy_(q.weight.to(module.weight.dtype))
    return twin


def build_quant(name: str, fmt: str, **config_kw):
    args = sat_args(name, skip_init=True, quant=BITS[fmt], quant_format=fmt, **config_kw)
    return sat_quant.get_model(args, SAT_MODELS[name][0]).eval()


@pytest.mark.parametrize("model_name", sorted(SAT_MODELS))
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_sat_models_quantized_at_build(fp_models, model_name, fmt):
    fp_model, state, inputs, ref = fp_models[model_name]
    model = build_quant(model_name, fmt)
    result = model.load_state_dict(state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    logits = run_logits(model, inputs)
    assert rel(logits, ref) < MAX_REL_LOGIT_ERROR[fmt]
    twin_logits = run_logits(dequantized_twin(fp_model, model), inputs)
    assert rel(logits, twin_logits) < MAX_REL_MACHINERY_ERROR

    # every targeted linear is replaced, except the LM head, which stays full precision by default
    targets = target_names(fp_model)
    quantized = sorted(n for n, m in model.named_modules() if isinstance(m, QuantLinear))
    lm_heads = [n for n in targets if any(fnmatch.fnmatchcase(n, p) for p in LM_HEAD_PATTERNS)]
    assert lm_heads, "each of these models has an LM head"
    assert quantized == sorted(set(targets) - set(lm_heads))
    assert all(is_target(model.get_submodule(n)) for n in lm_heads)
    # the report counts exactly those layers and parameters
    report = model.quant_report
    assert report.rows[fmt].layers == len(quantized) == len(report.layers)
    fp_mods = dict(fp_model.named_modules())
    assert report.rows[fmt].params == sum(fp_mods[n].weight.numel() for n in quantized)
    assert report.rows[fmt].bytes_after == sum(model.get_submodule(n).quantized_nbytes() for n in quantized)
    rest = list(model.parameters()) + list(model.buffers())  # quantized weights are neither
    assert report.rows["full precision"].params == sum(t.numel() for t in rest)
    # embeddings stay full precision
    assert model.transformer.word_embeddings.weight.dtype == torch.float32


def test_build_never_creates_full_precision_linear_weights():
    """With the meta hook active, a model's linear weights are meta; everything else is real."""
    args = sat_args("gpt2")
    with linear_weights_on_meta():
        model = SAT_MODELS["gpt2"][0](args)
    for name, module in model.named_modules():
        if is_target(module):
            assert module.weight.is_meta, name
    assert not model.transformer.word_embeddings.weight.is_meta
    assert not model.transformer.layers[0].input_layernorm.weight.is_meta


def test_random_init_build_is_usable_and_seeded():
    """Without a checkpoint (skip_init=False) each layer gets N(0, 0.02) generated one at a time."""
    args = sat_args("gpt2", quant=8)
    torch.manual_seed(0)
    a = sat_quant.get_model(args, SAT_MODELS["gpt2"][0])
    torch.manual_seed(0)
    b = sat_quant.get_model(args, SAT_MODELS["gpt2"][0])
    wa = a.transformer.layers[0].attention.dense.weight
    assert torch.equal(wa, b.transformer.layers[0].attention.dense.weight)
    assert 0.015 < wa.std().item() < 0.025


def test_skip_patterns_plan_and_lm_head_flag(fp_models):
    fp_model, state, inputs, _ = fp_models["llama"]
    args = sat_args("llama", skip_init=True, quant=4, quant_skip=["*.attention.dense"],
                    quant_lm_head=True)
    config = sat_quant.validate_quant_args(args)
    config.plan = {"*.mlp.dense_4h_to_h": "int8", "transformer.layers.1.*": "fp"}
    model = sat_quant.sat.build.build_quantized(args, SAT_MODELS["llama"][0], config).eval()
    model.load_state_dict(state, strict=False)
    kinds = {n: (m.fmt.name if isinstance(m, QuantLinear) else "fp") for n, m in model.named_modules() if
             isinstance(m, QuantLinear) or is_target(m)}
    assert kinds["transformer.layers.0.attention.dense"] == "fp"
    assert kinds["transformer.layers.0.mlp.dense_4h_to_h"] == "int8"
    assert kinds["transformer.layers.0.attention.query_key_value"] == "int4"
    assert kinds["transformer.layers.1.attention.query_key_value"] == "fp"
    assert kinds["mixins.lm.lm_head"] == "int4"
    assert torch.isfinite(run_logits(model, inputs)).all()


def test_skip_pattern_matching_nothing_warns():
    args = sat_args("gpt2", quant=4, quant_skip=["*.no_such_layer"])
    with pytest.warns(UserWarning, match="no_such_layer.*matches no linear layer"):
        sat_quant.get_model(args, SAT_MODELS["gpt2"][0])


def test_group_size_not_dividing_a_layer_is_zero_padded(fp_models):
    args = sat_args("gpt2", quant=4, quant_group_size=96)  # 256 and 1024 are not multiples of 96: padded to 288, 1056
    model = sat_quant.get_model(args, SAT_MODELS["gpt2"][0])
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.spec.padding for m in layers)
    assert torch.isfinite(run_logits(model.eval(), fp_models["gpt2"][2])).all()


def test_quantize_an_already_built_model_in_place(fp_models):
    fp_model, _, inputs, ref = fp_models["bert"]
    model = copy.deepcopy(fp_model)
    report = sat_quant.quantize_(model, QuantConfig(bits=8))
    heads = [n for n in target_names(fp_model) if ".lm_head." in n]
    assert report.rows["int8"].layers == len(target_names(fp_model)) - len(heads) and len(heads) == 2
    assert rel(run_logits(model, inputs), ref) < MAX_REL_LOGIT_ERROR["int8"]
    assert report.bytes_after < 0.5 * quant_report(fp_model).bytes_before


# -- the real CogVLMModel ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cogvlm_fp():
    model, args = build_tiny_cogvlm()
    inputs = tiny_cogvlm_inputs()
    return model, {k: v.clone() for k, v in model.state_dict().items()}, inputs, run_logits(model, inputs)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_cogvlm_quantized_at_build(cogvlm_fp, fmt):
    fp_model, state, inputs, ref = cogvlm_fp
    args = tiny_cogvlm_args(skip_init=True, quant=BITS[fmt], quant_format=fmt)
    model = sat_quant.get_model(args, _cogvlm_model_class()).eval()
    result = model.load_state_dict(state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    logits = run_logits(model, inputs)
    assert rel(logits, ref) < COGVLM_MAX_REL_LOGIT_ERROR[fmt]
    assert rel(logits, run_logits(dequantized_twin(fp_model, model), inputs)) < MAX_REL_MACHINERY_ERROR

    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    targets = set(target_names(fp_model))
    assert quantized == {n for n in targets if not n.endswith("lm_head")}
    # the parts SAT's own quantize() never reaches are quantized here
    assert any(".vit_model." in n for n in quantized), "EVA2-CLIP tower (nested SAT model)"
    assert any(n.startswith("mixins.eva.linear_proj") for n in quantized), "GLU adapter (plain nn.Linear)"
    assert any("vision_dense_h_to_4h_list" in n for n in quantized), "visual expert MLP (mixin)"
    assert any("vision_query_key_value_list" in n for n in quantized), "visual expert attention (mixin)"
    assert model.quant_report.rows[fmt].layers == len(quantized)


@pytest.mark.parametrize("dtype,flag", [(torch.bfloat16, "bf16"), (torch.float16, "fp16")])
def test_report_prices_full_precision_rows_in_the_dtype_the_model_holds(dtype, flag):
    """Under --bf16 / --fp16 every remaining parameter is 16-bit once SAT's cast has run: 16 bits/param, and the
    quantized rows' 'before' is priced at 2 bytes/param too (not the fp32 some parts are built in)."""
    from sat.model.official.gpt2_model import GPT2Model
    args = sat_args("gpt2", quant=4, **{flag: True})
    model = sat_quant.get_model(args, GPT2Model)
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {dtype}
    rest = model.quant_report.rows["full precision"]
    assert rest.bytes_after == 2 * rest.params
    row = model.quant_report.rows["int4"]
    assert row.bytes_before == 2 * row.params
