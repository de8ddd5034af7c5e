"""A fault corpus over every file of a sat_quant checkpoint: one byte flipped at many offsets, the file cut at many
lengths. Each damaged checkpoint is either refused with sat_quant's own error (naming the file) or loads bitwise
identical to the original; never a raw Python error, never a silently different model."""
import os
import shutil

import pytest
import torch
from sat.model.official.gpt2_model import GPT2Model

import sat_quant
from sat_quant import QuantError
from tests.conftest import run_logits, sat_args
from tests.io.checkpoints import STATES

FILES = ["1/" + STATES + ".safetensors", "1/" + STATES + ".manifest.json", "1/" + STATES + ".pt",
         "model_config.json", "latest"]
FRACTIONS = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


@pytest.fixture(scope="module")
def pristine(fp_models, tmp_path_factory):
    _, state, inputs, _ = fp_models["gpt2"]
    args = sat_args("gpt2", skip_init=True, quant=4)
    model = sat_quant.get_model(args, GPT2Model).eval()
    model.load_state_dict(state, strict=False)
    path = str(tmp_path_factory.mktemp("corpus") / "ckpt")
    sat_quant.save_checkpoint(model, path, args=args)
    return path, inputs, run_logits(model, inputs)


def damaged_copy(pristine, tmp_path, relative, damage):
    path, _, _ = pristine
    copy = str(tmp_path / "ckpt")
    shutil.copytree(path, copy)
    target = os.path.join(copy, relative)
    with open(target, "rb") as f:
        data = bytearray(f.read())
    with open(target, "wb") as f:
        f.write(damage(data))
    return copy


def refused_or_identical(copy, inputs, ref):
    try:
        model, _ = sat_quant.from_pretrained(GPT2Model, copy)
    except QuantError as exc:
        return "refused", str(exc)
    logits = run_logits(model.eval(), inputs)
    assert torch.equal(logits, ref), "loaded a different model without a word"
    return "identical", ""


@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("relative", FILES)
def test_one_flipped_byte_is_refused_or_harmless(pristine, tmp_path, relative, fraction):
    _, inputs, ref = pristine

    def flip(data):
        at = min(len(data) - 1, int(fraction * len(data)))
        data[at] ^= 0xFF
        return bytes(data)
    outcome, message = refused_or_identical(damaged_copy(pristine, tmp_path, relative, flip), inputs, ref)
    if relative.endswith((".safetensors", ".manifest.json")):
        assert outcome == "refused", "a damaged tensor file or manifest must never load"
    if outcome == "refused":
        assert os.path.basename(relative) in message or "model_config" in message, message


@pytest.mark.parametrize("fraction", FRACTIONS[:-1])
@pytest.mark.parametrize("relative", FILES)
def test_a_truncated_file_is_refused_or_harmless(pristine, tmp_path, relative, fraction):
    _, inputs, ref = pristine
    outcome, message = refused_or_identical(
        damaged_copy(pristine, tmp_path, relative, lambda data: bytes(data[:int(fraction * len(data))])), inputs, ref)
    if relative.endswith((".safetensors", ".manifest.json")):
        assert outcome == "refused"
    if outcome == "refused":
        assert os.path.basename(relative) in message or "model_config" in message, message
