"""``sat-quant convert SRC DST --quant 4 --calibrate FILE``: a real SAT LLaMA-style checkpoint, calibrated on a file of
text lines tokenized with a real (small, SentencePiece) LlamaTokenizer, from the command line."""
import os

import pytest
import torch
from safetensors.torch import load_file
from sat.model.base_model import get_model as sat_get_model

import sat_quant
from sat_quant import QuantConfig
from sat_quant.testing.cogvlm_assets import make_tokenizer
from sat_quant.tools.calibrate_blocks import calibrate_blocks, full_precision_skeleton
from sat_quant.tools.calibration_data import load_tokenizer, read_lines, text_samples
from sat_quant.tools.cli import main
from sat_quant.tools.sources import open_full_precision
from tests.conftest import SAT_MODELS, model_inputs, run_logits, sat_args, save_fp_with_sat
from tests.io.checkpoints import snapshot

TEXT = ["the cat sat on the mat and looked at the bird", "a short line", "question: what is in the picture?",
        "answer: a red square next to a blue circle on a green field", "", "one more line of calibration text"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    torch.manual_seed(0)
    args = sat_args("llama")
    src = save_fp_with_sat(sat_get_model(args, SAT_MODELS["llama"][0]), args, root / "fp")
    (root / "calib.txt").write_text("\n".join(TEXT) + "\n")
    return {"root": root, "src": src, "text": str(root / "calib.txt"), "tok": make_tokenizer(str(root / "tok"))}


def layer_tensors(folder):
    return load_file(os.path.join(folder, "1", "mp_rank_00_model_states.safetensors"))


def test_cli_calibrated_convert_writes_the_block_streamed_gptq_result(env, one_torch_thread, capsys):
    dst = str(env["root"] / "q-cal")
    status = main(["convert", env["src"], dst, "--quant", "4", "--quant-group-size", "64", "--calibrate", env["text"],
                   "--calibrate-samples", "4", "--tokenizer", env["tok"], "--quiet"])
    out = capsys.readouterr()
    assert status == 0, out.err
    assert "4 samples" in out.out and " of calibration (a rough estimate" in out.out and f"wrote {dst}" in out.out
    # the same calibration in Python: the first 4 non-empty lines, tokenized the same way (fp32 model: bf16 kept)
    fp = open_full_precision(env["src"], "convert")
    samples = text_samples(read_lines(env["text"], 4), load_tokenizer(env["tok"]), 64, 1000)
    config = QuantConfig(bits=4, group_size=64)
    want = calibrate_blocks(full_precision_skeleton(fp.cls, fp.args, fp.source), fp.source, config, samples,
                            progress=False, store_dtype=torch.bfloat16).neutral
    got = layer_tensors(dst)
    rtn = str(env["root"] / "q-rtn")
    sat_quant.convert(env["src"], rtn, config, progress=False)
    plain = layer_tensors(rtn)
    assert len(want) >= 8
    for name, tensors in want.items():
        for t, value in tensors.items():
            assert torch.equal(got[f"{name}.{t}"], value), f"{name}.{t}"
    differs = [n for n in want if not torch.equal(plain[n + ".qweight"], got[n + ".qweight"])]
    assert len(differs) == len(want), differs  # GPTQ changed every calibrated layer
    assert set(got) == set(plain)  # everything else as a plain convert writes it
    for name in set(got) - {f"{n}.{t}" for n, ts in want.items() for t in ts}:
        assert torch.equal(got[name], plain[name]), name
    model, _ = sat_quant.from_pretrained(None, dst)
    logits = run_logits(model.eval(), model_inputs("llama"))
    assert logits.shape == (1, 16, 1000) and torch.isfinite(logits).all()


def test_dry_run_prints_the_estimate_and_writes_nothing(env, capsys):
    before = snapshot(str(env["root"]))
    dst = str(env["root"] / "never")
    status = main(["convert", env["src"], dst, "--quant", "4", "--calibrate", env["text"], "--tokenizer", env["tok"],
                   "--dry-run", "--quiet"])
    out = capsys.readouterr().out
    assert status == 0 and " of calibration (a rough estimate" in out and "dry run: nothing written" in out, out
    assert not os.path.exists(dst) and snapshot(str(env["root"])) == before


@pytest.mark.parametrize("case,needle", [
    ("jsonl", "not found"), ("empty", "holds no text"), ("tokenizer", "--tokenizer"), ("samples", "--calibrate-samples"),
    ("dry-run alone", "pass it with --calibrate")])
def test_bad_calibration_input_is_one_line_with_status_2(env, capsys, case, needle):
    root = env["root"]
    (root / "img.jsonl").write_text('{"image": "a.png", "text": "hi"}\n')
    (root / "blank.txt").write_text("\n\n")
    argv = ["convert", env["src"], str(root / "bad"), "--quant", "4", "--quiet", "--tokenizer", env["tok"]]
    argv += {"jsonl": ["--calibrate", str(root / "img.jsonl")], "empty": ["--calibrate", str(root / "blank.txt")],
             "tokenizer": ["--calibrate", env["text"], "--tokenizer", str(root / "no-such-tokenizer")],
             "samples": ["--calibrate", env["text"], "--calibrate-samples", "0"], "dry-run alone": ["--dry-run"]}[case]
    status = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not os.path.exists(root / "bad")


def test_calibrated_convert_holds_one_full_precision_block_at_a_time(tmp_path):
    """24 LLaMA blocks (hidden 512, MLP 1024), fp32: 252 MiB of block weights, which the in-memory path holds
    whole. Every block is read from the source and run in full precision; to keep CI time small, GPTQ (a few
    seconds per layer on a busy CPU) runs on one layer per block (attention.dense, int4) and the rest is int8.
    Block by block, the peak over the size after imports stays under the quantized layers + one block in full
    precision + MARGIN (the model's embeddings and norms, the activations of 8 short samples, H and GPTQ's
    temporaries, the read copy of a weight, the allocator's slack), and well under the full-precision blocks alone
    (measured: +150 MiB for 61 MiB quantized, 10 MiB per block, 240 MiB of blocks; ~80 MiB of it is fixed: the
    skeleton, the tokenizer, the first block's inputs)."""
    import json
    import subprocess
    import sys

    from sat.model.official.llama_model import LLaMAModel

    from tests.io.checkpoints import CHILD_ENV, ROOT
    margin = 128 * 2**20
    torch.manual_seed(0)
    args = sat_args("llama", num_layers=24, hidden_size=512, num_attention_heads=8, inner_hidden_size=1024)
    model = sat_get_model(args, LLaMAModel)
    blocks = [sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                  if n.startswith(f"transformer.layers.{i}.") or n.startswith(f"mixins.mlp.gate_proj.{i}."))
              for i in range(24)]
    src = save_fp_with_sat(model, args, tmp_path / "fp")
    del model
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(" ".join(TEXT[i % 4].split() * 3) for i in range(8)) + "\n")
    tok = make_tokenizer(str(tmp_path / "tok"))
    dst = str(tmp_path / "q")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"*.attention.dense": "int4:64", "*": "int8"}))
    child = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "workers", "calibrate_memory_child.py"), src,
                            dst, str(text), tok, str(plan)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env=dict(CHILD_ENV, OMP_NUM_THREADS="2"))
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["status"] == 0, child.stderr[-3000:]
    quantized = sum(t.numel() * t.element_size() for t in layer_tensors(dst).values())
    rise = result["peak"] - result["baseline"]
    report = (f"peak rise {rise / 2**20:.0f} MiB; quantized checkpoint {quantized / 2**20:.0f} MiB; one block "
              f"{max(blocks) / 2**20:.0f} MiB; all blocks {sum(blocks) / 2**20:.0f} MiB")
    print(report)
    assert rise <= quantized + max(blocks) + margin, report
    assert rise < 0.7 * sum(blocks), report
    assert "24 blocks" in result["out"], result["out"]


def test_budget_with_calibrate_plans_on_the_samples_block_by_block(env, tmp_path, one_torch_thread, capsys):
    """`--quant-budget 5.0bpp --calibrate FILE`: the calibrated planner (each layer scored on its own output from its
    Hessian), one block at a time, then GPTQ of that plan. On a bf16 model (activations kept in bf16) the plan and
    every tensor are bitwise the in-memory plan_quantization(sensitivity="layer") + quantize_calibrated_."""
    torch.manual_seed(1)
    args = sat_args("llama", bf16=True)
    model = sat_get_model(args, SAT_MODELS["llama"][0]).bfloat16()
    sat_quant.apply_cpu_compat(model)
    src = save_fp_with_sat(model, args, tmp_path / "fp")
    dst = str(tmp_path / "q")
    status = main(["convert", src, dst, "--quant-budget", "5.0bpp", "--quant-group-size", "64", "--calibrate",
                   env["text"], "--calibrate-samples", "4", "--tokenizer", env["tok"], "--quiet"])
    out = capsys.readouterr()
    assert status == 0, out.err
    assert "planning then calibration" in out.out, out.out
    samples = text_samples(read_lines(env["text"], 4), load_tokenizer(env["tok"]), 64, 1000)

    def run(m):
        outputs = [m(**sample)[0] for sample in samples]
        return torch.cat([o.reshape(-1, o.shape[-1]) for o in outputs])
    model.eval()
    plan = sat_quant.plan_quantization(model, "5.0bpp", run=run, sensitivity="layer",
                                       config=QuantConfig(bits=4, group_size=64))
    chosen = {name: value for name, value in plan.plan.items()}
    assert len(set(chosen.values())) > 1, chosen  # a real mix, not one format everywhere
    import json
    with open(os.path.join(dst, "model_config.json")) as f:
        saved = json.load(f)["quantization"]["layers"]
    for name, value in chosen.items():
        assert saved[name]["format"] == value.split(":")[0], (name, value, saved[name])
    sat_quant.quantize_calibrated_(model, plan.to_config(), run)
    ref = str(tmp_path / "ref")
    sat_quant.save_checkpoint(model, ref, args=args)
    got, want = layer_tensors(dst), layer_tensors(ref)
    assert set(got) == set(want)
    for name in got:
        assert torch.equal(got[name], want[name]), name
