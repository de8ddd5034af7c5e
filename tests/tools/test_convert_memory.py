"""``sat-quant convert`` in bounded memory (issue 13): converting a checkpoint far bigger than the largest of its
tensors peaks at about that tensor, not at the model.

The source is a real SAT GPT-2 checkpoint (SAT's layout, ``.pt`` read memory-mapped) of 1.58 GB in fp16, whose
largest tensor is the 134 MB word embedding; its int8 conversion holds 0.92 GB, which the in-memory path (build,
fill, save) held all at once. The conversion runs in a child process; its peak resident set (``VmHWM``, file
pages of the memory-mapped source included; tests/workers/convert_memory_child.py says why not ``ru_maxrss``) less
its size after imports must stay under the largest tensor plus MARGIN, and under half the converted model.
"""
import json
import math
import os
import subprocess
import sys

import torch
from sat.model.official.gpt2_model import GPT2Model
from sat.training.model_io import extract_model_specific_args_to_dump

from sat_quant.sat.build import build_on_meta
from tests.io.checkpoints import CHILD_ENV, ROOT, read_json

CHILD = os.path.join(ROOT, "tests", "workers", "convert_memory_child.py")
# 13 blocks of 50M parameters (hidden 2048, MLP 8192), a 32768-token vocabulary (embedding and LM head), fp16: 1.58 GB
ARCH = dict(num_layers=13, hidden_size=2048, num_attention_heads=16, vocab_size=32768, max_sequence_length=64)
#: above the largest tensor: one read copy of it, its pages of the map until dropped, a layer's quantization
#: temporaries (fp32 of a 2048 x 8192 weight: 64 MiB) and the allocator's slack
MARGIN = 320 * 2**20


def write_sat_checkpoint(folder: str) -> dict:
    """What SAT's save_checkpoint writes in inference mode, for GPT2Model at ARCH in fp16: ``latest``,
    model_config.json and ``1/mp_rank_00_model_states.pt`` ({'module': state_dict}). Each tensor is its own copy of
    a slice of one seeded random pool (copying is ten times faster than drawing 770M numbers on a busy CPU)."""
    args = GPT2Model.get_args(**ARCH, device="cpu", fp16=True, skip_init=True, mode="inference")
    meta = build_on_meta(GPT2Model, args, torch.float16)
    shapes = {name: t.shape for name, t in meta.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    pool = torch.empty(max(s.numel() for s in shapes.values()) + len(shapes), dtype=torch.float16)
    pool.uniform_(-0.05, 0.05, generator=gen)
    state = {name: pool[i:i + shape.numel()].clone().view(shape) for i, (name, shape) in enumerate(shapes.items())}
    del pool
    os.makedirs(os.path.join(folder, "1"))
    torch.save({"module": state}, os.path.join(folder, "1", "mp_rank_00_model_states.pt"))
    with open(os.path.join(folder, "model_config.json"), "w") as f:
        json.dump(extract_model_specific_args_to_dump(args, meta), f)
    with open(os.path.join(folder, "latest"), "w") as f:
        f.write("1")
    return {name: t.numel() * t.element_size() for name, t in state.items()}


def test_convert_peaks_at_the_largest_tensor_not_at_the_model(tmp_path):
    sizes = write_sat_checkpoint(str(tmp_path / "fp"))
    total, largest = sum(sizes.values()), max(sizes.values())
    assert total >= 1.5e9 and 100e6 <= largest <= 200e6, (total, largest)
    dst = str(tmp_path / "q8")
    child = subprocess.run([sys.executable, CHILD, str(tmp_path / "fp"), dst, "8"], cwd=ROOT, capture_output=True,
                           text=True, timeout=600, env=dict(CHILD_ENV, OMP_NUM_THREADS="2"))
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["status"] == 0, child.stderr[-3000:]
    manifest = read_json(os.path.join(dst, "1", "mp_rank_00_model_states.manifest.json"))
    converted = sum(math.prod(t["shape"]) * torch.empty(0, dtype=getattr(torch, t["dtype"])).element_size()
                    for t in manifest["tensors"].values())
    rise = result["peak"] - result["baseline"]  # VmHWM: see the child for why not ru_maxrss
    report = (f"peak rise {rise / 2**20:.0f} MiB; largest tensor {largest / 2**20:.0f} MiB; source {total / 2**20:.0f} "
              f"MiB; converted {converted / 2**20:.0f} MiB; {result['rates']}")
    print(report)
    assert converted > 800 * 2**20, report  # what the in-memory path held at least
    assert rise <= largest + MARGIN, report
    assert rise < converted / 2, report
    assert len(result["rates"]) == 1 and result["rates"][0].count("MB/s") == 3, result
