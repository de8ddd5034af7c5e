"""LoRA on a 4-bit base (QLoRA): trains, leaves the base bitwise unchanged, merges and reloads."""
import copy

import pytest
import torch

import sat_quant
from sat_quant import QuantConfig, QuantLinear
from sat_quant.engine.lora import LoraQuantLinear, add_lora_, merge_lora_
from sat_quant.sat.build import build_quantized
from tests.conftest import SAT_MODELS, run_logits, sat_args


def quantized_llama(fp_models, **config):
    _, state, inputs, _ = fp_models["llama"]
    model = build_quantized(sat_args("llama", skip_init=True), SAT_MODELS["llama"][0], QuantConfig(bits=4, **config))
    model.load_state_dict(state, strict=False)
    return model, inputs


def lm_loss(model, inputs):
    logits = model(**inputs)[0]
    targets = inputs["input_ids"][:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


@pytest.fixture(scope="module")
def trained(fp_models):
    torch.manual_seed(0)
    model, inputs = quantized_llama(fp_models)
    model.eval()  # no dropout: a fixed batch must give a deterministic loss
    base_before = {n: {k: v.clone() for k, v in m.neutral_tensors().items()}
                   for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    wrapped = add_lora_(model, rank=8, alpha=16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=2e-3)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = lm_loss(model, inputs)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model, inputs, base_before, wrapped, losses


def test_loss_decreases_and_only_adapters_train(trained):
    model, _, _, wrapped, losses = trained
    assert len(wrapped) == 8 and losses[-1] < 0.8 * losses[0], losses
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(("lora_A", "lora_B")) for n in names)
    # gradients crossed the quantized matmuls: the first layer's adapters learned too
    first = model.transformer.layers[0].attention.query_key_value
    assert isinstance(first, LoraQuantLinear) and first.lora_B.abs().sum() > 0


def test_base_weights_are_bitwise_unchanged(trained):
    model, _, base_before, _, _ = trained
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            key = name[: -len(".base")] if name.endswith(".base") else name
            after = module.neutral_tensors()
            assert all(torch.equal(after[k], v) for k, v in base_before[key].items()), name


def test_merge_full_precision_equals_the_adapted_model(trained):
    import copy
    model, inputs, _, _, _ = trained
    adapted = run_logits(model, inputs)
    merged = copy.deepcopy(model)
    assert merge_lora_(merged, requantize=False) == 8
    # the merged weights are exact; only the adapted model's kernels round activations to bf16
    assert ((run_logits(merged, inputs) - adapted).norm() / adapted.norm()).item() < 0.02


def test_merge_requantized_saves_and_reloads(trained, tmp_path):
    import copy
    model, inputs, _, _, _ = trained
    adapted = run_logits(model, inputs)
    base_only = copy.deepcopy(model)
    for m in base_only.modules():
        if isinstance(m, LoraQuantLinear):
            torch.nn.init.zeros_(m.lora_B)
    merged = copy.deepcopy(model)
    merge_lora_(merged)
    assert not any(isinstance(m, LoraQuantLinear) for m in merged.modules())
    merged_logits = run_logits(merged, inputs)
    gap = lambda a: ((a - adapted).norm() / adapted.norm()).item()
    assert gap(merged_logits) < 0.5 * gap(run_logits(base_only, inputs)), "the merge carries the adaptation"
    sat_quant.save_checkpoint(merged, str(tmp_path), args=sat_args("llama"))
    reloaded, _ = sat_quant.from_pretrained(SAT_MODELS["llama"][0], str(tmp_path))
    assert torch.equal(run_logits(reloaded.eval(), inputs), merged_logits)


def test_lora_trains_through_a_column_scaled_base_and_merges_exactly(fp_models):
    """int4cs (kernels compute (x * t) @ core^T): gradients reach the adapters through the scaled matmul, the base is
    unchanged, and a full-precision merge equals the adapted model (its dequantized weight includes t)."""
    torch.manual_seed(0)
    model, inputs = quantized_llama(fp_models, format="int4cs")
    model.eval()
    base = {n: m.neutral_tensors() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    add_lora_(model, rank=4, alpha=8)
    for m in model.modules():
        if isinstance(m, LoraQuantLinear):
            torch.nn.init.normal_(m.lora_B, std=0.02)
    loss = lm_loss(model, inputs)
    loss.backward()
    grads = [m.lora_A.grad for m in model.modules() if isinstance(m, LoraQuantLinear)]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and name.endswith(".base"):
            after = module.neutral_tensors()
            assert all(torch.equal(after[k], v) for k, v in base[name[: -len(".base")]].items()), name
    with torch.no_grad():
        adapted = run_logits(model, inputs)
        merged = copy.deepcopy(model)
        merge_lora_(merged, requantize=False)
        assert ((run_logits(merged, inputs) - adapted).norm() / adapted.norm()).item() < 0.02


def test_lora_on_a_layer_kept_full_precision_is_refused(fp_models):
    model, _ = quantized_llama(fp_models, skip=("*.attention.dense",))
    with pytest.raises(sat_quant.QuantConfigError, match="keeps in full precision.*attention.dense"):
        add_lora_(model, targets=("*.attention.dense",))


# -- QuantLoraMixin: the SAT-mixin form -----------------------------------------------------------------

from sat_quant import QuantLoraMixin  # noqa: E402


def test_mixin_wraps_only_the_layer_range_and_round_trips_through_sat_quant_checkpoints(fp_models, tmp_path):
    model, inputs = quantized_llama(fp_models)
    args = sat_args("llama", lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, layer_range=[1],
                    lora_targets=["attention.query_key_value", "mlp.dense_4h_to_h"])
    mixin = QuantLoraMixin.from_args(args)
    model.add_mixin("lora", mixin, reinit=True)
    assert mixin.wrapped == ["transformer.layers.1.attention.query_key_value", "transformer.layers.1.mlp.dense_4h_to_h"]
    assert args.quant_lora == dict(rank=4, alpha=8.0, dropout=0.0, layer_range=[1],
                                   targets=["attention.query_key_value", "mlp.dense_4h_to_h"])
    assert isinstance(model.transformer.layers[0].attention.query_key_value, QuantLinear)
    for m in model.modules():
        if isinstance(m, LoraQuantLinear):
            torch.nn.init.normal_(m.lora_B, std=0.05)
    sd = model.state_dict()
    key = "transformer.layers.1.attention.query_key_value."
    assert {key + n for n in ("base.qweight", "base.scale", "base.zero", "lora_A", "lora_B")} <= set(sd)
    expected = run_logits(model.eval(), inputs)
    sat_quant.save_checkpoint(model, str(tmp_path), args=args)
    reloaded, rargs = sat_quant.from_pretrained(None, str(tmp_path))
    assert rargs.quant_lora == args.quant_lora and reloaded.mixins["lora"].wrapped == mixin.wrapped
    assert torch.equal(run_logits(reloaded.eval(), inputs), expected)
    # SAT's own load_state_dict of an adapter-less quantized state dict into a wrapped model: base names remap
    plain, _ = quantized_llama(fp_models)
    wrapped = copy.deepcopy(plain)
    wrapped.add_mixin("lora", QuantLoraMixin(rank=4, layer_range=[1]), reinit=True)
    missing, unexpected = wrapped.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.endswith(("lora_A", "lora_B")) for k in missing)
    assert torch.equal(run_logits(wrapped.eval(), inputs), run_logits(plain.eval(), inputs))


def test_mixin_refuses_bad_layers_clearly(fp_models):
    model, _ = quantized_llama(fp_models, skip=("*.attention.dense",))
    with pytest.raises(sat_quant.QuantConfigError, match="keeps in full precision.*layers.0.attention.dense"):
        model.add_mixin("lora", QuantLoraMixin(rank=4, layer_range=[0]), reinit=True)
    model, _ = quantized_llama(fp_models)
    with pytest.raises(sat_quant.QuantConfigError, match=r"--layer_range \[5\] is outside the model's 2 layers"):
        model.add_mixin("lora", QuantLoraMixin(rank=4, layer_range=[5]), reinit=True)


def test_cogvlm_qlora_flow_adapts_language_layers_only(tmp_path):
    """The finetune script's --use_qlora flow on the real (tiny) FineTuneTrainCogVLMModel: quantized build,
    then QuantLoraMixin.from_args with --lora_rank/--layer_range; the EVA tower is left alone."""
    from tests.cogvlm_fixture import cogvlm_model_class, tiny_cogvlm_args, tiny_cogvlm_inputs
    cogvlm_model_class()  # puts the snapshot on sys.path
    from utils.models import FineTuneTrainCogVLMModel
    args = tiny_cogvlm_args(quant=4, quant_group_size=64)
    args.lora_rank, args.layer_range, args.use_qlora = 4, [1], True  # the script's own flags
    model = sat_quant.get_model(args, FineTuneTrainCogVLMModel)
    model.add_mixin("lora", QuantLoraMixin.from_args(args), reinit=True)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoraQuantLinear)]
    assert wrapped == ["transformer.layers.1.attention.query_key_value", "transformer.layers.1.attention.dense"]
    inputs = tiny_cogvlm_inputs(seq_len=262)
    logits = model(**inputs)[0]
    logits[0, -1].float().logsumexp(-1).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == {f"{w}.{m}" for w in wrapped for m in ("lora_A", "lora_B")}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.endswith("lora_B"))
