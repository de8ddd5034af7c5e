"""Saving a model in SAT's layout: its tensors one module at a time, every rank's files, atomically.

Layout (``docs/FORMAT.md``)::

    {dir}/latest                                    iteration number, written last
    {dir}/model_config.json                         SAT's config + a "quantization" block
    {dir}/{it}/mp_rank_XX_model_states.safetensors  every tensor (quantized ones kernel-neutral)
    {dir}/{it}/mp_rank_XX_model_states.manifest.json size + sha256 of the tensor file, tensor table,
                                                    and the quantization block of this iteration
    {dir}/{it}/mp_rank_XX_model_states.pt           stub, so SAT's tools find the checkpoint
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch import nn

from ..engine.layers import QuantLinear
from ..errors import CheckpointError, CheckpointWriteError
from ..oom import is_out_of_memory
from .commit import (
    check_writable,
    commit_iteration,
    fsync_dir,
    is_disk_full,
    remove_stale_temporaries,
    write_errors,
    write_json_atomic,
    write_text_atomic,
)
from .layout import barrier, model_parallel_rank, saved_model_class, state_file
from .manifest import quantization_block, write_rank_files
from .tensorfile import Layout, TensorStream


def saved_tensors(module: nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    """A module's own parameters and persistent buffers: what its state_dict saves besides packed weights."""
    for n, p in module._parameters.items():
        if p is not None:
            yield n, p.detach()
    for n, b in module._buffers.items():
        if b is not None and n not in module._non_persistent_buffers_set:
            yield n, b


def iter_module_tensors(model: nn.Module) -> Iterator[Tuple[nn.Module, str, Dict[str, torch.Tensor]]]:
    """(module, prefix, {local name: tensor}) for every module owning saved tensors, one at a time."""
    for prefix, module in model.named_modules():  # each module once, even where it is shared
        local = dict(saved_tensors(module))
        if isinstance(module, QuantLinear):
            local.update(module.neutral_tensors())
        if local:
            yield module, (prefix + "." if prefix else ""), local


def expected_layout(model: nn.Module) -> Layout:
    """Name → (shape, dtype) of every tensor a checkpoint of this model holds, in the order they are saved."""
    out: Layout = {}
    for prefix, module in model.named_modules():
        pre = prefix + "." if prefix else ""
        out.update({pre + n: (tuple(t.shape), t.dtype) for n, t in saved_tensors(module)})
        if isinstance(module, QuantLinear):
            out.update({pre + n: (tuple(shape), dtype) for n, (shape, dtype) in module.fmt.layout(module.spec).items()})
    return out


def model_tensor_stream(model: nn.Module) -> TensorStream:
    """The model's tensors as a stream: a quantized layer's neutral tensors exist only while they are written."""
    groups = ({pre + n: t for n, t in local.items()} for _, pre, local in iter_module_tensors(model))
    return TensorStream(expected_layout(model), groups)


def save_model(model: nn.Module, save_dir: str, model_config: Dict[str, Any], *, iteration: int = 1,
               overwrite: bool = False, tensors: Optional[TensorStream] = None) -> str:
    """Save ``model`` (quantized or not) under ``save_dir`` in SAT's layout; returns the iteration directory.

    ``model_config`` is what model_config.json holds besides the quantization block (SAT's args, from the sat
    layer). Each model-parallel rank writes its own files; rank 0 writes model_config.json and ``latest``.
    Refuses to replace an existing iteration unless ``overwrite``. The iteration folder is written as a
    temporary sibling and swapped in; ``latest`` is updated last, so a kill or a failure at any point leaves the
    previous checkpoint loadable.

    ``tensors`` replaces the model's own tensors (``model_tensor_stream``): ``sat-quant convert`` passes a model
    built on meta, with no storage, and the stream that quantizes each layer from the source as it is written. The
    stream's layout must be ``expected_layout(model)``; the quantization block still comes from ``model``.
    """
    if iteration <= 0:
        raise CheckpointError(f"iteration must be positive (SAT's 'latest' needs it), got {iteration}")
    rank, world = model_parallel_rank()
    final_dir = os.path.join(save_dir, str(iteration))
    held = [s for s in (".safetensors", ".pt") if os.path.exists(state_file(save_dir, iteration, rank, s))]
    if held and not overwrite:  # a SAT .pt alone is a checkpoint too: the full-precision weights a model came from
        raise CheckpointError(f"{final_dir} already holds a checkpoint (mp_rank_{rank:02d}_model_states{held[0]}); "
                              f"pass overwrite=True (--overwrite) to replace it, or save to another "
                              f"directory/iteration.")
    check_writable(final_dir, replace=True, verb="save_checkpoint")  # before any work
    prefix = f".{iteration}.tmp-"
    # the iteration number in the folder name keeps it apart from SAT's own iteration folders
    tmp_dir = os.path.join(save_dir, f"{prefix}{os.getpid()}-rank{rank}")
    block = quantization_block(model)
    config = dict(model_config, quantization=block)
    committed = False
    try:
        os.makedirs(save_dir, exist_ok=True)
        remove_stale_temporaries(save_dir, prefix)  # left by a killed earlier save
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os.makedirs(tmp_dir)
        stream = model_tensor_stream(model) if tensors is None else tensors
        write_rank_files(tmp_dir, iteration, rank, stream, block, config)
        fsync_dir(tmp_dir)
        commit_iteration(tmp_dir, final_dir, single_writer=world == 1)
        committed = True
        fsync_dir(final_dir)
        fsync_dir(save_dir)
    except write_errors() as exc:
        if is_out_of_memory(exc):
            raise
        raise _save_failed(exc, final_dir, save_dir, committed) from exc
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # a temporary folder, or the old files an overwrite swapped out
    barrier()
    if rank == 0:
        try:
            write_folder_config(save_dir, config, iteration)
            fsync_dir(save_dir)
        except OSError as exc:
            raise _save_failed(exc, final_dir, save_dir, committed=True) from exc
    barrier()
    return final_dir


def _save_failed(exc: BaseException, final_dir: str, save_dir: str, committed: bool) -> CheckpointWriteError:
    why = "the disk is full" if is_disk_full(exc) else f"{getattr(exc, 'strerror', None) or exc}"
    if not committed:
        return CheckpointWriteError(f"saving to {final_dir} failed: {why}. Nothing was replaced: the previous "
                                    f"checkpoint in {save_dir} (if any) is still the one 'latest' names; free "
                                    f"space (or fix the cause) and save again.")
    if not os.path.exists(os.path.join(save_dir, "latest")):
        return CheckpointWriteError(f"saving to {final_dir} failed after its tensor files were in place: {why}. "
                                    f"{save_dir} holds no complete checkpoint yet (no 'latest'); free space (or fix "
                                    f"the cause) and save again.")
    return CheckpointWriteError(f"saving to {final_dir} failed after its tensor files were in place: {why}. "
                                f"{save_dir}/latest names a complete checkpoint (the previous iteration, or this "
                                f"one when it was overwritten); free space (or fix the cause) and save again.")


def write_folder_config(folder: str, model_config: Dict[str, Any], iteration: int) -> None:
    """model_config.json, then ``latest``: the two files that make a folder of iteration files a SAT checkpoint.

    A quantized checkpoint's ``model_class`` carries a note naming sat_quant (see ``saved_model_class``).
    """
    if "model_class" in model_config:
        model_config = dict(model_config, model_class=saved_model_class(model_config["model_class"],
                                                                        bool(model_config.get("quantization"))))
    write_json_atomic(os.path.join(folder, "model_config.json"), model_config)
    write_text_atomic(os.path.join(folder, "latest"), str(iteration))


__all__ = ["saved_tensors", "iter_module_tensors", "expected_layout", "model_tensor_stream", "save_model",
           "write_folder_config"]
