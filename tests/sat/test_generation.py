"""last_position_logits: the same generated tokens as SAT's own path, with the LM head run on one position."""
from __future__ import annotations

import pytest
import torch

from sat_quant.sat.generation import last_position_logits
from tests.cogvlm_fixture import cogvlm_available, greedy_generate, tiny_cogvlm_inputs

pytestmark = pytest.mark.skipif(not cogvlm_available(), reason="needs the CogVLM snapshot (../shared/cogvlm)")


@pytest.fixture(scope="module")
def int4_cogvlm():
    import sat_quant
    from sat_quant.sat.compat import install_xformers_cpu_fallback
    from tests.cogvlm_fixture import cogvlm_model_class, init_skipped_weights, tiny_cogvlm_args
    args = tiny_cogvlm_args(quant=4, quant_group_size=64)
    model = sat_quant.get_model(args, cogvlm_model_class()).eval()
    init_skipped_weights(model)
    install_xformers_cpu_fallback()
    return model


def test_generation_is_unchanged_and_the_head_sees_one_position(int4_cogvlm):
    head = int4_cogvlm.mixins["lm"].lm_head
    widths = []
    handle = head.register_forward_hook(lambda mod, args, out: widths.append(args[0].shape[1]))
    try:
        reference = greedy_generate(int4_cogvlm)
        assert max(widths) == 270  # SAT's own path: the head over the whole prompt
        widths.clear()
        lean = greedy_generate(int4_cogvlm, lean=True)
    finally:
        handle.remove()
    assert torch.equal(lean, reference)
    assert max(widths) == 1


def test_mixin_is_removed_after_the_block(int4_cogvlm):
    before = list(int4_cogvlm.mixins)
    with last_position_logits(int4_cogvlm):
        assert len(int4_cogvlm.mixins) == len(before) + 1
    assert list(int4_cogvlm.mixins) == before
    with torch.no_grad():
        full = int4_cogvlm(**tiny_cogvlm_inputs())[0]
    assert full.shape[1] == 266  # a plain forward (e.g. a loss) still gets every position
