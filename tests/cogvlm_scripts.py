"""Run CogVLM's own scripts, patched with ``patches/``, on the tiny real model: helpers for the tests.

A patched copy of the upstream snapshot is made in a temporary folder (the snapshot itself is never
modified); checkpoints, tokenizer and image come from :mod:`sat_quant.testing.cogvlm_assets`.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
PATCHES = sorted((REPO / "patches").glob("*.patch"))


def script_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for a script run: offline, no wandb, the project importable, CPU threads bounded."""
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="2", PYTHONPATH=str(REPO))
    env.update(extra or {})
    return env


def git_apply(checkout: Path, patches: Sequence[Path] = PATCHES, check: bool = False,
              reverse: bool = False) -> subprocess.CompletedProcess:
    """``git apply [--check] [-R]`` every patch, in order, inside ``checkout`` (it need not be a git repository)."""
    cmd = ["git", "apply"] + (["--check"] if check else []) + (["-R"] if reverse else []) + [str(p) for p in patches]
    return subprocess.run(cmd, cwd=checkout, capture_output=True, text=True)


def patched_checkout(cogvlm_dir: Path, dest: Path) -> Path:
    """A copy of the CogVLM snapshot at ``dest`` with every patch applied."""
    shutil.copytree(cogvlm_dir, dest)
    result = git_apply(dest)
    if result.returncode:
        raise RuntimeError(f"patches did not apply: {result.stderr}")
    return dest


def run_script(checkout: Path, script: str, argv: List[str], stdin: str = "", *, nproc: int = 0,
               timeout: int = 240, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run ``script`` (relative to the checkout) with python, or under ``torchrun --nproc_per_node nproc``."""
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), script] + argv
    else:
        cmd = [sys.executable, script] + argv
    return subprocess.run(cmd, cwd=checkout, input=stdin, capture_output=True, text=True, timeout=timeout,
                          env=script_env(env))


def answers(stdout: str) -> List[str]:
    """The model's replies as cli_demo_sat.py prints them ("Model: ..." after the prompts on the same line)."""
    return [m.group(1) for m in re.finditer(r"(?:^|User: )Model: (.*)$", stdout, flags=re.MULTILINE)]
