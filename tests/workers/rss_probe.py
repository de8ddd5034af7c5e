"""Run in a subprocess by the memory tests: build a ~310M-parameter SAT GPT-2 model and print
JSON with the resident-set baseline after imports and the peak (VmHWM, reset after imports)."""
import json
import os
import sys

os.environ.setdefault("WANDB_MODE", "disabled")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Start the peak (VmHWM) afresh: imports can briefly peak higher than the build we measure."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(mode: str) -> None:
    import torch
    from sat.model.official.gpt2_model import GPT2Model

    import sat_quant
    torch.set_num_threads(2)
    args = GPT2Model.get_args(num_layers=24, hidden_size=1024, num_attention_heads=16, vocab_size=8192,
                              max_sequence_length=512, device="cpu", fp16=False, bf16=False, skip_init=False,
                              quant=None if mode == "fp32" else int(mode[-1]), mode="inference")
    from sat.arguments import _simple_init
    _simple_init(model_parallel_size=1, seed=1234)
    baseline = rss_bytes()
    reset_peak()
    model = sat_quant.get_model(args, GPT2Model)
    params = sum(p.numel() for p in model.parameters())
    linear = sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, sat_quant.QuantLinear))
    peak = peak_bytes()
    print(json.dumps({"baseline": baseline, "peak": peak, "params": params + linear}))


if __name__ == "__main__":
    main(sys.argv[1])
