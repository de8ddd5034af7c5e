"""Model-parallel partitions: our split/merge equals SAT's partition, for float and quantized tensors."""
import pytest
import torch
from sat.mpu.layers import ColumnParallelLinear, RowParallelLinear

from sat_quant import get_format
from sat_quant.parallel import merge, split


@pytest.fixture(scope="module", autouse=True)
def sat_model_parallel():
    from sat.arguments import _simple_init
    _simple_init(model_parallel_size=1, seed=1234)


@pytest.mark.parametrize("stride", [1, 3, (2, 1, 1)])
@pytest.mark.parametrize("parts", [2, 4])
def test_column_split_matches_sat_partition(stride, parts):
    layer = ColumnParallelLinear(128, 384, bias=True, stride=stride)
    with torch.no_grad():
        layer.bias.normal_()
    sat_weights, sat_biases = layer.partition(new_model_parallel_size=parts)
    ours = split(layer.weight.detach(), ("column", stride), parts)
    assert all(torch.equal(a, b) for a, b in zip(ours, sat_weights))
    assert all(torch.equal(a, b) for a, b in zip(split(layer.bias.detach(), ("column", stride), parts), sat_biases))
    assert torch.equal(merge(ours, ("column", stride)), layer.weight.detach())


@pytest.mark.parametrize("parts", [2, 4])
def test_row_split_matches_sat_partition(parts):
    layer = RowParallelLinear(512, 64, bias=True)
    sat_weights, _ = layer.partition(new_model_parallel_size=parts)
    ours = split(layer.weight.detach(), ("row", 1), parts)
    assert all(torch.equal(a, b) for a, b in zip(ours, sat_weights))
    assert torch.equal(merge(ours, ("row", 1)), layer.weight.detach())


@pytest.mark.parametrize("fmt_name", ["int4", "nf4", "fp4", "int8"])
@pytest.mark.parametrize("how,stride", [("column", 3), ("row", 1)])
def test_split_quantized_equals_quantizing_each_partition(fmt_name, how, stride):
    """Splitting packed codes and scales gives exactly what quantizing each rank's float partition gives,
    so no rank ever needs another rank's weights and resharding never dequantizes."""
    fmt = get_format(fmt_name)
    w = torch.randn(384, 512) * 0.05
    full = fmt.quantize(w, fmt.spec(384, 512, group_size=64))
    w_parts = split(w, (how, stride), 2)
    for rank, w_part in enumerate(w_parts):
        spec = fmt.spec(*w_part.shape, group_size=64)
        if fmt_name == "int8" and how == "row":  # a row shard's scale covers the whole row (all-reduced max)
            expected = fmt.quantize(w_part, spec, row_absmax=w.abs().amax(1))
            kinds = {"qweight": ("row", 1), "scale": ("row-replicated", 1)}
        else:
            expected = fmt.quantize(w_part, spec)
            kinds = {name: (how, stride) for name in expected}
        for name, tensor in full.items():
            assert torch.equal(split(tensor, kinds[name], 2)[rank], expected[name]), name
    for name, tensor in full.items():
        kind = ("row-replicated", 1) if (fmt_name == "int8" and how == "row" and name == "scale") else (how, stride)
        assert torch.equal(merge(split(tensor, kind, 2), kind), tensor)


# -- real launches: torchrun --nproc_per_node 2, gloo on CPU, --model-parallel-size 2 --------------------

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import sat_quant  # noqa: E402
from sat_quant import QuantConfig  # noqa: E402
from tests.conftest import SAT_MODELS, run_logits, sat_args  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(script: str, *argv: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Two CPU ranks; the whole process group is killed if it outlives ``timeout``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + os.getpid() % 1000), os.path.join(ROOT, "tests", script), *argv]
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun timed out:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_model_parallel_quantize_save_load_reshard(fp_models, tmp_path):
    """mp=2 under torchrun: each rank quantizes its partition of a full-precision checkpoint, saves mp=2
    shards, reloads them, and reshards an mp=1 quantized checkpoint; mp=1 merges the mp=2 shards."""
    from sat.training.model_io import save_checkpoint as sat_save
    from sat_quant.convert import convert
    fp_model, state, inputs, _ = fp_models["gpt2"]
    fp_args = sat_args("gpt2")
    fp_args.save, fp_args.mode = str(tmp_path / "fp"), "inference"
    sat_save(1, fp_model, None, None, fp_args)
    convert(str(tmp_path / "fp"), str(tmp_path / "q1"), QuantConfig(bits=4), progress=False)
    reference, _ = sat_quant.from_pretrained(SAT_MODELS["gpt2"][0], str(tmp_path / "q1"))
    expected = run_logits(reference.eval(), inputs)

    out = tmp_path / "out"
    out.mkdir()
    r = torchrun("mp_worker.py", str(tmp_path / "fp"), str(tmp_path / "q1"), str(out))
    assert r.returncode == 0, r.stderr[-4000:]
    fp_to_mp2 = torch.load(out / "fp_to_mp2.pt")
    # partitions hold exactly mp=1's codes and scales; only the matmul is split (bf16 activations, all-reduce)
    assert ((fp_to_mp2 - expected).norm() / expected.norm()).item() < 0.02
    assert torch.equal(torch.load(out / "mp2_reload.pt"), fp_to_mp2), "same shards reload bitwise"
    assert torch.equal(torch.load(out / "mp1_to_mp2.pt"), fp_to_mp2), "mp=1 → mp=2 reshard = quantizing at mp=2"
    shards = sorted(os.listdir(out / "q-mp2" / "1"))
    assert [s for s in shards if s.endswith(".safetensors")] == ["mp_rank_00_model_states.safetensors",
                                                                  "mp_rank_01_model_states.safetensors"]
    # mp=2 shards merged back at mp=1 are bitwise the mp=1 quantized model
    merged, merged_args = sat_quant.from_pretrained(SAT_MODELS["gpt2"][0], str(out / "q-mp2"),
                                                    overwrite_args={"model_parallel_size": 1})
    assert merged_args.model_parallel_size == 1
    assert torch.equal(run_logits(merged.eval(), inputs), expected)
