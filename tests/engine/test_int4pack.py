"""The C++ int4 repack (kernels/int4pack.py) writes exactly torch's CPU int4 layout, and reads it back."""
import pytest
import torch

from sat_quant.engine.backends.torch_native import _cpu_pack_neutral, _cpu_pack_reference, _cpu_unpack_neutral, cpu_int4_block_n
from sat_quant.engine.formats.base import pack_nibbles
from sat_quant.engine.kernels import int4pack


def _codes(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("n,k,block_n", [(64, 256, 64), (128, 4096, 64), (96, 64, 32), (256, 128, 128),
                                         (64, 2, 64), (64, 36, 64), (24, 16, 8)])  # tails: bytes, rows
@pytest.mark.parametrize("threads", [1, 2])
def test_repack_equals_the_layout_model_and_the_torch_version(n, k, block_n, threads):
    codes = _codes(n, k)
    neutral = pack_nibbles(codes)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        packed = int4pack.from_neutral(neutral, block_n)
        assert packed is not None, "the C++ repack must build wherever the tests run (g++ is there)"
        assert torch.equal(packed, _cpu_pack_reference(codes, block_n))
        assert torch.equal(packed, _cpu_pack_neutral(neutral, block_n))
        back = int4pack.to_neutral(packed, n, block_n)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(back, neutral) and torch.equal(back, _cpu_unpack_neutral(packed, n, k, block_n))


def test_repack_is_what_torchs_converter_writes_and_its_kernel_reads():
    """On this machine's block size: torch's own converter gives the same bytes, and its int4 kernel computes
    with them what the codes say."""
    block_n = cpu_int4_block_n()
    assert block_n is not None, "the pinned torch's CPU int4 layout changed: torch_native would decline int4"
    codes = _codes(128, 256, seed=1)
    packed = int4pack.from_neutral(pack_nibbles(codes), block_n)
    assert torch.equal(packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1))
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    scales_zeros = torch.stack([torch.ones(2, 128), torch.zeros(2, 128)], dim=-1).to(torch.bfloat16)  # w = q - 8
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 128, scales_zeros)
    torch.testing.assert_close(y.float(), x.float() @ (codes.float() - 8).t(), rtol=2e-2, atol=2e-1)


def test_rows_that_are_not_whole_blocks_are_refused():
    with pytest.raises(ValueError, match="not whole blocks of 64"):
        int4pack.from_neutral(pack_nibbles(_codes(96, 64)), 64)
