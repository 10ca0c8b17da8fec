"""Sliding-window attention (`window_size=(left, right)` and the windowed CausalBias `sliding_window`): forward,
backward and log-sum-exp of every backend that takes it against the float64 reference by the suite's rule, with
the window given to the reference and to torch as the bool mask it stands for; both alignments, with masks, GQA,
sinks, softcap and dropout; gradcheck and second-order gradients; compile and opcheck; the reason on devices whose
kernels lack it; argument errors; the bias object; the work it saves (tiles outside the window are skipped)."""
import itertools
import math
import pickle
import time

import pytest
import torch
import torch.nn.functional as F

import sdpax
from helpers import (
    DEVICES,
    LOWER_RIGHT,
    UPPER_LEFT,
    assert_close_rel,
    assert_dropout_like_math,
    backends_taking,
    check_every_backend,
    make_qkv,
    needs_cuda,
    reference,
    run,
    torch_errors,
)
from sdpax import SDPBackend
from sdpax.attention.bias import CausalBias, CausalVariant, causal_lower_right, sliding_window


def window_allowed(L, S, left, right, align, device="cpu"):
    """The definition: key j is visible from query i iff d - left <= j <= d + right, d = i (upper-left) or
    i + S - L (lower-right); -1 leaves that side open."""
    d = torch.arange(L, device=device).unsqueeze(1) + (0 if align == UPPER_LEFT else S - L)
    j = torch.arange(S, device=device).unsqueeze(0)
    ok = torch.ones(L, S, dtype=torch.bool, device=device)
    if right >= 0:
        ok &= j <= d + right
    if left >= 0:
        ok &= j >= d - left
    return ok


# name -> (kwargs for (L, S), the pattern's (left, right, alignment), the op's (causal, window_left, window_right)):
# the ways a user asks for a window.
WINDOWS = {
    "lr_band": lambda L, S: ({"window_size": (37, 20)}, (37, 20, LOWER_RIGHT), (0, 37, 20)),
    "lr_left_only": lambda L, S: ({"window_size": (50, -1)}, (50, -1, LOWER_RIGHT), (0, 50, -1)),
    "lr_right_only": lambda L, S: ({"window_size": (-1, 3)}, (-1, 3, LOWER_RIGHT), (0, -1, 3)),
    "causal_ul": lambda L, S: ({"is_causal": True, "window_size": (64, 0)}, (64, 0, UPPER_LEFT),
                               (UPPER_LEFT, 64, -1)),
    "causal_lr_bias": lambda L, S: ({"attn_mask": sliding_window(L, S, 100)}, (100, 0, LOWER_RIGHT),
                                    (LOWER_RIGHT, 100, -1)),
    "causal_ul_bias": lambda L, S: ({"attn_mask": sliding_window(L, S, 7, CausalVariant.UPPER_LEFT)},
                                    (7, 0, UPPER_LEFT), (UPPER_LEFT, 7, -1)),
    "causal_lr_kw": lambda L, S: ({"attn_mask": causal_lower_right(L, S), "window_size": (0, -1)},
                                  (0, 0, LOWER_RIGHT), (LOWER_RIGHT, 0, -1)),
}
CASES = list(itertools.product([torch.float64, torch.float32, torch.bfloat16, torch.float16],
                               [(1, 300), (5, 700), (300, 300), (257, 129)], list(WINDOWS)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,LS,window", CASES, ids=[f"{str(d)[6:]}-L{L}-S{S}-{w}" for d, (L, S), w in CASES])
def test_window_forward_backward(dtype, LS, window, device):
    L, S = LS
    idx = CASES.index((dtype, LS, window))
    gen = torch.Generator().manual_seed(300 + idx)
    E = [32, 64, 128][idx % 3]
    gqa = idx % 2 == 1
    q, k, v = make_qkv((2, 4, L, E), (2, 2 if gqa else 4, S, E), E, dtype, device, gen, requires_grad=True)
    kwargs, (left, right, align), (causal, wl, wr) = WINDOWS[window](L, S)
    allowed = window_allowed(L, S, left, right, align, device)
    mask = allowed
    extra = idx % 3  # 0: the window alone; 1: with a bool padding mask; 2: with an additive mask
    if extra and "attn_mask" not in kwargs and "is_causal" not in kwargs:  # causal + mask is an error
        if extra == 1:
            user = (torch.rand(2, 1, 1, S, generator=gen) > 0.2).to(device)
            mask = allowed & user
        else:
            user = torch.randn(2, 4, L, S, generator=gen).to(device=device, dtype=dtype)
            mask = user.masked_fill(~allowed, -math.inf)
        kwargs["attn_mask"] = user
    sinks = torch.randn(4, generator=gen, dtype=torch.float32).to(device).requires_grad_() if idx % 4 == 3 else None
    cap = 20.0 if idx % 5 == 4 else None
    kwargs.update(enable_gqa=gqa, sinks=sinks, softcap=cap)
    gout = torch.randn((2, 4, L, E), generator=gen).to(device=device, dtype=dtype)

    user = None if isinstance(kwargs.get("attn_mask"), CausalBias) else kwargs.get("attn_mask")
    backends = check_every_backend(q, k, v, gout, kwargs,
                                   lambda b: (user, 0.0, causal, 1.0 / math.sqrt(E), gqa, sinks, None, int(b),
                                              cap or 0.0, wl, wr),
                                   mask=mask, sinks=sinks, softcap=cap, gqa=gqa)
    if device == "cpu" and dtype != torch.float64:
        assert SDPBackend.FLASH_ATTENTION in backends  # the CPU kernels take every window


@pytest.mark.parametrize("device", DEVICES)
def test_window_fused_matches_math_with_dropout(device):
    """Dropout draws the same keep mask with and without a window, on every backend that takes both."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = make_qkv((2, 2, 70, 32), (2, 2, 390, 32), 32, torch.float32, device, gen, requires_grad=True)
    assert_dropout_like_math(q, k, v, {"window_size": (40, 5)}, (0.0, 40, 5))


@pytest.mark.parametrize("device", DEVICES)
def test_window_gradcheck_float64(device):
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv((1, 4, 5, 6), (1, 2, 9, 6), 5, torch.float64, device, gen, requires_grad=True)
    mask = torch.randn(1, 4, 5, 9, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    for backend in backends_taking(q, k, v, attn_mask=mask.detach(), enable_gqa=True, window_size=(2, 1)):
        def f(q, k, v, mask, backend=backend):
            return run(backend, q, k, v, attn_mask=mask, enable_gqa=True, window_size=(2, 1))
        assert torch.autograd.gradcheck(f, (q, k, v, mask))
        assert torch.autograd.gradgradcheck(f, (q, k, v, mask))


def test_window_compiles_and_opcheck():
    gen = torch.Generator().manual_seed(4)
    q, k, v = make_qkv((1, 2, 33, 16), (1, 2, 40, 16), 16, torch.float32, "cpu", gen, requires_grad=True)

    def f(q, k, v):
        return sdpax.scaled_dot_product_attention(q, k, v, attn_mask=sliding_window(33, 40, 5))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, expected = compiled(q, k, v), f(q, k, v)
    assert torch.equal(out, expected)
    g, eg = (torch.autograd.grad(o.sum(), (q, k, v)) for o in (out, expected))
    for a, b in zip(g, eg):
        assert torch.equal(a, b)
    args = (q.detach(), k.detach(), v.detach(), None, 0.0, 2, 0.25, False, None, None, 1, 0.0, 5, -1)
    torch.library.opcheck(torch.ops.sdpax.fwd.default, args)


def test_window_no_window_is_plain_attention():
    gen = torch.Generator().manual_seed(5)
    q, k, v = make_qkv((1, 2, 20, 16), (1, 2, 24, 16), 16, torch.float32, "cpu", gen)
    for b in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION):
        assert torch.equal(run(b, q, k, v, window_size=(-1, -1)), run(b, q, k, v))
        assert torch.equal(run(b, q, k, v, window_size=None, is_causal=True), run(b, q, k, v, is_causal=True))
        assert torch.equal(run(b, q, k, v, is_causal=True, window_size=(-1, 0)), run(b, q, k, v, is_causal=True))


def test_window_bias_object():
    bias = sliding_window(4, 6, 1)
    assert bias.variant == CausalVariant.LOWER_RIGHT and bias.window_left == 1
    assert torch.equal(bias._materialize(), window_allowed(4, 6, 1, 0, LOWER_RIGHT))
    ul = sliding_window(4, 6, 2, CausalVariant.UPPER_LEFT)
    assert torch.equal(ul._materialize(), window_allowed(4, 6, 2, 0, UPPER_LEFT))
    assert "window_left=1" in repr(bias)
    again = pickle.loads(pickle.dumps(bias))
    assert (again.variant, again.seq_len_q, again.seq_len_kv, again.window_left) == (bias.variant, 4, 6, 1)
    assert bias.contiguous() is bias
    with pytest.raises(ValueError, match="left must be an int >= 0"):
        sliding_window(4, 6, -1)
    with pytest.raises(ValueError, match="window_left must be an int"):
        CausalBias(CausalVariant.LOWER_RIGHT, 4, 6, 1.5)


def test_window_bias_through_torch_function():
    """torch's own function with a windowed CausalBias runs sdpax (no patch needed), as the causal bias does."""
    gen = torch.Generator().manual_seed(8)
    q, k, v = make_qkv((1, 2, 30, 16), (1, 2, 50, 16), 16, torch.float32, "cpu", gen)
    bias = sliding_window(30, 50, 9)
    expected = sdpax.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=bias), expected)
    with sdpax.patch():
        assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=bias), expected)
    ref = reference(q.double(), k.double(), v.double(), mask=window_allowed(30, 50, 9, 0, LOWER_RIGHT))
    assert_close_rel(expected, ref, torch_errors(q, k, v, mask=window_allowed(30, 50, 9, 0, LOWER_RIGHT))[0],
                     torch.float32)


@pytest.mark.parametrize("kwargs,match", [
    ({"window_size": (3,)}, "window_size must be None or"),
    ({"window_size": (3, -2)}, "window_size must be None or"),
    ({"window_size": (1.0, 2)}, "window_size must be None or"),
    ({"window_size": (True, 2)}, "window_size must be None or"),
    ({"window_size": "3"}, "window_size must be None or"),
    ({"window_size": (3, 2), "is_causal": True}, "past the causal edge"),
    ({"window_size": (3, 0), "attn_mask": sliding_window(4, 4, 2)}, "already carries a sliding window"),
    ({"attn_mask": sliding_window(4, 5, 2)}, "CausalBias is for"),
])
def test_window_argument_errors(kwargs, match):
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(sdpax.AttentionError, match=match):
        sdpax.scaled_dot_product_attention(q, q, q, **kwargs)


def test_window_op_argument_errors():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="window sizes must be >= 0, or -1"):
        torch.ops.sdpax.fwd(q, q, q, None, 0.0, 0, 1.0, False, None, None, 0, 0.0, -3, 2)
    with pytest.raises(RuntimeError, match="window_right must be -1"):
        torch.ops.sdpax.fwd(q, q, q, None, 0.0, 1, 1.0, False, None, None, 1, 0.0, 2, 0)


def test_window_rows_with_no_key_give_zeros():
    """A window that leaves a row no key (L > S with a lower-right window) gives that row zeros and lse -inf."""
    gen = torch.Generator().manual_seed(9)
    q, k, v = make_qkv((1, 1, 40, 16), (1, 1, 10, 16), 16, torch.float32, "cpu", gen)
    for b in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION):
        out = run(b, q, k, v, attn_mask=sliding_window(40, 10, 3))
        assert torch.equal(out[..., :30, :], torch.zeros_like(out[..., :30, :]))
        assert out[..., 30:, :].abs().sum() > 0


def test_window_work_follows_the_window():
    """The fused CPU kernels skip key tiles outside the window: a 256-key window over 8k keys costs a small
    fraction of full causal attention, forward and backward (a loose bound: the skipping, not a speed target)."""
    gen = torch.Generator().manual_seed(10)
    q, k, v = make_qkv((1, 2, 8192, 64), (1, 2, 8192, 64), 64, torch.bfloat16, "cpu", gen, requires_grad=True)

    def timed(**kwargs):
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            out = sdpax.scaled_dot_product_attention(q, k, v, **kwargs)
            out.backward(torch.ones_like(out))
            best = min(best, time.perf_counter() - t0)
        return best
    full, windowed = timed(is_causal=True), timed(is_causal=True, window_size=(255, 0))
    # Causal over 8k keys visits ~4k keys per row, the window 256 plus the diagonal tiles.
    assert windowed < 0.35 * full, (windowed, full)


# CUDA kernel cases: (L, S, head dim, window_size, is_causal, extra) over several key tiles, both alignments, L > S
# (rows that see no key), windows narrower than a tile and wider than the keys; extra: None, "pad" (a bool
# padding mask: the mma.sync general kind), "gqa".
CUDA_CASES = [
    (1000, 1000, 64, (200, 0), True, None), (777, 1500, 128, (300, 0), True, "gqa"), (512, 512, 128, (5, 7), False,
                                                                                      "pad"),
    (300, 128, 64, (40, 0), True, None), (640, 900, 256, (130, 60), False, None), (1030, 1030, 64, (-1, 20), False,
                                                                                   "gqa"),
    (256, 2048, 128, (3000, 0), True, None), (1100, 1100, 128, (90, 0), False, "pad"),
]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("loop", ["auto", "mma"])
@pytest.mark.parametrize("L,S,E,window,causal,extra", CUDA_CASES)
def test_window_cuda_kernels(L, S, E, window, causal, extra, loop, dtype):
    """The CUDA kernels take the window (the Hopper forward's plain kind, the mma.sync general kind; the plan
    says which): FLASH runs it, and output, gradients and lse meet the suite's rule. loop="mma" pins the mma.sync
    forward where the plan would run the Hopper one."""
    gen = torch.Generator().manual_seed(L + S + E)
    gqa = extra == "gqa"
    q, k, v = make_qkv((2, 4, L, E), (2, 2 if gqa else 4, S, E), E, dtype, "cuda", gen, requires_grad=True)
    allowed = window_allowed(L, S, window[0], window[1] if not causal else 0, UPPER_LEFT if causal else LOWER_RIGHT,
                             "cuda")
    kwargs = {"window_size": window, "is_causal": causal, "enable_gqa": gqa}
    mask = allowed
    if extra == "pad":  # (non-causal cases only: is_causal and a mask do not combine)
        user = (torch.rand(2, 1, 1, S, generator=gen) > 0.3).cuda()
        mask = allowed & user
        kwargs["attn_mask"] = user
    gout = torch.randn((2, 4, L, E), generator=gen).to(device="cuda", dtype=dtype)
    c = UPPER_LEFT if causal else 0
    wl, wr = (window[0], -1) if causal else window
    with sdpax.cuda_main_loop(forward=loop):
        assert SDPBackend.FLASH_ATTENTION in backends_taking(q, k, v, **kwargs)
        check_every_backend(q, k, v, gout, kwargs,
                            lambda b: (kwargs.get("attn_mask"), 0.0, c, 1.0 / math.sqrt(E), gqa, None, None, int(b),
                                       0.0, wl, wr), mask=mask, gqa=gqa)
