"""Benchmarks for sat_quant: ``python -m benchmarks`` writes benchmarks/RESULTS.md."""
