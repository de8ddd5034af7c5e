"""Subprocess body of the evaluation-memory benchmark: load the tiny CogVLM one way, generate, report the peak.

argv: VARIANT CHECKPOINT. Prints one JSON line: peak RSS growth over the post-import baseline, the weight bytes
and the generated tokens.
"""
import json
import os
import sys

os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: what SAT's own quantize(model, bits) leaves in full precision in CogVLM: everything outside
#: model.transformer.layers (the EVA tower, the GLU adapter, the visual expert held by the mlp/rotary mixins)
SAT_SCOPE_SKIP = ["mixins.eva.*", "mixins.mlp.*", "mixins.rotary.*"]

VARIANTS = {
    "fp32": dict(quant=None),
    "int4, SAT's scope (transformer.layers only)": dict(quant=4, quant_skip=SAT_SCOPE_SKIP),
    "int4, every linear layer": dict(quant=4),
    "int4, every linear layer + last-position logits": dict(quant=4, lean=True),
}


def main(variant: str, checkpoint: str, new_tokens: int) -> None:
    import argparse

    import sat_quant
    from sat_quant.engine.replace import release_freed_memory
    from sat_quant.tools.patched_scripts import load_for_inference
    from tests.cogvlm_fixture import cogvlm_model_class, greedy_generate
    from tests.workers.rss_probe import peak_bytes, reset_peak, rss_bytes
    cogvlm_model_class()  # registers CogVLMModel with SAT (imports utils.models)
    import xformers.ops  # noqa: F401  one-time imports every variant pays
    settings = dict(VARIANTS[variant])
    lean = settings.pop("lean", False)
    args = sat_quant.add_quant_args(argparse.ArgumentParser()).parse_args([])
    settings.pop("quant_skip", None)  # the int4 checkpoints are converted with their skip list: load as saved
    args.__dict__.update(settings, fp16=False, bf16=False)
    release_freed_memory(0)
    baseline = rss_bytes()
    reset_peak()  # measure loading + evaluation, not the imports
    model, model_args = load_for_inference(checkpoint, args, rank=0, world_size=1)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    tokens = greedy_generate(model, new_tokens=new_tokens, vocab_size=model_args.vocab_size, lean=lean)
    print(json.dumps({"peak_growth": peak_bytes() - baseline, "weights": weights,
                      "tokens": tokens[0, -new_tokens:].tolist()}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
