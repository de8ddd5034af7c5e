"""Model-parallel partitions: our split/merge equals SAT's partition, for float and quantized tensors."""
import threading

import pytest
import torch
from sat.mpu.layers import ColumnParallelLinear, RowParallelLinear

from sat_quant import get_format
from sat_quant.io.parallel import merge, packed_kinds, split


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


class ThreadAllReduce:
    """An all-reduce between threads (one per simulated rank): what ``shard_statistics`` is handed, without
    torch.distributed; the torchrun tests below run the real one."""

    def __init__(self, parts: int) -> None:
        self.barrier, self.slots = threading.Barrier(parts), [None] * parts

    def for_rank(self, rank: int):
        def reduce(t: torch.Tensor, op: str) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            stacked = torch.stack(self.slots)
            combined = stacked.sum(0) if op == "sum" else stacked.amax(0)
            self.barrier.wait()
            return t.copy_(combined)
        return reduce


def _group_size(fmt) -> int:
    return 32 if fmt.name == "int4cs" else 64  # int4cs's own default; 64 for the rest


def _quantize_shards(fmt, w_parts, sharded: str):
    """Every shard quantized as its rank would: the format's shard statistics, all-reduced between threads."""
    reducer, results = ThreadAllReduce(len(w_parts)), [None] * len(w_parts)

    def rank_main(rank: int) -> None:
        spec = fmt.spec(*w_parts[rank].shape, group_size=_group_size(fmt))
        stats = fmt.shard_statistics(w_parts[rank], spec, sharded=sharded, reduce=reducer.for_rank(rank))
        results[rank] = fmt.quantize(w_parts[rank], spec, **stats)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(len(w_parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("fmt_name", ["int4", "nf4", "fp4", "int8", "int4c", "int4cs"])
@pytest.mark.parametrize("how,stride", [("column", 3), ("row", 1)])
def test_split_quantized_equals_quantizing_each_partition(fmt_name, how, stride):
    """Splitting packed codes and scales gives exactly what quantizing each rank's float partition gives (with the
    format's statistics of the whole weight: int8's row absmax, int4c/int4cs's row scale, int4cs's column scale), so
    no rank ever needs another rank's weights and resharding never dequantizes."""
    fmt = get_format(fmt_name)
    w = torch.randn(384, 512, generator=torch.Generator().manual_seed(0)) * 0.05
    w[:, 7] *= 30  # one hot input column (int4cs's t), and rows of different spread
    w[5] *= 0.1
    spec = fmt.spec(384, 512, group_size=_group_size(fmt))
    full = fmt.quantize(w, spec)
    kinds = packed_kinds((how, stride), fmt, spec, "")
    w_parts = split(w, (how, stride), 2)
    for rank, expected in enumerate(_quantize_shards(fmt, w_parts, "rows" if how == "column" else "columns")):
        for name, tensor in full.items():
            assert torch.equal(split(tensor, kinds[name], 2)[rank], expected[name]), (name, rank)
    for name, tensor in full.items():
        assert torch.equal(merge(split(tensor, kinds[name], 2), kinds[name]), tensor)


def test_int4c_row_parallel_split_needs_an_even_group_count():
    """int4c packs two groups' zero-points per byte: a row-parallel cut through a byte is refused in words."""
    fmt = get_format("int4c")
    spec = fmt.spec(64, 384, group_size=64)  # 6 groups: 3 per rank
    full = fmt.quantize(torch.randn(64, 384), spec)
    kinds = packed_kinds(("row", 1), fmt, spec, "")
    with pytest.raises(sat_quant.CheckpointError, match="whole groups .int4c: an even number of them"):
        split(full["zero"], kinds["zero"], 2)


# -- real launches: torchrun --nproc_per_node 2, gloo on CPU, --model-parallel-size 2 --------------------

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import sat_quant  # noqa: E402
from sat_quant import QuantConfig  # noqa: E402
from tests.conftest import SAT_MODELS, free_port, run_logits, sat_args  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def torchrun(script: str, *argv: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Two CPU ranks; the whole process group is killed if it outlives ``timeout``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), os.path.join(ROOT, "tests", "workers", script), *argv]
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun timed out:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def mp_run(fp_models, tmp_path_factory):
    """One torchrun of tests/workers/mp_worker.py: fp checkpoint → mp=2 quantized, saved, reloaded; mp=1 → mp=2."""
    tmp_path = tmp_path_factory.mktemp("mp")
    fp_dir, q1_dir = _mp_fixture(fp_models, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    r = torchrun("mp_worker.py", fp_dir, q1_dir, str(out))
    assert r.returncode == 0, r.stderr[-4000:]
    return q1_dir, out


def test_model_parallel_quantize_save_load_reshard(fp_models, mp_run):
    """mp=2 under torchrun: each rank quantizes its partition of a full-precision checkpoint, saves mp=2
    shards, reloads them, and reshards an mp=1 quantized checkpoint; mp=1 merges the mp=2 shards."""
    _, _, inputs, _ = fp_models["gpt2"]
    q1_dir, out = mp_run
    reference, _ = sat_quant.from_pretrained(SAT_MODELS["gpt2"][0], q1_dir)
    expected = run_logits(reference.eval(), inputs)
    fp_to_mp2 = torch.load(out / "fp_to_mp2.pt")
    # partitions hold exactly mp=1's codes and scales; only the matmul is split (bf16 activations, all-reduce)
    assert ((fp_to_mp2 - expected).norm() / expected.norm()).item() < 0.02
    assert torch.equal(torch.load(out / "mp2_reload.pt"), fp_to_mp2), "same shards reload bitwise"
    assert torch.equal(torch.load(out / "mp1_to_mp2.pt"), fp_to_mp2), "mp=1 → mp=2 reshard = quantizing at mp=2"
    assert torch.equal(torch.load(out / "sat_automodel_mp1_to_mp2.pt"), fp_to_mp2), "SAT's AutoModel reshards alike"
    shards = sorted(os.listdir(out / "q-mp2" / "1"))
    assert [s for s in shards if s.endswith(".safetensors")] == ["mp_rank_00_model_states.safetensors",
                                                                  "mp_rank_01_model_states.safetensors"]
    # mp=2 shards merged back at mp=1 are bitwise the mp=1 quantized model
    merged, merged_args = sat_quant.from_pretrained(SAT_MODELS["gpt2"][0], str(out / "q-mp2"),
                                                    overwrite_args={"model_parallel_size": 1})
    assert merged_args.model_parallel_size == 1
    assert torch.equal(run_logits(merged.eval(), inputs), expected)


def test_model_parallel_bad_inputs_fail_on_every_rank_without_hanging(mp_run, tmp_path):
    import shutil
    out = mp_run[1]
    broken = tmp_path / "broken"
    shutil.copytree(out / "q-mp2", broken)
    for name in os.listdir(broken / "1"):
        if name.startswith("mp_rank_01"):
            os.remove(broken / "1" / name)
    r = torchrun("mp_bad_worker.py", str(broken), str(tmp_path), timeout=90)
    assert r.returncode == 0, r.stderr[-4000:]
    texts = [(tmp_path / f"rank{k}.txt").read_text() for k in (0, 1)]
    for text in texts:
        world, group, rowscale, missing = text.split("\n---\n")
        assert "world size 2" in world and "not a multiple of --model-parallel-size 4" in world
        assert "not divisible by group size 256" in group and "row-parallel layer" in group
        assert "int4c: layer 'transformer.layers.0.attention.dense' is row-parallel" in rowscale
        assert "holds 1 groups" in rowscale and "needs a multiple of 2 per rank" in rowscale
        assert "failed on rank(s) 1" in missing and "mp_rank_01_model_states" in missing
    assert texts[0].split("\n---\n")[3] == texts[1].split("\n---\n")[3], "every rank raises the same error"


def _mp_fixture(fp_models, tmp_path):
    from sat.training.model_io import save_checkpoint as sat_save

    from sat_quant.tools.convert import convert
    fp_model = fp_models["gpt2"][0]
    fp_args = sat_args("gpt2")
    fp_args.save, fp_args.mode = str(tmp_path / "fp"), "inference"
    sat_save(1, fp_model, None, None, fp_args)
    convert(str(tmp_path / "fp"), str(tmp_path / "q1"), QuantConfig(bits=4), progress=False)
    return str(tmp_path / "fp"), str(tmp_path / "q1")


def test_resharding_to_a_size_that_is_not_a_power_of_two_is_refused(fp_models, tmp_path):
    import json
    _, q1 = _mp_fixture(fp_models, tmp_path)
    config_path = os.path.join(q1, "model_config.json")
    config = json.load(open(config_path))
    config["model_parallel_size"] = 3
    json.dump(config, open(config_path, "w"))
    manifest_path = os.path.join(q1, "1", "mp_rank_00_model_states.manifest.json")
    manifest = json.load(open(manifest_path))
    manifest.setdefault("model_config", {})["model_parallel_size"] = 3
    json.dump(manifest, open(manifest_path, "w"))
    with pytest.raises(sat_quant.CheckpointError, match="model-parallel size 3.*powers of two"):
        sat_quant.from_pretrained(SAT_MODELS["gpt2"][0], q1, overwrite_args={"model_parallel_size": 1})


def test_offline_reshard_cli_matches_torchrun_shards(fp_models, mp_run, tmp_path):
    """`sat-quant reshard`: mp=1 → 2 gives the shards the two torchrun ranks wrote; 2 → 1 loads bitwise."""
    from safetensors.torch import load_file
    _, _, inputs, _ = fp_models["gpt2"]
    q1_dir, out = mp_run
    run = lambda *a: subprocess.run([sys.executable, "-m", "sat_quant.tools.cli", "reshard", *a], cwd=ROOT,
                                    capture_output=True, text=True, timeout=300)
    r = run(q1_dir, str(tmp_path / "to2"), "--mp", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        ours = load_file(tmp_path / "to2" / "1" / f"mp_rank_{rank:02d}_model_states.safetensors")
        theirs = load_file(out / "q-mp2" / "1" / f"mp_rank_{rank:02d}_model_states.safetensors")
        assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    r = run(str(out / "q-mp2"), str(tmp_path / "to1"), "--mp", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    merged, args = sat_quant.from_pretrained(SAT_MODELS["gpt2"][0], str(tmp_path / "to1"))
    reference, _ = sat_quant.from_pretrained(SAT_MODELS["gpt2"][0], q1_dir)
    assert args.model_parallel_size == 1
    assert torch.equal(run_logits(merged.eval(), inputs), run_logits(reference.eval(), inputs))
    r = run(q1_dir, str(tmp_path / "to3"), "--mp", "3")
    assert r.returncode == 2 and "powers of two" in r.stderr


def test_int4c_and_int4cs_shards_hold_the_whole_weights_statistics(fp_models, tmp_path):
    """int4cs and int4c at mp=2: on column-parallel layers every rank quantizes its rows with the whole weight's
    column scale ``t`` (column statistics all-reduced); on row-parallel ones its input columns with the whole row's
    row scale and the ``t`` of the whole weight (row statistics all-reduced). Ranks hold the same ``t`` where it is
    shared, the shards merge bitwise into the mp=1 conversion, and an mp=1 checkpoint splits into the same shards
    (``sat-quant reshard`` of int4c/int4cs failed with an IndexError before)."""
    import json

    from sat_quant.tools.convert import convert
    from sat_quant.tools.reshard import reshard
    fp_dir, _ = _mp_fixture(fp_models, tmp_path)
    plan = {"*.query_key_value": "int4cs", "*.dense_h_to_4h": "int4cs",  # column-parallel
            "*.attention.dense": "int4c", "*.dense_4h_to_h": "int4cs"}  # row-parallel
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan))
    convert(fp_dir, str(tmp_path / "q1cs"), QuantConfig(bits=4, plan=plan), progress=False)
    out = tmp_path / "out"
    out.mkdir()
    r = torchrun("mp_int4cs_worker.py", fp_dir, str(plan_path), str(out))
    assert r.returncode == 0, r.stderr[-4000:]
    assert torch.equal(torch.load(out / "col_scale_rank0.pt"), torch.load(out / "col_scale_rank1.pt"))
    from safetensors.torch import load_file
    q1 = load_file(tmp_path / "q1cs" / "1" / "mp_rank_00_model_states.safetensors")
    name = "transformer.layers.0.attention.query_key_value.col_scale"
    assert torch.equal(torch.load(out / "col_scale_rank0.pt"), q1[name]), "mp=2's t is mp=1's t"
    _, _, inputs, _ = fp_models["gpt2"]
    reference, _ = sat_quant.from_pretrained(SAT_MODELS["gpt2"][0], str(tmp_path / "q1cs"))
    expected = run_logits(reference.eval(), inputs)
    assert ((torch.load(out / "int4cs_mp2.pt") - expected).norm() / expected.norm()).item() < 0.02
    merged, _ = sat_quant.from_pretrained(SAT_MODELS["gpt2"][0], str(out / "q-int4cs-mp2"),
                                          overwrite_args={"model_parallel_size": 1})
    assert torch.equal(run_logits(merged.eval(), inputs), expected), "mp=2 shards merge into the mp=1 model"
    reshard(str(tmp_path / "q1cs"), str(tmp_path / "to2"), 2)
    for rank in (0, 1):
        ours = load_file(tmp_path / "to2" / "1" / f"mp_rank_{rank:02d}_model_states.safetensors")
        theirs = load_file(out / "q-int4cs-mp2" / "1" / f"mp_rank_{rank:02d}_model_states.safetensors")
        assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_column_parallel_shards_with_different_column_scales_refuse_to_merge():
    t = torch.rand(64).half()
    assert torch.equal(merge(split(t, ("input-replicated", 1), 2), ("input-replicated", 1)), t)
    assert [p.shape[0] for p in split(t, ("input", 1), 2)] == [32, 32]
    with pytest.raises(sat_quant.CheckpointError, match="different per-input-column scales"):
        merge([t, t * 2], ("input-replicated", 1))


def test_tiny_cogvlm_quantized_at_model_parallel_2(tmp_path):
    """The real CogVLMModel (EVA tower, GLU adapter, visual expert) at mp=2: each rank quantizes its partition."""
    from sat.training.model_io import save_checkpoint as sat_save

    from tests.cogvlm_fixture import build_tiny_cogvlm, tiny_cogvlm_args, tiny_cogvlm_inputs
    fp_model, fp_args = build_tiny_cogvlm()
    fp_args.save, fp_args.mode = str(tmp_path / "fp"), "inference"
    sat_save(1, fp_model, None, None, fp_args)
    # group 64: the tiny EVA MLP has 1920 input columns, 960 per rank (128 would straddle; real CogVLM: 7680)
    reference, _ = sat_quant.from_pretrained(None, str(tmp_path / "fp"),
                                             args=tiny_cogvlm_args(quant=4, quant_group_size=64))
    expected = run_logits(reference.eval(), tiny_cogvlm_inputs())
    r = torchrun("mp_cogvlm_worker.py", str(tmp_path / "fp"), str(tmp_path), timeout=150)
    assert r.returncode == 0, r.stderr[-4000:]
    logits = torch.load(tmp_path / "cogvlm_mp2.pt")
    # same codes and scales as mp=1 on every partition; the split matmuls and all-reduces only reorder sums
    assert ((logits - expected).norm() / expected.norm()).item() < 0.02


# -- LoRA at model-parallel size 2 ----------------------------------------------------------------------

def _lora_checkpoint(q1_dir: str, path: str):
    """An mp=1 QLoRA checkpoint with non-zero adapters on every attention and MLP layer; returns its model."""
    from sat_quant.engine.lora import LoraQuantLinear
    from sat_quant.sat.lora_mixin import QuantLoraMixin
    model, margs = sat_quant.from_pretrained(SAT_MODELS["gpt2"][0], q1_dir)
    mixin = QuantLoraMixin(rank=4, alpha=8, targets=["attention.query_key_value", "attention.dense",
                                                     "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"])
    model.add_mixin("lora", mixin, reinit=True)
    mixin.record_in_args(margs)
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, LoraQuantLinear):
            m.lora_B.data.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.05)
    sat_quant.save_checkpoint(model, path, args=margs)
    return model.eval()


def test_lora_at_model_parallel_2_loads_trains_saves_and_merges(fp_models, mp_run, tmp_path):
    """mp=2 LoRA: forward = mp=1 LoRA; a training step keeps replicated adapters identical on both ranks; the
    mp=2 shards reload at mp=1 with the trained outputs; merging per rank = merging at mp=1."""
    from sat_quant.engine.lora import merge_lora_
    _, _, inputs, _ = fp_models["gpt2"]
    q1_dir, _ = mp_run
    adapted = run_logits(_lora_checkpoint(q1_dir, str(tmp_path / "lora-mp1")), inputs)
    r = torchrun("mp_lora_worker.py", str(tmp_path / "lora-mp1"), str(tmp_path), timeout=150)
    assert r.returncode == 0, r.stderr[-4000:]
    res = torch.load(tmp_path / "mp_lora.pt")
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    base_gap = rel(run_logits(sat_quant.from_pretrained(SAT_MODELS["gpt2"][0], q1_dir)[0].eval(), inputs), adapted)
    assert rel(res["loaded"], adapted) < 0.02 < base_gap, (rel(res["loaded"], adapted), base_gap)
    assert res["losses"][-1] < res["losses"][0], res["losses"]
    assert res["replicated_identical"] and res["n_replicated"] == 8  # column A and row B of 4 layers x 2
    reloaded, args = sat_quant.from_pretrained(SAT_MODELS["gpt2"][0], str(tmp_path / "lora-mp2"),
                                               overwrite_args={"model_parallel_size": 1})
    assert args.model_parallel_size == 1
    assert rel(run_logits(reloaded.eval(), inputs), res["trained"]) < 0.02
    # each rank re-quantized its own partition of W + B @ A: the same codes as merging the whole layer at mp=1
    merge_lora_(reloaded)
    assert rel(res["merged"], run_logits(reloaded, inputs)) < 0.02


def test_world_size_not_a_multiple_of_model_parallel_size_is_refused():
    from sat_quant.sat.args import check_world_size
    check_world_size(["--model-parallel-size", "2"], world_size=4)
    with pytest.raises(sat_quant.QuantConfigError, match="world size 6 .* not a multiple of --model-parallel-size 4"):
        check_world_size(["--mode", "finetune", "--model-parallel-size", "4"], world_size=6)


def test_mp4_shards_at_mp3_are_refused_before_building(fp_models, tmp_path):
    """Shards of size 4 cannot be resharded to 3; every rank says so before SAT builds (which would only assert)."""
    import json
    _, q1 = _mp_fixture(fp_models, tmp_path)
    for path in (os.path.join(q1, "model_config.json"), os.path.join(q1, "1", "mp_rank_00_model_states.manifest.json")):
        data = json.load(open(path))
        (data.setdefault("model_config", {}) if "manifest" in path else data)["model_parallel_size"] = 4
        json.dump(data, open(path, "w"))
    with pytest.raises(sat_quant.CheckpointError, match="saved with model-parallel size 4; loading it at 3"):
        sat_quant.from_pretrained(SAT_MODELS["gpt2"][0], q1, overwrite_args={"model_parallel_size": 3})


def test_missing_rank_file_when_merging_shards_is_named(mp_run, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(mp_run[1] / "q-mp2", broken)
    for name in os.listdir(broken / "1"):
        if name.startswith("mp_rank_01"):
            os.remove(broken / "1" / name)
    with pytest.raises(sat_quant.CheckpointError, match="mp_rank_01_model_states.* missing"):
        sat_quant.from_pretrained(SAT_MODELS["gpt2"][0], str(broken), overwrite_args={"model_parallel_size": 1})
