"""Build a 4-bit SAT GPT-2 holding about 630 MB of packed weights in the CPU kernel's layout, save it with
sat_quant.save_checkpoint, print "QUANTIZED_MB RSS_BEFORE_SAVE_MB PEAK_DURING_SAVE_MB". argv: SAVE_DIR [gather].

Saving converts each layer to the kernel-neutral layout (a new tensor): gathered for the whole model first, that
is a second copy of the weights; streamed, one layer at a time. ``gather`` runs the old gathering path, to show
the test can tell them apart.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def main(save_dir: str, mode: str = "stream") -> None:
    import torch
    from sat.model.official.gpt2_model import GPT2Model

    import sat_quant
    from sat_quant.engine.layers import QuantLinear
    args = GPT2Model.get_args(num_layers=6, hidden_size=4096, num_attention_heads=32, vocab_size=1000,
                              max_sequence_length=64, device="cpu", skip_init=True, mode="inference", quant=4,
                              quant_backend="torch")  # a kernel layout that is not the saved one
    model = sat_quant.get_model(args, GPT2Model)  # skip_init: built on meta, packed zeros
    torch.manual_seed(0)
    quantized = 0
    for module in model.modules():  # random packed weights, as a checkpoint would bring (every page touched)
        if isinstance(module, QuantLinear):
            for tensor in module._kernel.values():  # any bytes are valid 4-bit codes; scales any positive floats
                tensor.uniform_(0.5, 1.0) if tensor.is_floating_point() else tensor.random_(0, 127)
            quantized += module.quantized_nbytes()
    if mode == "gather":
        import sat_quant.io.save as save
        from sat_quant.io.tensorfile import TensorStream, layout_of

        def gathered(model):
            tensors = {pre + n: t for _, pre, local in save.iter_module_tensors(model) for n, t in local.items()}
            return TensorStream(layout_of(tensors), [tensors])
        save.model_tensor_stream = gathered
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM restarts from the current resident set: the save's own peak is measured
    before = rss_mb("VmRSS")
    sat_quant.save_checkpoint(model, save_dir, args=args)
    print(f"{quantized / 2**20:.0f} {before:.0f} {rss_mb('VmHWM'):.0f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
