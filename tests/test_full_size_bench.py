"""benchmarks/full_size.py at the tests' tiny real CogVLM and CogAgent: every step runs (build, save, fresh-process
load, image+text prompt, decode) and fills its row; the full-size run uses the same code on configs/*.json."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(*argv):
    return subprocess.run([sys.executable, "-m", "benchmarks.full_size", "--tiny", "--formats", "int4",
                           "--new-tokens", "3", *argv], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1"))


def _rows(stdout, table=0):
    """The cells after (model, format) of each model's row in the main table (0), the steps' memory table (1), the
    load phases (2) or the generation memory table (3)."""
    part = re.split(r"\n(?=Each step's peak|Load phases|Memory while generating)", stdout)[table]
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[3:-1]]
            for line in part.splitlines() if line.startswith("| cog")}


def test_every_step_fills_its_row_and_the_work_folder_is_left_clean(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    result = _bench("--work", str(work))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(result.stdout)
    assert set(rows) == {"cogvlm", "cogagent"}, result.stdout
    for model, cells in rows.items():
        assert len(cells) == 14 and all(float(c) >= 0 for c in cells), (model, cells)
        weights, checkpoint, decode, per_token = float(cells[0]), float(cells[5]), float(cells[10]), float(cells[11])
        assert weights > 0 and checkpoint > 0 and decode > 0, (model, cells)
        # counted, not assumed: a text token runs neither the vision tower nor the visual expert
        assert 0 < per_token < weights * 1024, (model, cells)  # MiB against GiB
    steps = _rows(result.stdout, 1)
    assert set(steps) == {"cogvlm", "cogagent"}
    for model, cells in steps.items():
        imports, build_net, build_ratio, save_growth, load_imports, load_net, load_ratio = map(float, cells)
        assert imports > 0.3 and load_imports > 0.3, (model, cells)  # torch + SAT + deepspeed alone
        assert build_net > 0 and load_net > 0 and save_growth >= 0 and build_ratio > 0 and load_ratio > 0, (model, cells)
    phases = _rows(result.stdout, 2)
    assert set(phases) == {"cogvlm", "cogagent"}
    for model, cells in phases.items():  # load s, then read / verify / repack MB/s: each phase ran and was timed
        assert len(cells) == 4 and all(float(c) > 0 for c in cells), (model, cells)
    memory = _rows(result.stdout, 3)
    assert set(memory) == {"cogvlm", "cogagent"}
    for model, (start, peak, growth, held, kv, activations) in memory.items():
        assert float(peak) >= float(start) > 0 and float(kv) > 0 and float(activations) > 0, (model, memory)
        assert float(held) > 0, (model, memory)  # the in-place KV cache's capacity, read from the mixin
        assert abs(float(growth) - 1024 * (float(peak) - float(start))) <= 11, (model, memory)  # MiB vs rounded GiB
    kernel = re.search(r"at one row \(4096 -> 11008, bf16, same run\) reads ([0-9.]+) GB/s", result.stdout)
    assert kernel and float(kernel.group(1)) > 0, result.stdout
    llama = re.search(r"LLaMA.*same decode path\): ([0-9.]+) tokens/s x ([0-9.]+) MiB read per token = ([0-9.]+) of",
                      result.stdout)
    assert llama and all(float(g) > 0 for g in llama.groups()), result.stdout
    assert int(rows["cogvlm"][8]) == 256 + 3 + 13  # prompt tokens: image, bos/boi/eoi, the question
    assert os.listdir(work) == []  # the checkpoints it wrote are removed; nothing else was there


def test_an_existing_folder_in_the_work_directory_is_never_touched(tmp_path):
    mine = tmp_path / "cogvlm-int4"
    mine.mkdir()
    (mine / "keep.txt").write_text("the user's")
    result = _bench("--work", str(tmp_path), "--models", "cogvlm")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already exists" in result.stdout
    assert (mine / "keep.txt").read_text() == "the user's" and os.listdir(mine) == ["keep.txt"]
