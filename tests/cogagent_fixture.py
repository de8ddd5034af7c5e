"""A tiny but real CogAgent (THUDM's ``CogAgentModel`` from the shared upstream snapshot) on CPU.

The model is upstream's class with a one-block cross tower (``sat_quant.testing.cogvlm_assets.tiny_cogagent_class``
says why); importing this module defines it, so ``--import tests.cogagent_fixture`` lets a fresh process (the CLI,
torchrun workers) load checkpoints saved from it. Everything else is the tiny CogVLM of ``tests/cogvlm_fixture.py``
plus CogAgent's cross-attention in every layer. Use::

    from tests.cogagent_fixture import build_tiny_cogagent, tiny_cogagent_inputs
    model, args = build_tiny_cogagent()
    logits = model(**tiny_cogagent_inputs())[0]      # [1, seq, 1000]
"""
from __future__ import annotations

import argparse
from typing import Any, Tuple

import torch

from sat_quant.testing.cogvlm_assets import (
    TINY_COGAGENT_ARGS,
    TINY_COGAGENT_EVA_ARGS,
    TINY_CROSS_LAYERS,
    init_skipped_weights,
    tiny_cogagent_class,
    tiny_cross_inputs,
)
from sat_quant.testing.cogvlm_assets import (
    tiny_cogagent_args as _tiny_cogagent_args,
)
from tests.cogvlm_fixture import COGVLM_DIR, cogvlm_model_class, tiny_cogvlm_inputs

__all__ = ["TINY_COGAGENT_ARGS", "TINY_CROSS_LAYERS", "TinyCogAgentModel", "build_tiny_cogagent", "cogagent_class",
           "tiny_cogagent_args", "tiny_cogagent_inputs"]


def cogagent_class() -> type:
    """``TinyCogAgentModel`` (a ``utils.models.CogAgentModel``) from the snapshot, registered in SAT's registry."""
    cogvlm_model_class()  # the snapshot first on sys.path, and no other 'utils' package in the way
    return tiny_cogagent_class(str(COGVLM_DIR))


TinyCogAgentModel = cogagent_class()  # defined on import: ``--import tests.cogagent_fixture`` registers it


def tiny_cogagent_args(**overrides: Any) -> argparse.Namespace:
    """SAT args for the tiny CogAgent (every SAT default present); ``eva_args`` merge into the tiny EVA's."""
    return _tiny_cogagent_args(str(COGVLM_DIR), **overrides)


def build_tiny_cogagent(params_dtype: torch.dtype = torch.float32, *, seed: int = 0,
                        **overrides: Any) -> Tuple[torch.nn.Module, argparse.Namespace]:
    """Build the tiny CogAgent with SAT's own ``get_model`` in eval mode on CPU (fp32/bf16/fp16 as CogVLM's
    ``--bf16``/``--fp16`` do), CogAgent's skip_init weights (visual expert) filled from ``seed``, CPU fallbacks on."""
    from sat.model.base_model import get_model

    from sat_quant.sat.compat import apply_cpu_compat, install_xformers_cpu_fallback

    overrides.setdefault("bf16", params_dtype == torch.bfloat16)
    overrides.setdefault("fp16", params_dtype == torch.float16)
    args = tiny_cogagent_args(**overrides)
    model = get_model(args, TinyCogAgentModel, params_dtype=params_dtype).eval()
    init_skipped_weights(model, seed)
    apply_cpu_compat(model)
    install_xformers_cpu_fallback()
    return model, args


def tiny_cogagent_inputs(seed: int = 0, *, dtype: torch.dtype = torch.float32, text_tokens: int = 10) -> dict:
    """Keyword arguments of a full ``CogAgentModel.forward``: a CogVLM prompt with one 56 px image (16 image tokens,
    laid out by ``tiny_cogvlm_inputs``) and ``text_tokens`` text tokens, plus the high-resolution ``cross_*`` inputs."""
    image_length = TINY_COGAGENT_ARGS["image_length"]
    prompt = tiny_cogvlm_inputs(seq_len=image_length + 3 + text_tokens, seed=seed, dtype=dtype,
                                image_length=image_length, image_size=TINY_COGAGENT_EVA_ARGS["image_size"][0])
    return dict(prompt, **tiny_cross_inputs(seed, dtype=dtype))
