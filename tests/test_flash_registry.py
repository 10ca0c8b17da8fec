"""sdpax in torch's flash-attention registry (torch 2.11 on; skipped on older torch, which has no registry).

The registration itself, activation and restore; the five aten operator implementations called directly (they
are device-agnostic Python over sdpax's ops, so CPU runs them) against sdpax's own calls, which the rest of the
suite checks against the float64 reference; dropout's rng_state round trip; and, on a GPU, torch's own
F.scaled_dot_product_attention routed to sdpax by activate_flash_attention_impl("sdpax")."""
import pytest
import torch
import torch.nn.functional as F

import sdpax
from helpers import LOWER_RIGHT, make_qkv, needs_cuda
from sdpax import _flash_registry as reg
from sdpax.attention.bias import causal_lower_right

HAS_REGISTRY = hasattr(torch.nn.attention, "register_flash_attention_impl")
pytestmark = pytest.mark.skipif(not HAS_REGISTRY, reason="torch has no flash-attention registry (2.11 and later)")


def test_registered_and_activates():
    from torch.nn.attention import _registry
    assert "sdpax" in _registry.list_flash_attention_impls()
    torch.nn.attention.activate_flash_attention_impl("sdpax")
    try:
        assert _registry.current_flash_attention_impl() == "sdpax"
    finally:
        _registry.restore_flash_attention_impl()
    assert _registry.current_flash_attention_impl() is None


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_flash_operator(causal):
    gen = torch.Generator().manual_seed(1)
    q, k, v = make_qkv((2, 4, 33, 32), (2, 2, 33, 32), 32, torch.bfloat16, "cpu", gen)
    out, lse, _, _, max_q, max_k, rng_state, _, debug = reg.sdpa_flash_forward(q, k, v, 0.0, causal, scale=0.3)
    want = sdpax.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3, enable_gqa=True)
    assert torch.equal(out, want) and (max_q, max_k) == (33, 33) and lse.shape == (2, 4, 33) and debug.numel() == 0
    gout = torch.randn(out.shape, generator=gen).to(out.dtype)
    dq, dk, dv = reg.sdpa_flash_backward(gout, q, k, v, out, lse, None, None, 33, 33, 0.0, causal, rng_state, None,
                                         scale=0.3)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ref = torch.autograd.grad(sdpax.scaled_dot_product_attention(*leaves, is_causal=causal, scale=0.3,
                                                                 enable_gqa=True), leaves, gout)
    for a, b in zip((dq, dk, dv), ref):
        assert torch.equal(a, b)


def test_sdpa_flash_dropout_round_trip():
    """The backward regenerates the forward's keep mask from the rng_state the forward returned."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = make_qkv((1, 2, 40, 16), (1, 2, 40, 16), 16, torch.float32, "cpu", gen)
    out, lse, _, _, _, _, rng_state, _, _ = reg.sdpa_flash_forward(q, k, v, 0.3, False)
    rng = rng_state.view(torch.int64)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    want, _ = torch.ops.sdpax.fwd(*leaves, None, 0.3, 0, 0.25, False, None, rng, 1)
    assert torch.equal(out, want)
    gout = torch.ones_like(out)
    got = reg.sdpa_flash_backward(gout, q, k, v, out, lse, None, None, 40, 40, 0.3, False, rng_state, None)
    for a, b in zip(got, torch.autograd.grad(want, leaves, gout)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("window", [(None, None), (5, 0), (3, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_forward_dense_fa_layout(causal, window):
    """(B, L, H, D) inputs, FlashAttention's lower-right causal edge and window."""
    if causal and window[1] not in (None, 0):
        pytest.skip("FlashAttention's causal is the window's right edge at 0")
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv((2, 20, 4, 16), (2, 30, 4, 16), 16, torch.float32, "cpu", gen)
    out, lse, rng_state, _, _ = reg.flash_forward(q, k, v, None, None, 20, 30, 0.0, causal, False, scale=0.5,
                                                  window_size_left=window[0], window_size_right=window[1])
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    left = -1 if window[0] is None else window[0]
    right = -1 if window[1] is None else window[1]
    kwargs = {"attn_mask": causal_lower_right(20, 30), "window_size": (left, 0) if left >= 0 else None} if causal \
        else {"window_size": (left, right)}
    want = sdpax.scaled_dot_product_attention(qt, kt, vt, scale=0.5, **kwargs).transpose(1, 2)
    assert torch.equal(out, want) and out.is_contiguous()
    gout = torch.randn(out.shape, generator=gen)
    grads = reg.flash_backward(gout, q, k, v, out, lse, None, None, 20, 30, 0.0, causal, rng_state, None, scale=0.5,
                               window_size_left=window[0], window_size_right=window[1])
    leaves = [t.detach().requires_grad_() for t in (qt, kt, vt)]
    ref = torch.autograd.grad(sdpax.scaled_dot_product_attention(*leaves, scale=0.5, **kwargs),
                              leaves, gout.transpose(1, 2))
    for a, b in zip(grads, ref):
        assert torch.equal(a, b.transpose(1, 2))


def test_flash_forward_packed_and_inplace():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(25, 4, 16, generator=gen)
    k, v = (torch.randn(31, 2, 16, generator=gen) for _ in range(2))
    cq = torch.tensor([0, 10, 10, 25], dtype=torch.int32)
    ck = torch.tensor([0, 12, 16, 31], dtype=torch.int32)
    out, lse, rng_state, _, _ = reg.flash_forward(q, k, v, cq, ck, 15, 15, 0.0, True, False)
    want, want_lse = sdpax.varlen_attn(q, k, v, cq, ck, 15, 15, is_causal=True, enable_gqa=True, return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    buf = torch.empty_like(out)
    assert torch.equal(reg.flash_forward_inplace(buf, q, k, v, cq, ck, 15, 15, 0.0, True, False), lse)
    assert torch.equal(buf, out)
    gout = torch.randn(out.shape, generator=gen)
    grads = reg.flash_backward(gout, q, k, v, out, lse, cq, ck, 15, 15, 0.0, True, rng_state, None)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ref = torch.autograd.grad(sdpax.varlen_attn(*leaves, cq, ck, 15, 15, is_causal=True, enable_gqa=True),
                              leaves, gout)
    for a, b in zip(grads, ref):
        assert torch.equal(a, b)


def test_unsupported_arguments_are_named():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="return_debug_mask"):
        reg.sdpa_flash_forward(q, q, q, 0.0, False, True)
    with pytest.raises(RuntimeError, match="ALiBi"):
        reg.flash_forward(q, q, q, None, None, 4, 4, 0.0, False, False, alibi_slopes=torch.zeros(2))


@needs_cuda
def test_cuda_torch_flash_backend_routes_to_sdpax_when_activated():
    gen = torch.Generator().manual_seed(5)
    q, k, v = make_qkv((2, 4, 256, 64), (2, 4, 256, 64), 64, torch.bfloat16, "cuda", gen)
    want = sdpax.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.nn.attention.activate_flash_attention_impl("sdpax")
    try:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            got = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    finally:
        torch.nn.attention.restore_flash_attention_impl()
    assert torch.equal(got, want)


def test_fa_window_arguments():
    """FlashAttention's (is_causal, left, right) as the op's (causal id, left, right): causal is the right edge."""
    assert reg._fa_window(True, None, 0) == (LOWER_RIGHT, -1, -1)
    assert reg._fa_window(False, 4, 0) == (LOWER_RIGHT, 4, -1)
    assert reg._fa_window(False, None, None) == (0, -1, -1)
