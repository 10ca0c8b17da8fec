"""Backward parity (q, k, v, float mask, sinks) and float64 gradcheck, including dropout with a fixed seed."""
import itertools

import pytest
import torch

from helpers import (
    DEVICES,
    LOWER_RIGHT,
    UPPER_LEFT,
    assert_grads_close,
    backends_for,
    grad_magnitude,
    make_qkv,
    reference,
    run,
    torch_errors,
)
from sdpax import SDPBackend
from sdpax._select import LIMITS
from sdpax.attention.bias import causal_lower_right

CASES = list(itertools.product([torch.float64, torch.float32, torch.bfloat16, torch.float16],
                               [(1, 7), (64, 64), (129, 300), (300, 129), (511, 64)],
                               ["none", "bool_pad", "add_full", "causal_ul", "causal_lr"]))


def _fused_mask_grad(device: str) -> bool:
    dev = LIMITS[SDPBackend.FLASH_ATTENTION].per_device.get(device)
    return bool(dev is not None and dev.mask_grad)


def _grads(out, inputs, gout):
    return torch.autograd.grad(out, inputs, gout, allow_unused=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,LS,feature", CASES,
                         ids=[f"{str(d)[6:]}-L{L}-S{S}-{f}" for d, (L, S), f in CASES])
def test_backward_grid(dtype, LS, feature, device):
    L, S = LS
    idx = CASES.index((dtype, LS, feature))
    gen = torch.Generator().manual_seed(idx)
    E = [16, 64, 72, 128][idx % 4]
    gqa = idx % 3 == 1
    hk = 2 if gqa else 4
    q, k, v = make_qkv((2, 4, L, E), (2, hk, S, E), E if idx % 2 else 40, dtype, device, gen,
                       layout="blhe" if idx % 5 == 2 else "bhle", requires_grad=True)
    sinks = torch.randn(4, generator=gen, dtype=torch.float32).to(device).requires_grad_() if idx % 4 == 1 else None
    mask, causal = None, 0
    if feature == "bool_pad":
        mask = (torch.rand(2, 1, 1, S, generator=gen) > 0.2).to(device)
    elif feature == "add_full":
        mask = torch.randn(2, 4, L, S, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    elif feature == "causal_ul":
        causal = UPPER_LEFT
    elif feature == "causal_lr":
        causal = LOWER_RIGHT
    gout = torch.randn((2, 4, L, v.shape[-1]), generator=gen).to(device=device, dtype=dtype)

    leaves = [q, k, v] + ([mask] if mask is not None and mask.requires_grad else []) + (
        [sinks] if sinks is not None else [])
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rq, rk, rv = ref_leaves[:3]
    rmask = ref_leaves[3] if mask is not None and mask.requires_grad else mask
    rsinks = ref_leaves[-1] if sinks is not None else None
    ref = reference(rq, rk, rv, mask=rmask, causal=causal, sinks=rsinks)
    ref_grads = _grads(ref, ref_leaves, gout.double())
    _, t_errs = torch_errors(q, k, v, mask=mask, causal=causal, sinks=sinks, gqa=gqa, gout=gout)

    mask_grad = mask is not None and mask.requires_grad
    names = ["dq", "dk", "dv"] + (["dmask"] if mask_grad else []) + (["dsinks"] if sinks is not None else [])
    for backend in backends_for(device, dtype):
        # Where a fused kernel does not compute the mask gradient (a reason sends such calls to MATH), it gets the
        # mask without grad.
        fused_no_dmask = mask_grad and backend != SDPBackend.MATH and not _fused_mask_grad(device)
        use_mask = mask.detach() if fused_no_dmask else mask
        if causal == UPPER_LEFT:
            out = run(backend, q, k, v, is_causal=True, enable_gqa=gqa, sinks=sinks)
        elif causal == LOWER_RIGHT:
            out = run(backend, q, k, v, attn_mask=causal_lower_right(L, S), enable_gqa=gqa, sinks=sinks)
        else:
            out = run(backend, q, k, v, attn_mask=use_mask, enable_gqa=gqa, sinks=sinks)
        keep = [i for i, n in enumerate(names) if not (fused_no_dmask and n == "dmask")]
        grads = _grads(out, [leaves[i] for i in keep], gout)
        for i, g in zip(keep, grads):
            assert g is not None and g.dtype == leaves[i].dtype, names[i]
        assert_grads_close([f"{backend.name} {names[i]}" for i in keep], grads, [ref_grads[i] for i in keep],
                           t_errs, dtype, grad_magnitude(gout, out))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    gen = torch.Generator().manual_seed(0)
    q, k, v = make_qkv((1, 4, 5, 6), (1, 2, 7, 6), 5, torch.float64, device, gen, requires_grad=True)
    mask = torch.randn(1, 4, 5, 7, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    sinks = torch.randn(4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    for backend in backends_for(device, torch.float64):
        def f(q, k, v, mask, sinks, backend=backend):
            return run(backend, q, k, v, attn_mask=mask, enable_gqa=True, sinks=sinks)
        assert torch.autograd.gradcheck(f, (q, k, v, mask, sinks))

        def g(q, k, v, sinks, backend=backend):
            return run(backend, q, k, v, attn_mask=causal_lower_right(5, 7), enable_gqa=True, sinks=sinks, scale=0.7)
        assert torch.autograd.gradcheck(g, (q, k, v, sinks))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_dropout_fixed_seed(device):
    """Dropout is a deterministic function of the rng tensor, so gradcheck holds with a fixed {seed, offset}."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = make_qkv((2, 2, 6, 4), (2, 2, 9, 4), 3, torch.float64, device, gen, requires_grad=True)
    rng = torch.tensor([12345, 678], dtype=torch.int64, device=device)
    for backend in backends_for(device, torch.float64):
        def f(q, k, v, backend=backend):
            return torch.ops.sdpax.fwd(q, k, v, None, 0.4, 1, 0.5, False, None, rng, int(backend))[0]
        assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_rows_zero_gradients(device):
    gen = torch.Generator().manual_seed(2)
    q, k, v = make_qkv((1, 2, 6, 8), (1, 2, 4, 8), 8, torch.float32, device, gen, requires_grad=True)
    for backend in backends_for(device, torch.float32):
        out = run(backend, q, k, v, attn_mask=causal_lower_right(6, 4))  # rows 0 and 1 see no key
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
        assert (dq[:, :, :2] == 0).all()
        assert (out[:, :, :2] == 0).all()
