"""OOM guidance: a real allocation failure while loading or generating becomes advice with figures."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from sat_quant.oom import QuantOutOfMemoryError, is_out_of_memory, oom_guidance
from tests.cogvlm_fixture import cogvlm_available
from tests.cogvlm_scripts import REPO, script_env

IMPOSSIBLE = 2**62  # bytes no allocator can give: torch's CPU allocator raises a real RuntimeError


def test_a_real_cpu_allocation_failure_becomes_advice_with_the_estimate():
    with pytest.raises(QuantOutOfMemoryError) as info:
        with oom_guidance("loading /ckpt", need_bytes=lambda: 3 * 2**30, quant_bits=8, model_parallel_size=2):
            torch.empty(IMPOSSIBLE, dtype=torch.uint8)
    message = str(info.value)
    assert "ran out of cpu memory while loading /ckpt" in message
    assert "peak so far:" in message and "estimate for this step: 3.00 GiB" in message
    assert "use --quant 4 instead of --quant 8" in message and "--nproc_per_node 4" in message
    assert is_out_of_memory(info.value.__cause__) and isinstance(info.value, MemoryError)


def test_errors_that_are_not_out_of_memory_pass_through_unchanged():
    with pytest.raises(ValueError, match="not memory"):
        with oom_guidance("loading"):
            raise ValueError("not memory")


def test_estimate_failure_does_not_hide_the_oom():
    def broken():
        raise RuntimeError("cannot price")
    with pytest.raises(QuantOutOfMemoryError) as info:
        with oom_guidance("building", need_bytes=broken):
            torch.empty(IMPOSSIBLE, dtype=torch.uint8)
    assert "estimate for this step" not in str(info.value) and "--quant 4" in str(info.value)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_real_cuda_oom_names_the_device():
    with pytest.raises(QuantOutOfMemoryError, match=r"cuda:\d"):
        with oom_guidance("generating", device=torch.device("cuda"), generating=True):
            torch.empty(IMPOSSIBLE, dtype=torch.uint8, device="cuda")


needs_cogvlm = pytest.mark.skipif(not cogvlm_available(), reason="needs the CogVLM snapshot (../shared/cogvlm)")


@needs_cogvlm
def test_generation_guard_prices_the_kv_cache_for_max_length(tmp_path):
    from sat_quant.tools.patched_scripts import generation_guard
    from tests.cogvlm_fixture import build_tiny_cogvlm
    model, args = build_tiny_cogvlm()
    with pytest.raises(QuantOutOfMemoryError) as info:
        with generation_guard(model, args, max_length=2048):
            torch.empty(IMPOSSIBLE, dtype=torch.uint8)
    message = str(info.value)
    from sat_quant.tools.estimate import estimate_runtime
    kv, act = estimate_runtime(args, 1, 2048, 4)
    assert "while generating up to 2048 tokens" in message and f"{(kv + act) / 2**30:.2f} GiB" in message
    assert "lower --max_length" in message


@needs_cogvlm
def test_loading_under_a_memory_limit_fails_with_advice_not_a_bare_oom(tmp_path):
    """A process whose address space is capped just above what it has mapped loads a full-precision CogVLM
    with --quant 4: the real allocation failure must surface as QuantOutOfMemoryError naming the step."""
    from sat_quant.testing.cogvlm_assets import save_tiny_checkpoint
    save_tiny_checkpoint(str(tmp_path / "fp"))
    code = textwrap.dedent(f"""
        import argparse, resource, sys
        import torch, sat_quant, xformers.ops
        from sat.arguments import _simple_init
        from sat_quant.tools.patched_scripts import load_for_inference
        from tests.cogvlm_fixture import cogvlm_model_class
        cogvlm_model_class()
        _simple_init(model_parallel_size=1, seed=1234)  # gloo's threads start before the cap
        torch.zeros(4) @ torch.zeros(4)  # and the OpenMP pool
        vm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize:'))
        resource.setrlimit(resource.RLIMIT_AS, (vm + 60 * 2**20, resource.RLIM_INFINITY))
        args = sat_quant.add_quant_args(argparse.ArgumentParser()).parse_args([])
        args.__dict__.update(quant=4, fp16=False, bf16=False)
        load_for_inference({str(tmp_path / 'fp')!r}, args, rank=0, world_size=1)
        print('LOADED')
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=script_env(),
                            cwd=REPO, timeout=180)
    assert result.returncode != 0 and "LOADED" not in result.stdout
    last = result.stderr.strip().splitlines()
    tail = "\n".join(last[-4:])
    assert "QuantOutOfMemoryError: sat_quant ran out of cpu memory while loading" in result.stderr, tail
    assert "peak so far:" in result.stderr and "pre-quantized checkpoint" in result.stderr
