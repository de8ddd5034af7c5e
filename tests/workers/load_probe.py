"""Run in subprocesses by tests/io/test_checkpoint_memory.py.

``save DIR``: build a ~310M-parameter SAT GPT-2 quantized to int4 at build time and save it with
``sat_quant.save_checkpoint`` (prints the tensor file's size).
``load DIR``: load it back with ``sat_quant.from_pretrained`` and print JSON with the resident-set
baseline after imports and the peak (VmHWM, reset after imports, as in tests/workers/rss_probe.py).
"""
import importlib
import json
import os
import sys
import time

os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.workers.rss_probe import peak_bytes, reset_peak, rss_bytes  # noqa: E402

ARCH = dict(num_layers=24, hidden_size=1024, num_attention_heads=16, vocab_size=8192, max_sequence_length=512)


def save(directory: str) -> None:
    import torch
    from sat.model.official.gpt2_model import GPT2Model

    import sat_quant
    torch.set_num_threads(2)
    torch.manual_seed(0)
    args = GPT2Model.get_args(**ARCH, device="cpu", fp16=False, bf16=False, skip_init=False, quant=4,
                              mode="inference")
    model = sat_quant.get_model(args, GPT2Model)
    linear = sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, sat_quant.QuantLinear))
    params = linear + sum(p.numel() for p in model.parameters())
    it_dir = sat_quant.save_checkpoint(model, directory, args=args)
    tensor_file = os.path.join(it_dir, "mp_rank_00_model_states.safetensors")
    print(json.dumps({"params": params, "file_bytes": os.path.getsize(tensor_file)}))


def load(directory: str) -> None:
    import torch
    from sat.model.official.gpt2_model import GPT2Model

    import sat_quant
    torch.set_num_threads(2)
    for lazy in ("xformers.ops", "sat.model.position_embedding.triton_rotary_embeddings"):
        try:  # imported lazily by the CPU fallbacks every CPU build installs: an import, not the load
            importlib.import_module(lazy)
        except Exception:
            pass
    baseline = rss_bytes()
    reset_peak()
    start = time.perf_counter()
    model, _ = sat_quant.from_pretrained(GPT2Model, directory)
    seconds = time.perf_counter() - start
    peak = peak_bytes()
    layers = sum(isinstance(m, sat_quant.QuantLinear) for m in model.modules())
    print(json.dumps({"baseline": baseline, "peak": peak, "after": rss_bytes(), "quant_layers": layers,
                      "seconds": seconds}))


if __name__ == "__main__":
    {"save": save, "load": load}[sys.argv[1]](sys.argv[2])
