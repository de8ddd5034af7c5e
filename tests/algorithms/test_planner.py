"""The --quant-budget planner (sat_quant.algorithms.planner) on real SAT models: budgets, knapsack, plans that save/reload."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

import sat_quant
from sat_quant import QuantConfig, QuantConfigError, QuantLinear
from sat_quant.algorithms.planner import (
    Budget,
    LayerCosts,
    Option,
    parse_budget,
    plan_quantization,
    quantize_to_budget_,
    solve,
)
from tests.conftest import SAT_MODELS, build_fp, model_inputs, run_logits, sat_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _quantized_bits(model) -> float:
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    return 8.0 * sum(m.quantized_nbytes() for m in layers) / sum(m.in_features * m.out_features for m in layers)


def _formats(model):
    return {n: (f"{m.fmt.name}:{m.spec.group_size}" if m.spec.group_size else m.fmt.name)
            for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


# -- budgets ----------------------------------------------------------------------------------------

def test_budget_forms():
    assert parse_budget("5bpp") == Budget(bits_per_param=5.0, text="5bpp")
    assert parse_budget(" 4.25 BPP ").bits_per_param == 4.25
    assert parse_budget("500MB").total_bytes == 500 * 10**6
    assert parse_budget("10gb").total_bytes == 10 * 10**9
    assert parse_budget("9.5GiB").total_bytes == int(9.5 * 2**30)


@pytest.mark.parametrize("text, match", [("five", "not understood"), ("500", "not understood"),
                                         ("3 parsecs", "unknown unit"), ("0.5bpp", "between 1 and 32")])
def test_bad_budgets_are_clear_errors(text, match):
    with pytest.raises(QuantConfigError, match=match):
        parse_budget(text)


def test_quant_budget_flag_is_validated():
    args = sat_args("gpt2", quant=4, quant_budget="lots")
    with pytest.raises(QuantConfigError, match="--quant-budget 'lots'.*5.0bpp"):
        sat_quant.validate_quant_args(args)
    # a build has no fp weights to plan from: the flag is refused there with the commands that plan first
    with pytest.raises(QuantConfigError, match="needs the full-precision weights.*sat-quant plan.*--quant-plan"):
        sat_quant.validate_quant_args(sat_args("gpt2", quant=4, quant_budget="5bpp"))


# -- the knapsack -----------------------------------------------------------------------------------

def _random_layers(seed: int):
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(6):
        params = int(torch.randint(1, 5, (1,), generator=gen)) * 1000
        base_error = float(torch.rand(1, generator=gen)) * 10
        options = [Option("int4", params // 2, base_error), Option("int4c", params * 53 // 100, base_error * 0.6),
                   Option("int8", params, base_error * 0.05)]
        layers.append(LayerCosts(f"l{i}", params, options))
    return layers


@pytest.mark.parametrize("seed", range(5))
def test_greedy_fits_and_is_near_the_exact_optimum(seed):
    layers = _random_layers(seed)
    cheapest = sum(l.options[0].nbytes for l in layers)
    budget = cheapest + (sum(l.options[2].nbytes for l in layers) - cheapest) // 3
    assert solve(layers, budget)
    spent = sum(l.choice.nbytes for l in layers)
    greedy = sum(l.choice.error for l in layers)
    best = min(sum(o.error for o in combo) for combo in itertools.product(*[l.options for l in layers])
               if sum(o.nbytes for o in combo) <= budget)
    assert spent <= budget
    # greedy by error-per-byte is exact on convex costs and close otherwise; measured worst ratio 1.0-1.3 here
    assert greedy <= 1.5 * best + 1e-9
    # more budget never hurts, and a budget below the cheapest plan is reported as such
    assert solve(layers, budget * 2) and sum(l.choice.error for l in layers) <= greedy
    assert not solve(layers, cheapest - 1)


# -- on real SAT models -----------------------------------------------------------------------------

@pytest.fixture()
def gpt2():
    model, args = build_fp("gpt2")
    inputs = model_inputs("gpt2", seq=16, batch=2)
    return model, args, inputs


def test_budget_below_the_cheapest_plan_names_the_minimum(gpt2):
    model, _, _ = gpt2
    with pytest.raises(QuantConfigError, match=r"too small.*ask for at least (4\.\d\d)bpp") as info:
        plan_quantization(model, "3.5bpp")
    minimum = info.value.args[0].split("ask for at least ")[1].split("bpp")[0]
    plan = plan_quantization(model, f"{minimum}bpp")  # the stated minimum is enough
    assert plan.bits_per_param <= float(minimum)


def test_planner_needs_real_weights():
    from sat_quant.engine.replace import linear_weights_on_meta
    cls, _ = SAT_MODELS["gpt2"]
    with linear_weights_on_meta():
        model = cls(sat_args("gpt2"))
    with pytest.raises(QuantConfigError, match="needs the full-precision weights"):
        plan_quantization(model, "5bpp")


def test_calibrated_plan_fits_and_beats_uniform_4bit(gpt2):
    model, _, inputs = gpt2
    ref = run_logits(model, inputs)
    run = lambda m: run_logits(m, inputs)  # noqa: E731
    uniform, _ = build_fp("gpt2")
    sat_quant.algorithms.calibration.quantize_calibrated_(uniform, QuantConfig(bits=4, format="int4c", group_size=64), run)
    plan = quantize_to_budget_(model, "5.0bpp", run=run)
    assert plan.sensitivity == "output" and plan.bits_per_param <= 5.0
    assert _quantized_bits(model) <= 5.0 and _formats(model) == plan.plan
    assert set(plan.plan.values()) >= {"int8"}  # the spare bits went somewhere
    # measured: uniform int4c 0.028 relative logit error, the 5-bit plan 0.024 (random weights are equally
    # sensitive everywhere, so the gain is small here; MiniLM's is in tests/algorithms/test_quality.py)
    assert _rel(run_logits(model, inputs), ref) < 0.95 * _rel(run_logits(uniform, inputs), ref)


def test_layer_sensitivity_needs_one_pass_and_still_beats_uniform(gpt2):
    model, _, inputs = gpt2
    ref = run_logits(model, inputs)
    calls = []

    def run(m):
        calls.append(1)
        return run_logits(m, inputs)

    uniform, _ = build_fp("gpt2")
    sat_quant.algorithms.calibration.quantize_calibrated_(uniform, QuantConfig(bits=4, format="int4c", group_size=64), run)
    calls.clear()
    plan = plan_quantization(model, "5.0bpp", run=run, sensitivity="layer")
    assert len(calls) == 2  # the reference output and one pass collecting every Hessian, not one per layer
    assert plan.sensitivity == "layer" and plan.bits_per_param <= 5.0
    quantize_to_budget_(model, "5.0bpp", run=run, sensitivity="layer")
    assert _formats(model) == plan.plan
    # measured: 0.025 relative logit error against uniform int4c's 0.028
    assert _rel(run_logits(model, inputs), ref) < 0.95 * _rel(run_logits(uniform, inputs), ref)
    with pytest.raises(QuantConfigError, match="sensitivity must be"):
        plan_quantization(model, "5.0bpp", run=run, sensitivity="global")


def test_size_budget_bounds_the_whole_model(gpt2):
    model, _, _ = gpt2
    fp_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    budget = int(fp_bytes * 0.6)
    plan = quantize_to_budget_(model, f"{budget}B")
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())  # packed tensors included
    assert plan.total_bytes <= budget and held <= budget
    assert held == plan.total_bytes


def test_plan_saves_and_reloads_bitwise(gpt2, tmp_path):
    model, args, inputs = gpt2
    plan = quantize_to_budget_(model, "5.5bpp")
    assert len(set(plan.plan.values())) >= 2, "a mixed plan, or this test proves little"
    sat_quant.save_checkpoint(model, str(tmp_path), args=args)
    loaded, _ = sat_quant.from_pretrained(SAT_MODELS["gpt2"][0], str(tmp_path))
    assert _formats(loaded) == plan.plan
    for name, layer in loaded.named_modules():
        if isinstance(layer, QuantLinear):
            mine = model.get_submodule(name).neutral_tensors()
            assert all(torch.equal(mine[k], v) for k, v in layer.neutral_tensors().items()), name
    assert torch.equal(run_logits(loaded.eval(), inputs), run_logits(model, inputs))


def test_plan_file_works_as_quant_plan(gpt2, tmp_path):
    model, _, _ = gpt2
    plan = plan_quantization(model, "5.5bpp")
    path = tmp_path / "plan.json"
    plan.save(str(path))
    assert json.loads(path.read_text()) == plan.plan
    args = sat_args("gpt2", quant=4, quant_plan=str(path), skip_init=True)
    built = sat_quant.get_model(args, SAT_MODELS["gpt2"][0])
    built.load_state_dict(model.state_dict(), strict=False)
    assert _formats(built) == plan.plan


def test_cli_plan_and_convert_with_a_budget(gpt2, tmp_path):
    from sat.training.model_io import save_checkpoint as sat_save_checkpoint

    from sat_quant.tools.cli import main
    model, args, inputs = gpt2
    args.save, args.mode = str(tmp_path / "fp"), "inference"
    sat_save_checkpoint(1, model, None, None, args)
    out = tmp_path / "plan.json"
    assert main(["plan", str(tmp_path / "fp"), "--quant-budget", "5.5bpp", "-o", str(out)]) == 0
    offline = json.loads(out.read_text())
    assert offline == plan_quantization(model, "5.5bpp").plan  # streamed from the checkpoint = in memory
    assert main(["convert", str(tmp_path / "fp"), str(tmp_path / "q"), "--quant-budget", "5.5bpp", "--quiet"]) == 0
    block = json.loads((tmp_path / "q" / "model_config.json").read_text())["quantization"]
    converted = {n: (f"{l['format']}:{l['group_size']}" if l["group_size"] else l["format"])
                 for n, l in block["layers"].items()}
    assert converted == offline
    assert main(["plan", str(tmp_path / "fp"), "--quant-budget", "2bpp", "-o", str(out)]) == 2  # clear error


def test_cogvlm_plans_offline_like_in_memory(tmp_path):
    """The tiny real CogVLM: `sat-quant plan`'s streamed plan equals the in-memory one and covers every part
    (EVA tower, GLU adapter, visual expert, language layers); the plan then converts and loads."""
    from sat.training.model_io import save_checkpoint as sat_save_checkpoint

    from sat_quant.tools.plan import plan_checkpoint
    from tests.cogvlm_fixture import build_tiny_cogvlm, tiny_cogvlm_args
    fp_model, fp_args = build_tiny_cogvlm()
    fp_args.save, fp_args.mode = str(tmp_path / "fp"), "inference"
    sat_save_checkpoint(1, fp_model, None, None, fp_args)
    offline = plan_checkpoint(str(tmp_path / "fp"), "5.0bpp")
    assert offline.plan == plan_quantization(fp_model, "5.0bpp").plan
    assert offline.bits_per_param <= 5.0
    names = list(offline.plan)
    for part in ("mixins.eva.vit_model.", "mixins.eva.linear_proj.", "mixins.mlp.vision_", "mixins.rotary.vision_",
                 "transformer.layers.0.mlp"):
        assert any(part in n for n in names), part
    sat_quant.convert(str(tmp_path / "fp"), str(tmp_path / "q"), offline.to_config(), progress=False)
    loaded, _ = sat_quant.from_pretrained(None, str(tmp_path / "q"), args=tiny_cogvlm_args())
    assert _formats(loaded) == offline.plan


def test_the_cli_default_candidates_are_the_planners():
    """`sat-quant plan`'s parser stays torch-free, so it spells the default out: it must be the planner's."""
    from sat_quant.algorithms.planner import DEFAULT_CANDIDATES
    from sat_quant.tools.cli import build_parser
    ns = build_parser().parse_args(["plan", "src", "--quant-budget", "5bpp", "-o", "plan.json"])
    assert tuple(ns.candidates) == DEFAULT_CANDIDATES and "int4cs:32" in DEFAULT_CANDIDATES
