"""examples/ run as documented (bash, CPU, no downloads) and do what they say."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.cogvlm_fixture import COGVLM_DIR, cogvlm_available
from tests.cogvlm_scripts import REPO, answers, script_env

pytestmark = pytest.mark.skipif(not cogvlm_available(), reason="needs the CogVLM snapshot (../shared/cogvlm)")


def _run(name: str, work: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "examples" / name), str(work)], capture_output=True, text=True,
                          timeout=400, env=script_env({"COGVLM_DIR": str(COGVLM_DIR)}))


@pytest.fixture(scope="module")
def chat_example(tmp_path_factory):
    work = tmp_path_factory.mktemp("example")
    result = _run("cogvlm_tiny_chat.sh", work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, result


def test_tiny_chat_example_converts_chats_twice_and_prints_the_memory_table(chat_example):
    work, result = chat_example
    assert (work / "int4" / "model_config.json").is_file() and "4-bit (int4 group 64)" in result.stdout
    replies = answers(result.stdout)
    assert len(replies) == 2 and all(r.strip() for r in replies), result.stdout[-2000:]
    assert "exceeds the context length" not in result.stdout
    table = result.stdout.split("CogVLMModel: batch 1, sequence 300", 1)[1]
    assert all(col in table for col in ("fp16", "bf16", "int8", "int4")) and "vision tower" in table
    assert (COGVLM_DIR / "basic_demo" / "cli_demo_sat.py").read_text().count("sat_quant") == 0  # untouched


def test_model_parallel_example_answers_like_the_single_process_one(chat_example):
    work, single = chat_example
    result = _run("cogvlm_tiny_mp2.sh", work)  # reuses the checkpoint, tokenizer and patched checkout
    assert result.returncode == 0, result.stderr[-3000:]
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
