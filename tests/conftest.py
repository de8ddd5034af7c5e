"""Shared builders: real SAT models (SAT's own classes and get_args) at small sizes, on CPU."""
from __future__ import annotations

import os
import warnings

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # two pytest workers on a 2-core machine: one OpenMP thread each (and in the processes they start), else each
    # worker's threads spin-wait on cores the other holds (see one_torch_thread below)
    os.environ["OMP_NUM_THREADS"] = "1"
warnings.filterwarnings("ignore", category=FutureWarning)

import argparse  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from sat.model.official.bert_model import BertModel  # noqa: E402
from sat.model.official.gpt2_model import GPT2Model  # noqa: E402
from sat.model.official.llama_model import LLaMAModel  # noqa: E402

import tests.cogvlm_fixture  # noqa: E402,F401  (sets $SAT_QUANT_COGVLM_DIR for the package's CogVLM helpers)


def _cpu_has_avx512() -> bool:
    """Read from /proc/cpuinfo here, not from the kernel module, so a wrong detection there fails a test."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return all(f in flags for f in ("avx512f", "avx512bw", "avx512vl"))


#: sat_quant's nf4/fp4 CPU kernel ("lut") runs on AVX-512 CPUs only; elsewhere auto picks bitsandbytes
HAS_AVX512 = _cpu_has_avx512()
NF4_CPU_BACKEND = "lut" if HAS_AVX512 else "bitsandbytes"
INT4_CPU_BACKEND = "torch"  # auto's choice for int4 on CPU (lut only where torch's kernel cannot run the shape)
#: like the tests marked cuda, the lut kernel's own tests run where the hardware is; the fallback has CPU tests
needs_avx512 = pytest.mark.skipif(not HAS_AVX512, reason="the lut kernel needs AVX-512 F/BW/VL, which this CPU lacks")

def free_port() -> int:
    """A TCP port free right now, for a torch.distributed rendezvous: tests run in parallel workers (pytest -n),
    so a port derived from the pid could meet another worker's."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SAT_MODELS = {
    "gpt2": (GPT2Model, dict(num_layers=2, hidden_size=256, num_attention_heads=4, vocab_size=1000,
                             max_sequence_length=64)),
    "bert": (BertModel, dict(num_layers=2, hidden_size=256, num_attention_heads=4, vocab_size=1000,
                             max_sequence_length=64, num_types=2, layernorm_order="post")),
    "llama": (LLaMAModel, dict(num_layers=2, hidden_size=256, num_attention_heads=4, vocab_size=1000,
                               max_sequence_length=64, inner_hidden_size=512, layernorm_order="pre")),
}


def sat_args(name: str, **overrides) -> argparse.Namespace:
    """SAT's own args for a small model of kind ``name`` (through ``Model.get_args``), on CPU."""
    cls, arch = SAT_MODELS[name]
    kw = dict(arch, device="cpu", fp16=False, bf16=False, skip_init=False, quant=None, mode="inference")
    kw.update(overrides)
    return cls.get_args(**kw)


def model_inputs(name: str, seq: int = 16, batch: int = 1, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (batch, seq), generator=gen)
    pos = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    if name == "bert":
        mask = torch.ones(batch, 1, seq, seq)
        return dict(input_ids=ids, position_ids=pos, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    mask = torch.ones(1, 1, seq, seq).tril()
    return dict(input_ids=ids, position_ids=pos, attention_mask=mask)


def run_logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return (out[0] if isinstance(out, (tuple, list)) else out).float()


def build_fp(name: str, seed: int = 0, **overrides):
    """A full-precision reference model built with SAT's own get_model (CPU fallbacks switched on)."""
    from sat.model.base_model import get_model as sat_get_model

    from sat_quant.sat.compat import apply_cpu_compat
    torch.manual_seed(seed)
    args = sat_args(name, **overrides)
    model = sat_get_model(args, SAT_MODELS[name][0])
    apply_cpu_compat(model)
    return model.eval(), args


def save_fp_with_sat(model, args, path) -> str:
    """A full-precision checkpoint written by SAT's own save_checkpoint (inference mode): what users convert."""
    from sat.training.model_io import save_checkpoint as sat_save_checkpoint
    args.save, args.mode = str(path), "inference"
    sat_save_checkpoint(1, model, None, None, args)
    return str(path)


@pytest.fixture(scope="session")
def fp_models():
    """name → (fp32 model, its state_dict, inputs, fp32 logits), built once per session."""
    out = {}
    for name in SAT_MODELS:
        model, _ = build_fp(name)
        inputs = model_inputs(name)
        out[name] = (model, {k: v.clone() for k, v in model.state_dict().items()}, inputs, run_logits(model, inputs))
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for the module: GPTQ, calibration and batch-1 forwards run thousands of tiny ops, and on a
    busy 2-core machine two threads made them up to 40x slower (each waits on the other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
