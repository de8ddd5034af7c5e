"""Quantized checkpoints in SAT's layout: save once, load fast, in little memory, never half-way.

Layout (``docs/FORMAT.md``)::

    {dir}/latest                                    iteration number, written last
    {dir}/model_config.json                         SAT's config + a "quantization" block
    {dir}/{it}/mp_rank_XX_model_states.safetensors  every tensor (quantized ones kernel-neutral)
    {dir}/{it}/mp_rank_XX_model_states.manifest.json size + sha256 of the tensor file, tensor table,
                                                    and the quantization block of this iteration
    {dir}/{it}/mp_rank_XX_model_states.pt           stub, so SAT's tools find the checkpoint (and an
                                                    unpatched SAT load fails naming sat_quant)

Saving writes into a temporary directory, fsyncs, then moves it into place in one atomic step
(a rename, or a ``renameat2(RENAME_EXCHANGE)`` swap when an iteration is overwritten) and updates
``latest`` last, so a killed or failed save leaves the previous checkpoint loadable. Each
iteration's manifest also carries its own copy of model_config.json's content, so a save killed
between replacing model_config.json and ``latest`` cannot pair an old iteration with a new config.
Loading verifies the manifest, checks every tensor's name, shape and dtype before touching the
model, and reads the tensors one at a time into memory of their own (re-opening the memory map
every ``_REMAP_BYTES`` so mapped pages do not accumulate in the resident set).
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import hashlib
import json
import os
import shutil
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ._libc import libc
from .config import QuantConfig
from .errors import QuantConfigError, QuantError
from .layers import QuantLinear

FORMAT_VERSION = 1
STUB_KEY = "SAT_QUANT_CHECKPOINT__load_it_with_sat_quant.from_pretrained"
_REMAP_BYTES = 16 * 2**20


class CheckpointError(QuantError, RuntimeError):
    """A checkpoint cannot be saved or loaded; the message names the file and the fix."""


# -- naming ---------------------------------------------------------------------------------------

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


# -- the quantization block -----------------------------------------------------------------------

def find_quant_config(model: nn.Module) -> Optional[QuantConfig]:
    mixins = getattr(model, "mixins", None)
    if mixins is not None and "quant" in mixins:
        return mixins["quant"].quant_config
    return getattr(model, "quant_config", None)


def quantization_block(model: nn.Module, config: Optional[QuantConfig] = None) -> Dict[str, Any]:
    """What model_config.json records: format version, the config, and every quantized layer by name."""
    from . import __version__
    config = config or find_quant_config(model) or QuantConfig()
    from .lora import LoraQuantLinear
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraQuantLinear)}
    layers: Dict[str, Dict[str, Any]] = {}
    for name, module in model.named_modules():  # a shared module is listed once, under its first name
        if isinstance(module, QuantLinear):
            # a LoRA-wrapped base is named as the layer it replaced: the model is rebuilt, then wrapped
            if name.endswith(".base") and name[:-len(".base")] in wrapped:
                name = name[:-len(".base")]
            layers[name] = {"format": module.fmt.name, "group_size": module.spec.group_size,
                            "shape": [module.out_features, module.in_features]}
    return {"format_version": FORMAT_VERSION, "sat_quant_version": __version__, "config": config.to_dict(),
            "layers": layers}


def config_from_block(block: Dict[str, Any], where: str = "model_config.json") -> QuantConfig:
    """The QuantConfig that rebuilds exactly the layers a block lists (everything else full precision)."""
    version = block.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{where}: quantization format_version {version!r} is not supported by this "
                              f"sat_quant (it reads version {FORMAT_VERSION}); upgrade sat_quant.")
    try:
        config = QuantConfig.from_dict(block["config"])
        layers = block["layers"]
    except (KeyError, TypeError, QuantConfigError) as exc:
        raise CheckpointError(f"{where}: malformed quantization block ({exc}); re-convert the checkpoint.") from None
    plan = {}
    for name, layer in layers.items():
        group = layer.get("group_size")
        plan[name] = f"{layer['format']}:{group}" if group else layer["format"]
    plan["*"] = "fp"
    config.plan, config.skip = plan, ()
    return config.validate()


def describe_block(block: Dict[str, Any]) -> str:
    """One line naming what a checkpoint holds, for error messages."""
    formats = sorted({f"{l['format']}" + (f" group {l['group_size']}" if l.get("group_size") else "")
                      for l in block.get("layers", {}).values()})
    bits = block.get("config", {}).get("bits")
    return f"{bits}-bit ({', '.join(formats) or 'no quantized layers'})"


# -- tensors of a model, without materialising a full state dict ----------------------------------

def _saved_tensors(module: nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
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
        local = dict(_saved_tensors(module))
        if isinstance(module, QuantLinear):
            local.update(module.neutral_tensors())
        if local:
            yield module, (prefix + "." if prefix else ""), local


def expected_layout(model: nn.Module) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """Name → (shape, dtype) of every tensor a checkpoint of this model must hold."""
    out: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}
    for prefix, module in model.named_modules():
        pre = prefix + "." if prefix else ""
        out.update({pre + n: (tuple(t.shape), t.dtype) for n, t in _saved_tensors(module)})
        if isinstance(module, QuantLinear):
            out.update({pre + n: (tuple(shape), dtype) for n, (shape, dtype) in module.fmt.layout(module.spec).items()})
    return out


# -- saving ---------------------------------------------------------------------------------------

def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 * 2**20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: str, data: Any) -> None:
    _write_text_atomic(path, json.dumps(data, indent=2))


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):  # a failed write (e.g. ENOSPC) leaves no .tmp file behind
            os.unlink(tmp)
        raise


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two directories (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    renameat2 = getattr(libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # kernel or filesystem without RENAME_EXCHANGE
    raise OSError(err, os.strerror(err), b)


def _commit_iteration(tmp_dir: str, final_dir: str, single_writer: bool) -> None:
    """Move the finished files of ``tmp_dir`` to ``final_dir`` so that a reader sees all old or all new files.

    One writer: a rename (new iteration) or an atomic swap of the two folders (overwrite; other files of
    the old folder, e.g. SAT's optimizer states, are hard-linked over first); ``tmp_dir`` then holds the
    old files. Several model-parallel ranks share the folder, so each moves its own files one by one.
    """
    if single_writer:
        if not os.path.exists(final_dir):
            os.rename(tmp_dir, final_dir)
            return
        ours = set(os.listdir(tmp_dir))
        others = [n for n in os.listdir(final_dir) if n not in ours]
        if all(os.path.isfile(os.path.join(final_dir, n)) and not os.path.islink(os.path.join(final_dir, n))
               for n in others):
            try:
                for n in others:
                    os.link(os.path.join(final_dir, n), os.path.join(tmp_dir, n))
                if _exchange(tmp_dir, final_dir):
                    return
            except OSError:
                pass  # no hard links or no exchange here: move the files one by one below
            for n in others:
                if os.path.exists(os.path.join(tmp_dir, n)):
                    os.unlink(os.path.join(tmp_dir, n))
    os.makedirs(final_dir, exist_ok=True)
    for name in sorted(os.listdir(tmp_dir)):  # per-rank files: other ranks' files stay untouched
        os.replace(os.path.join(tmp_dir, name), os.path.join(final_dir, name))


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC, however it arrives: OSError, or safetensors' SafetensorError text ('... (os error 28)')."""
    if getattr(exc, "errno", None) == errno.ENOSPC:
        return True
    text = str(exc)
    return f"(os error {errno.ENOSPC})" in text or os.strerror(errno.ENOSPC) in text


def _save_errors() -> Tuple[type, ...]:
    """Exception types a failed write raises: OSError, safetensors' own error, torch.save's RuntimeError."""
    try:
        from safetensors import SafetensorError
        return (OSError, RuntimeError, SafetensorError)
    except ImportError:
        return (OSError, RuntimeError)


def _write_tensor_file(path: str, tensors: Dict[str, torch.Tensor]) -> None:
    """safetensors writes the file; separate storages are required, so shared tensors are cloned."""
    from safetensors.torch import save_file
    seen_ptrs = set()
    clean = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu")
        if not t.is_contiguous() or t.data_ptr() in seen_ptrs or t.untyped_storage().nbytes() != t.nbytes:
            t = t.contiguous().clone()
        seen_ptrs.add(t.data_ptr())
        clean[name] = t
    save_file(clean, path, metadata={"format": "pt", "producer": "sat_quant"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # safetensors creates 0600; follow the umask like every other file we write
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def model_config_dict(model: nn.Module, args: Optional[argparse.Namespace]) -> Dict[str, Any]:
    """SAT's own model_config.json content (when args are given), plus the quantization block."""
    if args is not None:
        from sat.training.model_io import extract_model_specific_args_to_dump
        config = extract_model_specific_args_to_dump(args, model)
    else:
        config = {"model_class": type(model).__name__}
    config = {k: v for k, v in config.items() if _jsonable(v)}
    config["quantization"] = quantization_block(model)
    return config


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def save_checkpoint(model: nn.Module, save_dir: str, *, args: Optional[argparse.Namespace] = None,
                    iteration: int = 1, overwrite: bool = False) -> str:
    """Save ``model`` (quantized or not) under ``save_dir`` in SAT's layout; returns the iteration directory.

    Each model-parallel rank writes its own files; rank 0 writes model_config.json and ``latest``.
    Refuses to replace an existing iteration unless ``overwrite``.
    """
    if iteration <= 0:
        raise CheckpointError(f"iteration must be positive (SAT's 'latest' needs it), got {iteration}")
    rank, world = model_parallel_rank()
    os.makedirs(save_dir, exist_ok=True)
    final_dir = os.path.join(save_dir, str(iteration))
    if os.path.exists(state_file(save_dir, iteration, rank, ".safetensors")) and not overwrite:
        raise CheckpointError(f"{final_dir} already holds a checkpoint; pass overwrite=True (--overwrite) "
                              f"or save to another directory/iteration.")
    tmp_dir = os.path.join(save_dir, f".{iteration}.tmp-{os.getpid()}-rank{rank}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    block = quantization_block(model)
    config = model_config_dict(model, args)
    committed = False
    try:
        stem = os.path.join(tmp_dir, f"mp_rank_{rank:02d}_model_states")
        tensors = {}
        for _, prefix, local in iter_module_tensors(model):
            tensors.update({prefix + n: t for n, t in local.items()})
        _write_tensor_file(stem + ".safetensors", tensors)
        table = {name: {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape)}
                 for name, t in tensors.items()}
        del tensors
        # this iteration's own copy of model_config.json (less the block, stored next to it): the loader
        # trusts it over model_config.json, which a save killed before 'latest' may already have replaced
        manifest = {"format_version": FORMAT_VERSION, "iteration": iteration, "rank": rank,
                    "file": os.path.basename(stem) + ".safetensors",
                    "bytes": os.path.getsize(stem + ".safetensors"), "sha256": _sha256(stem + ".safetensors"),
                    "tensors": table, "quantization": block,
                    "model_config": {k: v for k, v in config.items() if k != "quantization"}}
        _write_json_atomic(stem + ".manifest.json", manifest)
        torch.save({"module": {STUB_KEY: torch.zeros(0)}, "sat_quant_format_version": FORMAT_VERSION},
                   stem + ".pt")
        _fsync_dir(tmp_dir)
        _commit_iteration(tmp_dir, final_dir, single_writer=world == 1)
        committed = True
        _fsync_dir(final_dir)
        _fsync_dir(save_dir)
    except _save_errors() as exc:
        raise _save_failed(exc, final_dir, save_dir, committed) from exc
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # a temporary folder, or the old files an overwrite swapped out
    _barrier()
    if rank == 0:
        try:
            _write_json_atomic(os.path.join(save_dir, "model_config.json"), config)
            _write_text_atomic(os.path.join(save_dir, "latest"), str(iteration))
            _fsync_dir(save_dir)
        except OSError as exc:
            raise _save_failed(exc, final_dir, save_dir, committed=True) from exc
    _barrier()
    return final_dir


def _save_failed(exc: BaseException, final_dir: str, save_dir: str, committed: bool) -> CheckpointError:
    why = "the disk is full" if _is_disk_full(exc) else f"{getattr(exc, 'strerror', None) or exc}"
    if not committed:
        return CheckpointError(f"saving to {final_dir} failed: {why}. Nothing was replaced: the previous "
                               f"checkpoint in {save_dir} (if any) is still the one 'latest' names; free "
                               f"space (or fix the cause) and save again.")
    return CheckpointError(f"saving to {final_dir} failed after its tensor files were in place: {why}. "
                           f"{save_dir}/latest names a complete checkpoint (the previous iteration, or this one "
                           f"when it was overwritten); free space (or fix the cause) and save again.")


def _barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


# -- loading --------------------------------------------------------------------------------------

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


def read_manifest(load_dir: str, iteration: int, rank: int) -> Optional[Dict[str, Any]]:
    path = state_file(load_dir, iteration, rank, ".manifest.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is corrupted ({exc}); restore it or re-save the checkpoint.") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is not supported by this sat_quant (it reads "
                              f"version {FORMAT_VERSION}); upgrade sat_quant or re-convert the checkpoint.")
    return manifest


def verify_tensor_file(path: str, manifest: Dict[str, Any], checksum: bool = True) -> None:
    """Size always, sha256 when ``checksum``: a truncated or altered file is named, never half-read."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete (re-save or re-convert it).")
    size = os.path.getsize(path)
    if size != manifest["bytes"]:
        raise CheckpointError(f"{path} has {size} bytes but its manifest says {manifest['bytes']}: the file is "
                              f"truncated or was replaced; re-save or re-convert the checkpoint.")
    if checksum and _sha256(path) != manifest["sha256"]:
        raise CheckpointError(f"{path} fails its sha256 check: the file is corrupted; re-save or re-convert "
                              f"the checkpoint.")


class TensorSource:
    """Reads named tensors from a safetensors file or a SAT .pt, one at a time, with bounded residency."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._handle = None
        self._mapped_bytes = 0
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            self._open = lambda: safe_open(path, framework="pt", device="cpu")
            try:
                self._handle = self._open()
            except Exception as exc:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); "
                                      f"it may be truncated or corrupted.") from None
            self._shapes = {}
            for k in self._handle.keys():
                sl = self._handle.get_slice(k)
                self._shapes[k] = (tuple(sl.get_shape()), _st_dtype(sl.get_dtype()))
        else:
            self._state = _torch_load_safely(path)
            self._shapes = {k: (tuple(v.shape), v.dtype) for k, v in self._state.items()
                            if isinstance(v, torch.Tensor)}

    def layout(self) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
        return self._shapes

    def get(self, name: str, *, owned: bool = True) -> torch.Tensor:
        """The tensor ``name``; with ``owned`` (default) in memory of its own, never a view of the file's map.

        ``owned=False`` may return a view of the memory map (it pins the map while referenced): for a
        caller that copies it right away (``param.copy_``), saving a temporary copy.
        """
        if self._handle is None:
            t = self._state[name]
            return t.clone() if owned else t
        shape, dtype = self._shapes[name]
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if self._mapped_bytes and self._mapped_bytes + nbytes > _REMAP_BYTES:
            self._remap()
        # safetensors' tensors are views of its memory map: one kept by the model (an int4 scale, a
        # whole int8 qweight) would pin the map, and every page touched through it, for good
        t = self._handle.get_tensor(name)
        if owned:
            t = t.clone()
        self._mapped_bytes += nbytes
        return t

    def _remap(self) -> None:
        """Drop the memory map (file pages touched through it otherwise stay resident) and open a new one."""
        self._handle = None
        self._handle = self._open()
        self._mapped_bytes = 0


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _st_dtype(name: str) -> torch.dtype:
    return _ST_DTYPES.get(name, torch.uint8)


def _numpy_rng_globals() -> list:
    """What SAT's deepspeed checkpoints pickle besides tensors: numpy's RNG state (a uint32 array). These few
    numpy types rebuild plain arrays only; any other global is still refused by weights_only."""
    try:
        import numpy as np
        core = getattr(np, "_core", None) or np.core
        return [np.ndarray, np.dtype, core.multiarray._reconstruct, type(np.dtype(np.uint32))]
    except (ImportError, AttributeError):
        return []


def _torch_load_safely(path: str) -> Dict[str, torch.Tensor]:
    """A SAT .pt, memory-mapped and with weights_only=True: a pickle that would run code is refused."""
    import pickle
    import zipfile
    try:
        # files from torch < 1.6 (legacy format) cannot be memory-mapped; weights_only holds for them too
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            sd = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = str(exc).splitlines()
        detail = next((l.strip() for l in lines if "Unsupported" in l), lines[0] if lines else "")
        raise CheckpointError(f"{path} contains pickled code or objects that are not plain tensors; sat_quant "
                              f"loads checkpoints with weights_only=True and refuses it. Re-save it from "
                              f"trusted code as a plain state dict. ({detail})") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path} cannot be read as a torch checkpoint ({exc}); it may be truncated.") from None
    if not isinstance(sd, dict) or not isinstance(sd.get("module"), dict):
        raise CheckpointError(f"{path} is not a SAT checkpoint (expected a dict with a 'module' state dict).")
    return sd["module"]


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


def load_into(model: nn.Module, source: TensorSource, *, strict: bool = True) -> None:
    """Fill ``model`` from ``source``: check every name/shape/dtype first, then copy one module at a time.

    Full-precision ``weight`` tensors arriving for a quantized layer are quantized as they arrive.
    """
    check_fits(model, source, strict=strict)
    fill(model, source)


def check_fits(model: nn.Module, source: TensorSource, *, strict: bool = True) -> None:
    """Raise CheckpointError unless ``source`` holds exactly the tensors ``model`` needs (names, shapes, dtypes)."""
    have = source.layout()
    if STUB_KEY in have:
        raise CheckpointError(f"{source.path} is sat_quant's stub; its tensors are in the .safetensors file next "
                              f"to it (load with sat_quant.from_pretrained).")
    want = expected_layout(model)
    problems: List[str] = []
    quant_prefixes = {}
    for prefix, module in model.named_modules():
        if isinstance(module, QuantLinear):
            quant_prefixes[prefix + "." if prefix else ""] = module
    consumed = set()
    packed = {pre + n for pre, layer in quant_prefixes.items() for n in layer.fmt.layout(layer.spec)}
    for name, (shape, dtype) in want.items():
        if name in have:
            consumed.add(name)
            got_shape, got_dtype = have[name]
            # full-precision tensors may change float dtype (copy_ casts, as load_state_dict does); packed ones may not
            cast_ok = name not in packed and got_dtype.is_floating_point and dtype.is_floating_point
            if got_shape != shape or (got_dtype != dtype and not cast_ok):
                problems.append(f"{name}: checkpoint has {list(got_shape)} {got_dtype}, model needs {list(shape)} {dtype}")
            continue
        prefix, _, local = name.rpartition(".")
        layer = quant_prefixes.get(prefix + "." if prefix else "")
        fp_name = (prefix + "." if prefix else "") + "weight"
        if layer is not None and local in layer.fmt.layout(layer.spec) and fp_name in have:
            consumed.add(fp_name)
            got_shape = have[fp_name][0]
            if got_shape != (layer.out_features, layer.in_features):
                problems.append(f"{fp_name}: checkpoint has {list(got_shape)}, model needs "
                                f"{[layer.out_features, layer.in_features]}")
            continue
        problems.append(f"{name}: missing from the checkpoint")
    unexpected = sorted(set(have) - consumed)
    if strict and unexpected:
        problems += [f"{n}: in the checkpoint but not in the model" for n in unexpected[:10]]
    if problems:
        raise CheckpointError(f"{source.path} does not fit this model ({len(problems)} problems):\n  " +
                              "\n  ".join(sorted(set(problems))[:15]) +
                              "\nCheck that the model class and its sizes (model_config.json) match the checkpoint, "
                              "and that the quantization block describes these tensors.")


def fill(model: nn.Module, source: TensorSource) -> None:
    """Copy every tensor of ``model`` from ``source`` (already checked by ``check_fits``), one module at a time."""
    from .build import release_freed_memory
    have = source.layout()
    with torch.no_grad():
        for prefix, module in model.named_modules():  # each module once, even where it is shared
            pre = prefix + "." if prefix else ""
            if isinstance(module, QuantLinear):  # neutral_tensors() is not needed here (it would unpack int4)
                names = list(module.fmt.layout(module.spec))
                if all(pre + n in have for n in names):
                    module.load_neutral_({n: source.get(pre + n) for n in names})
                else:
                    module.quantize_weight_(source.get(pre + "weight"))
                release_freed_memory(4 * module.quantized_nbytes())  # replaced tensors + repack temporaries
            for n, t in _saved_tensors(module):
                t.copy_(source.get(pre + n, owned=False))
    release_freed_memory()
