"""patches/ against CogVLM's own scripts: they apply to the upstream snapshot, and the patched scripts run
end to end on CPU on the tiny real CogVLMModel (scripted stdin, real checkpoints, real torchrun)."""
from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap

import pytest

from tests.cogvlm_fixture import COGVLM_DIR, cogvlm_available
from tests.cogvlm_scripts import PATCHES, answers, git_apply, patched_checkout, run_script, script_env

pytestmark = pytest.mark.skipif(not cogvlm_available(), reason="needs the CogVLM snapshot (../shared/cogvlm)")

QUESTION = "what is in this image"


def test_every_patch_applies_cleanly_to_the_upstream_snapshot():
    assert PATCHES, "patches/ holds no .patch files"
    for patch in PATCHES:  # each one alone, then the series in order
        result = git_apply(COGVLM_DIR, [patch], check=True)
        assert result.returncode == 0, f"{patch.name}: {result.stderr}"
    assert git_apply(COGVLM_DIR, check=True).returncode == 0


@pytest.fixture(scope="module")
def cogvlm_env(tmp_path_factory):
    """A patched checkout, the tiny model as a full-precision checkpoint, int4 (group 64, so it also splits
    at model-parallel 2) and int8 checkpoints converted from it, a tokenizer and an image."""
    import sat_quant
    from sat_quant.testing import cogvlm_assets as assets
    root = tmp_path_factory.mktemp("cogvlm")
    env = argparse.Namespace(root=root, checkout=patched_checkout(COGVLM_DIR, root / "CogVLM"))
    env.fp = str(root / "fp")
    assets.save_tiny_checkpoint(env.fp)
    env.q4, env.q8 = str(root / "q4"), str(root / "q8")
    sat_quant.convert(env.fp, env.q4, sat_quant.QuantConfig(bits=4, group_size=64), progress=False)
    sat_quant.convert(env.fp, env.q8, sat_quant.QuantConfig(bits=8), progress=False)
    env.tokenizer = assets.make_tokenizer(str(root / "tokenizer"))
    env.image = assets.make_image(str(root / "image.png"))
    return env


def _chat(env, *flags, stdin=None, nproc=0):
    stdin = stdin if stdin is not None else f"{env.image}\n{QUESTION}\nstop\n"
    argv = ["--local_tokenizer", env.tokenizer, "--max_length", "300", *flags]
    return run_script(env.checkout, "basic_demo/cli_demo_sat.py", argv, stdin, nproc=nproc)


@pytest.fixture(scope="module")
def int4_answer(cogvlm_env):
    """cli_demo_sat.py --quant 4 on the saved int4 checkpoint; a missing image first, then a real one."""
    stdin = f"{cogvlm_env.root}/no_such_image.png\n{QUESTION}\n{cogvlm_env.image}\n{QUESTION}\nstop\n"
    result = _chat(cogvlm_env, "--from_pretrained", cogvlm_env.q4, "--quant", "4", stdin=stdin)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_cli_demo_answers_from_a_saved_int4_checkpoint(int4_answer):
    replies = answers(int4_answer.stdout)
    assert len(replies) == 1 and replies[0].strip(), int4_answer.stdout[-2000:]
    assert "int4 (4-bit) model built" in int4_answer.stdout + int4_answer.stderr


def test_cli_demo_reports_a_missing_image_and_goes_on(int4_answer):
    assert "No such file or directory" in int4_answer.stdout and "no_such_image.png" in int4_answer.stdout


def test_cli_demo_int8_bf16_answers_from_a_saved_int8_checkpoint(cogvlm_env):
    result = _chat(cogvlm_env, "--from_pretrained", cogvlm_env.q8, "--quant", "8", "--bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    replies = answers(result.stdout)
    assert len(replies) == 1 and replies[0].strip(), result.stdout[-2000:]
    assert "int8 (8-bit) model built" in result.stdout + result.stderr


def test_cli_demo_under_torchrun_model_parallel_2_answers_as_one_process(cogvlm_env, int4_answer):
    """WORLD_SIZE=2: the int4 checkpoint saved at mp=1 is split per rank (no dequantization) and answers
    exactly what the single process answered (greedy decoding, top_k=1)."""
    result = _chat(cogvlm_env, "--from_pretrained", cogvlm_env.q4, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert answers(result.stdout) == answers(int4_answer.stdout)


def test_cli_demo_refuses_quant_3(cogvlm_env):
    result = _chat(cogvlm_env, "--from_pretrained", cogvlm_env.q4, "--quant", "3")
    assert result.returncode == 2 and "--quant: invalid choice: 3" in result.stderr


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else ""


def test_cli_demo_refuses_a_quant_that_contradicts_the_checkpoint_in_one_line(cogvlm_env):
    result = _chat(cogvlm_env, "--from_pretrained", cogvlm_env.q4, "--quant", "8")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = _last_line(result.stderr)
    assert last.startswith("cli_demo_sat.py: error: ") and "already quantized to 4-bit (int4" in last
    assert "Drop the --quant flags" in last


REFUSALS = {  # flags -> what the one line says; all refused before torch, SAT or the model code are imported
    "fp16+bf16": (["--fp16", "--bf16"], "--fp16 and --bf16 were both given"),
    "unknown name": (["--from_pretrained", "cogvlm-chat-no-such-model"], "sat_quant never downloads"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_cli_demo_refuses_bad_flags_in_one_line_before_the_heavy_imports(cogvlm_env, case):
    flags, said = REFUSALS[case]
    # run the script as python would, then list the heavy modules that were imported when it exited
    code = ("import runpy, sys\n"
            "sys.argv = ['basic_demo/cli_demo_sat.py'] + sys.argv[1:]\n"
            "try:\n"
            "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "finally:\n"
            "    print('HEAVY', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'sat', 'deepspeed'}))\n")
    argv = [sys.executable, "-c", code, "--local_tokenizer", cogvlm_env.tokenizer, *flags]
    if "--from_pretrained" not in flags:
        argv += ["--from_pretrained", cogvlm_env.q4]
    result = subprocess.run(argv, cwd=cogvlm_env.checkout, capture_output=True, text=True, timeout=120,
                            env=script_env())
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("cli_demo_sat.py: error: ")
    assert said in result.stderr and "HEAVY []" in result.stdout


def test_sat_quant_debug_shows_the_traceback(cogvlm_env):
    result = run_script(cogvlm_env.checkout, "basic_demo/cli_demo_sat.py", ["--fp16", "--bf16"],
                        env={"SAT_QUANT_DEBUG": "1"})
    assert result.returncode == 1 and "Traceback" in result.stderr and "QuantConfigError" in result.stderr


def test_under_torchrun_the_refusal_is_said_once_and_last(cogvlm_env):
    """Two ranks refuse the same contradicting --quant (after loading SAT): rank 0's line goes into torchrun's
    error file, so torchrun's own summary ends with it as the root cause; rank 1 says nothing and exits 2."""
    result = _chat(cogvlm_env, "--from_pretrained", cogvlm_env.q4, "--quant", "8", nproc=2)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert out.count("already quantized to 4-bit") == 1, out[-4000:]
    root_cause = out.split("Root Cause (first observed failure):", 1)[1]
    assert "rank      : 0" in root_cause and "cli_demo_sat.py: error: " in root_cause
    assert "already quantized to 4-bit" in root_cause and "Drop the --quant flags" in root_cause
    assert out.count("Traceback (most recent call last)") == 1  # torchrun's own; none from the ranks
    assert "exitcode  : -15" not in out  # rank 1 stopped with the refusal's status, not as a signal


def test_model_parallel_size_that_does_not_divide_the_heads_is_refused_before_building(cogvlm_env):
    from sat_quant.errors import QuantConfigError
    from sat_quant.tools.patched_scripts import load_for_inference
    with pytest.raises(QuantConfigError, match=r"model-parallel size 3 .*num_attention_heads=4.*nproc_per_node 4"):
        load_for_inference(cogvlm_env.q4, argparse.Namespace(quant=None, fp16=False, bf16=False), rank=0,
                           world_size=3)


def test_unpatched_sat_loader_refuses_a_quantized_checkpoint_and_names_sat_quant(cogvlm_env):
    """What the unpatched scripts call (SAT's AutoModel.from_pretrained) must not load the stub silently."""
    code = textwrap.dedent(f"""
        import argparse, sys
        sys.path.insert(0, {str(COGVLM_DIR)!r})
        from utils.models import CogVLMModel
        from sat.model import AutoModel
        AutoModel.from_pretrained({cogvlm_env.q4!r}, args=argparse.Namespace(deepspeed=None, local_rank=0, rank=0,
            world_size=1, model_parallel_size=1, mode='inference', skip_init=True, use_gpu_initialization=False,
            device='cpu', fp16=False, bf16=False))
    """)
    import sys

    from tests.cogvlm_scripts import script_env
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=script_env(),
                            timeout=120)
    assert result.returncode != 0
    assert "import sat_quant" in result.stdout + result.stderr  # the one sentence naming the fix


def test_web_demo_load_model_and_post_answer_with_int4(cogvlm_env):
    """web_demo.py's own load_model() and post() (the Gradio UI is not under test: an empty module stands in
    for the gradio import so the script's functions can be called)."""
    code = textwrap.dedent(f"""
        import argparse, sys, types
        sys.modules['gradio'] = types.ModuleType('gradio')
        sys.path.insert(0, 'basic_demo')
        import sat_quant, web_demo
        args = sat_quant.add_quant_args(argparse.ArgumentParser()).parse_args([])
        args.__dict__.update(from_pretrained={cogvlm_env.q4!r}, local_tokenizer={cogvlm_env.tokenizer!r},
                             version='chat', fp16=False, bf16=False, stream_chat=False, max_length=300)
        web_demo.model, web_demo.image_processor, web_demo.cross_image_processor, web_demo.text_processor_infer = \\
            web_demo.load_model(args)
        _, history, _ = web_demo.post({QUESTION!r}, 0.8, 0.4, 1, {cogvlm_env.image!r}, [], None, {{'args': args}})
        print('HISTORY', repr(history))
    """)
    import sys

    from tests.cogvlm_scripts import script_env
    result = subprocess.run([sys.executable, "-c", code], cwd=cogvlm_env.checkout, capture_output=True, text=True,
                            env=script_env(), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    history = eval(result.stdout.split("HISTORY", 1)[1])
    assert history[-1][0] == QUESTION and history[-1][1] and "Timeout" not in history[-1][1]
