"""Fixtures of the checkpoint tests: a quantized tiny GPT-2 and a fresh checkpoint of it."""
import pytest
from sat.model.official.gpt2_model import GPT2Model

import sat_quant
from tests.conftest import run_logits, sat_args


@pytest.fixture(scope="module")
def q4(fp_models):
    """The tiny GPT-2, int4 at build, filled from the fp32 weights; its inputs and logits."""
    _, state, inputs, _ = fp_models["gpt2"]
    args = sat_args("gpt2", skip_init=True, quant=4)
    model = sat_quant.get_model(args, GPT2Model).eval()
    model.load_state_dict(state, strict=False)
    return model, args, inputs, run_logits(model, inputs)


@pytest.fixture
def ckpt(q4, tmp_path):
    """A good checkpoint (iteration 1) of q4, freshly saved."""
    model, args, _, _ = q4
    d = str(tmp_path / "ckpt")
    sat_quant.save_checkpoint(model, d, args=args)
    return d
