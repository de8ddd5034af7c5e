"""A KV cache for SAT's generation that is written in place instead of copied every token.

SAT's ``CachedAutoregressiveMixin`` returns each step's keys and values as ``mem_kv``; ``filling_sequence``'s
``update_mems`` then ``torch.cat``s the whole cache with them, and the mixin ``torch.cat``s it again with the new
keys and values before attention: two copies of every layer's cache per token (CogVLM-17B at a 1,241-token
prompt: ~1.3 GB of memory traffic per token, a quarter of a CPU decode step). The strided view it hands to
attention is also 2.5x slower for ``scaled_dot_product_attention`` on CPU than a contiguous one.

:class:`KVCacheMixin` keeps keys and values in one buffer per layer, grown geometrically and written in place,
and hands SAT a one-column (float32) ``mem_kv`` holding each batch row's cache row. SAT's own bookkeeping (``update_mems``,
``max_memory_length``, ``filling_sequence``'s ``index``, beam search's reordering of ``mems`` along the batch)
keeps working on that column: its length is the cache length and its last value says which cache row each beam
continues. It is a drop-in for ``CachedAutoregressiveMixin`` (``model.add_mixin('auto-regressive',
KVCacheMixin())``) with the same outputs, for unmodified ``filling_sequence`` and CogVLM's ``chat``.

On CPUs without native bf16 (no AVX512-BF16/AMX) a bf16 or fp16 model's cache is kept in float32 by default:
attention over it then runs at memory speed (2.6x faster per layer at 1,241 tokens) for twice the cache bytes.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from sat.model.base_model import BaseMixin, non_conflict
from sat.transformer_defaults import attention_fn_default

from ..engine.backends.prefill import cpu_has_native_bf16

__all__ = ["KVCacheMixin"]

#: cache positions are allocated in multiples of this; a full cache grows by a quarter (at least this many
#: positions), so a token is copied a bounded number of times over a generation and spare capacity stays small
GROWTH_QUANTUM = 256


class _LayerCache:
    """One layer's keys and values, ``[batch, heads, capacity, head_dim]`` each; the first ``length`` positions
    hold the sequence so far."""

    def __init__(self) -> None:
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None
        self.length = 0

    def reset(self) -> None:
        self.keys = self.values = None
        self.length = 0

    def _ensure(self, like: torch.Tensor, dtype: torch.dtype, needed: int) -> None:
        batch, heads, _, head_dim = like.shape
        capacity = 0 if self.keys is None else self.keys.shape[2]
        if self.keys is not None and needed <= capacity:
            return
        capacity = needed + max(GROWTH_QUANTUM, needed // 4)
        capacity = -(-capacity // GROWTH_QUANTUM) * GROWTH_QUANTUM
        keys = like.new_empty((batch, heads, capacity, head_dim), dtype=dtype)
        values = torch.empty_like(keys)
        if self.keys is not None and self.length:
            keys[:, :, :self.length] = self.keys[:, :, :self.length]
            values[:, :, :self.length] = self.values[:, :, :self.length]
        self.keys, self.values = keys, values

    def follow(self, rows: torch.Tensor, past: int) -> None:
        """Align with SAT's ``mems``: ``rows[i]`` is the cache row batch row ``i`` continues (beam search reorders,
        a batch of one expands); ``past`` is the length SAT kept (``max_memory_length`` may have dropped the
        oldest positions)."""
        if self.keys is None or past > self.length:
            raise RuntimeError(
                f"KVCacheMixin: SAT passed a cache of {past} positions but this layer holds {self.length}. "
                "Pass mems only from the same model's previous filling_sequence call, or start again with mems=None.")
        if past < self.length:
            keep = slice(self.length - past, self.length)
            self.keys[:, :, :past] = self.keys[:, :, keep].clone()
            self.values[:, :, :past] = self.values[:, :, keep].clone()
            self.length = past
        if not torch.equal(rows, torch.arange(self.keys.shape[0], device=rows.device)):
            self.keys = self.keys.index_select(0, rows.to(self.keys.device))
            self.values = self.values.index_select(0, rows.to(self.values.device))

    def append(self, keys: torch.Tensor, values: torch.Tensor, dtype: torch.dtype):
        start = self.length
        self._ensure(keys, dtype, start + keys.shape[2])
        end = start + keys.shape[2]
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCacheMixin(BaseMixin):
    """Drop-in for SAT's ``CachedAutoregressiveMixin``: the same generated tokens, without copying the cache.

    ``cache_dtype``: the dtype keys and values are kept in. ``None`` (default): float32 for a bf16/fp16 model on a
    CPU without native bf16 (attention there runs 2.6x faster in float32), else the model's dtype.
    """

    def __init__(self, cache_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.cache_dtype = cache_dtype
        self.layers: Dict[int, _LayerCache] = {}

    def _dtype_for(self, k: torch.Tensor) -> torch.dtype:
        if self.cache_dtype is not None:
            return self.cache_dtype
        if k.device.type == "cpu" and k.dtype in (torch.bfloat16, torch.float16) and not cpu_has_native_bf16():
            return torch.float32
        return k.dtype

    def cache_bytes(self) -> int:
        """Bytes the caches hold now (allocated capacity), for memory reports."""
        return sum(c.keys.numel() * c.keys.element_size() * 2 for c in self.layers.values() if c.keys is not None)

    def clear(self) -> None:
        """Frees every layer's cache (the next generation starts with ``mems=None`` and allocates again)."""
        for cache in self.layers.values():
            cache.reset()

    @non_conflict
    def attention_fn(self, q, k, v, mask, dropout_fn, mems=None, cross_attention=False, old_impl=attention_fn_default,
                     **kw_args):
        if cross_attention:  # CogAgent's cross attention: its encoder outputs pass through, as SAT's mixin does
            kw_args["output_this_layer"]["mem_cross"] = kw_args["mem_cross"]
            if q.shape[0] != k.shape[0]:
                k = k.expand(q.shape[0], *[-1] * (k.dim() - 1))
            if q.shape[0] != v.shape[0]:
                v = v.expand(q.shape[0], *[-1] * (v.dim() - 1))
            return old_impl(q, k, v, mask, dropout_fn, cross_attention=cross_attention, mems=mems, **kw_args)

        layer_id = int(kw_args["layer_id"])  # SAT passes a 0-d tensor
        cache = self.layers.setdefault(layer_id, _LayerCache())
        mem = mems[layer_id] if mems is not None else None  # [batch, length, 1]: each position's cache row
        batch = q.shape[0]
        if mem is None:
            cache.reset()
            if k.shape[0] != batch:
                k, v = k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
        else:
            rows = mem[:, -1, 0].round().long().expand(batch) if mem.shape[0] == 1 else mem[:, -1, 0].round().long()
            cache.follow(rows, mem.shape[1])
        dtype = self._dtype_for(k)
        keys, values = cache.append(k, v, dtype)
        row_ids = torch.arange(batch, device=q.device, dtype=torch.float32)
        kw_args["output_this_layer"]["mem_kv"] = row_ids.view(batch, 1, 1).expand(batch, k.shape[2], 1)

        query = q.to(dtype)
        if old_impl is attention_fn_default:
            out = _default_attention(query, keys, values, mask, dropout_fn, past=keys.shape[2] - k.shape[2], **kw_args)
            if out is not None:
                return out.to(q.dtype)
        return old_impl(query, keys, values, mask, dropout_fn, cross_attention=False, mems=mems, **kw_args).to(q.dtype)


def _default_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout_fn,
                       past: int, scaling_attention_score: bool = True, log_attention_weights=None,
                       **_: object) -> Optional[torch.Tensor]:
    """SAT's ``attention_fn_default`` for the cases it sends to ``scaled_dot_product_attention`` (every key visible,
    or causal), without its ``.contiguous()`` copy of the cache; ``None`` when SAT's general path is needed."""
    if not scaling_attention_score or log_attention_weights is not None or q.shape[1] != k.shape[1]:
        return None
    if dropout_fn is not None and getattr(dropout_fn, "training", False) and getattr(dropout_fn, "p", 0.0) > 0:
        return None
    if mask is None or bool((mask > 0).all()):
        is_causal = False
    elif past == 0 and q.shape[2] == k.shape[2] and bool(
            (mask == torch.ones_like(mask, dtype=torch.float).tril()).all()):
        is_causal = True
    else:
        return None
    if q.shape[2] == 1 and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        # one new token (decode), half precision: torch's CPU flash-attention kernel is several times slower here
        # than two matmuls (bf16 over a 1,254-position cache, 32 heads: 8.8 vs 1.4 ms; in float32 it is the faster
        # one). SAT's own standard_attention math, with the softmax in float32.
        scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
        return torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0,
                                                            is_causal=is_causal)


def layer_lengths(mixin: KVCacheMixin) -> List[int]:
    """Each layer's cached length, in layer order (for tests and reports)."""
    return [mixin.layers[i].length for i in sorted(mixin.layers)]
