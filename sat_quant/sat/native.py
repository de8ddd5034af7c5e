"""SAT's own entry points load sat_quant checkpoints: ``AutoModel.from_pretrained``, ``Cls.from_pretrained`` and
``load_checkpoint`` (what ``training_main`` runs for ``--load``).

Three small wrappers, installed once SAT is imported (a post-import hook registered by ``import sat_quant``, so
importing sat_quant alone imports neither SAT nor torch). Each one looks at the folder first: a sat_quant checkpoint
(a quantization block in model_config.json, or a manifest beside the tensors) goes to sat_quant's loader, anything
else to SAT's original function, unchanged. The wrapped signatures are checked against the installed SAT before
anything is replaced: if SAT changed them, nothing is patched and ``sat_quant.from_pretrained`` still works.
docs/ARCHITECTURE.md lists these patches.
"""
from __future__ import annotations

import inspect
import os
import warnings
from typing import Any, Callable, Dict, Optional

#: what each wrapped SAT function must accept for the wrapper to stand in for it (SAT 0.4.12)
EXPECTED_PARAMETERS = {
    "from_pretrained": ["cls", "name", "args", "home_path", "url", "prefix", "build_only", "use_node_group",
                        "overwrite_args", "kwargs"],
    "load_checkpoint": ["model", "args", "load_path", "prefix", "specific_iteration"],
}

_ORIGINALS: Dict[str, Callable[..., Any]] = {}


def is_sat_quant_checkpoint(path: Any) -> bool:
    """True for a local folder sat_quant wrote (or SAT wrote from a sat_quant-quantized model): its
    model_config.json holds a quantization block, or its latest iteration holds a sat_quant manifest."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        return False
    import json
    try:
        with open(os.path.join(path, "model_config.json")) as f:
            config = json.load(f)
        if isinstance(config, dict) and config.get("quantization"):
            return True
    except (OSError, ValueError):
        pass  # a broken config is reported by whichever loader reads it
    try:
        with open(os.path.join(path, "latest")) as f:
            iteration_dir = os.path.join(path, f.read().strip())
        return any(n.endswith("_model_states.manifest.json") for n in os.listdir(iteration_dir))
    except (OSError, UnicodeDecodeError):
        return False


def _local_folder(name: Any, home_path: Optional[str]) -> Optional[str]:
    """The folder SAT would load for ``name`` without downloading: the path itself, or ``$SAT_HOME/name``."""
    if isinstance(name, (str, os.PathLike)) and os.path.isdir(name):
        return os.fspath(name)
    if isinstance(name, str) and name:
        home = home_path or os.environ.get("SAT_HOME", os.path.expanduser("~/.sat_models"))
        candidate = os.path.join(home, name)
        if os.path.isdir(candidate):
            return candidate
    return None


def _is_auto(cls) -> bool:
    return cls.__name__ == "AutoModel" and cls.__module__ == "sat.model.base_model"


def _from_pretrained(cls, name, args=None, *, home_path=None, url=None, prefix="", build_only=False,
                     use_node_group=True, overwrite_args={}, **kwargs):  # noqa: B006 (SAT's signature)
    """SAT's ``from_pretrained``; a sat_quant checkpoint is built quantized and filled by sat_quant's loader."""
    folder = _local_folder(name, home_path)
    if folder is None or not is_sat_quant_checkpoint(folder):
        original = _ORIGINALS["AutoModel.from_pretrained" if _is_auto(cls) else "BaseModel.from_pretrained"]
        return original(cls, name, args, home_path=home_path, url=url, prefix=prefix, build_only=build_only,
                        use_node_group=use_node_group, overwrite_args=overwrite_args, **kwargs)
    from .loading import from_pretrained  # at call time: SAT is fully imported by then
    if prefix:
        from ..errors import CheckpointError
        raise CheckpointError(f"{folder} is a sat_quant checkpoint; loading one part of it (prefix={prefix!r}) is not "
                              f"supported. Load the whole checkpoint and take the submodule from the model.")
    iteration = kwargs.pop("specific_iteration", None)
    model_cls = None if _is_auto(cls) else cls
    return from_pretrained(model_cls, folder, args, overwrite_args=overwrite_args, build_only=build_only,
                           iteration=iteration, **kwargs)


def _load_checkpoint(model, args, load_path=None, prefix="", specific_iteration=None):
    """SAT's ``load_checkpoint``; a sat_quant checkpoint fills the model through sat_quant (quantizing it first when
    it was built in full precision). Returns the iteration as SAT does (0 when fine-tuning)."""
    path = load_path if load_path is not None else getattr(args, "load", None)
    if not is_sat_quant_checkpoint(path):
        return _ORIGINALS["load_checkpoint"](model, args, load_path=load_path, prefix=prefix,
                                             specific_iteration=specific_iteration)
    from .loading import load_into_built_model
    return load_into_built_model(model, os.fspath(path), args, prefix=prefix, iteration=specific_iteration)


def _signature_matches(function: Callable[..., Any], key: str) -> bool:
    return list(inspect.signature(function).parameters) == EXPECTED_PARAMETERS[key]


def install(sat_module: Any = None) -> bool:
    """Wrap SAT's loaders (idempotent). Returns False, with a warning, when the installed SAT's signatures are not
    the ones these wrappers were written for; SAT is then left untouched."""
    if _ORIGINALS:
        return True
    import sat.model.base_model as base_model
    import sat.training.model_io as model_io
    try:
        import sat.training.deepspeed_training as deepspeed_training
    except ModuleNotFoundError:  # SAT without deepspeed: no training_main to serve
        deepspeed_training = None
    originals = {
        "BaseModel.from_pretrained": base_model.BaseModel.__dict__["from_pretrained"].__func__,
        "AutoModel.from_pretrained": base_model.AutoModel.__dict__["from_pretrained"].__func__,
        "load_checkpoint": model_io.load_checkpoint,
    }
    if not (_signature_matches(originals["BaseModel.from_pretrained"], "from_pretrained")
            and _signature_matches(originals["AutoModel.from_pretrained"], "from_pretrained")
            and _signature_matches(originals["load_checkpoint"], "load_checkpoint")):
        warnings.warn("sat_quant: this SwissArmyTransformer's from_pretrained/load_checkpoint differ from the ones "
                      "sat_quant wraps (0.4.12), so SAT's own loaders will not read sat_quant checkpoints; use "
                      "sat_quant.from_pretrained.", RuntimeWarning, stacklevel=2)
        return False
    _ORIGINALS.update(originals)
    base_model.BaseModel.from_pretrained = classmethod(_from_pretrained)
    base_model.AutoModel.from_pretrained = classmethod(_from_pretrained)
    # load_checkpoint is imported by name into these modules: each binding is replaced
    for module in (model_io, base_model, deepspeed_training):
        if module is not None and getattr(module, "load_checkpoint", None) is originals["load_checkpoint"]:
            module.load_checkpoint = _load_checkpoint
    return True


def installed() -> bool:
    """Whether SAT's loaders are wrapped in this process."""
    return bool(_ORIGINALS)


__all__ = ["install", "installed", "is_sat_quant_checkpoint", "EXPECTED_PARAMETERS"]
