"""What quantization did to a model: layers and bytes per format, before and after."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List

import torch
from torch import nn

from .layers import QuantLinear


@dataclass
class FormatRow:
    layers: int = 0
    params: int = 0
    bytes_before: int = 0
    bytes_after: int = 0


@dataclass
class QuantReport:
    """Per-format totals; the 'full precision' row covers every remaining parameter and buffer."""

    rows: Dict[str, FormatRow] = field(default_factory=OrderedDict)
    layers: List[str] = field(default_factory=list)  # names of quantized layers

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.rows.values())

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.rows.values())

    def table(self) -> str:
        lines = [f"{'format':<16}{'layers':>8}{'params':>14}{'bytes before':>16}{'bytes after':>16}{'bits/param':>12}"]
        for name, r in self.rows.items():
            bpp = 8.0 * r.bytes_after / r.params if r.params else 0.0
            lines.append(f"{name:<16}{r.layers:>8}{r.params:>14,}{r.bytes_before:>16,}{r.bytes_after:>16,}{bpp:>12.2f}")
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else 1.0
        lines.append(f"{'total':<16}{'':>8}{'':>14}{self.bytes_before:>16,}{self.bytes_after:>16,}"
                     f"{'':>12}  ({ratio:.1%} of before)")
        return "\n".join(lines)


def quant_report(model: nn.Module, full_precision_dtype: torch.dtype = None) -> QuantReport:
    """Summarise ``model`` as it is now. "before" prices quantized layers at ``full_precision_dtype``
    (default: the dtype of the model's other floating parameters)."""
    if full_precision_dtype is None:
        floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
        full_precision_dtype = floats[0] if floats else torch.float32
    fp_bytes = torch.empty((), dtype=full_precision_dtype).element_size()
    report = QuantReport()
    for name, module in model.named_modules():  # each module once, even where it is shared
        if isinstance(module, QuantLinear):
            row = report.rows.setdefault(module.fmt.name, FormatRow())
            n = module.out_features * module.in_features
            row.layers += 1
            row.params += n
            row.bytes_before += n * fp_bytes
            row.bytes_after += module.quantized_nbytes()
            report.layers.append(name)
    rest = FormatRow()
    for t in list(model.parameters()) + list(model.buffers()):
        rest.params += t.numel()
        rest.bytes_before += t.numel() * t.element_size()
        rest.bytes_after += t.numel() * t.element_size()
    rest.layers = 0
    report.rows["full precision"] = rest
    return report
