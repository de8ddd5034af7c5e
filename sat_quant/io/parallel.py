"""Model-parallel partitions of full-precision and quantized tensors: split and merge without dequantizing.

Mirrors SAT's ``partition``/``merge`` of ``ColumnParallelLinear`` (rows, honouring ``stride`` for fused
QKV), ``RowParallelLinear`` (input columns) and ``VocabParallelEmbedding`` (rows), for every tensor a
quantized layer holds: packed codes and per-row or per-group scales split along the same axis as the
weight. Row-parallel 4-bit codes split on byte boundaries and groups never straddle a partition (the
layer plan already requires ``group_size`` to divide a row-parallel partition's input size; a whole row-parallel
layer stored zero-padded to whole groups cannot be split and says so).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from sat.mpu.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from torch import nn

from ..engine.layers import QuantColumnParallelLinear, QuantRowParallelLinear
from ..engine.lora import LoraQuantLinear
from ..errors import CheckpointError
from .layout import model_parallel_rank
from .manifest import open_rank_source
from .tensorfile import LoadTimes, TensorSource

Stride = Union[int, Sequence[int]]
Kind = Tuple[str, Stride]  # ("column" | "row" | "vocab", stride)


def _strides(stride: Stride) -> List[int]:
    return [1] * stride if isinstance(stride, int) else list(stride)


def packed_kinds(weight_kind: Kind, fmt, spec, prefix: str) -> Dict[str, Kind]:
    """How each packed tensor of one quantized layer is partitioned: like its weight, except the per-row tensors of
    a row-parallel layer (int8's scale, int4c/int4cs's row scale): whole-row, identical on every rank (every format
    with per-row tensors computes them from the whole row on shards: its ``shard_statistics``)."""
    if weight_kind[0] == "row" and spec.padding:  # zero-padded rows: a cut would land inside the padding's groups
        return {prefix + n: ("row-padded", 1) for n in fmt.layout(spec)}
    replicated = set(fmt.per_row_tensors) if weight_kind[0] == "row" else set()
    kinds = {prefix + n: (("row-replicated", 1) if n in replicated else weight_kind) for n in fmt.layout(spec)}
    if fmt.input_scale_tensor is not None:  # one value per input column: whole on column-parallel ranks (shared,
        # see the format's shard_statistics), cut with the columns on row-parallel ones
        kinds[prefix + fmt.input_scale_tensor] = ("input-replicated", 1) if weight_kind[0] == "column" else ("input", 1)
    return kinds


def tensor_kinds(model: nn.Module) -> Dict[str, Kind]:
    """Name → how that tensor is partitioned across model-parallel ranks (absent: replicated)."""
    kinds: Dict[str, Kind] = {}
    for prefix, module in model.named_modules():
        pre = prefix + "." if prefix else ""
        if isinstance(module, (ColumnParallelLinear, QuantColumnParallelLinear)):
            kinds.update({pre + n: ("column", module.stride) for n in ("weight", "bias")})
            if isinstance(module, QuantColumnParallelLinear):
                kinds.update(packed_kinds(("column", module.stride), module.fmt, module.spec, pre))
        elif isinstance(module, (RowParallelLinear, QuantRowParallelLinear)):
            kinds[pre + "weight"] = ("row", 1)  # the bias is added once, after the all-reduce: replicated
            if isinstance(module, QuantRowParallelLinear):
                kinds.update(packed_kinds(("row", 1), module.fmt, module.spec, pre))
        elif isinstance(module, VocabParallelEmbedding):
            kinds[pre + "weight"] = ("vocab", 1)
        elif isinstance(module, LoraQuantLinear):  # A and B follow the base's partition (see engine/lora.py)
            if isinstance(module.base, QuantColumnParallelLinear):
                kinds[pre + "lora_B"] = ("column", module.base.stride)
            elif isinstance(module.base, QuantRowParallelLinear):
                kinds[pre + "lora_A"] = ("row", 1)
    return kinds


def lora_kinds(kinds: Dict[str, Kind], layer_names) -> Dict[str, Kind]:
    """Kinds of a LoRA-wrapped layer's tensors from the unwrapped layer's: ``X.base.*`` like ``X.*``; a column
    layer's ``lora_B`` splits by rows (with its stride), a row layer's ``lora_A`` by input columns."""
    out: Dict[str, Kind] = {}
    for name in layer_names:
        pre = name + "."
        for key, kind in kinds.items():
            if key.startswith(pre) and "." not in key[len(pre):]:
                out[pre + "base." + key[len(pre):]] = kind
        how, stride = kinds.get(pre + "weight", (None, 1))
        if how == "column":
            out[pre + "lora_B"] = ("column", stride)
        elif how == "row":
            out[pre + "lora_A"] = ("row", 1)
    return out


def split(t: torch.Tensor, kind: Kind, parts: int) -> List[torch.Tensor]:
    """One tensor → ``parts`` partitions, as SAT's ``partition`` would cut the weight it belongs to."""
    how, stride = kind
    if parts == 1 or how in ("row-replicated", "input-replicated"):
        return [t] * parts
    if how == "input":
        if t.shape[0] % parts:
            raise CheckpointError(f"cannot split {t.shape[0]} input columns into {parts} model-parallel parts")
        return [c.contiguous() for c in torch.chunk(t, parts, dim=0)]
    if how == "row-padded":
        raise CheckpointError(f"cannot split a row-parallel layer stored zero-padded to whole groups ({t.shape[1]} "
                              f"packed columns) into {parts} model-parallel parts; keep model-parallel size 1, or "
                              f"convert from full precision with a --quant-group-size that divides its input size.")
    if how == "row":
        if t.shape[1] % parts:
            raise CheckpointError(f"cannot split a row-parallel tensor of {t.shape[1]} (packed) input columns into "
                                  f"{parts} model-parallel parts: each part must hold whole groups (int4c: an even "
                                  f"number of them); keep this model-parallel size, or convert from full precision "
                                  f"with a --quant-group-size that divides each rank's input columns.")
        return list(torch.chunk(t, parts, dim=1))
    strides = _strides(stride if how == "column" else 1)
    if t.shape[0] % (sum(strides) * parts):
        raise CheckpointError(f"cannot split {t.shape[0]} rows into {parts} parts with stride {stride}")
    factor = t.shape[0] // sum(strides)
    blocks, start = [], 0
    for s in strides:
        blocks.append(t[start:start + factor * s])
        start += factor * s
    return [torch.cat([b.chunk(parts, dim=0)[r] for b in blocks], dim=0).contiguous() for r in range(parts)]


def merge(shards: Sequence[torch.Tensor], kind: Kind) -> torch.Tensor:
    """Inverse of ``split``: partitions of one tensor → the full tensor."""
    how, stride = kind
    if len(shards) == 1:
        return shards[0]
    if how == "row-replicated":
        if not all(torch.equal(shards[0], s) for s in shards[1:]):
            raise CheckpointError("row-parallel shards carry different per-row scales (not written by "
                                  "sat_quant's model-parallel quantization); re-convert from full precision.")
        return shards[0]
    if how == "input-replicated":
        if not all(torch.equal(shards[0], s) for s in shards[1:]):
            raise CheckpointError("column-parallel shards carry different per-input-column scales (col_scale; not "
                                  "written by sat_quant's model-parallel quantization); re-convert from full precision.")
        return shards[0]
    if how == "input":
        return torch.cat(list(shards), dim=0)
    if how == "row-padded":
        raise CheckpointError("row-parallel shards of a layer stored zero-padded to whole groups cannot be merged "
                              "(sat_quant never writes them); re-convert from full precision.")
    if how == "row":
        return torch.cat(list(shards), dim=1)
    strides = _strides(stride if how == "column" else 1)
    rows = shards[0].shape[0]
    factor = rows // sum(strides)
    pieces, start = [], 0
    for s in strides:
        pieces += [sh[start:start + factor * s] for sh in shards]
        start += factor * s
    return torch.cat(pieces, dim=0).contiguous()


class ReshardedSource:
    """Tensors of an mp=m checkpoint served as rank ``rank`` of mp=n, one tensor at a time."""

    def __init__(self, sources: Sequence[TensorSource], kinds: Dict[str, Kind], rank: int, world: int) -> None:
        self.sources, self.kinds, self.rank, self.world = list(sources), kinds, rank, world
        self.path = ", ".join(s.path for s in self.sources)
        self._layout: Optional[Dict] = None

    def layout(self):
        if self._layout is None:
            first = self.sources[0].layout()
            layout = {}
            m, n = len(self.sources), self.world
            for name, (shape, dtype) in first.items():
                how = self.kinds.get(name, (None, 1))[0]
                shape = list(shape)
                if how in ("column", "vocab"):
                    shape[0] = shape[0] * m // n
                elif how == "row":
                    shape[1] = shape[1] * m // n
                elif how == "input":
                    shape[0] = shape[0] * m // n
                layout[name] = (tuple(shape), dtype)
            self._layout = layout
        return self._layout

    def finish(self) -> None:
        for source in self.sources:
            source.finish()

    @property
    def times(self) -> LoadTimes:
        """Every shard's times, summed."""
        total = LoadTimes()
        for source in self.sources:
            total.add(source.times)
        return total

    def get(self, name: str, **kwargs) -> torch.Tensor:
        kind = self.kinds.get(name)
        if kind is None:
            return self.sources[0].get(name, **kwargs)
        full = merge([s.get(name, **kwargs) for s in self.sources], kind)
        return split(full, kind, self.world)[self.rank].clone()


def power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def open_checkpoint_source(path: str, iteration: int, saved_mp: int, model: nn.Module, *, verify: bool = True,
                           background: bool = False):
    """The tensor source this rank reads: its own file when the model-parallel size matches the checkpoint's,
    else every saved shard merged/split to this rank's partition (no dequantization). ``background``: see
    ``open_rank_source`` (call the source's ``finish()`` after reading)."""
    rank, world = model_parallel_rank()

    def open_rank(r: int) -> TensorSource:
        return open_rank_source(path, iteration, r, checksum=verify, background=background)

    if saved_mp == world:
        return open_rank(rank)
    if not (power_of_two(saved_mp) and power_of_two(world)):
        raise CheckpointError(f"{path} was saved with model-parallel size {saved_mp}; loading it at {world} needs "
                              f"both to be powers of two (resharding splits or merges partitions evenly). "
                              f"Use --model-parallel-size {saved_mp}, or a power of two.")
    return ReshardedSource([open_rank(r) for r in range(saved_mp)], tensor_kinds(model), rank, world)


def agree_across_ranks(step, what: str):
    """Run ``step()`` on every rank; if it fails anywhere, every rank raises the same error naming the rank.

    Without this, a rank whose file is missing would stop while the others go on into collectives and hang.
    """
    error: Optional[str] = None
    result = None
    try:
        result = step()
    except Exception as exc:  # any failure must reach the other ranks before they block in a collective
        error = f"{type(exc).__name__}: {exc}"
        if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            raise
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        errors: List[Optional[str]] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(errors, error)
        failed = [(r, e) for r, e in enumerate(errors) if e]
        if failed:
            raise CheckpointError(f"{what} failed on rank(s) {', '.join(str(r) for r, _ in failed)}:\n  " +
                                  "\n  ".join(f"rank {r}: {e}" for r, e in failed))
    return result
