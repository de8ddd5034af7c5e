"""Leaner generation for SAT models: compute the LM head only where sampling reads it.

SAT's ``filling_sequence`` runs the whole prompt (for CogVLM: 1,225 image tokens + text) through the model in
its first step and keeps only ``logits[:, -1]``; the LM head still produces ``seq x vocab`` values (CogVLM:
~1,290 x 32,000). :class:`LastPositionLogitsMixin` feeds the head the last position only, which gives the same
sampled logits (the head is applied per position) and removes that peak. :func:`last_position_logits` adds
it for the duration of a block. Used by the patched ``evaluate_cogvlm_demo.py``.

:func:`cache_cross_image` keeps CogAgent from re-encoding its cross image (and re-projecting it to every layer's
cross-attention keys and values) for every generated token.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from sat.model.base_model import BaseMixin, non_conflict
from torch import nn

MIXIN_NAME = "sat-quant-last-position-logits"


class LastPositionLogitsMixin(BaseMixin):
    """A SAT mixin wrapping whatever ``final_forward`` (LM head) the model has: multi-token inputs are cut to
    their last position first. Only for generation, never for a loss over every position."""

    @non_conflict
    def final_forward(self, logits, old_impl=None, **kw_args):
        if logits.dim() == 3 and logits.shape[1] > 1:
            logits = logits[:, -1:]
        return old_impl(logits, **kw_args)


@contextmanager
def last_position_logits(model: nn.Module) -> Iterator[None]:
    """Within the block, the model's LM head sees only the last position of a multi-token input. A mixin (not
    a patched hook table) so it survives SAT rebuilding its hooks when other mixins come and go."""
    added = MIXIN_NAME not in model.mixins
    if added:
        model.add_mixin(MIXIN_NAME, LastPositionLogitsMixin())
    try:
        yield
    finally:
        if added and MIXIN_NAME in model.mixins:
            model.del_mixin(MIXIN_NAME)


class _CrossImageMemo:
    """The last call's inputs and outputs of a cross-image encoder: a call with the very same tensors (same objects,
    storage and version) under ``torch.no_grad`` returns the kept outputs instead of encoding again."""

    def __init__(self, forward) -> None:
        self.forward, self.key, self.kept, self.output, self.calls = forward, None, None, None, 0

    @staticmethod
    def _key(args, kwargs):
        items = list(enumerate(args)) + sorted(kwargs.items())
        return tuple((name, id(v), v.data_ptr(), v._version, tuple(v.shape)) if isinstance(v, torch.Tensor)
                     else (name, v) for name, v in items)

    def would_reuse(self, args, kwargs) -> bool:
        """Whether a call with these inputs returns the kept outputs (benchmarks count the weights a step reads)."""
        return not torch.is_grad_enabled() and self.key is not None and self._key(args, kwargs) == self.key

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        key = self._key(args, kwargs)
        if key != self.key:
            self.calls += 1
            self.output = self.forward(*args, **kwargs)
            # the inputs are kept alive with the key, so no other tensor can take their id and storage
            self.key, self.kept = key, (args, kwargs)
        return self.output


def cache_cross_image(model: nn.Module) -> bool:
    """CogAgent encodes its high-resolution cross image, and projects it to each layer's cross-attention keys and
    values, once per generation instead of once per token.

    ``CogAgentModel.forward`` runs its cross-image tower (EVA2-CLIP-L at 1120x1120: 6,400 patches) unless it is given
    ``mems_cross``, which SAT's ``filling_sequence`` never passes (it passes the per-layer outputs back as
    ``encoder_outputs``, which that forward overwrites): every generated token re-encodes the same image, and every
    layer's ``cross_attention.key_value`` projects those 6,400 rows again (at full size most of a decode step).
    This wraps the model's ``encoder`` mixin and each ``key_value`` so that, without gradients, the same input
    tensors return the last outputs: the image's keys and values stay in memory between tokens (CogAgent-18B:
    32 layers x 6,400 x 2,048, 0.8 GiB in bf16), like the self-attention KV cache. Returns False for a model without
    an ``encoder`` mixin. Same logits (``tests/sat/test_kv_cache.py``).
    """
    mixins = getattr(model, "mixins", None)
    if mixins is None or "encoder" not in mixins:
        return False
    memoized = [mixins["encoder"]]
    for layer in getattr(getattr(model, "transformer", None), "layers", []):
        cross = getattr(layer, "cross_attention", None)
        if cross is not None and hasattr(cross, "key_value"):
            memoized.append(cross.key_value)
    for module in memoized:
        if not isinstance(module.__dict__.get("forward"), _CrossImageMemo):
            module.forward = _CrossImageMemo(module.forward)
    return True
