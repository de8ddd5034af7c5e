"""CPU fallbacks for the two CUDA-only kernels that SAT LLaMA-style models and CogVLM need.

Why this module exists: sat_quant's fast kernels include CPU ones, and its tests (and users asking for
CPU/Mac inference) must run real SAT and CogVLM models without a GPU. Two pieces of those models only run
on CUDA:

* SAT's rotary embedding ``sat.model.position_embedding.triton_rotary_embeddings.FastRotaryEmbedding``
  launches a triton kernel (held by ``sat.model.official.llama_model.RotaryMixin.rotary_emb``, by
  CogVLM's ``LlamaVisionExpertAttnMixin.rotary_emb``, by ChatGLM2/3/4's ``rotary_pos_emb`` and, with
  ``is_rotary_emb``, by ``BaseTransformer.position_embeddings``). :class:`TorchRotaryEmbedding` is the same
  module in plain torch, and :func:`apply_cpu_compat` swaps it in on a built model when that model is not
  on CUDA.
* ``xformers.ops.memory_efficient_attention`` (CogVLM's EVA2-CLIP vision tower) has no CPU operator.
  :func:`install_xformers_cpu_fallback` routes CPU calls to ``torch.nn.functional.scaled_dot_product_attention``
  and leaves every other call to xformers.

Nothing here imports SAT, triton or xformers at module import time, so ``import sat_quant`` stays light.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Tuple, Union

import torch

__all__ = [
    "TorchRotaryEmbedding",
    "apply_cpu_compat",
    "install_xformers_cpu_fallback",
    "uninstall_xformers_cpu_fallback",
    "xformers_routes_to_cpu_fallback",
    "xformers_attention_cpu",
]

# Attributes copied from a FastRotaryEmbedding onto its replacement (configuration and cache state).
_ROTARY_STATE = ("dim", "base", "pos_idx_in_fp32", "shift", "interleaved", "scale_base",
                 "_seq_len_cached", "_cos_cached", "_sin_cached", "_cos_k_cached", "_sin_k_cached")


class TorchRotaryEmbedding(torch.nn.Module):
    """Plain-torch twin of SAT's triton ``FastRotaryEmbedding`` (SAT 0.4.12).

    Same constructor, same buffers (``inv_freq`` persistent, so checkpoints load and save under the same
    key; ``scale`` non-persistent), same cos/sin cache and the same ``forward(q, k, position_id, max_seqlen,
    layer_id=0)``. Only the first ``rotary_dim = 2 * len(inv_freq)`` channels of ``head_dim`` are rotated
    (``dim`` may be smaller than ``head_dim``, as ChatGLM2/3/4 do with ``head_dim // 2``); the rest pass
    through unchanged. ``interleaved=False`` is GPT-NeoX style (first half / second half),
    ``interleaved=True`` GPT-J style (even / odd pairs).

    Deliberate differences from the triton module, none of which changes a value SAT would compute:

    * it returns new tensors instead of writing into ``q``/``k`` in place (every SAT and CogVLM caller
      uses the return value; out of place keeps autograd working on the views ``split`` produces);
    * the cache is also rebuilt when the input dtype or device changes (triton would fail an assertion).

    Mirrored quirks: positions ``>= `` the cached length (or negative) are left unrotated, as the kernel's
    masked loads (``cos = 1``, ``sin = 0``) do; with ``scale_base`` (XPos) both q and k use the q-side
    scaled cache, as SAT's ``forward`` does; with ``pos_idx_in_fp32=False`` (CogVLM) the position indices
    are built in ``inv_freq``'s dtype, so after ``model.bfloat16()`` positions above 256 round like bf16.
    """

    def __init__(
        self,
        dim: int,
        base: float = 10000,
        interleaved: bool = False,
        scale_base: Optional[float] = None,
        pos_idx_in_fp32: bool = True,
        device: Optional[Union[torch.device, str]] = None,
        shift: int = 0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.base = base
        self.pos_idx_in_fp32 = pos_idx_in_fp32
        self.shift = shift
        self.register_buffer("inv_freq", self._compute_inv_freq(device))
        self.interleaved = interleaved
        self.scale_base = scale_base
        # XPos per-channel scale, mirrors FastRotaryEmbedding.__init__: (2i + 0.4 dim) / (1.4 dim)
        scale = ((torch.arange(0, dim, 2, device=device, dtype=torch.float32) + 0.4 * dim) / (1.4 * dim)
                 if scale_base is not None else None)
        self.register_buffer("scale", scale, persistent=False)
        self._seq_len_cached = 0
        self._cos_cached: Optional[torch.Tensor] = None
        self._sin_cached: Optional[torch.Tensor] = None
        self._cos_k_cached: Optional[torch.Tensor] = None
        self._sin_k_cached: Optional[torch.Tensor] = None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}, interleaved={self.interleaved}, shift={self.shift}"

    def _compute_inv_freq(self, device: Optional[Union[torch.device, str]] = None) -> torch.Tensor:
        # mirrors FastRotaryEmbedding._compute_inv_freq: 1 / base^((shift + 2i) / dim)
        return 1.0 / (self.base ** (torch.arange(self.shift, self.shift + self.dim, 2, device=device).float()
                                    / self.dim))

    def _update_cos_sin_cache(self, seqlen: Union[int, torch.Tensor], position_id: Optional[torch.Tensor] = None,
                              device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        """Rebuild the cos/sin tables when a longer sequence (or another dtype/device) comes in."""
        seqlen = int(seqlen)
        stale = (self._cos_cached is not None
                 and (self._cos_cached.dtype != dtype
                      or (device is not None and self._cos_cached.device != torch.device(device))))
        if seqlen <= self._seq_len_cached and not stale:
            return
        # SAT keeps the longest table it has seen; keep that length when only dtype/device changed
        seqlen = max(seqlen, self._seq_len_cached)
        self._seq_len_cached = seqlen
        # mirrors FastRotaryEmbedding._update_cos_sin_cache: fp32 positions unless pos_idx_in_fp32=False
        if self.pos_idx_in_fp32:
            t = torch.arange(seqlen, device=device, dtype=torch.float32)
            inv_freq = (self._compute_inv_freq(device=device) if self.inv_freq.dtype != torch.float32
                        else self.inv_freq.to(device))
        else:
            t = torch.arange(seqlen, device=device, dtype=self.inv_freq.dtype)
            inv_freq = self.inv_freq.to(device)
        freqs = torch.outer(t, inv_freq)  # mirrors einsum("i,j->ij", t, inv_freq): angle = position * inv_freq
        if self.scale is None:
            self._cos_cached = torch.cos(freqs).to(dtype)
            self._sin_cached = torch.sin(freqs).to(dtype)
        else:
            # XPos, mirrors SAT: scale ** ((position - seqlen // 2) / scale_base), q gets *, k gets /
            power = (torch.arange(seqlen, dtype=self.scale.dtype, device=self.scale.device)
                     - seqlen // 2) / self.scale_base
            scale = self.scale.to(device=power.device) ** power[:, None]
            scale = scale.to(freqs.device)
            self._cos_cached = (torch.cos(freqs) * scale).to(dtype)
            self._sin_cached = (torch.sin(freqs) * scale).to(dtype)
            self._cos_k_cached = (torch.cos(freqs) / scale).to(dtype)
            self._sin_k_cached = (torch.sin(freqs) / scale).to(dtype)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        position_id: torch.Tensor,
        max_seqlen: Union[int, torch.Tensor],
        layer_id: int = 0,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` and ``k`` ([batch, heads, seq, head_dim]) by ``position_id`` ([batch or 1, seq]).

        ``max_seqlen`` sizes the cos/sin cache (SAT passes ``position_ids.max() + 1``); ``layer_id`` is
        unused, as in SAT.
        """
        if position_id.shape[0] != q.shape[0]:
            position_id = position_id.expand(q.shape[0], -1)
        self._update_cos_sin_cache(max_seqlen, position_id, device=q.device, dtype=q.dtype)
        q = _rotate(q, self._cos_cached, self._sin_cached, position_id, self.interleaved)
        k = _rotate(k, self._cos_cached, self._sin_cached, position_id, self.interleaved)
        return q, k


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_id: torch.Tensor,
            interleaved: bool) -> torch.Tensor:
    """Torch version of SAT's triton ``rotary_kernel`` (non-conjugate, zero ``seqlen_offsets``)."""
    seqlen_ro, half = cos.shape
    rotary_dim = 2 * half
    if rotary_dim > x.shape[-1]:
        raise ValueError(f"rotary_dim ({rotary_dim}) must be <= head_dim ({x.shape[-1]})")
    if position_id.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"position_id has shape {tuple(position_id.shape)}, expected "
                         f"{(x.shape[0], x.shape[2])} for q/k of shape {tuple(x.shape)}")
    pos = position_id.to(device=x.device, dtype=torch.long)
    # kernel's masked load: positions outside the table read cos = 1, sin = 0 (no rotation)
    valid = (pos >= 0) & (pos < seqlen_ro)
    idx = pos.clamp(0, seqlen_ro - 1)
    c = torch.where(valid[..., None], cos[idx], torch.ones((), dtype=cos.dtype, device=cos.device))
    s = torch.where(valid[..., None], sin[idx], torch.zeros((), dtype=sin.dtype, device=sin.device))
    c = c[:, None].float()  # [batch, 1, seq, rotary_dim / 2], broadcast over heads; math in fp32
    s = s[:, None].float()
    rot = x[..., :rotary_dim].float()
    if interleaved:
        # GPT-J pairs, mirrors the kernel's INTERLEAVED branch: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)
        x0, x1 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2)
    else:
        # GPT-NeoX halves, mirrors the kernel's non-interleaved branch: o0 = x0 cos - x1 sin, o1 = x0 sin + x1 cos
        x0, x1 = rot[..., :half], rot[..., half:]
        out = torch.cat((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    out = out.to(x.dtype)
    if rotary_dim < x.shape[-1]:
        out = torch.cat((out, x[..., rotary_dim:]), dim=-1)
    return out


def _on_cuda(model: torch.nn.Module) -> bool:
    return any(t.device.type == "cuda" for t in model.parameters()) or \
        any(t.device.type == "cuda" for t in model.buffers())


def apply_cpu_compat(model: torch.nn.Module) -> int:
    """Swap every SAT triton ``FastRotaryEmbedding`` in ``model`` for :class:`TorchRotaryEmbedding`.

    Why: the triton kernel only runs on CUDA, so LLaMA-style SAT models and CogVLM cannot run a forward on
    CPU without this. It is a no-op (returns 0) when any parameter or buffer of ``model`` is on CUDA, where
    the triton kernel is the faster choice; on CPU (and on meta/mps, where triton cannot run either) every
    instance is replaced wherever it is registered -- a mixin attribute (``model.mixins.rotary.rotary_emb``),
    ``transformer.position_embeddings``, a ``ModuleList``/``ModuleDict`` entry. An instance registered under
    several parents is replaced by one shared module. The replacement keeps the original's buffers
    (``inv_freq`` as loaded from a checkpoint, same dtype and device), configuration, cache and
    ``training`` flag, so ``state_dict()`` keys and values do not change.

    Returns the number of distinct rotary modules replaced (0 on CUDA or when there are none).
    """
    try:
        from sat.model.position_embedding.triton_rotary_embeddings import FastRotaryEmbedding
    except ImportError:  # SAT (or triton) not importable: nothing of SAT's can be in the model
        return 0
    if isinstance(model, FastRotaryEmbedding):
        raise TypeError("apply_cpu_compat needs the module that holds the rotary embedding, not the "
                        "rotary module itself; build a TorchRotaryEmbedding directly instead")
    if _on_cuda(model):
        return 0
    replacements: dict[int, TorchRotaryEmbedding] = {}
    # remove_duplicate=False: see every (parent, name) that holds a shared instance
    holders = [(parent, name, child)
               for _, parent in model.named_modules(remove_duplicate=False)
               for name, child in parent.named_children()
               if isinstance(child, FastRotaryEmbedding) and not isinstance(child, TorchRotaryEmbedding)]
    for parent, name, old in holders:
        new = replacements.get(id(old))
        if new is None:
            new = _torch_twin(old)
            replacements[id(old)] = new
        setattr(parent, name, new)
    return len(replacements)


def _torch_twin(old: torch.nn.Module) -> TorchRotaryEmbedding:
    """A TorchRotaryEmbedding carrying ``old``'s configuration, buffers (same tensors) and cache."""
    new = TorchRotaryEmbedding.__new__(TorchRotaryEmbedding)
    torch.nn.Module.__init__(new)
    for attr in _ROTARY_STATE:
        setattr(new, attr, getattr(old, attr))
    new.register_buffer("inv_freq", old.inv_freq)
    new.register_buffer("scale", old.scale, persistent=False)
    new.train(old.training)
    return new


# ----------------------------------------------------------------------------------------------------------
# xformers memory_efficient_attention on CPU
# ----------------------------------------------------------------------------------------------------------

_FALLBACK_FLAG = "_sat_quant_cpu_fallback"


def xformers_routes_to_cpu_fallback(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """The dispatch decision of the installed wrapper: True when all of q, k, v are CPU tensors."""
    return all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in (query, key, value))


def xformers_attention_cpu(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_bias: Any = None,
    p: float = 0.0,
    scale: Optional[float] = None,
    *,
    op: Any = None,
    output_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``xformers.ops.memory_efficient_attention`` semantics on top of torch SDPA (any device).

    Layout as xformers: ``[batch, seq, heads, dim]`` (also ``[batch, seq, dim]`` and the grouped
    ``[batch, seq, groups, heads, dim]``); returns a contiguous tensor in that layout, as xformers does (EVA's
    ``XAttn`` calls ``.view`` on it). ``attn_bias``: None, a tensor added to the scores, or any xformers
    ``AttentionBias`` (materialized to its dense form). ``p`` is the dropout probability (applied whenever
    ``p > 0``, like xformers), ``scale`` defaults to ``1/sqrt(dim)``. ``op`` selects xformers CUDA kernels and
    is ignored here. The output dtype is ``output_dtype`` if given, else the input dtype.
    """
    ndim = query.dim()
    if ndim not in (3, 4, 5):
        raise ValueError(f"memory_efficient_attention expects 3-D, 4-D or 5-D inputs, got {ndim}-D")
    if ndim == 3:  # [B, M, K] -> one head
        q, k, v = (t.unsqueeze(2) for t in (query, key, value))
    elif ndim == 5:  # [B, M, G, H, K] -> G*H heads
        q, k, v = (t.flatten(2, 3) for t in (query, key, value))
    else:
        q, k, v = query, key, value
    # xformers [B, M, H, K] -> SDPA [B, H, M, K]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    batch, heads, mq, mk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    mask = None
    if attn_bias is not None:
        if isinstance(attn_bias, torch.Tensor):
            mask = attn_bias
        elif hasattr(attn_bias, "materialize"):
            shape = tuple(query.shape[:1]) + (tuple(query.shape[2:-1]) or (1,)) + (mq, mk)
            mask = attn_bias.materialize(shape, dtype=q.dtype, device=q.device)
        else:
            raise TypeError(f"unsupported attn_bias type {type(attn_bias).__name__}")
        if ndim == 5 and mask.dim() == 5:
            mask = mask.flatten(1, 2)
        elif ndim == 3 and mask.dim() == 3:  # [B, Mq, Mk] for head-less inputs
            mask = mask.unsqueeze(1)
        if mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        mask = mask.expand(batch, heads, mq, mk) if mask.dim() == 4 else mask
    # mirrors xformers' math: softmax(q k^T * scale + bias) v, dropout p
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scale)
    out = out.transpose(1, 2)
    if ndim == 3:
        out = out.squeeze(2)
    elif ndim == 5:
        out = out.unflatten(2, query.shape[2:4])
    out = out.contiguous()
    return out.to(output_dtype) if output_dtype is not None else out


def install_xformers_cpu_fallback() -> bool:
    """Make ``xformers.ops.memory_efficient_attention`` work on CPU tensors.

    Why: CogVLM's EVA2-CLIP (``XAttn.attention_fn``) calls it as
    ``xops.memory_efficient_attention(q, k, v, p=0., scale=...)`` through the module attribute, and xformers
    has no CPU operator ("No operator found for memory_efficient_attention_forward"). The attribute is
    replaced by a dispatcher: calls whose q, k, v are all on CPU go to :func:`xformers_attention_cpu`
    (torch SDPA), every other call goes unchanged to the original function. Installing twice does not wrap
    twice. Returns True when the dispatcher is in place, False when xformers cannot be imported.
    """
    try:
        import xformers.ops as xops
    except Exception:  # ImportError, or a broken build failing at import
        return False
    current = xops.memory_efficient_attention
    if getattr(current, _FALLBACK_FLAG, False):
        return True
    original: Callable[..., torch.Tensor] = current

    @functools.wraps(original)
    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, **kwargs):
        if xformers_routes_to_cpu_fallback(query, key, value):
            return xformers_attention_cpu(query, key, value, attn_bias, p, scale, **kwargs)
        return original(query, key, value, attn_bias, p, scale, **kwargs)

    setattr(memory_efficient_attention, _FALLBACK_FLAG, True)
    memory_efficient_attention.__sat_quant_original__ = original
    xops.memory_efficient_attention = memory_efficient_attention
    return True


def uninstall_xformers_cpu_fallback() -> bool:
    """Put the original ``xformers.ops.memory_efficient_attention`` back; True if a dispatcher was removed."""
    try:
        import xformers.ops as xops
    except Exception:  # xformers fails to import in many ways (CUDA libs, ABI): then nothing was installed
        return False
    current = xops.memory_efficient_attention
    if not getattr(current, _FALLBACK_FLAG, False):
        return False
    xops.memory_efficient_attention = current.__sat_quant_original__
    return True
