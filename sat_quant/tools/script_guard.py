"""What the patched CogVLM scripts call first, without torch or SAT: their arguments checked before the heavy
imports, and any failure as one line (exit 2 bad input, 1 environment), said once under ``torchrun``.

Under ``torchrun`` every rank runs the same checks and would print the same refusal, and torchrun then prints its
own traceback and summary below them. So a failing rank writes its line into the error file torchrun gives it
(``$TORCHELASTIC_ERROR_FILE``): torchrun shows it as the run's root cause, the last thing on screen, once. A
refusal of bad input is the same on every rank: only rank 0 reports it; the other ranks wait for torchrun to stop
them (they report it themselves only if rank 0 did not fail). ``SAT_QUANT_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, List, Optional

from ..errors import QuantConfigError
from ..sat.flags import add_quant_args
from .cli import BAD_INPUT, describe_failure

__all__ = ["add_quant_args", "check_model_parallel_fits", "check_script_args", "check_script_argv", "report_failure",
           "resolve_checkpoint", "script_main"]

#: how long a rank other than 0 waits for torchrun to stop it after refusing the same input as rank 0
PEER_GRACE_S = 10.0


def resolve_checkpoint(name: str) -> str:
    """A local checkpoint folder as is; a model name only where SAT has already unpacked it (``$SAT_HOME/name``,
    default ``~/.sat_models``). Never downloads: an unknown name is one sentence saying where to get it."""
    if os.path.isdir(name):
        return name
    cached = os.path.join(os.path.expanduser(os.getenv("SAT_HOME", "~/.sat_models")), name)
    if os.path.isdir(cached):
        return cached
    raise QuantConfigError(f"--from_pretrained {name}: no such folder, and not in SAT's model folder ({cached}); "
                           f"sat_quant never downloads. Download the checkpoint (CogVLM's README links cogvlm-chat, "
                           f"cogagent-chat, ...), unzip it, and pass its folder: --from_pretrained /path/to/{name}.")


_PARTITIONED_SIZES = ("num_attention_heads", "inner_hidden_size")  # what SAT's parallel layers divide by mp


def check_model_parallel_fits(model_config: Dict[str, Any], world_size: int, where: str = "model_config.json") -> None:
    """Refuse a model-parallel size that does not divide the heads (or MLP width) of every tower, before SAT's
    bare ``divide`` assertion fires deep inside the build. Nested configs (``eva_args``, ...) are checked too."""
    if world_size <= 1:
        return
    sizes = []

    def visit(config: Dict[str, Any], prefix: str) -> None:
        for key, value in config.items():
            if isinstance(value, dict):
                visit(value, f"{prefix}{key}.")
            elif key in _PARTITIONED_SIZES and isinstance(value, int) and value > 0:
                sizes.append((f"{prefix}{key}", value))

    visit(model_config, "")
    problems = [f"{name}={value}" for name, value in sizes if value % world_size]
    if problems:
        fits = [n for n in (1, 2, 4, 8, 16) if all(value % n == 0 for _, value in sizes)]
        raise QuantConfigError(f"model-parallel size {world_size} (WORLD_SIZE / --nproc_per_node) does not divide "
                               f"{', '.join(problems)} in {where}; each rank must hold whole attention heads. "
                               f"Use torchrun --nproc_per_node {fits[-1]} or another size that divides them.")


def check_script_args(args: argparse.Namespace, world_size: Optional[int] = None) -> Optional[str]:
    """The refusals a script can make from its flags and the checkpoint's model_config.json alone, before it
    imports torch, SAT or deepspeed: ``--fp16`` with ``--bf16``, an unknown ``--from_pretrained``, a world size
    that does not divide the heads. Returns the checkpoint folder (None without ``--from_pretrained``); the
    loader checks the rest (a ``--quant`` that contradicts a quantized checkpoint, shapes, files)."""
    if getattr(args, "fp16", False) and getattr(args, "bf16", False):
        raise QuantConfigError("--fp16 and --bf16 were both given; pass only one of them (or neither for fp32).")
    name = getattr(args, "from_pretrained", None)
    if not name:
        return None
    path = resolve_checkpoint(name)
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    config_path = os.path.join(path, "model_config.json")
    try:
        with open(config_path) as f:
            model_config = json.load(f)
    except (OSError, ValueError):
        return path  # unreadable or missing: the loader names the file and the fix
    if isinstance(model_config, dict):
        check_model_parallel_fits(model_config, world_size, where=config_path)
    return path


def check_script_argv(argv: List[str]) -> Optional[str]:
    """:func:`check_script_args` on a raw argument list, for scripts that hand their argv to SAT's ``get_args``
    (the finetune and evaluate scripts): only the flags checked here are read, the rest is left to SAT."""
    parser = argparse.ArgumentParser(prog=os.path.basename(sys.argv[0] or "script"), add_help=False)
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--from_pretrained", default=None)
    known, _ = parser.parse_known_args(argv)
    return check_script_args(known)


def _write_error_file(path: str, message: str) -> bool:
    """torchrun's error-file format (what ``torch.distributed.elastic``'s ``@record`` writes), with our one line
    as the message and no traceback, so torchrun's summary shows the line itself."""
    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}, f)
        return True
    except OSError:
        return False


def report_failure(message: str, status: int) -> None:
    """Say ``message`` once for the whole run (see the module docstring), then exit with ``status``."""
    rank = int(os.environ.get("RANK", 0) or 0)
    world_size = int(os.environ.get("WORLD_SIZE", 1) or 1)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if world_size > 1 and rank != 0 and status == BAD_INPUT:
        # rank 0 refuses the same input and torchrun stops this rank when it sees that (then with the same status,
        # not as a signal); if it does not, say it here
        signal.signal(signal.SIGTERM, lambda *_: os._exit(status))
        time.sleep(PEER_GRACE_S)
    if world_size > 1 and error_file and _write_error_file(error_file, message):
        sys.exit(status)
    if world_size > 1 and rank != 0 and status == BAD_INPUT:
        sys.exit(status)  # no torchrun error file (another launcher): rank 0 prints it
    print(message, file=sys.stderr, flush=True)
    sys.exit(status)


def script_main(main: Callable[[], Any], prog: Optional[str] = None) -> None:
    """Run a script's ``main()``; any failure becomes one line ``PROG: error: ...`` on stderr (exit 2 bad input,
    1 environment), said once under torchrun. ``SAT_QUANT_DEBUG=1`` re-raises it with its traceback."""
    prog = prog or os.path.basename(sys.argv[0] or "script")
    try:
        main()
    except Exception as exc:
        if os.environ.get("SAT_QUANT_DEBUG") == "1":
            raise
        status, message = describe_failure(exc)
        report_failure(f"{prog}: error: {message}", status)
