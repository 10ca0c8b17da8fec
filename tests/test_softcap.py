"""Score softcap (`softcap=c`: scaled scores s -> c * tanh(s / c) before the mask, Gemma 2's logit softcapping):
forward and backward of every backend that takes it against the float64 reference, by the suite's rule (torch's
function cannot express a softcap: the same-dtype comparison is the definition evaluated in that dtype); gradcheck
and second-order gradients in float64; the reason on devices whose kernels lack it; argument errors."""
import itertools
import math

import pytest
import torch

import sdpax
from helpers import (
    DEVICES,
    LOWER_RIGHT,
    UPPER_LEFT,
    assert_dropout_like_math,
    backends_taking,
    check_every_backend,
    make_qkv,
    needs_cuda,
    run,
)
from sdpax import SDPBackend
from sdpax.attention.bias import causal_lower_right

CASES = list(itertools.product([torch.float64, torch.float32, torch.bfloat16, torch.float16],
                               [(1, 7), (5, 300), (129, 129), (300, 129)],
                               ["none", "bool_pad", "add_full", "causal_ul", "causal_lr"]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,LS,feature", CASES, ids=[f"{str(d)[6:]}-L{L}-S{S}-{f}" for d, (L, S), f in CASES])
def test_softcap_forward_backward(dtype, LS, feature, device):
    L, S = LS
    idx = CASES.index((dtype, LS, feature))
    gen = torch.Generator().manual_seed(100 + idx)
    E = [32, 64, 128][idx % 3]
    gqa = idx % 2 == 1
    # Scores of a few times the cap, so the tanh is in its curved part and saturated for some keys.
    q, k, v = make_qkv((2, 4, L, E), (2, 2 if gqa else 4, S, E), E, dtype, device, gen)
    q, k = (q.double() * 3).to(dtype).requires_grad_(), (k.double() * 3).to(dtype).requires_grad_()
    v.requires_grad_()
    cap = [5.0, 30.0, 2.5][idx % 3]
    sinks = torch.randn(4, generator=gen, dtype=torch.float32).to(device).requires_grad_() if idx % 4 == 3 else None
    mask, causal, kwargs = None, 0, {}
    if feature == "bool_pad":
        mask = (torch.rand(2, 1, 1, S, generator=gen) > 0.2).to(device)
        kwargs["attn_mask"] = mask
    elif feature == "add_full":
        mask = torch.randn(2, 4, L, S, generator=gen).to(device=device, dtype=dtype)
        kwargs["attn_mask"] = mask
    elif feature == "causal_ul":
        causal, kwargs["is_causal"] = UPPER_LEFT, True
    elif feature == "causal_lr":
        causal, kwargs["attn_mask"] = LOWER_RIGHT, causal_lower_right(L, S)
    kwargs.update(enable_gqa=gqa, sinks=sinks, softcap=cap)
    gout = torch.randn((2, 4, L, E), generator=gen).to(device=device, dtype=dtype)

    check_every_backend(q, k, v, gout, kwargs, lambda b: (mask, 0.0, causal, 1.0 / math.sqrt(E), gqa, sinks, None,
                                                          int(b), cap),
                        mask=mask, causal=causal, sinks=sinks, softcap=cap, gqa=gqa)


@pytest.mark.parametrize("device", DEVICES)
def test_softcap_fused_matches_math_with_dropout(device):
    """Dropout draws the same keep mask with and without a softcap, on every backend."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = make_qkv((2, 2, 70, 32), (2, 2, 90, 32), 32, torch.float32, device, gen, requires_grad=True)
    assert_dropout_like_math(q, k, v, {"softcap": 4.0}, (4.0,))


@pytest.mark.parametrize("device", DEVICES)
def test_softcap_gradcheck_float64(device):
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv((1, 4, 5, 6), (1, 2, 7, 6), 5, torch.float64, device, gen, requires_grad=True)
    mask = torch.randn(1, 4, 5, 7, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    sinks = torch.randn(4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    for backend in backends_taking(q, k, v, attn_mask=mask.detach(), enable_gqa=True, softcap=0.8):
        def f(q, k, v, mask, sinks, backend=backend):
            return run(backend, q * 2, k, v, attn_mask=mask, enable_gqa=True, sinks=sinks, softcap=0.8)
        assert torch.autograd.gradcheck(f, (q, k, v, mask, sinks))
        assert torch.autograd.gradgradcheck(f, (q, k, v, mask, sinks))


def test_softcap_compiles():
    gen = torch.Generator().manual_seed(4)
    q, k, v = make_qkv((1, 2, 33, 16), (1, 2, 40, 16), 16, torch.float32, "cpu", gen, requires_grad=True)

    def f(q, k, v):
        return sdpax.scaled_dot_product_attention(q, k, v, softcap=3.0)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, expected = compiled(q, k, v), f(q, k, v)
    assert torch.equal(out, expected)
    g, eg = (torch.autograd.grad(o.sum(), (q, k, v)) for o in (out, expected))
    for a, b in zip(g, eg):
        assert torch.equal(a, b)
    args = (q.detach(), k.detach(), v.detach(), None, 0.0, 0, 0.25, False, None, None, 1, 3.0)
    torch.library.opcheck(torch.ops.sdpax.fwd.default, args)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, math.inf, math.nan, True, "5", torch.tensor(5.0)])
def test_softcap_argument_errors(bad):
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(sdpax.AttentionError, match="softcap must be None or a finite number > 0"):
        sdpax.scaled_dot_product_attention(q, q, q, softcap=bad)
    with pytest.raises(RuntimeError, match="softcap must be a finite number > 0"):
        torch.ops.sdpax.fwd(q, q, q, None, 0.0, 0, 1.0, False, None, None, 0, -2.0)


def test_softcap_none_is_plain_attention():
    gen = torch.Generator().manual_seed(5)
    q, k, v = make_qkv((1, 2, 20, 16), (1, 2, 24, 16), 16, torch.float32, "cpu", gen)
    for b in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION):
        assert torch.equal(run(b, q, k, v, softcap=None), run(b, q, k, v))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("feature", ["none", "causal_ul", "causal_lr", "bool_pad", "add_full", "add_rows", "gqa",
                                     "window"])
@pytest.mark.parametrize("L,S,E", [(300, 300, 64), (129, 700, 128), (640, 200, 256)])
def test_softcap_cuda_kernels(L, S, E, feature, dtype):
    """The CUDA kernels take the softcap (the mma.sync general kind; the plan says so): FLASH runs it, forward and
    backward by the suite's rule, with every mask kind the wide backward reads (bool, additive in place, additive
    broadcast over rows), both causal alignments, GQA and a window."""
    gen = torch.Generator().manual_seed(L + S + E)
    gqa = feature == "gqa"
    q, k, v = make_qkv((2, 4, L, E), (2, 2 if gqa else 4, S, E), E, dtype, "cuda", gen, requires_grad=True)
    kwargs, mask, causal, user, window = {"softcap": 15.0, "enable_gqa": gqa}, None, 0, None, (-1, -1)
    if feature in ("causal_ul", "causal_lr"):
        causal = UPPER_LEFT if feature == "causal_ul" else LOWER_RIGHT
        kwargs.update({"is_causal": True} if causal == UPPER_LEFT else {"attn_mask": causal_lower_right(L, S)})
    elif feature == "bool_pad":
        user = (torch.rand(2, 1, 1, S, generator=gen) > 0.3).cuda()
    elif feature == "add_full":
        user = torch.randn(2, 4, L, S, generator=gen).to(device="cuda", dtype=dtype)
    elif feature == "add_rows":
        user = torch.randn(2, 1, 1, S, generator=gen).to(device="cuda", dtype=dtype)
    elif feature == "window":
        window = (50, 10)
        kwargs["window_size"] = window
        i, j = torch.arange(L).unsqueeze(1) + S - L, torch.arange(S).unsqueeze(0)
        mask = ((j >= i - 50) & (j <= i + 10)).cuda()
    if user is not None:
        kwargs["attn_mask"] = mask = user
    gout = torch.randn((2, 4, L, E), generator=gen).to(device="cuda", dtype=dtype)
    assert SDPBackend.FLASH_ATTENTION in backends_taking(q, k, v, **kwargs)
    ex = sdpax.explain(q, k, v, **kwargs)
    assert ex.plan.forward_kind == "general" and ex.plan.forward_loop == "mma.sync"
    check_every_backend(q, k, v, gout, kwargs,
                        lambda b: (user, 0.0, 2 if feature == "causal_lr" else causal, 1.0 / math.sqrt(E), gqa, None,
                                   None, int(b), 15.0, *window),
                        mask=mask, causal=causal, softcap=15.0, gqa=gqa)


@needs_cuda
def test_softcap_cuda_mask_grad_runs_math():
    """A softcap with a float mask that requires grad: the CUDA kernels decline (their dS is taken after the cap's
    derivative) and MATH computes the call; FLASH alone refuses with that reason."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = make_qkv((1, 2, 64, 64), (1, 2, 64, 64), 64, torch.bfloat16, "cuda", gen, requires_grad=True)
    mask = torch.randn(1, 2, 64, 64, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    ex = sdpax.explain(q, k, v, attn_mask=mask, softcap=10.0)
    assert ex.backend == SDPBackend.MATH
    assert any("softcap" in r for r in ex.reasons[SDPBackend.FLASH_ATTENTION])
    with pytest.raises(RuntimeError, match="softcap"):
        out = run(SDPBackend.FLASH_ATTENTION, q, k, v, attn_mask=mask, softcap=10.0)
        out.sum().backward()
