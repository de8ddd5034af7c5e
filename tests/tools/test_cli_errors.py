"""Errors for people: every refusal of the ``sat-quant`` CLI is one line on stderr naming what is wrong and the fix,
exit status 2 for bad input and 1 for the environment, no traceback unless ``SAT_QUANT_DEBUG=1``."""
import os
import subprocess
import sys

import pytest

import sat_quant
from sat_quant import QuantConfig
from sat_quant.tools.cli import main
from tests.conftest import sat_args, save_fp_with_sat
from tests.io.checkpoints import ROOT, snapshot


@pytest.fixture(scope="module")
def folders(fp_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model, _, _, _ = fp_models["gpt2"]
    save_fp_with_sat(model, sat_args("gpt2"), root / "fp")
    sat_quant.convert(str(root / "fp"), str(root / "q4"), QuantConfig(bits=4), progress=False)
    (root / "a-file").write_text("not a checkpoint")
    return root


def run_cli(capsys, *argv):
    status = main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    return status, lines


CASES = {
    "convert onto itself": (["convert", "{fp}", "{fp}", "--quant", "4", "--overwrite"], "overlaps the source"),
    "dequantize onto itself": (["dequantize", "{q4}", "{q4}", "--overwrite"], "overlaps the source"),
    "reshard around its source": (["reshard", "{q4}", "{root}", "--mp", "2", "--overwrite"], "overlaps the source"),
    "merge-lora into its source": (["merge-lora", "{q4}", "{q4}/out"], "overlaps the source"),
    "convert a file": (["convert", "{root}/a-file", "{root}/out", "--quant", "4"], "is a file"),
    "convert into a file": (["convert", "{fp}", "{root}/a-file", "--quant", "4", "--overwrite"], "not a folder"),
    "convert a quantized source": (["convert", "{q4}", "{root}/out2", "--quant", "4"], "already quantized"),
    "inspect a missing folder": (["inspect", "{root}/missing"], "does not exist"),
    "plan into a missing folder": (["plan", "{fp}", "--quant-budget", "5bpp", "-o", "{root}/missing/plan.json"],
                                   "does not exist"),
    "plan into its source": (["plan", "{fp}", "--quant-budget", "5bpp", "-o", "{fp}/plan.json"],
                             "inside the source checkpoint"),
    "plan with an unknown candidate": (["plan", "{fp}", "--quant-budget", "5bpp", "-o", "{root}/plan.json",
                                        "--candidates", "int9"], "--candidates int9"),
    "plan with an unreadable budget": (["plan", "{fp}", "--quant-budget", "lots", "-o", "{root}/plan.json"],
                                       "--quant-budget 'lots'"),
    "estimate without its config": (["estimate", "--config", "{root}/missing.json"], "--config"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_refusal_is_one_line_with_status_2_and_changes_nothing(folders, capsys, case):
    argv, needle = CASES[case]
    argv = [a.format(root=folders, fp=folders / "fp", q4=folders / "q4") for a in argv]
    before = snapshot(str(folders))
    status, lines = run_cli(capsys, *argv)
    assert status == 2, lines
    assert len(lines) == 1 and lines[0].startswith(f"sat-quant {argv[0]}: error: "), lines
    assert needle in lines[0], lines
    assert snapshot(str(folders)) == before


def test_an_environment_failure_is_status_1(folders, capsys, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device", str(folders / "out"))
    monkeypatch.setattr("sat_quant.tools.convert.check_destination", no_space)
    status, lines = run_cli(capsys, "convert", str(folders / "fp"), str(folders / "out"), "--quant", "4")
    assert status == 1 and len(lines) == 1 and "No space left on device" in lines[0], lines


def test_no_traceback_unless_sat_quant_debug(folders):
    argv = [sys.executable, "-m", "sat_quant.tools.cli", "dequantize", str(folders / "q4"), str(folders / "q4")]
    env = dict(os.environ, WANDB_MODE="disabled")
    quiet = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().splitlines()[-1].startswith("sat-quant dequantize: error: ")
    loud = subprocess.run(argv, cwd=ROOT, env=dict(env, SAT_QUANT_DEBUG="1"), capture_output=True, text=True,
                          timeout=300)
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "CheckpointError" in loud.stderr


ALLOCATOR = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                         "you tried to allocate 4194304 bytes. Error code 12 (Cannot allocate memory)")


def _fail_allocating(self, name, **kwargs):
    raise ALLOCATOR


def test_an_allocation_failure_in_convert_is_an_out_of_memory_error_and_writes_nothing(folders, capsys, monkeypatch):
    monkeypatch.setattr("sat_quant.io.tensorfile.TensorSource.get", _fail_allocating)
    dst = folders / "oom-out"
    with pytest.raises(sat_quant.QuantOutOfMemoryError) as excinfo:
        sat_quant.convert(str(folders / "fp"), str(dst), QuantConfig(bits=4), progress=False)
    assert "ran out of cpu memory while converting" in str(excinfo.value) and "may be truncated" not in str(excinfo.value)
    assert not dst.exists() and not [n for n in os.listdir(folders) if "tmp" in n]
    status, lines = run_cli(capsys, "convert", str(folders / "fp"), str(dst), "--quant", "4", "--quiet")
    assert status == 1 and len(lines) == 1 and "ran out of cpu memory" in lines[0], lines


def test_an_allocation_failure_while_loading_is_an_out_of_memory_error(folders, monkeypatch):
    from sat.model.official.gpt2_model import GPT2Model
    monkeypatch.setattr("sat_quant.io.tensorfile.TensorSource.get", _fail_allocating)
    with pytest.raises(sat_quant.QuantOutOfMemoryError, match="while loading"):
        sat_quant.from_pretrained(GPT2Model, str(folders / "q4"))


def test_an_unknown_model_name_says_where_to_get_the_checkpoint(tmp_path, monkeypatch):
    """The patched scripts' --from_pretrained: a folder, or a name SAT already unpacked; never a download."""
    from sat_quant.tools.patched_scripts import resolve_checkpoint
    monkeypatch.setenv("SAT_HOME", str(tmp_path))
    with pytest.raises(sat_quant.QuantConfigError) as excinfo:
        resolve_checkpoint("cogvlm-chat")
    message = str(excinfo.value)
    assert "--from_pretrained cogvlm-chat" in message and "never downloads" in message and "pass its folder" in message
    assert os.listdir(tmp_path) == []  # no lock file, no partial download
    (tmp_path / "cogvlm-chat").mkdir()
    assert resolve_checkpoint("cogvlm-chat") == str(tmp_path / "cogvlm-chat")
