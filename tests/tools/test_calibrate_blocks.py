"""Block-streamed GPTQ (tools/calibrate_blocks.py) against the in-memory ``quantize_calibrated_``: on a real SAT
LLaMA-style model that fits in memory, the same tensors, bitwise, when activations are kept in the model's dtype;
within GPTQ's rounding when they are kept in bf16 (fp32 model); activations spilled to files give the same result."""
import pytest
import torch
from sat.model.base_model import get_model as sat_get_model

from sat_quant import QuantConfig
from sat_quant.algorithms.calibration import quantize_calibrated_
from sat_quant.engine.layers import QuantLinear
from sat_quant.sat.compat import apply_cpu_compat
from sat_quant.tools.calibrate_blocks import calibrate_blocks, full_precision_skeleton
from sat_quant.tools.sources import open_full_precision
from tests.conftest import SAT_MODELS, model_inputs, sat_args, save_fp_with_sat

CONFIGS = {
    "int4": QuantConfig(bits=4, group_size=64),
    "mixed": QuantConfig(bits=4, plan={"*.mlp.dense_4h_to_h": "int4c:64", "*.attention.query_key_value": "int8",
                                       "*.layers.1.mlp.dense_h_to_4h": "fp", "*.attention.dense": "int4cs:32"}),
}


@pytest.fixture(scope="module")
def llama_source(tmp_path_factory):
    torch.manual_seed(0)
    args = sat_args("llama")
    model = sat_get_model(args, SAT_MODELS["llama"][0])
    src = save_fp_with_sat(model, args, tmp_path_factory.mktemp("calib") / "fp")
    samples = [model_inputs("llama", seq=12 + 4 * i, seed=i) for i in range(4)]
    return src, samples


def in_memory(src, samples, config):
    """The reference: the whole fp model loaded, then quantize_calibrated_ with the same samples in the same order."""
    fp = open_full_precision(src, "convert")
    model = sat_get_model(fp.args, fp.cls)
    model.load_state_dict({k: fp.source.get(k) for k in fp.source.layout()}, strict=False)
    apply_cpu_compat(model)
    model.eval()
    quantize_calibrated_(model, config, lambda m: [m(**s) for s in samples])
    return {n: m.neutral_tensors() for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def streamed(src, samples, config, **kwargs):
    fp = open_full_precision(src, "convert")
    skeleton = full_precision_skeleton(fp.cls, fp.args, fp.source)
    return calibrate_blocks(skeleton, fp.source, config, samples, progress=False, **kwargs)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_block_streamed_gptq_equals_the_in_memory_result_bitwise(llama_source, one_torch_thread, kind):
    src, samples = llama_source
    config = CONFIGS[kind]
    want = in_memory(src, samples, config)
    got = streamed(src, samples, config, store_dtype=None)
    assert sorted(got.neutral) == sorted(want) and len(want) >= 7
    for name, tensors in want.items():
        assert sorted(got.neutral[name]) == sorted(tensors), name
        for t, ref in tensors.items():
            assert torch.equal(got.neutral[name][t], ref), f"{name}.{t}"


def test_spilled_activations_give_the_same_tensors(llama_source, one_torch_thread):
    src, samples = llama_source
    config = CONFIGS["int4"]
    kept = streamed(src, samples, config, store_dtype=None)
    spilled = streamed(src, samples, config, store_dtype=None, spill_bytes=0)
    assert spilled.spilled_bytes > 0
    for name, tensors in kept.neutral.items():
        assert all(torch.equal(spilled.neutral[name][t], v) for t, v in tensors.items()), name


def test_bf16_activations_stay_within_rounding_of_the_in_memory_result(llama_source, one_torch_thread):
    """fp32 model, activations kept in bf16: H moves by bf16's rounding (2^-9 relative), which flips some of GPTQ's
    rounding decisions, and each flip feeds back into the columns after it. So the codes differ, but not the
    quality: each layer's error against its full-precision weight is within 5% of the in-memory GPTQ's, and most
    codes agree."""
    from sat_quant.engine.formats import get_format
    src, samples = llama_source
    config = CONFIGS["int4"]
    want = in_memory(src, samples, config)
    got = streamed(src, samples, config, store_dtype=torch.bfloat16)
    fp = open_full_precision(src, "convert")
    agree = total = 0
    for name, tensors in want.items():
        weight = fp.source.get(name + ".weight").float()
        spec = config.spec_for(name, *weight.shape)
        fmt = get_format(spec.format)
        err_ref = (fmt.dequantize(tensors, spec) - weight).norm()
        err_new = (fmt.dequantize(got.neutral[name], spec) - weight).norm()
        assert abs(err_new - err_ref) <= 0.05 * err_ref, (name, err_new, err_ref)
        agree += (got.neutral[name]["qweight"] == tensors["qweight"]).sum().item()
        total += tensors["qweight"].numel()
    assert agree / total > 0.5, agree / total


def test_a_killed_runs_spilled_activations_are_removed_by_the_next_run(llama_source, tmp_path):
    """Activations spill to ``sat-quant-activations-<pid>-*``; kill -9 leaves the folder, and the next calibration
    removes it when that pid is gone. A live writer's folder and anything else stay."""
    import subprocess
    import sys

    from sat_quant.tools.calibrate_blocks import SPILL_PREFIX
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"{SPILL_PREFIX}{int(gone.stdout)}-abc"
    (dead / "0").mkdir(parents=True)
    (dead / "0" / "3.pt").write_bytes(b"x" * 100)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = tmp_path / f"{SPILL_PREFIX}{live.pid}-def"
        alive.mkdir()
        mine = tmp_path / "sat-quant-activations-notes"
        mine.mkdir()
        src, samples = llama_source
        spilled = streamed(src, samples, CONFIGS["int4"], spill_dir=str(tmp_path), spill_bytes=0)
        assert spilled.spilled_bytes > 0
        assert not dead.exists() and alive.exists() and mine.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, mine.name])  # its own: removed
    finally:
        live.kill()
        live.wait()
