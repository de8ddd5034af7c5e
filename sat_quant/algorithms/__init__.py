"""Algorithms over tensors and a QuantConfig: calibration (GPTQ) and the budget planner. No files, no argparse."""
