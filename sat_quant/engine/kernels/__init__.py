"""sat_quant's own compiled kernels (C++ in ``sat_quant/csrc``), built at first use and cached.

Each kernel module reports ``unavailable_reason()`` (None when it can run) so backends can fall back to
another path with a logged reason instead of failing.
"""
