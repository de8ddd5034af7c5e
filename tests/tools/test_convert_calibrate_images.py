"""``sat-quant convert ... --calibrate prompts.jsonl`` on the tiny real CogVLM and CogAgent: image+text prompts prepared
by the checkout's own processors, the EVA2-CLIP tower calibrated first, then the language model (visual expert
included) on the tower's full-precision output; the layers inside both are bitwise what the in-memory
``quantize_calibrated_`` gives on the same prompts."""
from __future__ import annotations

import copy
import json
import os
from typing import Tuple

import pytest
import torch
from safetensors.torch import load_file

import sat_quant
from sat_quant import QuantConfig
from sat_quant.testing.cogvlm_assets import make_image, make_tokenizer
from sat_quant.tools.calibration_data import image_samples, read_calibration_file
from sat_quant.tools.cli import main
from tests.cogvlm_fixture import cogvlm_available
from tests.conftest import save_fp_with_sat

pytestmark = pytest.mark.skipif(not cogvlm_available(), reason="needs the CogVLM snapshot (../shared/cogvlm)")

QUESTIONS = ["What is in the picture?", "Describe the colours.", "How many shapes are there?"]
CONFIG = QuantConfig(bits=4, group_size=64)
VISION = "mixins.eva.vit_model.transformer.layers."
EXPERT = ("mixins.mlp.vision_", "mixins.rotary.vision_")


def _prompts(root, size: int) -> str:
    lines = []
    for i, question in enumerate(QUESTIONS):
        make_image(str(root / f"img{i}.png"), size=size, seed=i)
        lines.append(json.dumps({"image": f"img{i}.png", "text": question}))
    path = root / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _tensors(folder):
    return load_file(os.path.join(folder, "1", "mp_rank_00_model_states.safetensors"))


def _in_memory_reference(model, args, jsonl: str, tok: str, out: str, config: QuantConfig = CONFIG):
    """The in-memory path on the same prompts: the whole bf16 model, quantize_calibrated_, save_checkpoint."""
    samples = image_samples(read_calibration_file(jsonl, None)[1], args, tok, torch.bfloat16)

    def run(m):
        for sample in samples:
            m(**sample)
    model = copy.deepcopy(model)
    sat_quant.quantize_calibrated_(model, config, run)
    sat_quant.save_checkpoint(model, out, args=args)
    return _tensors(out)


def _check_against_reference(got, reference, plain, outside_prefix: Tuple[str, ...]):
    """Inside the stacks: bitwise the in-memory GPTQ. Outside (adapters, a tower that is not a SAT model): plain RTN,
    as a convert without --calibrate writes it."""
    calibrated = sorted({n.rsplit(".", 1)[0] for n in got if n.endswith(".qweight")})
    inside = [n for n in calibrated if not n.startswith(outside_prefix)]
    assert any(n.startswith(VISION) for n in inside) and any(n.startswith(EXPERT) for n in inside)
    for name in inside:
        for suffix in ("qweight", "scale", "zero"):
            key = f"{name}.{suffix}"
            if key in got:
                assert torch.equal(got[key], reference[key]), key
        assert not torch.equal(got[name + ".qweight"], plain[name + ".qweight"]), name  # GPTQ changed it
    outside = [n for n in calibrated if n.startswith(outside_prefix)]
    assert outside
    for name in outside:
        assert torch.equal(got[name + ".qweight"], plain[name + ".qweight"]), name
    assert set(got) == set(plain)


def _env(root, build, image_size: int):
    """A bf16 tiny model saved by SAT, a tokenizer and three image prompts under ``root``."""
    model, args = build(torch.bfloat16)
    src = save_fp_with_sat(model, args, root / "fp")
    return dict(root=root, model=model, args=args, src=src, tok=make_tokenizer(str(root / "tok")),
                jsonl=_prompts(root, image_size))


def _cli_calibrate(env, module: str, capsys) -> Tuple[str, str, str]:
    """``sat-quant convert --calibrate`` into q-cal, and a plain RTN convert into q-rtn: (q-cal, q-rtn, stdout)."""
    dst, plain = str(env["root"] / "q-cal"), str(env["root"] / "q-rtn")
    status = main(["convert", env["src"], dst, "--quant", "4", "--quant-group-size", "64", "--calibrate",
                   env["jsonl"], "--tokenizer", env["tok"], "--import", module, "--quiet"])
    out = capsys.readouterr()
    assert status == 0, out.err
    sat_quant.convert(env["src"], plain, CONFIG, progress=False)
    return dst, plain, out.out


@pytest.fixture(scope="module")
def cogvlm(tmp_path_factory):
    from tests.cogvlm_fixture import build_tiny_cogvlm
    return _env(tmp_path_factory.mktemp("cogvlm-images"), build_tiny_cogvlm, 224)


def test_cogvlm_image_calibration_from_the_cli_matches_the_in_memory_path(cogvlm, one_torch_thread, capsys):
    root = cogvlm["root"]
    dst, plain, out = _cli_calibrate(cogvlm, "utils.models", capsys)
    assert "3 samples" in out and "2 (mixins.eva.vit_model) + 2 (the model) blocks" in out, out
    reference = _in_memory_reference(cogvlm["model"], cogvlm["args"], cogvlm["jsonl"], cogvlm["tok"],
                                     str(root / "q-mem"))
    _check_against_reference(_tensors(dst), reference, _tensors(plain), ("mixins.eva.linear_proj.",))
    loaded, _ = sat_quant.from_pretrained(None, dst)
    dtype = next(p.dtype for p in loaded.parameters() if p.is_floating_point())
    sample = image_samples(read_calibration_file(cogvlm["jsonl"], 1)[1], cogvlm["args"], cogvlm["tok"], dtype)[0]
    with torch.no_grad():
        logits = loaded.eval()(**sample)[0]
    assert torch.isfinite(logits.float()).all()


def test_samples_are_what_cogvlms_chat_prepares(cogvlm):
    """The prompt template, the image slots and the positions come from the checkout's processors."""
    sample = image_samples(read_calibration_file(cogvlm["jsonl"], 1)[1], cogvlm["args"], cogvlm["tok"],
                           torch.bfloat16)[0]
    ids, image_length = sample["input_ids"][0], cogvlm["args"].image_length
    assert int(sample["image_embed_mask"].sum()) == image_length + 2  # boi, the image, eoi
    assert int(sample["vision_expert_mask"].sum()) == image_length + 1
    assert sample["vision_image"].shape == (1, 3, 224, 224) and sample["vision_image"].dtype == torch.bfloat16
    assert sample["attention_mask"].shape == (1, 1, len(ids), len(ids))
    positions = sample["position_ids"][0]
    assert positions[-1] == len(ids) - image_length  # every image token shares one rotary position
    from sat_quant.tools.calibration_data import _checkout_module
    tok = _checkout_module("language").llama2_tokenizer(cogvlm["tok"], signal_type="chat")
    text = tok.decode(ids[image_length + 3:])
    assert "[INST]" in text and "What is in the picture?" in text and "[/INST]" in text  # CogVLM's chat template


def _block_bytes(model) -> dict:
    """Bytes of each transformer block's parameters: EVA2-CLIP's and the language model's (its visual expert and
    gate projection, held per layer by mixins, included)."""
    import re
    blocks: dict = {}
    for name, p in model.named_parameters():
        eva = re.match(r"^mixins\.eva\.vit_model\.transformer\.layers\.(\d+)\.", name)
        lm = re.match(r"^(?:transformer\.layers|mixins\.(?:mlp|rotary)\.\w+?)\.(\d+)\.", name)
        key = ("eva", eva.group(1)) if eva else ("lm", lm.group(1)) if lm and not name.startswith("mixins.eva") else None
        if key is not None:
            blocks[key] = blocks.get(key, 0) + p.numel() * p.element_size()
    return blocks


def _calibrated_convert_peak(root, eva_layers: int, lm_layers: int) -> dict:
    """A bf16 CogVLM (EVA2-CLIP hidden 1792, language model hidden 1024 with its visual expert) saved by SAT, then
    ``sat-quant convert --calibrate prompts.jsonl`` in a child process: GPTQ (int4) on every attention.dense, nf4
    (not calibrated: fast) on the rest, so every block is still read and run in full precision."""
    import subprocess
    import sys

    from tests.cogvlm_fixture import build_tiny_cogvlm
    from tests.io.checkpoints import CHILD_ENV, ROOT
    from tests.tools.test_convert_calibrate import layer_tensors
    root.mkdir()
    model, args = build_tiny_cogvlm(torch.bfloat16, num_layers=lm_layers, hidden_size=1024, num_attention_heads=16,
                                    inner_hidden_size=2816, eva_args=dict(num_layers=eva_layers))
    blocks = _block_bytes(model)
    assert len(blocks) == eva_layers + lm_layers
    src = save_fp_with_sat(model, args, root / "fp")
    del model
    plan = root / "plan.json"
    plan.write_text(json.dumps({"*.attention.dense": "int4:64", "*": "nf4"}))
    dst = str(root / "q")
    child = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "workers", "calibrate_memory_child.py"), src,
                            dst, _prompts(root, 224), make_tokenizer(str(root / "tok")), str(plan), "--import",
                            "utils.models"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                           env=dict(CHILD_ENV, OMP_NUM_THREADS="2"))
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["status"] == 0, child.stderr[-3000:]
    assert f"{eva_layers} (mixins.eva.vit_model) + {lm_layers} (the model) blocks" in result["out"], result["out"]
    return dict(rise=result["peak"] - result["baseline"], blocks=sum(blocks.values()), block=max(blocks.values()),
                quantized=sum(t.numel() * t.element_size() for t in layer_tensors(dst).values()))


def test_image_calibration_memory_does_not_grow_with_the_blocks(tmp_path):
    """Image calibration from the CLI holds one full-precision block at a time: twice the blocks (4 + 8 -> 8 + 16,
    543 -> 1085 MiB of bf16 block weights, which the in-memory path holds whole) raise the peak over the size after
    imports by about the extra quantized bytes only. Measured: +439 / +602 MiB peaks for 163 / 316 MiB quantized;
    the fixed part (~280 MiB) is the skeleton, the image prompts and the first block's inputs, one block's weights,
    reads and quantization temporaries, the allocator's slack, and does not depend on the model's size."""
    small = _calibrated_convert_peak(tmp_path / "small", 4, 8)
    large = _calibrated_convert_peak(tmp_path / "large", 8, 16)
    report = ", ".join(f"{name}: peak rise {r['rise'] / 2**20:.0f} MiB, quantized {r['quantized'] / 2**20:.0f} MiB, "
                       f"blocks {r['blocks'] / 2**20:.0f} MiB (largest {r['block'] / 2**20:.0f})"
                       for name, r in (("small", small), ("large", large)))
    print(report)
    extra_blocks = large["blocks"] - small["blocks"]
    # holding every block would add all of extra_blocks; one block at a time adds the extra quantized bytes
    assert large["rise"] - small["rise"] <= large["quantized"] - small["quantized"] + 0.25 * extra_blocks, report
    assert large["rise"] <= large["quantized"] + 6 * large["block"] + 128 * 2**20, report
    assert large["rise"] < 0.8 * large["blocks"], report


@pytest.fixture(scope="module")
def cogagent(tmp_path_factory):
    from tests.cogagent_fixture import build_tiny_cogagent
    return _env(tmp_path_factory.mktemp("cogagent-images"), build_tiny_cogagent, 112)


def test_cogagent_image_calibration_matches_the_in_memory_path(cogagent, one_torch_thread, capsys):
    root = cogagent["root"]
    dst, plain, _ = _cli_calibrate(cogagent, "tests.cogagent_fixture", capsys)
    # in memory, the cross-image tower (which reads .weight into F.linear: no hook sees it) stays full precision,
    # as it is while the block path calibrates; everything else is the in-memory GPTQ
    skip_cross = QuantConfig(bits=4, group_size=64, skip=("mixins.encoder.*",))
    reference = _in_memory_reference(cogagent["model"], cogagent["args"], cogagent["jsonl"], cogagent["tok"],
                                     str(root / "q-mem"), skip_cross)
    got = _tensors(dst)
    # the cross-image tower (not a SAT model) and the GLU adapter are outside the blocks: plain RTN
    _check_against_reference(got, reference, _tensors(plain), ("mixins.encoder.", "mixins.eva.linear_proj."))
    assert any(n.startswith("mixins.encoder.") for n in got)


def test_layers_the_samples_never_reach_are_quantized_plainly_and_listed(cogvlm, one_torch_thread, tmp_path):
    """Prompts whose vision_expert_mask is empty never run the visual expert: its layers get plain RTN and are
    listed, the rest is calibrated (no error, no silent GPTQ on nothing)."""
    from sat_quant.tools.calibrate_blocks import calibrate_blocks, full_precision_skeleton
    from sat_quant.tools.sources import open_full_precision
    samples = image_samples(read_calibration_file(cogvlm["jsonl"], 2)[1], cogvlm["args"], cogvlm["tok"],
                            torch.bfloat16)
    for sample in samples:
        sample["vision_expert_mask"] = torch.zeros_like(sample["vision_expert_mask"])
    fp = open_full_precision(cogvlm["src"], "convert", ["utils.models"])
    result = calibrate_blocks(full_precision_skeleton(fp.cls, fp.args, fp.source), fp.source, CONFIG, samples,
                              progress=False, store_dtype=None)
    experts = [n for n in result.uncalibrated if n.startswith(EXPERT)]
    assert len(experts) == 5 * 2  # five expert linears in each of the two blocks
    plain = str(tmp_path / "q-rtn")
    sat_quant.convert(cogvlm["src"], plain, CONFIG, progress=False)
    plain = _tensors(plain)
    for name, tensors in result.neutral.items():
        same = torch.equal(tensors["qweight"], plain[name + ".qweight"])
        assert same == (name in experts), name  # plain RTN exactly where the samples never reach


@pytest.mark.parametrize("case,needle", [
    ("llama", "not a CogVLM/CogAgent model"), ("text", "takes image prompts"), ("missing", "not found"),
    ("not json", "line 2 is not JSON"),
    ("keys", "needs an \"image\" path"), ("not an image", "as an image")])
def test_bad_image_prompts_are_one_line_with_status_2(cogvlm, tmp_path, capsys, case, needle):
    from sat.model.base_model import get_model as sat_get_model

    from tests.conftest import SAT_MODELS, sat_args
    src = cogvlm["src"]
    make_image(str(tmp_path / "ok.png"), size=64)
    (tmp_path / "fake.png").write_text("not an image")
    lines = {"llama": ['{"image": "ok.png", "text": "hi"}'], "missing": ['{"image": "gone.png", "text": "hi"}'],
             "not json": ['{"image": "ok.png", "text": "hi"}', '{"image": '],
             "keys": ['{"picture": "ok.png"}'], "not an image": ['{"image": "fake.png", "text": "hi"}'],
             "text": ["a line of text"]}[case]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    if case == "llama":
        args = sat_args("llama")
        src = save_fp_with_sat(sat_get_model(args, SAT_MODELS["llama"][0]), args, tmp_path / "llama")
    status = main(["convert", src, str(tmp_path / "bad"), "--quant", "4", "--quiet", "--calibrate",
                   str(tmp_path / "p.jsonl"), "--tokenizer", cogvlm["tok"], "--import", "utils.models"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and needle in err[0], err
    assert not os.path.exists(tmp_path / "bad")


def test_budget_plan_on_image_prompts_scores_every_layer_on_one_scale(cogvlm, one_torch_thread, tmp_path, capsys):
    """`--quant-budget 4.5bpp --calibrate prompts.jsonl` on CogVLM: layers in the blocks are scored on their own
    output, the GLU adapter (outside, no Hessian) on its relative weight error: the same 0..1 scale, so the knapsack
    can trade them. The checkpoint follows the plan."""
    from sat_quant.tools.calibrate_blocks import full_precision_skeleton
    from sat_quant.tools.plan_blocks import plan_blocks
    from sat_quant.tools.sources import open_full_precision
    fp = open_full_precision(cogvlm["src"], "convert", ["utils.models"])
    samples = image_samples(read_calibration_file(cogvlm["jsonl"], 2)[1], cogvlm["args"], cogvlm["tok"],
                            torch.bfloat16)
    plan = plan_blocks(full_precision_skeleton(fp.cls, fp.args, fp.source), fp.source, QuantConfig(bits=4), samples,
                       "4.5bpp", store_dtype=None, progress=False)
    adapter = [layer for layer in plan.layers if layer.name.startswith("mixins.eva.linear_proj.")]
    assert adapter and any(layer.name.startswith(VISION) for layer in plan.layers)
    for layer in plan.layers:
        assert all(0.0 <= option.error < 1.0 for option in layer.options), layer
    assert plan.bits_per_param <= 4.5 and len(set(plan.plan.values())) > 1
    dst = str(tmp_path / "q")
    status = main(["convert", cogvlm["src"], dst, "--quant-budget", "4.5bpp", "--calibrate", cogvlm["jsonl"],
                   "--calibrate-samples", "2", "--tokenizer", cogvlm["tok"], "--import", "utils.models", "--quiet"])
    out = capsys.readouterr()
    assert status == 0 and "planning then calibration" in out.out, out.err
    with open(os.path.join(dst, "model_config.json")) as f:
        layers = json.load(f)["quantization"]["layers"]
    for name, value in plan.plan.items():
        assert layers[name]["format"] == value.split(":")[0], name
