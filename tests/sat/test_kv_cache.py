"""KVCacheMixin: the same generation as SAT's CachedAutoregressiveMixin (greedy, beam search, a truncated memory,
CogVLM's image prompt, CogAgent's cross attention), with the cache written in place instead of copied."""
from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch
from sat.generation.autoregressive_sampling import filling_sequence
from sat.generation.sampling_strategies import BaseStrategy, BeamSearchStrategy
from sat.model.mixins import CachedAutoregressiveMixin
from sat.model.official.llama_model import LLaMAModel

import sat_quant
from sat_quant.sat import kv_cache
from sat_quant.sat.kv_cache import KVCacheMixin, layer_lengths
from tests.cogvlm_fixture import cogvlm_available
from tests.conftest import build_fp, sat_args

NEW_TOKENS = 6


class RecordingGreedy(BaseStrategy):
    """Greedy (top-k 1, never ends early) and keeps every step's logits: random weights repeat tokens, so the
    logits are what tells two caches apart."""

    def __init__(self) -> None:
        super().__init__(temperature=1.0, top_k=1, end_tokens=[-5])
        self.logits: List[torch.Tensor] = []

    def forward(self, logits, tokens, mems, temperature=None):
        self.logits.append(logits.detach().float().clone())
        return super().forward(logits, tokens, mems, temperature)


def _generate(model, cache, prompt: torch.Tensor, strategy=None, batch_size: int = 1,
              positions: torch.Tensor = None, **kw: Any):
    seq = torch.cat([prompt, torch.full((NEW_TOKENS,), -1, dtype=torch.long)])
    total = len(seq)
    if positions is None:
        positions = torch.arange(total)
    else:
        positions = torch.cat([positions, positions[-1] + 1 + torch.arange(NEW_TOKENS)])
    strategy = strategy or RecordingGreedy()
    model.add_mixin("auto-regressive", cache)
    try:
        with torch.no_grad():
            tokens = filling_sequence(
                model, seq, batch_size=batch_size, strategy=strategy,
                get_masks_and_position_ids=lambda s: (s.unsqueeze(0), torch.ones(1, 1, total, total).tril(),
                                                      positions.unsqueeze(0)), **kw)[0]
    finally:
        model.del_mixin("auto-regressive")
    return tokens, strategy


def _prompt(length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 1000, (length,), generator=torch.Generator().manual_seed(seed))


def _assert_same_steps(ours: RecordingGreedy, sats: RecordingGreedy, atol: float) -> None:
    assert len(ours.logits) == len(sats.logits) == NEW_TOKENS
    for step, (a, b) in enumerate(zip(ours.logits, sats.logits)):
        assert torch.allclose(a, b, atol=atol, rtol=0), f"step {step}: max diff {(a - b).abs().max():.3g}"


@pytest.fixture(scope="module")
def llama():
    model, _ = build_fp("llama")
    return model


@pytest.fixture(scope="module")
def int4_llama():
    model = sat_quant.get_model(sat_args("llama", quant=4, bf16=True), LLaMAModel)
    sat_quant.apply_cpu_compat(model)
    return model.eval()


def test_greedy_matches_sats_cache_step_by_step(llama):
    sats_tokens, sats = _generate(llama, CachedAutoregressiveMixin(), _prompt())
    cache = KVCacheMixin()
    ours_tokens, ours = _generate(llama, cache, _prompt())
    assert torch.equal(ours_tokens, sats_tokens)
    _assert_same_steps(ours, sats, atol=1e-5)
    assert layer_lengths(cache) == [10 + NEW_TOKENS - 1] * 2  # the last token is sampled, never fed back


def test_the_cache_is_written_in_place_not_copied(llama):
    """Within its capacity each layer keeps one buffer for the whole generation: SAT's mixin allocates a new,
    longer cache every token."""
    cache = KVCacheMixin()
    buffers: Dict[int, set] = {}
    original = cache.attention_fn

    def spy(*args, **kw):
        out = original(*args, **kw)
        layer = cache.layers[int(kw["layer_id"])]
        buffers.setdefault(int(kw["layer_id"]), set()).add(layer.keys.data_ptr())
        return out
    cache.attention_fn = spy
    _generate(llama, cache, _prompt())
    assert set(buffers) == {0, 1} and all(len(ptrs) == 1 for ptrs in buffers.values())
    # 10 prompt positions + 256 of headroom, rounded up to 256: 512 positions x width 256 x fp32, keys and values
    assert cache.cache_bytes() == 2 * 2 * 512 * 256 * 4
    cache.clear()
    assert cache.cache_bytes() == 0


def test_a_long_generation_grows_the_cache_and_matches(llama, monkeypatch):
    monkeypatch.setattr(kv_cache, "GROWTH_QUANTUM", 4)  # grow every few tokens: the copy on growth is exercised
    prompt = _prompt(9)
    _, sats = _generate(llama, CachedAutoregressiveMixin(), prompt)
    cache = KVCacheMixin()
    _, ours = _generate(llama, cache, prompt)
    _assert_same_steps(ours, sats, atol=1e-5)
    assert cache.layers[0].keys.shape[2] > 9 + 4  # it grew past the prompt's allocation


def test_beam_search_reorders_the_cache_like_sat(llama, monkeypatch):
    """Beam search reorders SAT's mems along the batch each step; the one-column mems carry that to the cache."""
    def beams():  # SAT's beam search draws its candidates with torch.multinomial: both runs start from one seed
        torch.manual_seed(0)
        return BeamSearchStrategy(3, length_penalty=1.0, consider_end=False, end_tokens=[-5],
                                  no_repeat_ngram_size=0)
    sats_tokens, _ = _generate(llama, CachedAutoregressiveMixin(), _prompt(seed=3), strategy=beams(), batch_size=3)
    follow, reorders = kv_cache._LayerCache.follow, []

    def counting_follow(self, rows, past):  # the real follow, noting each reorder it is asked for
        if not torch.equal(rows, torch.arange(len(rows))):
            reorders.append(rows.tolist())
        return follow(self, rows, past)
    monkeypatch.setattr(kv_cache._LayerCache, "follow", counting_follow)
    ours_tokens, _ = _generate(llama, KVCacheMixin(), _prompt(seed=3), strategy=beams(), batch_size=3)
    assert reorders, "the beams never reordered: the test would not exercise the cache's reordering"
    assert torch.equal(torch.as_tensor(ours_tokens), torch.as_tensor(sats_tokens))
    assert len({tuple(t.tolist()) for t in torch.as_tensor(ours_tokens)}) > 1  # different beams, not copies


def test_max_memory_length_drops_the_same_positions_as_sat(llama):
    _, sats = _generate(llama, CachedAutoregressiveMixin(), _prompt(), max_memory_length=12)
    cache = KVCacheMixin()
    _, ours = _generate(llama, cache, _prompt(), max_memory_length=12)
    _assert_same_steps(ours, sats, atol=1e-5)
    assert layer_lengths(cache) == [12 + 1] * 2  # the 12 kept positions + the token being fed
    _, unlimited = _generate(llama, KVCacheMixin(), _prompt())
    assert not torch.allclose(ours.logits[-1], unlimited.logits[-1], atol=1e-3)  # the limit really cut something


def test_mems_from_elsewhere_are_refused_in_one_line(llama):
    cache = KVCacheMixin()
    stray = torch.zeros(2, 1, 5, 1)  # 5 cached positions this mixin never saw
    with pytest.raises(RuntimeError, match="holds 0.*mems=None"):
        _generate(llama, cache, _prompt(), mems=stray)


def test_bf16_model_float32_cache_on_cpu_matches_sat(int4_llama):
    """A bf16 model on a CPU without native bf16 keeps its cache in float32 (faster attention); the logits stay
    within bf16 rounding of SAT's. An explicit bf16 cache too: a decode step's attention is two bf16 matmuls and a
    float32 softmax (SAT's standard_attention math), not torch's flash kernel, which is several times slower there."""
    from sat_quant.engine.backends.prefill import cpu_has_native_bf16
    _, sats = _generate(int4_llama, CachedAutoregressiveMixin(), _prompt())
    auto = KVCacheMixin()
    _, ours = _generate(int4_llama, auto, _prompt())
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert auto.layers[0].keys.dtype == expected
    scale = max(s.abs().max().item() for s in sats.logits)
    _assert_same_steps(ours, sats, atol=0.05 * scale)
    same = KVCacheMixin(cache_dtype=torch.bfloat16)
    _, ours_bf16 = _generate(int4_llama, same, _prompt())
    assert same.layers[0].keys.dtype == torch.bfloat16
    _assert_same_steps(ours_bf16, sats, atol=0.05 * scale)
    assert [t.argmax() for t in ours_bf16.logits] == [t.argmax() for t in sats.logits]


needs_cogvlm = pytest.mark.skipif(not cogvlm_available(), reason="needs the CogVLM snapshot (../shared/cogvlm)")


def _generate_prompt(model, cache, inputs: Dict[str, Any]):
    """Generation from a full model input (CogVLM's layout): its ids and positions become the prompt."""
    inputs = dict(inputs)
    prompt, positions = inputs.pop("input_ids")[0], inputs.pop("position_ids")[0]
    inputs.pop("attention_mask")
    return _generate(model, cache, prompt, positions=positions, **inputs)


def _matches_sat(model, make_inputs) -> None:
    sats_tokens, sats = _generate_prompt(model, CachedAutoregressiveMixin(), make_inputs())
    ours_tokens, ours = _generate_prompt(model, KVCacheMixin(), make_inputs())
    assert torch.equal(ours_tokens, sats_tokens)
    _assert_same_steps(ours, sats, atol=1e-5)


@needs_cogvlm
def test_cogvlm_image_prompt_matches_sat():
    from tests.cogvlm_fixture import build_tiny_cogvlm, tiny_cogvlm_inputs
    _matches_sat(build_tiny_cogvlm(torch.float32)[0], lambda: tiny_cogvlm_inputs(seq_len=270))


@needs_cogvlm
def test_cogagent_cross_attention_matches_sat():
    from tests.cogagent_fixture import build_tiny_cogagent, tiny_cogagent_inputs
    _matches_sat(build_tiny_cogagent(torch.float32)[0], tiny_cogagent_inputs)


@needs_cogvlm
def test_cogagent_encodes_its_cross_image_once_per_generation():
    """Upstream CogAgent re-runs its cross-image tower for every generated token; cache_cross_image runs it once,
    with the same logits at every step."""
    from tests.cogagent_fixture import build_tiny_cogagent, tiny_cogagent_inputs
    model, _ = build_tiny_cogagent(torch.float32)
    runs, projections = [], []
    model.mixins["encoder"].vit.register_forward_hook(lambda *a: runs.append(1))
    layers = len(model.transformer.layers)

    def count_projections(kv_forward):  # each layer's cross keys/values come from the image, not from the tokens
        def counted(*args, **kwargs):
            projections.append(1)
            return kv_forward(*args, **kwargs)
        return counted
    for layer in model.transformer.layers:  # the projection itself (cache_cross_image wraps it from outside)
        layer.cross_attention.key_value.forward = count_projections(layer.cross_attention.key_value.forward)

    def generate():
        runs.clear()
        projections.clear()
        return _generate_prompt(model, KVCacheMixin(), tiny_cogagent_inputs()), len(runs), len(projections)

    (tokens, plain), plain_runs, plain_projections = generate()
    assert plain_runs == NEW_TOKENS  # upstream: once per forward, the prompt's and every new token's
    assert plain_projections == NEW_TOKENS * layers
    assert sat_quant.cache_cross_image(model) and sat_quant.cache_cross_image(model)  # twice: wrapped once
    (cached_tokens, cached), cached_runs, cached_projections = generate()
    assert cached_runs == 1 and cached_projections == layers
    memo = model.transformer.layers[0].cross_attention.key_value.forward  # benchmarks ask before counting weights
    with torch.no_grad():
        assert memo.would_reuse(*memo.kept) and not memo.would_reuse((torch.zeros(1, 4, 1024),), {})
    assert not memo.would_reuse(*memo.kept)  # with gradients nothing is reused
    assert torch.equal(cached_tokens, tokens)
    _assert_same_steps(cached, plain, atol=0.0)
    with torch.enable_grad():  # with gradients (training) nothing is reused
        inputs = tiny_cogagent_inputs()
        runs.clear()
        model(**inputs)
        model(**inputs)
    assert len(runs) == 2
    assert not sat_quant.cache_cross_image(torch.nn.Linear(2, 2))


def test_one_token_half_precision_attention_matches_float64():
    """A decode step's bf16 attention (two matmuls, float32 softmax) is within bf16 rounding of the exact result,
    as close as torch's own scaled_dot_product_attention, and float32 still takes torch's kernel unchanged."""
    from sat_quant.sat.kv_cache import _default_attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, n, 64, generator=g) for n in (1, 300, 300))
    exact = torch.softmax((q.double() @ k.double().transpose(-1, -2)) / 8.0, -1) @ v.double()
    ours = _default_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, None, past=299)
    torchs = torch.nn.functional.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert ours.dtype == torch.bfloat16 and ours.shape == (1, 8, 1, 64)
    err, ref_err = ((t.double() - exact).abs().max().item() for t in (ours, torchs))
    assert err <= max(2 * ref_err, 1e-2 * exact.abs().max().item()), (err, ref_err)
    assert torch.equal(_default_attention(q, k, v, None, None, past=299),
                       torch.nn.functional.scaled_dot_product_attention(q, k, v))
