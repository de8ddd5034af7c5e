"""Everything CogVLM's scripts need to run offline at a tiny size: a checkpoint, a tokenizer and an image.

Used by ``examples/`` and the tests of ``patches/``. The model is the real ``CogVLMModel`` imported from a
CogVLM checkout (never copied into sat_quant); the tokenizer is a small SentencePiece model trained here in
well under a second and saved as a ``LlamaTokenizer`` folder, which ``--local_tokenizer`` accepts like the
real vicuna one; the image is drawn with PIL. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import copy
import functools
import io
import json
import os
import random
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

#: EVA2-CLIP at tiny size. hidden 1792 is fixed: CogVLM's GLU adapter hard-codes ``in_features = 1792``.
TINY_EVA_ARGS: Dict[str, Any] = dict(
    num_layers=2, hidden_size=1792, num_attention_heads=16, inner_hidden_size=1920, vocab_size=1,
    layernorm_order="post", use_final_layernorm=False, layernorm_epsilon=1e-6, model_parallel_size=1,
    max_sequence_length=257, image_size=[224, 224], pre_len=1, post_len=0, in_channels=3, patch_size=14,
)

#: the language model at tiny size; ``image_length`` = (224 / 14)^2 patches (EVA's cls token is dropped)
TINY_LM_ARGS: Dict[str, Any] = dict(
    num_layers=2, hidden_size=256, num_attention_heads=4, inner_hidden_size=512, vocab_size=1000,
    max_sequence_length=2048, layernorm_order="pre", use_bias=False, layernorm_epsilon=1e-5,
    image_length=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

#: what CogVLM's scripts put in the namespace besides the architecture (cli_demo_sat.py, inference mode)
RUN_ARGS: Dict[str, Any] = dict(
    mode="inference", world_size=1, rank=0, local_rank=0, model_parallel_size=1, deepspeed=None,
    skip_init=False, use_gpu_initialization=False, device="cpu", fp16=False, bf16=False, seed=1234,
)

#: CogVLM builds these mixins with ``skip_init=True`` (they expect a checkpoint): fill them for a fresh model
SKIP_INIT_MIXINS = ("mlp", "rotary")
EXPERT_INIT_STD = 0.01  # LLaMAModel's init_method_std

#: CogAgent = the tiny CogVLM above + cross-attention in every layer over a high-resolution tower. The cross tower's
#: output width is fixed at 1024 by upstream (``ExternalVisionModel.pos_embed``), as is its EVA2-CLIP-L block shape;
#: ``cross_attn_hidden_size`` is that width, ``cross_hidden_size_per_attention_head`` x heads the cross compute size
#: (public CogAgent: 32 x 32 = 1024; tiny: 4 x 32 = 128).
TINY_COGAGENT_ARGS: Dict[str, Any] = dict(
    cross_image_pix=28, is_decoder=True, cross_attn_hidden_size=1024, cross_hidden_size_per_attention_head=32,
    image_length=16,
)
#: the low-resolution EVA2-CLIP-E tower of the tiny CogAgent: one block over a 56 px image (16 patches), which keeps
#: a whole forward well under a second while every layer type stays (hidden 1792 is fixed, as for CogVLM)
TINY_COGAGENT_EVA_ARGS: Dict[str, Any] = dict(num_layers=1, image_size=[56, 56], max_sequence_length=17)
#: ``Eva2LargeEncoder`` hard-codes EVA2-CLIP-L (24 blocks of width 1024, 300M parameters); the tiny CogAgent keeps
#: two real blocks of that shape, so its SwiGLU ``mlp.w3`` keeps in_features 2730 (= int(1024 * 2.6667), a multiple
#: of no 4-bit group: the ragged layout of docs/FORMAT.md is exercised by every 4-bit test). Two, not one: the
#: tower's ``forward_features`` never runs its last block (upstream takes the penultimate layer's features).
TINY_CROSS_LAYERS = 2

_WORDS = ("the a an cat dog bird image picture photo shows of red green blue yellow black white small large "
          "house tree car person man woman sitting standing on in with and is are what this that describe "
          "color colour square circle background left right top bottom there here it").split()


def find_cogvlm_dir(hint: Optional[str] = None) -> Path:
    """A CogVLM checkout: ``hint``, else ``$SAT_QUANT_COGVLM_DIR``; no other place is guessed. Raises
    FileNotFoundError saying where it looked and how to point at a checkout."""
    candidates = [Path(p) for p in (hint, os.environ.get("SAT_QUANT_COGVLM_DIR")) if p]
    for c in candidates:
        if (c / "utils" / "models" / "cogvlm_model.py").is_file():
            return c
    looked = f"looked in {', '.join(map(str, candidates))}" if candidates else "no folder was given"
    raise FileNotFoundError(f"no CogVLM checkout found ({looked}); clone https://github.com/THUDM/CogVLM and pass "
                            f"its folder (--cogvlm DIR) or set SAT_QUANT_COGVLM_DIR.")


def import_cogvlm(cogvlm_dir: Optional[str] = None):
    """``utils.models`` of the checkout (its real CogVLMModel), with the checkout first on ``sys.path``."""
    root = str(find_cogvlm_dir(cogvlm_dir))
    if root not in sys.path:
        sys.path.insert(0, root)
    from utils import models  # noqa: E402  (the checkout's own package)
    return models


def tiny_args(cogvlm_dir: Optional[str] = None, **overrides: Any) -> argparse.Namespace:
    """SAT args for the tiny CogVLM through ``CogVLMModel.get_args`` (every SAT default present)."""
    cls = import_cogvlm(cogvlm_dir).CogVLMModel
    eva = copy.deepcopy(TINY_EVA_ARGS)
    eva.update(overrides.pop("eva_args", None) or {})
    kw = dict(TINY_LM_ARGS, **RUN_ARGS)
    kw.update(overrides)
    kw["eva_args"] = eva
    return cls.get_args(**kw)


def init_skipped_weights(model: torch.nn.Module, seed: int = 0) -> int:
    """Seeded N(0, 0.01) values for the weights CogVLM leaves uninitialized; returns how many tensors."""
    gen = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for name in SKIP_INIT_MIXINS:
            for p in model.mixins[name].parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * EXPERT_INIT_STD)
                count += 1
    return count


def save_tiny_checkpoint(out_dir: str, cogvlm_dir: Optional[str] = None, seed: int = 0,
                         **overrides: Any) -> Tuple[torch.nn.Module, argparse.Namespace]:
    """Build the real CogVLMModel at tiny size (fp32, CPU) and save it as a full-precision SAT checkpoint."""
    from sat.model.base_model import get_model
    from sat.training.model_io import save_checkpoint

    args = tiny_args(cogvlm_dir, **overrides)
    model = get_model(args, import_cogvlm(cogvlm_dir).CogVLMModel).eval()
    init_skipped_weights(model, seed)
    args.save = out_dir
    save_checkpoint(1, model, None, None, args)
    return model, args


@functools.lru_cache(maxsize=None)
def tiny_cogagent_class(cogvlm_dir: Optional[str] = None) -> type:
    """``TinyCogAgentModel``: upstream's real ``CogAgentModel`` whose cross tower has ``TINY_CROSS_LAYERS`` blocks.

    Upstream builds the tower from a hard-coded config (``eva_clip_L_hf.Eva2LargeEncoder``) that no argument
    shrinks; this subclass swaps that class for one that builds the same ``EVAVisionTransformer`` with fewer blocks,
    during ``__init__`` only. Everything else (mixins, the rebuilt ``mlp`` mixin, cross-attention, forward) is
    CogAgent's own. Defining it registers the name in SAT's model registry, so checkpoints saved from it load by
    ``model_class`` (``tests/cogagent_fixture.py`` defines it on import: pass that module to ``--import``).
    """
    import_cogvlm(cogvlm_dir)
    from torch import nn
    from utils.models import cogagent_model, eva_clip_L_hf  # noqa: E402  (the checkout's own modules)

    class TinyEva2LargeEncoder(eva_clip_L_hf.Eva2LargeEncoder):
        def __init__(self, image_size: int = 224) -> None:
            nn.Module.__init__(self)
            probe = copy.deepcopy(_EVA2_L_CONFIG)
            probe["vision_cfg"].update(image_size=image_size, layers=TINY_CROSS_LAYERS)
            self.config = probe
            self.model = eva_clip_L_hf._build_vision_tower(**self.config)

    class TinyCogAgentModel(cogagent_model.CogAgentModel):
        def __init__(self, args, transformer=None, **kwargs):
            full = cogagent_model.Eva2LargeEncoder
            cogagent_model.Eva2LargeEncoder = TinyEva2LargeEncoder
            try:
                super().__init__(args, transformer=transformer, **kwargs)
            finally:
                cogagent_model.Eva2LargeEncoder = full

    return TinyCogAgentModel


#: upstream's EVA2-CLIP-L config (``Eva2LargeEncoder.__init__``), read by the tiny tower; checked against it in tests
_EVA2_L_CONFIG: Dict[str, Any] = {
    "embed_dim": 768,
    "vision_cfg": {"image_size": 336, "layers": 24, "width": 1024, "drop_path_rate": 0, "head_width": 64,
                   "mlp_ratio": 2.6667, "patch_size": 14, "eva_model_name": "eva-clip-l-14-336", "xattn": True,
                   "fusedLN": True, "rope": True, "pt_hw_seq_len": 16, "intp_freq": True, "naiveswiglu": True,
                   "subln": True},
}


def tiny_cogagent_args(cogvlm_dir: Optional[str] = None, **overrides: Any) -> argparse.Namespace:
    """SAT args for the tiny CogAgent: the tiny CogVLM's plus ``TINY_COGAGENT_ARGS`` (through ``get_args``)."""
    cls = tiny_cogagent_class(cogvlm_dir)
    eva = dict(copy.deepcopy(TINY_EVA_ARGS), **TINY_COGAGENT_EVA_ARGS)
    eva.update(overrides.pop("eva_args", None) or {})
    kw = dict(TINY_LM_ARGS, **TINY_COGAGENT_ARGS, **RUN_ARGS)
    kw.update(overrides)
    kw["eva_args"] = eva
    return cls.get_args(**kw)


def tiny_cross_inputs(seed: int = 0, *, dtype: torch.dtype = torch.float32,
                      cross_image_pix: int = TINY_COGAGENT_ARGS["cross_image_pix"]) -> Dict[str, Any]:
    """The ``cross_*`` keyword arguments CogAgent's ``chat`` adds to a CogVLM prompt from its cross image processor
    (``utils/utils/vision.py``): image [1, 3, pix, pix] in the model's dtype, input_ids [[0]], position_ids None,
    attention_mask [[1]] (``CogAgentModel.forward`` passes the mask on as ``cross_attention_mask``)."""
    gen = torch.Generator().manual_seed(seed + 1)
    return dict(cross_image=torch.randn(1, 3, cross_image_pix, cross_image_pix, generator=gen).to(dtype),
                cross_input_ids=torch.zeros(1, 1, dtype=torch.long), cross_position_ids=None,
                cross_attention_mask=torch.ones(1, 1, dtype=torch.long))


def make_tokenizer(out_dir: str, vocab_size: int = 600, seed: int = 0) -> str:
    """Train a small SentencePiece BPE model (ids: unk 0, bos 1, eos 2 as LLaMA; pad 3) into a LlamaTokenizer folder."""
    import sentencepiece as spm
    rng = random.Random(seed)
    sentences = [" ".join(rng.choice(_WORDS) for _ in range(12)) for _ in range(400)]
    sentences += ["[INST] [/INST] Question: Answer: Short answer: CAPTCHA:"] * 8  # CogVLM's prompt markers
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                                   hard_vocab_limit=False, byte_fallback=True, minloglevel=2)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        # an in-vocabulary pad token: CogVLM's llama2_tokenizer would set id 32000, outside this small vocabulary
        json.dump({"pad_token": "<pad>", "tokenizer_class": "LlamaTokenizer"}, f)
    return out_dir


def make_image(path: str, size: int = 224, seed: int = 0) -> str:
    """A picture with a few coloured shapes, written as PNG/JPEG by its extension."""
    from PIL import Image, ImageDraw
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.randrange(size // 2), rng.randrange(size // 2)
        box = (x0, y0, x0 + rng.randrange(20, size // 2), y0 + rng.randrange(20, size // 2))
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)
    return path


def main(argv: Optional[list] = None) -> int:
    """``python -m sat_quant.testing.cogvlm_assets OUT [--cogvlm DIR]``: write OUT/fp (checkpoint),
    OUT/tokenizer and OUT/image.png for the examples."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out")
    parser.add_argument("--cogvlm", default=None, help="CogVLM checkout (default: $SAT_QUANT_COGVLM_DIR)")
    ns = parser.parse_args(argv)
    save_tiny_checkpoint(os.path.join(ns.out, "fp"), ns.cogvlm)
    make_tokenizer(os.path.join(ns.out, "tokenizer"))
    make_image(os.path.join(ns.out, "image.png"))
    print(f"wrote {ns.out}/fp (full-precision SAT checkpoint), {ns.out}/tokenizer, {ns.out}/image.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
