"""Run CogVLM's patched scripts on the tiny CogAgent: ``python -m tests.cogagent_scripts SCRIPT ARGS...``.

SCRIPT is a file of a patched checkout (``basic_demo/cli_demo_sat.py``, ...); this project is on ``PYTHONPATH``. Importing this
module does, in the script's own process, only what the tiny size needs and a real user does not:

- it registers ``TinyCogAgentModel`` (``sat_quant.testing.cogvlm_assets``) in SAT's registry, so a checkpoint that
  records it loads by ``model_class`` (a real CogAgent checkpoint records ``CogAgentModel``, which the scripts'
  own ``from utils.models import ...`` registers);
- it gives every CogAgent class of the checkout the tiny one-block cross tower (upstream hard-codes 24 EVA2-CLIP-L
  blocks), so ``FineTuneTrainCogAgentModel`` as named by ``finetune_cogagent_demo.py`` builds at the tiny size.

With ``$TINY_COGAGENT_PROBE`` set to a file, every prompt forward (more than one token) of a CogAgent records the
``cross_image`` it was given and the last position's logits there (``torch.save`` of a list); with
``$TINY_COGAGENT_FLIP_CROSS=N`` the N-th prompt forward (1-based) gets its cross image mirrored left to right
(nothing else changes), so a test can tell whether the cross image reaches the answer.

``--import tests.cogagent_scripts`` does the same for ``sat-quant`` commands (PYTHONPATH=checkout:project).
"""
from __future__ import annotations

import copy
import os
import runpy
import sys

if __name__ == "__main__" and len(sys.argv) > 1:  # SCRIPT is CHECKOUT/<folder>/<script>.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(sys.argv[1]))))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from utils.models import cogagent_model, eva_clip_L_hf  # noqa: E402  (the patched checkout's own modules)

from sat_quant.testing.cogvlm_assets import _EVA2_L_CONFIG, TINY_CROSS_LAYERS, tiny_cogagent_class  # noqa: E402

CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(cogagent_model.__file__))))
TinyCogAgentModel = tiny_cogagent_class(CHECKOUT)


class TinyEva2LargeEncoder(eva_clip_L_hf.Eva2LargeEncoder):
    """Upstream's EVA2-CLIP-L cross tower with ``TINY_CROSS_LAYERS`` blocks (the same as TinyCogAgentModel's)."""

    def __init__(self, image_size: int = 224) -> None:
        nn.Module.__init__(self)
        config = copy.deepcopy(_EVA2_L_CONFIG)
        config["vision_cfg"].update(image_size=image_size, layers=TINY_CROSS_LAYERS)
        self.config = config
        self.model = eva_clip_L_hf._build_vision_tower(**self.config)


cogagent_model.Eva2LargeEncoder = TinyEva2LargeEncoder

_forward = cogagent_model.CogAgentModel.forward
_prompts = []


def _probed_forward(self, input_ids, vision_expert_mask, image_embed_mask, **kwargs):
    probe = os.environ.get("TINY_COGAGENT_PROBE")
    if not probe or input_ids.shape[1] == 1:
        return _forward(self, input_ids, vision_expert_mask, image_embed_mask, **kwargs)
    if len(_prompts) + 1 == int(os.environ.get("TINY_COGAGENT_FLIP_CROSS", 0) or 0):
        kwargs["cross_image"] = torch.flip(kwargs["cross_image"], dims=[-1])
    out = _forward(self, input_ids, vision_expert_mask, image_embed_mask, **kwargs)
    _prompts.append({"cross_image": kwargs["cross_image"].detach().cpu(),
                     "logits": out[0][0, -1].detach().float().cpu()})
    torch.save(_prompts, probe)
    return out


cogagent_model.CogAgentModel.forward = _probed_forward

if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python SCRIPT` would
    runpy.run_path(script, run_name="__main__")
