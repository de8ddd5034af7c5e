"""The contract every weight format fulfils: quantize, dequantize, describe its tensors and say what it can do.

A format owns the kernel-neutral layout (what goes to disk); backends own kernel layouts. What a format can do
(which kernels read it, whether calibration applies, which tensors are per-row) is declared on its class, so
adding a format is one module with ``@register_format`` plus its tests: nothing elsewhere keeps lists of names.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, Optional, Tuple, Type

import torch

from ...errors import QuantConfigError

TensorLayout = Dict[str, Tuple[Tuple[int, ...], torch.dtype]]
#: ``reduce(tensor, "sum" | "max")``: ``tensor`` combined elementwise over every model-parallel rank that holds part
#: of one weight, the result on every rank (an all-reduce; formats never call torch.distributed themselves)
Reduce = Callable[[torch.Tensor, str], torch.Tensor]


@dataclass(frozen=True)
class LayerSpec:
    """How one linear layer is quantized: its format, group size and (local) weight shape [out, in]."""

    format: str
    out_features: int
    in_features: int
    group_size: Optional[int] = None

    @property
    def num_groups(self) -> int:
        """Groups per row; a last, partial group counts (its columns are zero-padded, see ``padded_in_features``)."""
        return 1 if self.group_size is None else -(-self.in_features // self.group_size)

    @property
    def padded_in_features(self) -> int:
        """Input columns as stored: ``in_features`` rounded up to whole groups. Zero-padding (rather than a ragged
        last group) keeps every group the same size, which torch's int4 kernels, the lut kernel and bitsandbytes
        require; the pad columns hold code ``zero`` (int4) or 0 (nf4/fp4) and meet zero activations."""
        return self.in_features if self.group_size is None else self.num_groups * self.group_size

    @property
    def padding(self) -> int:
        """Zero columns appended to each row (0 when the group size divides ``in_features``)."""
        return self.padded_in_features - self.in_features


class WeightFormat(ABC):
    """One quantized weight format. Subclasses are stateless singletons registered by ``@register_format``."""

    name: ClassVar[str]
    bits: ClassVar[int]
    default_group_size: ClassVar[Optional[int]] = None
    grouped: ClassVar[bool] = False
    description: ClassVar[str] = ""
    # -- abilities: read by backends, calibration, model-parallel splitting and inspect --------------------
    #: names of the neutral tensors of one layer (the keys of ``layout``), as saved
    tensor_names: ClassVar[Tuple[str, ...]] = ()
    #: what ``--quant <bits>`` picks when no ``--quant-format`` is given
    default_for_bits: ClassVar[bool] = False
    #: the standard layout kernels read it as: "int8_rowwise" (int8 codes, one scale per row), "int4_affine"
    #: (4-bit codes with per-group scale and zero-point, see ``affine_groups``), "codebook4" (4-bit codes into a
    #: 16-value ``table``, per-block absmax, bitsandbytes' layout), or "" (reference kernel only)
    kernel_layout: ClassVar[str] = ""
    #: backends ``--quant-backend auto`` tries, fastest first (each may still decline a shape or device)
    backend_order: ClassVar[Tuple[str, ...]] = ("reference",)
    #: ``quantize(..., hessian=H)`` runs GPTQ against calibration statistics
    calibratable: ClassVar[bool] = False
    #: tensors of shape [out] whose value spans every input column of its row (a row-parallel shard sees only part):
    #: ``shard_statistics(..., sharded="columns")`` must give the whole row's, so row-parallel shards store identical
    #: copies (split and merged as such)
    per_row_tensors: ClassVar[Tuple[str, ...]] = ()
    #: a row-parallel shard must hold a multiple of this many groups (int4c packs two groups' zero-points per byte)
    row_shard_group_multiple: ClassVar[int] = 1
    #: a tensor of shape [in] the activations are multiplied by before the kernel (``int4cs``'s column scale):
    #: kernels hold ``dequantize_core`` and compute ``(x * t) @ core^T``; ``dequantize`` returns ``core * t``
    input_scale_tensor: ClassVar[Optional[str]] = None

    def shard_statistics(self, weight: torch.Tensor, spec: "LayerSpec", *, sharded: str,
                         reduce: Reduce) -> Dict[str, torch.Tensor]:
        """Keyword arguments for ``quantize`` that make one model-parallel shard's tensors exactly the whole weight's
        (statistics spanning every rank's part, combined with ``reduce``), so shards merge into, and split from,
        the model-parallel-size-1 result without requantizing. ``sharded``: "rows" (a column-parallel shard holds
        some output rows) or "columns" (a row-parallel shard holds some input columns). Per-group statistics need
        nothing: the default is none."""
        return {}

    def affine_groups(self, tensors: Dict[str, torch.Tensor], spec: "LayerSpec") -> Tuple[torch.Tensor, torch.Tensor]:
        """float32 [out, G] scale and zero-point with ``w = (q - zero) * scale`` (``kernel_layout == "int4_affine"``)."""
        raise NotImplementedError(f"{self.name} is not an int4_affine format")

    def resolve_group_size(self, group_size: Optional[int]) -> Optional[int]:
        """The group size this format actually uses: per-channel formats ignore it."""
        if not self.grouped:
            return None
        return self.default_group_size if group_size is None else int(group_size)

    def check_shape(self, out_features: int, in_features: int, group_size: Optional[int], where: str = "") -> None:
        """Raise QuantConfigError when this format cannot hold a [out, in] weight with this group size."""
        at = f" for layer '{where}'" if where else ""
        if self.grouped:
            if group_size is None or group_size <= 0 or group_size % 2:
                raise QuantConfigError(f"{self.name}: group size must be a positive even number, got {group_size}{at}; "
                                       f"set --quant-group-size (e.g. 32, 64 or 128).")
            # in_features need not be a multiple of the group: the stored rows are zero-padded to whole groups

    def spec(self, out_features: int, in_features: int, group_size: Optional[int] = None, where: str = "") -> LayerSpec:
        group = self.resolve_group_size(group_size)
        self.check_shape(out_features, in_features, group, where)
        return LayerSpec(self.name, out_features, in_features, group)

    @abstractmethod
    def layout(self, spec: LayerSpec) -> TensorLayout:
        """Name → (shape, dtype) of the kernel-neutral tensors of one layer (see docs/FORMAT.md)."""

    @abstractmethod
    def quantize(self, weight: torch.Tensor, spec: LayerSpec) -> Dict[str, torch.Tensor]:
        """Plain-torch reference quantization of a [out, in] float weight into the neutral tensors."""

    @abstractmethod
    def dequantize(self, tensors: Dict[str, torch.Tensor], spec: LayerSpec,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Plain-torch reference reconstruction of the [out, in] weight; every backend is tested against it."""

    def dequantize_core(self, tensors: Dict[str, torch.Tensor], spec: LayerSpec,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [out, in] weight the kernels multiply ``x * input_scale`` by: ``dequantize`` for every format without
        an ``input_scale_tensor``."""
        return self.dequantize(tensors, spec, dtype)

    def input_scale(self, tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
        """float32 [in]: what the activations are multiplied by (formats with an ``input_scale_tensor``)."""
        return tensors[self.input_scale_tensor].float()

    def nbytes(self, spec: LayerSpec) -> int:
        """Bytes the neutral tensors of one layer occupy."""
        total = 0
        for shape, dtype in self.layout(spec).values():
            n = 1
            for s in shape:
                n *= s
            total += n * torch.empty((), dtype=dtype).element_size()
        return total

    def bits_per_param(self, spec: LayerSpec) -> float:
        return 8.0 * self.nbytes(spec) / (spec.out_features * spec.in_features)


def pad_columns(weight: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """[out, in] → [out, padded_in_features] with zero columns appended (the tensor itself when none are needed)."""
    return torch.nn.functional.pad(weight, (0, spec.padding)) if spec.padding else weight


def pad_hessian(hessian: Optional[torch.Tensor], spec: LayerSpec) -> Optional[torch.Tensor]:
    """A calibration Hessian [in, in] grown to the padded columns: they saw no input (zero rows and columns)."""
    if hessian is None or not spec.padding:
        return hessian
    return torch.nn.functional.pad(hessian, (0, spec.padding, 0, spec.padding))


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] integer codes 0..15 → [N, K/2] uint8, even index in the high nibble (bitsandbytes' order)."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] << 4) | c[:, 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibbles: [N, K/2] uint8 → [N, K] uint8 codes."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(packed.shape[0], -1)


FORMATS: Dict[str, WeightFormat] = {}


def register_format(cls: Type[WeightFormat]) -> Type[WeightFormat]:
    """Class decorator: register one instance of the format under ``cls.name`` (``--quant-format`` takes it)."""
    if cls.name in FORMATS:
        raise ValueError(f"weight format {cls.name!r} is registered twice")
    FORMATS[cls.name] = cls()
    return cls
