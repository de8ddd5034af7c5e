"""The end-to-end benchmark's probe (benchmarks/e2e.py) on small models: it builds each kind of variant, generates
greedily through SAT's filling_sequence with the KV cache, and reports what the RESULTS table prints."""
import pytest

from benchmarks import e2e
from tests.conftest import NF4_CPU_BACKEND

SMALL_LLAMA = dict(num_layers=2, hidden_size=256, num_attention_heads=4, inner_hidden_size=512, vocab_size=1000,
                   max_sequence_length=128, layernorm_order="pre")


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(e2e, "LLAMA_ARCH", SMALL_LLAMA)
    monkeypatch.setattr(e2e, "NEW_TOKENS", 4)
    monkeypatch.setattr(e2e, "REPEATS", 1)


@pytest.mark.parametrize("variant,backend", [("fp32", None), ("nf4-bf16", NF4_CPU_BACKEND)])
def test_llama_probe_generates_and_measures(small, variant, backend):
    r = e2e.probe("llama", variant)
    assert len(r["tokens"]) == 4 and all(0 <= t < 1000 for t in r["tokens"])
    assert r["seconds"] > 0 and r["peak_growth"] > 0
    assert r["backends"] == ([backend] if backend else [])
    full = r["params"] * 4
    assert (r["weight_bytes"] == full) if backend is None else (r["weight_bytes"] < full / 2)


def test_cogvlm_probe_generates_with_the_image_prompt(small):
    r = e2e.probe("cogvlm", "nf4-fp32")
    assert len(r["tokens"]) == 4 and all(0 <= t < 1000 for t in r["tokens"]) and r["backends"] == [NF4_CPU_BACKEND]
    assert r["weight_bytes"] < r["params"] * 4 / 2


def test_side_by_side_timing_covers_every_variant(small):
    times = e2e.time_side_by_side("llama", ["fp32", "nf4-fp32"], rounds=1)
    assert set(times) == {"fp32", "nf4-fp32"}
    assert all(t["decode"] > 0 and 0 < t["prefill_s"] < float("inf") and t["overall"] > 0 for t in times.values())
