"""The engine: weight formats, kernel backends, compiled kernels, quantized layers and layer replacement.

Nothing here reads flags or files; everything above (algorithms, io, sat, tools) builds on it.
"""
