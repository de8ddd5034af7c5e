"""User-facing jobs: convert / dequantize / reshard / merge-lora / inspect / plan on checkpoint folders, the
``sat-quant`` CLI, the memory estimate, the demo, and the helpers the patched CogVLM scripts call."""
