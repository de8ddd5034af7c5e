"""A tiny but real CogVLM (THUDM's own ``CogVLMModel`` from the shared upstream snapshot) on CPU.

The model classes are imported from ``../shared/cogvlm`` (put on ``sys.path``), never copied into the
project. The configuration mirrors the shape of CogVLM's released ``model_config.json`` (LLaMA-style
language model without biases, EVA2-CLIP vision tower with post layernorm and no final layernorm) at a size
that builds and runs a full image+text forward on CPU in well under a second.

Use::

    from tests.cogvlm_fixture import build_tiny_cogvlm, tiny_cogvlm_inputs
    model, args = build_tiny_cogvlm()
    logits = model(**tiny_cogvlm_inputs())[0]        # [1, seq, 1000]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional, Tuple

import torch

# the tiny configuration and the fill for CogVLM's skip_init weights live in the package (examples use them too)
from sat_quant.testing.cogvlm_assets import (  # noqa: F401
    EXPERT_INIT_STD,
    RUN_ARGS,
    SKIP_INIT_MIXINS,
    TINY_EVA_ARGS,
    TINY_LM_ARGS,
    init_skipped_weights,
    tiny_args,
)


def _find_cogvlm_dir() -> Path:
    """``$SAT_QUANT_COGVLM_DIR``, else ``../shared/cogvlm`` next to the checkout, else the workspace's copy."""
    if os.environ.get("SAT_QUANT_COGVLM_DIR"):
        return Path(os.environ["SAT_QUANT_COGVLM_DIR"])
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "cogvlm", Path("/work/shared/cogvlm")]
    return next((c for c in candidates if (c / "utils" / "models").is_dir()), candidates[0])


#: the upstream snapshot (see _find_cogvlm_dir)
COGVLM_DIR = _find_cogvlm_dir()
# the package itself knows no path: its helpers take a folder or $SAT_QUANT_COGVLM_DIR (tests and benchmarks set it)
os.environ.setdefault("SAT_QUANT_COGVLM_DIR", str(COGVLM_DIR))

def cogvlm_available() -> bool:
    """True when the upstream CogVLM snapshot is where the fixture looks for it."""
    return (COGVLM_DIR / "utils" / "models" / "cogvlm_model.py").is_file()


def cogvlm_model_class():
    """Import ``utils.models.CogVLMModel`` from the snapshot (not from any other ``utils`` package)."""
    if not cogvlm_available():
        raise FileNotFoundError(f"CogVLM snapshot not found at {COGVLM_DIR} (set SAT_QUANT_COGVLM_DIR)")
    root = str(COGVLM_DIR)
    if root not in sys.path:
        sys.path.insert(0, root)
    loaded = sys.modules.get("utils")
    if loaded is not None and not str(getattr(loaded, "__file__", "") or "").startswith(root):
        raise ImportError(f"another top-level 'utils' package is already imported ({loaded!r}); "
                          f"CogVLM's snapshot needs that name")
    from utils.models import CogVLMModel  # noqa: E402  (the real upstream class)
    return CogVLMModel


_cogvlm_model_class = cogvlm_model_class  # older name, kept for callers


def tiny_cogvlm_args(**overrides: Any) -> argparse.Namespace:
    """SAT args (through ``CogVLMModel.get_args``, so every SAT default is present) for the tiny CogVLM.

    ``overrides`` replace any entry; an ``eva_args`` dict is merged into the tiny EVA defaults rather than
    replacing them. ``fp16``/``bf16`` are what SAT's ``get_model`` uses to cast the whole model.
    """
    cogvlm_model_class()  # the snapshot first on sys.path, and no other 'utils' package in the way
    return tiny_args(str(COGVLM_DIR), **overrides)


def build_tiny_cogvlm(params_dtype: torch.dtype = torch.float32, *, cpu_compat: bool = True, seed: int = 0,
                      **overrides: Any) -> Tuple[torch.nn.Module, argparse.Namespace]:
    """Build the real ``CogVLMModel`` at tiny size with SAT's own ``get_model``, in eval mode, on CPU.

    ``params_dtype`` selects fp32/bf16/fp16 the way CogVLM's ``--bf16``/``--fp16`` do (SAT then casts every
    parameter and buffer, the vision tower included). With ``cpu_compat`` (default) the triton rotary is
    swapped for the torch one and the xformers CPU fallback is installed; ``cpu_compat=False`` leaves the
    model as upstream builds it (its forward then fails on CPU). SAT's model-only ``_simple_init`` (called
    by ``BaseModel``) sets up a one-process gloo group, so this works in a plain pytest process.

    Deterministic: SAT reseeds the global RNG with ``args.seed`` (1234) while building, and the weights
    CogVLM builds with ``skip_init=True`` (visual expert, and the expert MLP's ``gate_proj``) are filled from
    ``seed`` by :func:`init_skipped_weights`. The global RNG state is left as SAT leaves it (reseeded).
    """
    from sat.model.base_model import get_model

    from sat_quant.sat.compat import apply_cpu_compat, install_xformers_cpu_fallback

    if params_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"params_dtype must be float32, bfloat16 or float16, not {params_dtype}")
    overrides.setdefault("bf16", params_dtype == torch.bfloat16)
    overrides.setdefault("fp16", params_dtype == torch.float16)
    args = tiny_cogvlm_args(**overrides)
    model = get_model(args, cogvlm_model_class(), params_dtype=params_dtype).eval()
    init_skipped_weights(model, seed)
    if cpu_compat:
        apply_cpu_compat(model)
        install_xformers_cpu_fallback()
    return model, args


def tiny_cogvlm_inputs(seq_len: int = 266, seed: int = 0, *, dtype: torch.dtype = torch.float32,
                       image_length: int = 256, image_size: int = 224, vocab_size: int = 1000,
                       device: Optional[torch.device] = None) -> dict:
    """Keyword arguments for a full image+text ``CogVLMModel.forward`` (batch 1), laid out as CogVLM's own
    ``llama2_text_processor_inference`` + ``get_masks_and_position_ids`` lay out a prompt with one image:

    ``[bos] [boi] [image x image_length] [eoi] [text ...]``; the image slots hold token 0 and are overwritten
    by the projected EVA features (``image_embed_mask`` covers boi..eoi), ``vision_expert_mask`` covers
    boi..last image token, all image tokens share one rotary position (so ``position_ids`` repeat and end
    below ``seq_len - 1``), and the attention mask is causal. ``seq_len`` counts every token, so it must be
    at least ``image_length + 3``; the rest are random text tokens. Float tensors (mask, image) are ``dtype``.
    """
    n_text = seq_len - (image_length + 3)
    if n_text < 0:
        raise ValueError(f"seq_len must be >= image_length + 3 = {image_length + 3}, got {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    boi, eoi = 1, image_length + 2  # indices of the begin/end-of-image tokens
    input_ids = torch.zeros(1, seq_len, dtype=torch.long)
    input_ids[0, 0] = 1  # bos
    input_ids[0, eoi + 1:] = torch.randint(3, vocab_size, (n_text,), generator=gen)
    image_embed_mask = torch.zeros(1, seq_len, dtype=torch.long)
    image_embed_mask[0, boi:eoi + 1] = 1
    vision_expert_mask = torch.zeros(1, seq_len, dtype=torch.long)
    vision_expert_mask[0, boi:eoi] = 1
    # positions: bos 0, boi 1, every image token 2, eoi 3, then one per text token
    position_ids = torch.cat([torch.arange(0, 3), torch.full((image_length - 1,), 2),
                              torch.arange(3, 4 + n_text)]).unsqueeze(0)
    attention_mask = torch.ones(1, 1, seq_len, seq_len, dtype=dtype).tril()
    image = torch.randn(1, 3, image_size, image_size, generator=gen).to(dtype)
    inputs = dict(
        input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
        image_embed_mask=image_embed_mask, vision_expert_mask=vision_expert_mask,
        vision_image=image, vision_input_ids=torch.zeros(1, 1, dtype=torch.long),
        vision_position_ids=None, vision_attention_mask=torch.ones(1, 1, dtype=torch.long),
    )
    if device is not None:
        inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    return inputs


def greedy_generate(model: torch.nn.Module, new_tokens: int = 8, seq_len: int = 270,
                    lean: bool = False, **input_kw: Any) -> torch.Tensor:
    """Greedy generation the way CogVLM's ``chat()`` runs it: SAT's ``filling_sequence`` with the
    cached-autoregressive mixin on the :func:`tiny_cogvlm_inputs` image+text prompt. ``lean`` adds
    :func:`sat_quant.sat.generation.last_position_logits`. Returns the token sequence [1, seq_len + new_tokens]."""
    from sat.generation.autoregressive_sampling import filling_sequence
    from sat.generation.sampling_strategies import BaseStrategy
    from sat.model.mixins import CachedAutoregressiveMixin

    from sat_quant.sat.generation import last_position_logits
    inputs = tiny_cogvlm_inputs(seq_len=seq_len, dtype=next(model.parameters()).dtype, **input_kw)
    context = inputs.pop("input_ids")[0]
    positions = inputs.pop("position_ids")[0]
    inputs.pop("attention_mask")
    total = len(context) + new_tokens
    seq = torch.cat([context, torch.full((new_tokens,), -1, dtype=torch.long)])
    all_positions = torch.cat([positions, positions[-1] + 1 + torch.arange(new_tokens)]).unsqueeze(0)

    def masks_and_positions(tokens_seq):
        return tokens_seq.unsqueeze(0), torch.ones(1, 1, total, total).tril(), all_positions

    model.add_mixin("auto-regressive", CachedAutoregressiveMixin())
    try:
        strategy = BaseStrategy(temperature=1.0, top_k=1, end_tokens=[-5])  # -5: never ends early
        with torch.no_grad():
            if lean:
                with last_position_logits(model):
                    return filling_sequence(model, seq, batch_size=1, strategy=strategy,
                                            get_masks_and_position_ids=masks_and_positions, **inputs)[0]
            return filling_sequence(model, seq, batch_size=1, strategy=strategy,
                                    get_masks_and_position_ids=masks_and_positions, **inputs)[0]
    finally:
        model.del_mixin("auto-regressive")
