"""SAT's own loaders on sat_quant checkpoints (sat_quant/sat/native.py): after ``import sat_quant``,
``AutoModel.from_pretrained``, ``Cls.from_pretrained`` and ``load_checkpoint`` (``--load``) give the same model as
``sat_quant.from_pretrained``; without it, SAT stops with one sentence naming the fix."""
import json
import os
import subprocess
import sys

import pytest
import torch
from sat.model.base_model import AutoModel
from sat.training.model_io import load_checkpoint

import sat_quant
from sat_quant.engine.config import QuantConfig
from sat_quant.engine.layers import QuantLinear
from sat_quant.io.save import saved_tensors
from sat_quant.io.tensorfile import STUB_MESSAGE
from sat_quant.sat import native
from tests.cogvlm_fixture import cogvlm_model_class, tiny_cogvlm_args, tiny_cogvlm_inputs
from tests.conftest import SAT_MODELS, build_fp, model_inputs, run_logits, sat_args, save_fp_with_sat

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name → (sat_quant checkpoint folder, sat_quant.from_pretrained's logits on model_inputs(name))."""
    out = {}
    for name, config in (("gpt2", QuantConfig(bits=4)), ("llama", QuantConfig(bits=4, format="nf4"))):
        folder = tmp_path_factory.mktemp(name)
        model, args = build_fp(name)
        fp = save_fp_with_sat(model, args, folder / "fp")
        sat_quant.convert(fp, str(folder / "q"), config)
        ref, _ = sat_quant.from_pretrained(None, str(folder / "q"))
        out[name] = (str(folder / "q"), run_logits(ref.eval(), model_inputs(name)), _layers(ref))
    return out


def _layers(model):
    return {n: (m.fmt.name, m.spec.group_size) for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_loaders_are_wrapped_after_import_sat_quant():
    assert native.installed()
    assert AutoModel.from_pretrained.__func__ is native._from_pretrained
    assert load_checkpoint is native._load_checkpoint  # the name SAT's own modules call
    import sat.model.base_model as base_model
    import sat.training.deepspeed_training as deepspeed_training
    assert base_model.load_checkpoint is deepspeed_training.load_checkpoint is native._load_checkpoint


def test_the_wrapped_signatures_are_checked():
    assert not native._signature_matches(lambda model, args: 0, "load_checkpoint")
    assert native._signature_matches(native._ORIGINALS["load_checkpoint"], "load_checkpoint")


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_automodel_from_pretrained(checkpoints, name):
    path, expected, layers = checkpoints[name]
    model, args = AutoModel.from_pretrained(path)
    assert type(model) is SAT_MODELS[name][0]
    assert _layers(model) == layers and len(layers) == {"gpt2": 8, "llama": 10}[name]  # 2 blocks, gate_proj
    assert torch.equal(run_logits(model.eval(), model_inputs(name)), expected)
    assert args.quantization["layers"].keys() == layers.keys()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_class_from_pretrained_with_args(checkpoints, name):
    path, expected, layers = checkpoints[name]
    model, _ = SAT_MODELS[name][0].from_pretrained(path, sat_args(name))
    assert _layers(model) == layers
    assert torch.equal(run_logits(model.eval(), model_inputs(name)), expected)


def test_build_only_builds_the_quantized_layout_without_reading(checkpoints):
    path, _, layers = checkpoints["gpt2"]
    model, _ = AutoModel.from_pretrained(path, build_only=True)
    assert _layers(model) == layers
    packed = [t for m in model.modules() if isinstance(m, QuantLinear) for _, t in saved_tensors(m)]
    assert packed and all(not t.any() for t in packed)  # zeros: nothing was read


def test_load_checkpoint_quantizes_a_full_precision_model_in_place(checkpoints):
    """--load in training_main: SAT's get_model built the model in full precision; the same object is quantized to
    the checkpoint's formats and filled. In finetune mode SAT's contract returns iteration 0."""
    path, expected, layers = checkpoints["gpt2"]
    model, _ = build_fp("gpt2", seed=5)
    before = id(model)
    args = sat_args("gpt2", mode="finetune", load=path)
    assert load_checkpoint(model, args) == 0
    assert id(model) == before and _layers(model) == layers
    assert torch.equal(run_logits(model.eval(), model_inputs("gpt2")), expected)
    assert load_checkpoint(model, sat_args("gpt2", mode="inference"), load_path=path) == 1  # already quantized


def test_load_checkpoint_refuses_a_prefix(checkpoints):
    path, _, _ = checkpoints["gpt2"]
    model, _ = build_fp("gpt2")
    with pytest.raises(sat_quant.CheckpointError, match="prefix"):
        load_checkpoint(model, sat_args("gpt2"), load_path=path, prefix="transformer.")


def test_full_precision_checkpoints_still_take_sats_path(tmp_path):
    model, args = build_fp("gpt2")
    fp = save_fp_with_sat(model, args, tmp_path / "fp")
    loaded, _ = AutoModel.from_pretrained(fp)
    assert not _layers(loaded)
    assert torch.equal(run_logits(loaded.eval(), model_inputs("gpt2")), run_logits(model, model_inputs("gpt2")))


def test_full_precision_model_saved_by_sat_quant_loads_with_sat(tmp_path):
    """sat_quant.save_checkpoint of an unquantized model writes safetensors + manifest: SAT's loader reads it."""
    model, args = build_fp("gpt2")
    sat_quant.save_checkpoint(model, str(tmp_path / "fp"), args=args)
    assert not json.load(open(tmp_path / "fp" / "model_config.json")).get("quantization", {}).get("layers")
    for loaded in (AutoModel.from_pretrained(str(tmp_path / "fp"))[0],
                   sat_quant.from_pretrained(None, str(tmp_path / "fp"))[0]):
        assert torch.equal(run_logits(loaded.eval(), model_inputs("gpt2")), run_logits(model, model_inputs("gpt2")))


def test_cogvlm_through_automodel_and_its_class(tmp_path):
    """CogVLM's scripts call AutoModel.from_pretrained / FineTuneTrainCogVLMModel.from_pretrained: both read a
    sat_quant CogVLM checkpoint quantized (tower, adapter, visual expert and language layers alike)."""
    cls = cogvlm_model_class()
    args = tiny_cogvlm_args(quant=4, skip_init=False)
    torch.manual_seed(0)
    model = sat_quant.get_model(args, cls).eval()
    sat_quant.save_checkpoint(model, str(tmp_path / "q"), args=args)
    inputs = tiny_cogvlm_inputs()
    with torch.no_grad():
        expected = model(**inputs)[0]
    saved = json.load(open(tmp_path / "q" / "model_config.json"))
    assert saved["model_class"].startswith("CogVLMModel ") and "import sat_quant" in saved["model_class"]
    for loaded in (AutoModel.from_pretrained(str(tmp_path / "q"))[0],
                   cls.from_pretrained(str(tmp_path / "q"), tiny_cogvlm_args())[0]):
        assert type(loaded) is cls and _layers(loaded) == _layers(model)
        with torch.no_grad():
            assert torch.equal(loaded.eval()(**inputs)[0], expected)


def test_cogagent_through_automodel_and_its_class(tmp_path):
    """CogAgent, the CLI demo's default model (cross tower with a zero-padded ragged layer): SAT's own loaders read
    its sat_quant checkpoint quantized, same logits as the model that was saved."""
    from tests.cogagent_fixture import TinyCogAgentModel, tiny_cogagent_args, tiny_cogagent_inputs
    args = tiny_cogagent_args(quant=4, skip_init=False)
    torch.manual_seed(0)
    model = sat_quant.get_model(args, TinyCogAgentModel).eval()
    sat_quant.save_checkpoint(model, str(tmp_path / "q"), args=args)
    inputs = tiny_cogagent_inputs()
    expected = run_logits(model, inputs)
    for loaded in (AutoModel.from_pretrained(str(tmp_path / "q"))[0],
                   TinyCogAgentModel.from_pretrained(str(tmp_path / "q"), tiny_cogagent_args())[0]):
        assert type(loaded) is TinyCogAgentModel and _layers(loaded) == _layers(model)
        assert any(n.startswith("mixins.encoder.") for n in _layers(loaded))  # the cross tower too
        assert torch.equal(run_logits(loaded.eval(), inputs), expected)


def test_without_sat_quant_sat_stops_with_one_sentence(checkpoints):
    """A fresh interpreter that never imports sat_quant: AutoModel stops before building (model_class names the
    fix), Cls.from_pretrained at the stub (torch.load raises the sentence), never with SAT's missing-key list."""
    path, _, _ = checkpoints["gpt2"]
    arch = SAT_MODELS["gpt2"][1]
    code = f"""
import sys
from sat.model.base_model import AutoModel
from sat.model.official.gpt2_model import GPT2Model
assert 'sat_quant' not in sys.modules
for load in (lambda: AutoModel.from_pretrained({path!r}),
             lambda: GPT2Model.from_pretrained({path!r}, GPT2Model.get_args(device='cpu', **{arch!r}))):
    try:
        load()
    except Exception as exc:
        print('ERROR', type(exc).__name__, str(exc).replace(chr(10), ' | '))
"""
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), env=env, capture_output=True, text=True,
                            timeout=180)
    errors = [line for line in result.stdout.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 2, result.stdout[-2000:] + result.stderr[-2000:]
    auto, cls = errors
    assert auto.startswith("ERROR ValueError model_class GPT2Model (a sat_quant checkpoint:")
    assert "import sat_quant" in auto and " | " not in auto
    assert cls == f"ERROR RuntimeError Invalid device string: '{STUB_MESSAGE}'"
    assert "Missing keys" not in result.stdout + result.stderr
