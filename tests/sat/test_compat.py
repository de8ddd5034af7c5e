"""CPU fallbacks (sat_quant.sat.compat) against independent math, SAT's own code and the real tiny CogVLM."""
from __future__ import annotations

import sys
import traceback

import pytest
import torch
from sat.model.position_embedding.triton_rotary_embeddings import FastRotaryEmbedding  # noqa: E402

from sat_quant.sat.compat import (
    TorchRotaryEmbedding,
    apply_cpu_compat,
    install_xformers_cpu_fallback,
    uninstall_xformers_cpu_fallback,
    xformers_attention_cpu,
    xformers_routes_to_cpu_fallback,
)
from tests.cogvlm_fixture import build_tiny_cogvlm, tiny_cogvlm_inputs

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ---------------------------------------------------------------------------------------------------------
# rotary: independent textbook reference
# ---------------------------------------------------------------------------------------------------------

def reference_rope(x: torch.Tensor, pos: torch.Tensor, dim: int, base: float = 10000.0,
                   interleaved: bool = False) -> torch.Tensor:
    """RoFormer/GPT-NeoX RoPE in float64, written from the paper: the first ``dim`` channels are rotated by
    angle ``pos * base^(-2i/dim)``; GPT-NeoX pairs channel i with i + dim/2 (rotate_half), GPT-J pairs 2i with
    2i+1. x: [B, H, S, D], pos: [B, S]."""
    xd = x.double()
    theta = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)          # [dim/2]
    ang = pos.double()[:, None, :, None] * theta                                    # [B, 1, S, dim/2]
    rot, rest = xd[..., :dim], xd[..., dim:]
    if interleaved:
        z = torch.view_as_complex(rot.reshape(*rot.shape[:-1], dim // 2, 2).contiguous())
        out = torch.view_as_real(z * torch.polar(torch.ones_like(ang), ang)).flatten(-2)
    else:
        cos, sin = torch.cos(torch.cat([ang, ang], -1)), torch.sin(torch.cat([ang, ang], -1))
        x1, x2 = rot[..., : dim // 2], rot[..., dim // 2:]
        out = rot * cos + torch.cat([-x2, x1], -1) * sin
    return torch.cat([out, rest], -1)


def _qk_pos(batch=2, heads=3, seq=9, head_dim=32, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, heads, seq, head_dim, generator=gen).to(dtype)
    # arbitrary positions per batch row: repeated, decreasing, with gaps (as CogVLM's image tokens)
    pos = torch.stack([torch.tensor([0, 1, 2, 2, 2, 3, 40, 41, 300])[:seq],
                       torch.randperm(500, generator=gen)[:seq]])[:batch]
    return q, k, pos


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 4e-2)])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("head_dim,dim", [(32, 32), (32, 16)])  # full, and partial (ChatGLM: head_dim // 2)
def test_rotary_matches_textbook(dtype, tol, interleaved, head_dim, dim):
    q, k, pos = _qk_pos(head_dim=head_dim, dtype=dtype)
    rope = TorchRotaryEmbedding(dim, interleaved=interleaved)
    q_in, k_in = q.clone(), k.clone()
    q_out, k_out = rope(q, k, pos, max_seqlen=pos.max() + 1, layer_id=0)
    for x, out in ((q_in, q_out), (k_in, k_out)):
        ref = reference_rope(x, pos, dim, interleaved=interleaved)
        assert out.dtype == dtype and out.shape == x.shape
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
        assert (ref - x.double()).abs().max() > 0.5  # the rotation is not a near-identity here
        if dim < head_dim:  # channels past rotary_dim pass through bit for bit
            assert torch.equal(out[..., dim:], x[..., dim:])
    assert torch.equal(q, q_in) and torch.equal(k, k_in)  # inputs are not modified


def test_rotary_broadcasts_position_ids_over_batch():
    q, k, _ = _qk_pos(batch=3)
    pos = torch.tensor([[5, 0, 7, 7, 2, 9, 100, 3, 4]])
    q_out, _ = TorchRotaryEmbedding(32)(q, k, pos, max_seqlen=101)
    torch.testing.assert_close(q_out.double(), reference_rope(q, pos.expand(3, -1), 32), atol=2e-5, rtol=2e-5)


def test_rotary_positions_beyond_table_are_left_unrotated_like_the_kernel():
    # the triton kernel's masked loads read cos=1, sin=0 for positions >= the cached length
    q, k, _ = _qk_pos(batch=1, seq=4)
    pos = torch.tensor([[0, 3, 8, 20]])
    q_out, _ = TorchRotaryEmbedding(32)(q, k, pos, max_seqlen=8)
    torch.testing.assert_close(q_out[:, :, :2].double(), reference_rope(q, pos, 32)[:, :, :2], atol=2e-5, rtol=0)
    assert torch.equal(q_out[:, :, 2:], q[:, :, 2:])


@pytest.mark.parametrize("kw", [dict(), dict(pos_idx_in_fp32=False), dict(base=500000, shift=2),
                                dict(scale_base=512), dict(interleaved=True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_cache_equals_sats_own_cache(kw, dtype):
    """The cos/sin tables (pure torch in SAT too) match SAT's FastRotaryEmbedding exactly, quirks included."""
    fast, ours = FastRotaryEmbedding(32, **kw), TorchRotaryEmbedding(32, **kw)
    if dtype == torch.bfloat16:  # what model.bfloat16() does: inv_freq becomes bf16
        fast, ours = fast.bfloat16(), ours.bfloat16()
    assert torch.equal(fast.inv_freq, ours.inv_freq)
    fast._update_cos_sin_cache(300, None, device=torch.device("cpu"), dtype=dtype)
    ours._update_cos_sin_cache(300, None, device=torch.device("cpu"), dtype=dtype)
    for name in ("_cos_cached", "_sin_cached", "_cos_k_cached", "_sin_k_cached"):
        a, b = getattr(fast, name), getattr(ours, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == dtype and torch.equal(a, b), name


def test_rotary_cogvlm_bf16_positions_round_like_upstream():
    # CogVLM builds its rotary with pos_idx_in_fp32=False; after .bfloat16() position 257 rounds to 256
    rope = TorchRotaryEmbedding(32, pos_idx_in_fp32=False).bfloat16()
    q, k, _ = _qk_pos(batch=1, seq=2, dtype=torch.bfloat16)
    out, _ = rope(q, k, torch.tensor([[256, 257]]), max_seqlen=258)
    same_token_at_256 = rope(q[:, :, 1:], k[:, :, 1:], torch.tensor([[256]]), 258)[0][:, :, 0]
    assert torch.equal(out[:, :, 1], same_token_at_256)
    assert not torch.equal(out[:, :, 1], q[:, :, 1])  # it is rotated, just by the bf16-rounded position


def test_rotary_recomputes_cache_on_dtype_change():
    rope = TorchRotaryEmbedding(32)
    q, k, pos = _qk_pos(batch=1)
    rope(q, k, pos, max_seqlen=pos.max() + 1)
    qb, kb = q.bfloat16(), k.bfloat16()
    out, _ = rope(qb, kb, pos, max_seqlen=5)  # shorter, other dtype: SAT's triton path would assert
    assert out.dtype == torch.bfloat16 and rope._cos_cached.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference_rope(qb, pos, 32), atol=4e-2, rtol=4e-2)


def test_rotary_backward_flows():
    q, k, pos = _qk_pos()
    q.requires_grad_(True)
    out, _ = TorchRotaryEmbedding(32)(q, k, pos, pos.max() + 1)
    out.square().sum().backward()
    # a rotation preserves norms: d/dq sum(R q)^2 = 2 q
    torch.testing.assert_close(q.grad, 2 * q.detach(), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# apply_cpu_compat on SAT's own LLaMA model
# ---------------------------------------------------------------------------------------------------------

def _tiny_llama(**extra):
    from sat.model.base_model import get_model
    from sat.model.official.llama_model import LLaMAModel
    args = LLaMAModel.get_args(num_layers=2, hidden_size=128, num_attention_heads=4, vocab_size=1000,
                               max_sequence_length=64, inner_hidden_size=256, layernorm_order="pre",
                               device="cpu", skip_init=False, mode="inference", **extra)
    torch.manual_seed(0)
    return get_model(args, LLaMAModel).eval()


def _llama_logits(model, position_ids):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (2, 10), generator=gen)
    with torch.no_grad():
        return model(input_ids=ids, position_ids=position_ids, attention_mask=torch.ones(1, 1, 10, 10).tril())[0]


@pytest.mark.parametrize("where", ["mixin", "transformer"])
def test_apply_cpu_compat_on_sat_llama(where):
    extra = {} if where == "mixin" else dict(is_rotary_emb=True, is_gated_mlp=True)
    model = _tiny_llama(**extra)
    holder, attr = ((model.mixins.rotary, "rotary_emb") if where == "mixin"
                    else (model.transformer, "position_embeddings"))
    old = getattr(holder, attr)
    assert type(old) is FastRotaryEmbedding
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    pos = torch.arange(10).expand(2, 10)

    assert apply_cpu_compat(model) == 1
    new = getattr(holder, attr)
    assert isinstance(new, TorchRotaryEmbedding) and new.inv_freq is old.inv_freq
    after = model.state_dict()
    assert after.keys() == keys.keys() and all(torch.equal(after[k], v) for k, v in keys.items())
    assert not any(isinstance(m, FastRotaryEmbedding) for m in model.modules())
    assert apply_cpu_compat(model) == 0  # nothing left to swap

    logits = _llama_logits(model, pos)
    assert logits.shape == (2, 10, 1000) and torch.isfinite(logits).all()
    # the rotary is live: other positions give other logits
    assert not torch.allclose(logits, _llama_logits(model, pos + 7))


def test_unpatched_sat_llama_fails_on_cpu():
    model = _tiny_llama()
    with pytest.raises(Exception) as err:
        _llama_logits(model, torch.arange(10).expand(2, 10))
    assert any("triton_rotary" in f.filename for f in traceback.extract_tb(err.value.__traceback__))


def test_apply_cpu_compat_shared_instance_counts_once():
    shared = FastRotaryEmbedding(16, interleaved=True, base=5000)
    model = torch.nn.ModuleDict({"a": torch.nn.ModuleDict({"rope": shared}), "b": torch.nn.ModuleList([shared]),
                                 "lin": torch.nn.Linear(4, 4)})
    assert apply_cpu_compat(model) == 1
    new = model["a"]["rope"]
    assert isinstance(new, TorchRotaryEmbedding) and model["b"][0] is new
    assert (new.dim, new.base, new.interleaved) == (16, 5000, True)


def test_apply_cpu_compat_keeps_dtype_of_converted_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.rope = FastRotaryEmbedding(32, pos_idx_in_fp32=False)
    model.bfloat16()
    assert apply_cpu_compat(model) == 1 and model.rope.inv_freq.dtype == torch.bfloat16
    assert model.rope.pos_idx_in_fp32 is False


@needs_cuda
@pytest.mark.cuda
def test_apply_cpu_compat_is_noop_on_cuda_and_matches_triton():
    model = _tiny_llama().cuda()
    assert apply_cpu_compat(model) == 0 and type(model.mixins.rotary.rotary_emb) is FastRotaryEmbedding
    q, k, pos = _qk_pos(head_dim=32)
    for interleaved in (False, True):
        fast, ours = FastRotaryEmbedding(16, interleaved=interleaved).cuda(), TorchRotaryEmbedding(16, interleaved=interleaved)
        qf, kf = fast(q.cuda(), k.cuda(), pos.cuda(), max_seqlen=pos.max() + 1)
        qo, ko = ours(q, k, pos, max_seqlen=pos.max() + 1)
        torch.testing.assert_close(qf.cpu(), qo, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kf.cpu(), ko, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# xformers fallback
# ---------------------------------------------------------------------------------------------------------

try:
    import xformers.ops as xops
except Exception:  # xformers is a test extra; the rotary tests do not need it
    xops = None


def reference_attention(q, k, v, scale, bias=None):
    """softmax(Q K^T * scale + bias) V in float64, xformers layout [B, M, H, K]."""
    s = torch.einsum("bmhk,bnhk->bhmn", q.double(), k.double()) * scale
    if bias is not None:
        s = s + bias.double()
    return torch.einsum("bhmn,bnhk->bmhk", s.softmax(-1), v.double())


def _qkv(mq=7, mk=11, heads=3, k_dim=16, v_dim=8, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, mq, heads, k_dim, generator=gen).to(dtype)
    k = torch.randn(2, mk, heads, k_dim, generator=gen).to(dtype)
    v = torch.randn(2, mk, heads, v_dim, generator=gen).to(dtype)
    return q, k, v


@pytest.fixture
def fallback():
    assert xops is not None, "xformers is a test dependency (pip install -e '.[test]')"
    assert install_xformers_cpu_fallback() is True
    yield xops
    install_xformers_cpu_fallback()  # tests may uninstall; leave it installed for the CogVLM tests


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_xformers_fallback_matches_explicit_math(fallback, dtype, tol):
    q, k, v = _qkv(dtype=dtype)
    # the call CogVLM's EVA XAttn makes
    out = fallback.memory_efficient_attention(q, k, v, p=0.0, scale=0.3)
    assert out.shape == (2, 7, 3, 8) and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, 0.3), atol=tol, rtol=tol)
    default = fallback.memory_efficient_attention(q, k, v, attn_bias=None)  # scale defaults to 1/sqrt(K)
    torch.testing.assert_close(default.double(), reference_attention(q, k, v, 16 ** -0.5), atol=tol, rtol=tol)
    assert not torch.allclose(out.float(), default.float(), atol=1e-3)


def test_xformers_fallback_biases(fallback):
    q, k, v = _qkv(mq=6, mk=6)
    bias = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(fallback.memory_efficient_attention(q, k, v, attn_bias=bias, scale=0.5).double(),
                               reference_attention(q, k, v, 0.5, bias), atol=1e-5, rtol=1e-5)
    causal = torch.full((6, 6), float("-inf")).triu(1)
    out = fallback.memory_efficient_attention(q, k, v, attn_bias=fallback.LowerTriangularMask())
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, 16 ** -0.5, causal), atol=1e-5, rtol=1e-5)


def test_xformers_fallback_three_dim_and_output_dtype(fallback):
    q, k, v = (t[:, :, 0] for t in _qkv())  # [B, M, K]
    out = fallback.memory_efficient_attention(q, k, v, scale=0.2, output_dtype=torch.float64)
    assert out.shape == (2, 7, 8) and out.dtype == torch.float64
    ref = reference_attention(q[:, :, None], k[:, :, None], v[:, :, None], 0.2)[:, :, 0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_xformers_fallback_dropout_is_applied(fallback):
    q, k, v = _qkv()
    torch.manual_seed(0)
    dropped = fallback.memory_efficient_attention(q, k, v, p=0.5, scale=0.3)
    assert torch.isfinite(dropped).all()
    assert not torch.allclose(dropped, fallback.memory_efficient_attention(q, k, v, p=0.0, scale=0.3))


def test_xformers_install_is_idempotent_and_reversible(fallback):
    first = fallback.memory_efficient_attention
    assert install_xformers_cpu_fallback() is True
    assert fallback.memory_efficient_attention is first
    original = first.__sat_quant_original__
    assert not getattr(original, "_sat_quant_cpu_fallback", False)  # wrapped exactly once
    assert uninstall_xformers_cpu_fallback() is True and fallback.memory_efficient_attention is original
    assert uninstall_xformers_cpu_fallback() is False
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError):  # the reason the fallback exists: xformers has no CPU operator
        fallback.memory_efficient_attention(q, k, v, scale=0.3)


def test_xformers_non_cpu_tensors_go_to_the_original(fallback):
    cpu = torch.zeros(1, 4, 2, 8)
    meta = torch.empty(1, 4, 2, 8, device="meta")
    assert xformers_routes_to_cpu_fallback(cpu, cpu, cpu)
    assert not xformers_routes_to_cpu_fallback(meta, meta, meta)
    assert not xformers_routes_to_cpu_fallback(cpu, meta, cpu)
    # the SDPA path would accept meta tensors; the original xformers refuses them, so this proves the routing
    assert xformers_attention_cpu(meta, meta, meta).device.type == "meta"
    with pytest.raises(NotImplementedError):
        fallback.memory_efficient_attention(meta, meta, meta)


def test_xformers_install_without_xformers_returns_false(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers.ops", None)  # makes `import xformers.ops` raise ImportError
    assert install_xformers_cpu_fallback() is False
    assert uninstall_xformers_cpu_fallback() is False


# ---------------------------------------------------------------------------------------------------------
# the real tiny CogVLM
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_cogvlm():
    return build_tiny_cogvlm()


def test_tiny_cogvlm_forward_on_cpu(tiny_cogvlm):
    model, args = tiny_cogvlm
    assert type(model).__name__ == "CogVLMModel" and args.eva_args["hidden_size"] == 1792
    assert isinstance(model.mixins.rotary.rotary_emb, TorchRotaryEmbedding)
    assert type(model.mixins.rotary).__name__ == "LlamaVisionExpertAttnMixin"
    assert apply_cpu_compat(model) == 0  # the fixture already swapped it
    inputs = tiny_cogvlm_inputs(seq_len=264)
    with torch.no_grad():
        logits = model(**inputs)[0]
    assert logits.shape == (1, 264, 1000) and logits.device.type == "cpu" and torch.isfinite(logits).all()
    # the image goes through EVA (xformers fallback) into the text logits
    other = dict(inputs, vision_image=tiny_cogvlm_inputs(seq_len=264, seed=1)["vision_image"])
    with torch.no_grad():
        logits2 = model(**other)[0]
    assert not torch.allclose(logits[0, -1], logits2[0, -1])


def test_tiny_cogvlm_eva_needs_the_xformers_fallback(tiny_cogvlm, fallback):
    model, _ = tiny_cogvlm
    inputs = tiny_cogvlm_inputs()
    vit = model.mixins.eva.vit_model
    vision = dict(image=inputs["vision_image"], input_ids=inputs["vision_input_ids"], position_ids=None,
                  attention_mask=inputs["vision_attention_mask"])
    uninstall_xformers_cpu_fallback()
    with pytest.raises(NotImplementedError), torch.no_grad():
        vit(**vision)
    install_xformers_cpu_fallback()
    with torch.no_grad():
        feats = vit(**vision)[0]
    assert feats.shape == (1, 256, 1792) and torch.isfinite(feats).all()


def test_tiny_cogvlm_bf16_forward_on_cpu():
    model, args = build_tiny_cogvlm(torch.bfloat16)
    assert args.bf16 and next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(**tiny_cogvlm_inputs(dtype=torch.bfloat16))[0]
    assert logits.dtype == torch.bfloat16 and logits.shape == (1, 266, 1000) and torch.isfinite(logits).all()


def test_tiny_cogvlm_without_compat_fails_in_the_triton_rotary():
    install_xformers_cpu_fallback()  # so the only CUDA-only piece left is the rotary
    model, _ = build_tiny_cogvlm(cpu_compat=False)
    assert type(model.mixins.rotary.rotary_emb) is FastRotaryEmbedding
    with pytest.raises(Exception) as err, torch.no_grad():
        model(**tiny_cogvlm_inputs())
    assert any("triton_rotary" in f.filename for f in traceback.extract_tb(err.value.__traceback__))
    assert apply_cpu_compat(model) == 1  # and the fallback fixes exactly that
    with torch.no_grad():
        assert torch.isfinite(model(**tiny_cogvlm_inputs())[0]).all()


def test_tiny_cogvlm_is_deterministic_and_fully_initialized(tiny_cogvlm):
    model, _ = tiny_cogvlm
    again, _ = build_tiny_cogvlm()
    ref = model.state_dict()
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, ref[name]), name
        # nothing left as uninitialized memory (CogVLM's expert layers are built with skip_init=True)
        assert torch.isfinite(tensor).all() and tensor.abs().max() < 10, name
    experts = again.mixins.rotary.vision_query_key_value_list["0"].weight
    assert 0.005 < experts.std() < 0.02


def test_tiny_cogvlm_inputs_follow_upstream_text_processor():
    """The fixture's layout equals what CogVLM's own inference processor and position function produce."""
    import importlib.util

    from tests.cogvlm_fixture import COGVLM_DIR
    spec = importlib.util.spec_from_file_location("cogvlm_language", COGVLM_DIR / "utils" / "utils" / "language.py")
    language = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(language)  # the package __init__ would pull seaborn; the module alone does not

    class Tok:  # just the attributes the processor reads; text ids are irrelevant to the layout
        bos_token_id, signal_type = 1, "base"

        def encode(self, text, add_special_tokens=False):
            return [3 + ord(c) % 900 for c in text]

    processed = language.llama2_text_processor_inference(Tok(), image_length=256)("<EOI>hello")
    seq = processed["input_ids"][0]
    _, mask, position_ids = language.get_masks_and_position_ids(seq, image_logits_mask=processed["image_rope_mask"])
    ours = tiny_cogvlm_inputs(seq_len=len(seq))
    assert torch.equal(ours["position_ids"], position_ids)
    assert torch.equal(ours["image_embed_mask"], processed["image_embed_mask"])
    assert torch.equal(ours["vision_expert_mask"], processed["vision_expert_mask"])
    assert torch.equal(ours["attention_mask"], mask)
    assert torch.equal(ours["input_ids"][0, :259], seq[:259])  # bos + image slots; text after is random
