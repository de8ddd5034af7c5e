"""Leaner generation for SAT models: compute the LM head only where sampling reads it.

SAT's ``filling_sequence`` runs the whole prompt (for CogVLM: 1,225 image tokens + text) through the model in
its first step and keeps only ``logits[:, -1]``; the LM head still produces ``seq x vocab`` values (CogVLM:
~1,290 x 32,000). :class:`LastPositionLogitsMixin` feeds the head the last position only, which gives the same
sampled logits (the head is applied per position) and removes that peak. :func:`last_position_logits` adds
it for the duration of a block. Used by the patched ``evaluate_cogvlm_demo.py``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

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
