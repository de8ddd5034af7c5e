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
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder; 'latest' must be a file holding the iteration number (e.g. 1) "
                              f"of the checkpoint to load.") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} does not hold text; write the iteration number (e.g. 1) into it.") from None
    except NotADirectoryError:
        raise CheckpointError(f"{load_dir} is a file, not a SAT checkpoint folder.") from None
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
            config = json.load(f)
    except FileNotFoundError:
        if os.path.lexists(load_dir) and not os.path.isdir(load_dir):
            raise CheckpointError(f"{load_dir} is a file, not a SAT checkpoint folder; pass the folder that holds "
                                  f"'latest' and model_config.json.") from None
        raise CheckpointError(f"{path} does not exist; a SAT checkpoint needs it (SAT's save_checkpoint writes "
                              f"it).") from None
    except NotADirectoryError:
        raise CheckpointError(f"{load_dir} is a file, not a SAT checkpoint folder; pass the folder that holds "
                              f"'latest' and model_config.json.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}).") from None
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read ({exc.strerror}); fix its permissions or restore it.") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a JSON {type(config).__name__}, not an object of model arguments; "
                              f"restore it from the checkpoint's manifest or re-save.")
    return config


def saved_model_parallel_size(model_config: Dict[str, Any], where: str) -> int:
    """``model_parallel_size`` of a checkpoint's config (1 when absent), refusing what is not a positive integer."""
    value = model_config.get("model_parallel_size", 1) or 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{where}: model_parallel_size is {value!r}, not a positive integer; fix it (the number "
                              f"of mp_rank_XX files of each iteration).")
    return value


#: appended to model_class in a quantized checkpoint's model_config.json: SAT's AutoModel, without sat_quant,
#: then stops with "model_class X (...) not found." naming the fix, instead of a wall of missing keys
MODEL_CLASS_NOTE = " (a sat_quant checkpoint: pip install sat-quant, then import sat_quant before loading it)"


def saved_model_class(name: Any, quantized: bool) -> Any:
    """The ``model_class`` value written to model_config.json (the class name, plus the note when quantized)."""
    if not isinstance(name, str):
        return name
    base = base_model_class(name)
    return base + MODEL_CLASS_NOTE if quantized else base


def base_model_class(name: str) -> str:
    """The SAT class name a ``model_class`` value stands for (without sat_quant's note)."""
    return name.split(" ", 1)[0]


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


__all__ = ["state_file", "model_parallel_rank", "barrier", "read_latest", "read_model_config", "saved_model_parallel_size",
           "checkpoint_tensor_path", "MODEL_CLASS_NOTE", "saved_model_class", "base_model_class"]
