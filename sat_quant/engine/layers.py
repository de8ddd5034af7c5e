"""Quantized drop-ins for ``nn.Linear`` and SAT's ``ColumnParallelLinear`` / ``RowParallelLinear``.

The quantized weight is frozen and lives outside ``_parameters``/``_buffers`` on purpose: SAT's
``get_model`` calls ``model.half()`` after building, and torch would cast every floating buffer
(our scales) with it. ``_apply`` here only follows device moves; scales keep their dtype and
kernels cast them to the activation dtype once, on first use. ``state_dict`` always holds the
kernel-neutral tensors (``<prefix>qweight``, ``<prefix>scale``, ...), whatever backend runs.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .backends import Backend, select_backend
from .formats import LayerSpec, get_format


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W stored in a quantized format and run by a kernel backend."""

    def __init__(self, spec: LayerSpec, bias: bool = True, *, backend: str = "auto",
                 device: Optional[torch.device] = None, bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.spec = spec
        self.fmt = get_format(spec.format)
        self.in_features = spec.in_features
        self.out_features = spec.out_features
        self.backend_request = backend
        self.compute_dtype = bias_dtype  # the model's float dtype: what .weight returns
        device = torch.device(device if device is not None else "cpu")
        self.backend: Backend = select_backend(backend, self.fmt, spec, device)
        self._kernel = self.backend.zeros(self.fmt, spec, device)  # a checkpoint or quantize_weight_ fills it
        self._device = device
        if bias:
            self.bias = nn.Parameter(torch.zeros(spec.out_features, dtype=bias_dtype, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # -- storage ----------------------------------------------------------------------------------
    def _set_neutral(self, neutral: Dict[str, torch.Tensor]) -> None:
        device = next(iter(neutral.values())).device
        self.backend: Backend = select_backend(self.backend_request, self.fmt, self.spec, device)
        self._kernel = self.backend.prepare(self.fmt, self.spec, neutral)
        self._device = device

    def neutral_tensors(self) -> Dict[str, torch.Tensor]:
        """The kernel-neutral tensors (the saved layout) of this layer."""
        return self.backend.to_neutral(self.fmt, self.spec, self._kernel)

    def quantize_weight_(self, weight: torch.Tensor) -> None:
        """Quantize a full-precision [out, in] weight into this layer (the float copy is not kept)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit a quantized layer of shape "
                             f"{(self.out_features, self.in_features)}")
        weight = weight.to(self._device)
        with torch.no_grad():
            neutral = self.fmt.quantize(weight, self.spec, **self._shard_statistics(weight))
        self._set_neutral(neutral)

    def _shard_statistics(self, weight: torch.Tensor) -> Dict[str, torch.Tensor]:
        """What ``quantize`` needs from the rest of a model-parallel weight (none: a whole weight)."""
        return {}

    def load_neutral_(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Install already-quantized neutral tensors after checking their names, shapes and dtypes."""
        layout = self.fmt.layout(self.spec)
        if set(tensors) != set(layout):
            raise ValueError(f"{self.fmt.name} layer expects tensors {sorted(layout)}, got {sorted(tensors)}")
        for name, (shape, dtype) in layout.items():
            t = tensors[name]
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"tensor '{name}' is {tuple(t.shape)} {t.dtype}; the {self.fmt.name} layout "
                                 f"needs {tuple(shape)} {dtype}")
        self._set_neutral({k: v.to(self._device).contiguous() for k, v in tensors.items()})

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that reads ``.weight`` directly (it costs a dequantize per read).

        It behaves as a plain tensor except in ``F.linear(x, layer.weight, b)``, which runs this layer's kernel:
        some model code does exactly that (CogAgent's EVA2-CLIP cross tower), and a dense bf16 GEMM there is
        several times slower than the kernel on CPUs without native bf16. See :class:`KernelRoutedWeight`.
        """
        routed = self.dequantized_weight().as_subclass(KernelRoutedWeight)
        routed.layer = self
        return routed

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """A plain float copy of the weight, ``[out, in]``, in ``dtype`` (default: the model's float dtype)."""
        return self.fmt.dequantize(self.neutral_tensors(), self.spec, dtype=dtype or self.compute_dtype)

    def quantized_nbytes(self) -> int:
        return self.fmt.nbytes(self.spec)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # Learn what `fn` does from a probe: its device move applies to the packed tensors; a float cast
        # (.half(), .bfloat16()) only changes the dtype .weight reports. float64 tells "no cast" apart.
        probe = fn(torch.empty(0, dtype=torch.float64, device=self._device))
        if probe.dtype != torch.float64 and probe.is_floating_point():
            self.compute_dtype = probe.dtype
        target = probe.device
        if target != self._device:
            self._set_neutral({k: v.to(target) for k, v in self.neutral_tensors().items()})
        return self

    # -- state dict -------------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, tensor in self.neutral_tensors().items():
            destination[prefix + name] = tensor

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        names = list(self.fmt.layout(self.spec))
        consumed = {prefix + "weight"} | {prefix + n for n in names}
        unexpected_keys[:] = [k for k in unexpected_keys if k not in consumed]  # torch flags keys it does not own
        try:
            if prefix + "weight" in state_dict:  # full-precision checkpoint: quantize as it arrives
                self.quantize_weight_(state_dict[prefix + "weight"])
            elif all(prefix + n in state_dict for n in names):
                self.load_neutral_({n: state_dict[prefix + n] for n in names})
            elif prefix + "lora_A" in state_dict or prefix + "base." + names[0] in state_dict:
                # a QLoRA checkpoint loaded into a model without adapters: say how to load it, not "missing weight"
                error_msgs.append(f"{prefix[:-1]}: the checkpoint holds LoRA adapters ({prefix}lora_A/lora_B over "
                                  f"{prefix}base.*). Load it with sat_quant.from_pretrained (it rebuilds them from "
                                  f"quant_lora in model_config.json), add QuantLoraMixin before loading, or fold "
                                  f"them in first with `sat-quant merge-lora SRC DST`.")
            else:
                missing_keys.append(prefix + "weight")
        except ValueError as exc:
            error_msgs.append(f"{prefix[:-1]}: {exc}")

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # training adapters upstream (LoRA): gradients flow through
            return _QuantMatmul.apply(x, self)
        return self.backend.linear(x, self.fmt, self.spec, self._kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._linear(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        group = f", group={self.spec.group_size}" if self.spec.group_size else ""
        return (f"in={self.in_features}, out={self.out_features}, format={self.fmt.name}{group}, "
                f"backend={self.backend.name}, bias={self.bias is not None}")


class KernelRoutedWeight(torch.Tensor):
    """What ``QuantLinear.weight`` returns: the dequantized values, a plain tensor to every op but ``F.linear``.

    ``F.linear(x, w, b)`` with ``w`` one of these runs ``w.layer``'s kernel on ``x`` and adds ``b``: the same
    product, through the quantized path (prefill tiles, int4 kernel) instead of a dense GEMM on a dequantized copy.
    Every other op sees the plain tensor (results are plain tensors, never this class).
    """
    layer: "QuantLinear"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            routed = _kernel_linear(*args, **kwargs)
            if routed is not None:
                return routed
        return func(*_plain(args), **_plain(kwargs))

    # saved or copied, it is the plain tensor: never the layer it points to
    def __reduce_ex__(self, protocol):
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)

    def __deepcopy__(self, memo):
        return self.as_subclass(torch.Tensor).clone()


def _plain(value):
    """``value`` with every KernelRoutedWeight in it (nested in tuples, lists, dicts) viewed as a plain tensor."""
    if isinstance(value, KernelRoutedWeight):
        return value.as_subclass(torch.Tensor)
    if isinstance(value, (tuple, list)):
        items = [_plain(v) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value  # untouched: a torch.Size or a named tuple stays what it is
        return list(items) if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _kernel_linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
                   ) -> Optional[torch.Tensor]:
    """``F.linear`` through the layer behind a KernelRoutedWeight ``weight``; None where that does not apply (the
    routed tensor is the input or the bias, or the input's width does not match: F.linear then says what is wrong)."""
    if (not isinstance(weight, KernelRoutedWeight) or isinstance(input, KernelRoutedWeight)
            or isinstance(bias, KernelRoutedWeight) or input.shape[-1:] != (weight.layer.in_features,)):
        return None
    y = weight.layer._linear(input)
    return y if bias is None else y + bias.to(y.dtype)


class _QuantMatmul(torch.autograd.Function):
    """x @ W^T through the layer's kernel; backward gives dL/dx = dL/dy @ W with W dequantized for that call
    (the weight itself is frozen: it gets no gradient). Weight-only kernels have no backward of their own."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantLinear") -> torch.Tensor:
        ctx.layer = layer
        out = layer.backend.linear(x, layer.fmt, layer.spec, layer._kernel)
        # kernels reshape their 2-D result back to x's shape: a view, which autograd forbids callers to modify
        # in place (CogVLM's MLP mixin writes expert rows into it), so hand out a tensor of its own
        return out.clone() if out._is_view() else out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        layer = ctx.layer
        weight = layer.fmt.dequantize(layer.neutral_tensors(), layer.spec, dtype=grad_out.dtype)
        return grad_out @ weight, None


def _model_parallel_statistics(layer: QuantLinear, weight: torch.Tensor, sharded: str) -> Dict[str, torch.Tensor]:
    """The format's ``shard_statistics`` for a shard holding some ``sharded`` ("rows" or "columns") of one weight,
    all-reduced over SAT's model-parallel group; none at model-parallel size 1."""
    from sat import mpu
    if not torch.distributed.is_initialized() or mpu.get_model_parallel_world_size() == 1:
        return {}
    group = mpu.get_model_parallel_group()
    ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}

    def reduce(t: torch.Tensor, op: str) -> torch.Tensor:
        torch.distributed.all_reduce(t, op=ops[op], group=group)
        return t

    return layer.fmt.shard_statistics(weight, layer.spec, sharded=sharded, reduce=reduce)


class QuantColumnParallelLinear(QuantLinear):
    """SAT ``ColumnParallelLinear`` semantics: this rank holds ``output_size / mp`` rows."""

    def __init__(self, spec: LayerSpec, *, input_size: int, output_size: int, bias: bool = True,
                 gather_output: bool = True, stride=1, backend: str = "auto", device=None,
                 bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(spec, bias, backend=backend, device=device, bias_dtype=bias_dtype)
        self.input_size = input_size
        self.output_size = output_size
        self.output_size_per_partition = spec.out_features
        self.gather_output = gather_output
        self.stride = stride
        if self.bias is not None:
            self.bias.model_parallel = True

    def _shard_statistics(self, weight: torch.Tensor) -> Dict[str, torch.Tensor]:
        """This rank's rows are quantized with the statistics that span the other ranks' rows (int4cs's column
        scale) taken from the whole weight: results equal model-parallel size 1, and shards merge or split without
        requantizing."""
        return _model_parallel_statistics(self, weight, "rows")

    def forward_partition(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's output rows, before any gather (LoRA adds its rows here)."""
        from sat.mpu.mappings import copy_to_model_parallel_region
        return QuantLinear.forward(self, copy_to_model_parallel_region(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from sat.mpu.mappings import gather_from_model_parallel_region
        y = self.forward_partition(x)
        return gather_from_model_parallel_region(y) if self.gather_output else y


class QuantRowParallelLinear(QuantLinear):
    """SAT ``RowParallelLinear`` semantics: this rank holds ``input_size / mp`` columns; outputs are all-reduced."""

    def __init__(self, spec: LayerSpec, *, input_size: int, output_size: int, bias: bool = True,
                 input_is_parallel: bool = False, final_bias: bool = True, backend: str = "auto", device=None,
                 bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(spec, bias, backend=backend, device=device, bias_dtype=bias_dtype)
        self.input_size = input_size
        self.output_size = output_size
        self.input_size_per_partition = spec.in_features
        self.input_is_parallel = input_is_parallel
        self.final_bias = final_bias

    def _shard_statistics(self, weight: torch.Tensor) -> Dict[str, torch.Tensor]:
        """This rank's input columns are quantized with per-row statistics (int8's absmax, int4c/int4cs's row scale)
        taken from the whole row: results equal model-parallel size 1, and shards merge or split without
        requantizing."""
        return _model_parallel_statistics(self, weight, "columns")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from sat.mpu.mappings import scatter_to_model_parallel_region
        return self.forward_partition(x if self.input_is_parallel else scatter_to_model_parallel_region(x))

    def forward_partition(self, x: torch.Tensor) -> torch.Tensor:
        """The full output from this rank's input columns ``x`` (all-reduced over ranks, bias added once)."""
        from sat.mpu import get_model_parallel_world_size
        from sat.mpu.mappings import reduce_from_model_parallel_region
        y = self._linear(x)
        if self.bias is not None and not self.final_bias:
            y = y + (self.bias / get_model_parallel_world_size()).to(y.dtype)
        y = reduce_from_model_parallel_region(y)
        if self.bias is not None and self.final_bias:
            y = y + self.bias.to(y.dtype)
        return y


__all__ = ["QuantLinear", "QuantColumnParallelLinear", "QuantRowParallelLinear"]
