"""examples/ run as documented (bash, CPU, no downloads) and do what they say.

In CI (``CI=true``, or ``SAT_QUANT_FRESH_VENV=1`` anywhere) both examples run in a fresh virtual environment
(no system site packages) where only ``pip install -e ".[cogvlm]"`` was run: their passing there proves the
``cogvlm`` extra brings everything CogVLM's code and the examples import. Elsewhere they run in the test run's
own environment (the install takes minutes).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, Optional

import pytest

from tests.cogvlm_fixture import COGVLM_DIR, cogvlm_available
from tests.cogvlm_scripts import PATCHES, REPO, answers, git_apply, script_env

FRESH_VENV = os.environ.get("CI") == "true" or os.environ.get("SAT_QUANT_FRESH_VENV") == "1"

pytestmark = pytest.mark.skipif(not cogvlm_available() and not FRESH_VENV,
                                reason="needs the CogVLM snapshot (../shared/cogvlm)")


def _say(request, line: str) -> None:
    """A timing line in pytest's own output (CI logs), past its output capture."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)


@pytest.fixture(scope="module")
def example_env(tmp_path_factory, request) -> Iterator[Dict[str, object]]:
    """The environment the two examples run in: a fresh venv with the ``cogvlm`` extra (CI), else this one."""
    if not FRESH_VENV:
        yield {"env": script_env(), "venv": None, "install_s": None}
        return
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    # --no-compile: the same files, without byte-compiling torch's ~10k modules first (they compile as imported)
    result = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile", "-e",
                             f"{REPO}[cogvlm]"], capture_output=True, text=True, timeout=1800)
    free_gb = shutil.disk_usage(venv).free / 2**30
    assert result.returncode == 0, f"{free_gb:.1f} GB free on the venv's disk; pip said: {result.stderr[-3000:]}"
    install_s = time.monotonic() - start
    _say(request, f"fresh venv + pip install -e '.[cogvlm]': {install_s:.0f} s")
    env = {k: v for k, v in script_env().items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(venv))
    yield {"env": env, "venv": venv, "install_s": install_s}
    shutil.rmtree(venv, ignore_errors=True)  # ~4 GB (torch with its CUDA libraries): not kept past this module


def _run(name: str, work: Path, example_env, cogvlm_dir: Path = COGVLM_DIR) -> subprocess.CompletedProcess:
    env = dict(example_env["env"], COGVLM_DIR=str(cogvlm_dir))
    return subprocess.run(["bash", str(REPO / "examples" / name), str(work)], capture_output=True, text=True,
                          timeout=1500, env=env)


@pytest.fixture(scope="module")
def chat_example(tmp_path_factory, example_env, request):
    work = tmp_path_factory.mktemp("example")
    start = time.monotonic()
    result = _run("cogvlm_tiny_chat.sh", work, example_env)
    assert result.returncode == 0, result.stderr[-3000:]
    _say(request, f"cogvlm_tiny_chat.sh: {time.monotonic() - start:.0f} s")
    return work, result


@pytest.mark.skipif(not FRESH_VENV, reason="installs into a fresh venv (minutes): runs in CI (CI=true) or with "
                                           "SAT_QUANT_FRESH_VENV=1")
def test_the_examples_ran_in_a_fresh_venv_with_only_the_cogvlm_extra(example_env, chat_example):
    """What the examples ran on is isolated (no system site packages, not this environment) and holds what
    CogVLM's model code imports, from its own site-packages; torch and torchvision are the pinned pair."""
    venv: Optional[Path] = example_env["venv"]
    assert cogvlm_available(), "CI must have the CogVLM snapshot (../shared/cogvlm): the examples need it"
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    # where each module would load from (find_spec: located, not executed) and the installed versions
    code = ("import importlib.util, importlib.metadata as md\n"
            "for name in ('timm', 'einops', 'sentencepiece', 'transformers', 'xformers', 'sat', 'sat_quant'):\n"
            "    print(name, importlib.util.find_spec(name).origin)\n"
            "print('versions', md.version('torch').split('+')[0], md.version('torchvision').split('+')[0])\n")
    result = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                            timeout=120, env=example_env["env"], cwd=str(venv))
    assert result.returncode == 0, result.stderr[-3000:]
    where = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    for name in ("timm", "einops", "sentencepiece", "transformers", "xformers", "sat"):
        assert where[name].startswith(str(venv)), (name, where[name])
    assert where["sat_quant"].startswith(str(REPO))  # the editable install
    assert where["versions"] == "2.14.1 0.29.1"


def test_tiny_chat_example_converts_chats_twice_and_prints_the_memory_table(chat_example):
    work, result = chat_example
    assert f"patches: {len(PATCHES)} applied, 0 already present" in result.stdout  # an unpatched checkout
    assert (work / "int4" / "model_config.json").is_file() and "4-bit (int4 group 64)" in result.stdout
    replies = answers(result.stdout)
    assert len(replies) == 2 and all(r.strip() for r in replies), result.stdout[-2000:]
    assert "exceeds the context length" not in result.stdout
    table = result.stdout.split("CogVLMModel: batch 1, sequence 300", 1)[1]
    assert all(col in table for col in ("fp16", "bf16", "int8", "int4")) and "vision tower" in table
    assert (COGVLM_DIR / "basic_demo" / "cli_demo_sat.py").read_text().count("sat_quant") == 0  # untouched


def test_model_parallel_example_on_an_already_patched_checkout_answers_like_the_single_process_one(
        chat_example, example_env, tmp_path, request):
    work, single = chat_example
    patched = tmp_path / "CogVLM-patched"  # a user's checkout that the patches were applied to already
    shutil.copytree(work / "CogVLM", patched)
    start = time.monotonic()
    result = _run("cogvlm_tiny_mp2.sh", work, example_env, patched)  # reuses the checkpoint and tokenizer
    _say(request, f"cogvlm_tiny_mp2.sh: {time.monotonic() - start:.0f} s")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"patches: 0 applied, {len(PATCHES)} already present" in result.stdout
    assert (work / "int4-mp2" / "1" / "mp_rank_01_model_states.safetensors").is_file()
    assert answers(result.stdout) == answers(single.stdout)[:1]


def test_the_package_guesses_no_cogvlm_folder(monkeypatch, tmp_path):
    """No fixed path in the package: a folder argument or $SAT_QUANT_COGVLM_DIR, else an error saying how."""
    from sat_quant.testing.cogvlm_assets import find_cogvlm_dir
    monkeypatch.delenv("SAT_QUANT_COGVLM_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="set SAT_QUANT_COGVLM_DIR"):
        find_cogvlm_dir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        find_cogvlm_dir(str(tmp_path))


def test_an_example_without_a_cogvlm_checkout_says_where_to_get_one(tmp_path):
    env = script_env({"COGVLM_DIR": str(tmp_path / "nowhere")})
    result = subprocess.run(["bash", str(REPO / "examples" / "cogvlm_tiny_chat.sh"), str(tmp_path / "w")],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "no CogVLM checkout" in result.stderr and "COGVLM_DIR" in result.stderr
    assert not (tmp_path / "w").exists()


def _patched_copy(source: Path, dest: Path) -> subprocess.CompletedProcess:
    """examples/_require.sh's patched_copy, called alone (what both examples do first)."""
    script = f'REPO={str(REPO)!r}; COGVLM_DIR={str(source)!r}; . "$REPO/examples/_require.sh"; patched_copy {str(dest)!r}'
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, env=script_env())


def test_a_partly_patched_checkout_gets_only_the_missing_patches(tmp_path):
    partly = tmp_path / "partly"
    shutil.copytree(COGVLM_DIR, partly)
    assert git_apply(partly, PATCHES[2:3]).returncode == 0  # the user applied one patch by hand
    result = _patched_copy(partly, tmp_path / "copy")
    assert result.returncode == 0, result.stderr
    assert f"patches: {len(PATCHES) - 1} applied, 1 already present" in result.stdout
    reverse = subprocess.run(["git", "apply", "--reverse", "--check"] + [str(p) for p in PATCHES],
                             cwd=tmp_path / "copy", capture_output=True, text=True)
    assert reverse.returncode == 0, reverse.stderr  # every patch is now applied, once
    assert "sat_quant" not in (partly / "basic_demo" / "cli_demo_sat.py").read_text()  # the source untouched


def test_a_checkout_the_patches_do_not_fit_stops_the_example_in_one_line(tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(COGVLM_DIR, edited)
    demo = edited / "basic_demo" / "cli_demo_sat.py"
    demo.write_text(demo.read_text().replace("from sat.model import AutoModel", "from sat.model import AutoModel  # mine"))
    result = subprocess.run(["bash", str(REPO / "examples" / "cogvlm_tiny_chat.sh"), str(tmp_path / "w")],
                            env=script_env({"COGVLM_DIR": str(edited)}), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "patches/0001-cli_demo_sat-sat_quant.patch neither applies" in result.stderr and str(edited) in result.stderr
    assert not (tmp_path / "w" / "fp").exists()  # stopped before any work
