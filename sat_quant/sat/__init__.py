"""Where SAT meets sat_quant: flags → QuantConfig, quantize-while-building, from_pretrained/save_checkpoint in
SAT's layout, the LoRA and quant mixins, SAT training on CPU, CPU fallbacks and leaner generation.

The only layer (with tools) that reads an ``argparse.Namespace``. Its imports of SAT are absolute (``sat.…``),
so this subpackage never shadows SAT's own ``sat`` package.
"""
