"""The streaming tensor writer (io/tensorfile.write_tensor_file): safetensors files read back bitwise by the
safetensors library, hashed while written, and a save that holds no second copy of the model."""
import hashlib
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sat_quant.errors import CheckpointError
from sat_quant.io.save import expected_layout, iter_module_tensors, model_tensor_stream
from sat_quant.io.tensorfile import TensorStream, layout_of, sha256_file, write_tensor_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _every_kind():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=gen)
    return {
        "f32": base, "f16": base.half(), "bf16": base.bfloat16(), "f64": base.double(),
        "i8": (base * 40).to(torch.int8), "u8": (base * 40).abs().to(torch.uint8), "i16": (base * 900).to(torch.int16),
        "i32": (base * 1e5).to(torch.int32), "i64": (base * 1e9).to(torch.int64), "bool": base > 0,
        "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4), "transposed": base.t(), "slice": base[1:4, 2:5],
        "shares_storage": base[0],  # a view of "f32": written as its own bytes
    }


def test_every_dtype_and_view_reads_back_bitwise(tmp_path):
    tensors = _every_kind()
    path = str(tmp_path / "t.safetensors")
    digest = write_tensor_file(path, tensors)
    back = load_file(path)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape and torch.equal(back[name], t), name
    assert digest == sha256_file(path) == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_stream_is_written_in_layout_order_whatever_the_order_inside_a_group(tmp_path):
    tensors = _every_kind()
    produced = []

    def groups():  # two groups, each in reverse order; produced only when the writer asks
        names = list(tensors)
        for part in (names[:7], names[7:]):
            produced.append(part[0])
            yield {n: tensors[n] for n in reversed(part)}

    path = str(tmp_path / "s.safetensors")
    write_tensor_file(path, TensorStream(layout_of(tensors), groups()))
    assert produced == [list(tensors)[0], list(tensors)[7]]
    back = load_file(path)
    assert all(torch.equal(back[n], t) for n, t in tensors.items())


@pytest.mark.parametrize("bad", ["shape", "missing", "extra"])
def test_a_stream_that_disagrees_with_its_layout_is_refused(tmp_path, bad):
    tensors = {"a": torch.ones(2, 2), "b": torch.zeros(3)}
    layout = layout_of(tensors)
    if bad == "shape":
        tensors["b"] = torch.zeros(4)
    elif bad == "missing":
        del tensors["b"]
    else:
        tensors["c"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="nothing was saved"):
        write_tensor_file(str(tmp_path / "x.safetensors"), TensorStream(layout, [tensors]))


def test_a_quantized_model_streams_the_same_tensors_it_would_gather(tmp_path):
    """Streaming = gathering every module's tensors first (the old path), bitwise, for every format."""
    from sat_quant.engine.config import QuantConfig
    from tests.conftest import build_fp
    from tests.sat.test_persistence import quantize_in_memory
    model, _ = build_fp("llama")
    plan = {"*.attention.query_key_value": "int8", "*.mlp.dense_4h_to_h": "int4:64", "*.layers.1.*": "nf4",
            "*.mlp.gate_proj.0": "int4c"}
    qmodel = quantize_in_memory("llama", model.state_dict(), QuantConfig(bits=4, plan=plan))
    gathered = {pre + n: t for _, pre, local in iter_module_tensors(qmodel) for n, t in local.items()}
    assert list(gathered) == list(expected_layout(qmodel)) and layout_of(gathered) == expected_layout(qmodel)
    path = str(tmp_path / "q.safetensors")
    write_tensor_file(path, model_tensor_stream(qmodel))
    back = load_file(path)
    assert set(back) == set(gathered) and all(torch.equal(back[n], t) for n, t in gathered.items())


def test_saving_holds_no_second_copy_of_the_model(tmp_path):
    """A 4-bit SAT GPT-2 with ~600 MB of packed weights in the CPU kernel's layout: while sat_quant.save_checkpoint
    runs, the resident set rises by at most 512 MiB (the kernel-neutral copy of each layer exists only while it is
    written). Gathering every layer's neutral tensors first, as before, rises by the whole model (checked here too,
    so the bound is shown to mean something)."""
    rises = {}
    for mode in ("stream", "gather"):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "workers", "save_memory_child.py"),
                                 str(tmp_path / mode), mode], cwd=ROOT, capture_output=True, text=True, timeout=600,
                                env=dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1"))
        assert result.returncode == 0, result.stderr[-3000:]
        quantized_mb, before_mb, peak_mb = (float(x) for x in result.stdout.split()[-3:])
        assert quantized_mb > 512, quantized_mb
        rises[mode] = peak_mb - before_mb
    assert rises["stream"] <= 512 < rises["gather"], rises
    assert load_file(str(tmp_path / "stream" / "1" / "mp_rank_00_model_states.safetensors")).keys() == \
        load_file(str(tmp_path / "gather" / "1" / "mp_rank_00_model_states.safetensors")).keys()


def test_verification_while_reading_reports_a_flipped_byte_at_finish(tmp_path):
    """open_rank_source(background=True): the sha256 runs while tensors are read; finish() raises on a flip (the
    loader then drops the model it filled), and passes on an intact file."""
    from sat_quant.io.manifest import open_rank_source, write_rank_files
    folder = tmp_path / "1"
    write_rank_files(str(folder), 1, 0, {"w": torch.arange(4096, dtype=torch.float32)}, None, {})
    intact = open_rank_source(str(tmp_path), 1, 0, background=True)
    assert torch.equal(intact.get("w"), torch.arange(4096, dtype=torch.float32))
    intact.finish()
    path = folder / "mp_rank_00_model_states.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))
    source = open_rank_source(str(tmp_path), 1, 0, background=True)  # the size still matches: no error yet
    source.get("w")
    with pytest.raises(CheckpointError, match="fails its sha256 check"):
        source.finish()
    with pytest.raises(CheckpointError, match="fails its sha256 check"):
        open_rank_source(str(tmp_path), 1, 0)  # the default still verifies before anything is read
