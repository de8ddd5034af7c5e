"""sat_quant's own compiled kernels (C++ in ``sat_quant/csrc``), built at first use and cached.

``lut4`` (the nf4/fp4/int4 CPU kernel) reports ``unavailable_reason()`` (None when it can run) so backends can fall
back to another path with a logged reason instead of failing; ``int4pack`` (byte repacking for torch's CPU int4
kernel) returns None where it cannot run and its caller repacks with torch ops.
"""
