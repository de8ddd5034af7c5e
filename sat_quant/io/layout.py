"""SAT's checkpoint layout: where each file of a checkpoint folder lives, and reading its small text files.

``{dir}/latest`` (iteration), ``{dir}/model_config.json``, ``{dir}/{it}/mp_rank_XX_model_states{.safetensors,
.manifest.json,.pt}`` (docs/FORMAT.md). Every reader names the file and the fix when it cannot be used.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Tuple

import torch

from ..errors import CheckpointError


def state_file(directory: str, iteration: int, rank: int, suffix: str) -> str:
    return os.path.join(directory, str(iteration), f"mp_rank_{rank:02d}_model_states{suffix}")


def model_parallel_rank() -> Tuple[int, int]:
    """(rank, size) of this process in SAT's model-parallel group; (0, 1) outside torch.distributed."""
    try:
        from sat import mpu
        if torch.distributed.is_initialized() and mpu.model_parallel_is_initialized():
            return mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size()
    except ImportError:
        pass
    return 0, 1


def barrier() -> None:
    """Wait for every rank (no-op outside torch.distributed)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def read_latest(load_dir: str) -> int:
    path = os.path.join(load_dir, "latest")
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist: {load_dir} is not a SAT checkpoint directory "
                              f"(expected 'latest', 'model_config.json' and an iteration folder).") from None
    if not text.isdigit() or int(text) <= 0:
        raise CheckpointError(f"{path} holds {text!r}, not an iteration number; fix or rewrite it.")
    iteration = int(text)
    if not os.path.isdir(os.path.join(load_dir, text)):
        raise CheckpointError(f"{path} names iteration {iteration}, but {os.path.join(load_dir, text)} does not "
                              f"exist; point 'latest' at an existing iteration folder.")
    return iteration


def read_model_config(load_dir: str) -> Dict[str, Any]:
    path = os.path.join(load_dir, "model_config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist; a SAT checkpoint needs it (SAT's save_checkpoint writes "
                              f"it).") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}).") from None


def checkpoint_tensor_path(load_dir: str, iteration: int, rank: int) -> str:
    """The tensor file of this rank: sat_quant's safetensors, else SAT's own .pt (e.g. from SAT's save_checkpoint)."""
    st = state_file(load_dir, iteration, rank, ".safetensors")
    if os.path.exists(st) or os.path.exists(state_file(load_dir, iteration, rank, ".manifest.json")):
        return st
    pt = state_file(load_dir, iteration, rank, ".pt")
    if not os.path.exists(pt):
        raise CheckpointError(f"{pt} is missing (model-parallel rank {rank} of iteration {iteration}); the "
                              f"checkpoint is incomplete or was saved with another --model-parallel-size.")
    return pt


__all__ = ["state_file", "model_parallel_rank", "barrier", "read_latest", "read_model_config",
           "checkpoint_tensor_path"]
