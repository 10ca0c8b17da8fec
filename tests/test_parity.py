"""Forward parity: sdpax vs an independent float64 reference, within a multiple of torch's own error."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import (
    DEVICES,
    LOWER_RIGHT,
    UPPER_LEFT,
    assert_close_rel,
    backends_for,
    causal_allowed,
    err,
    make_qkv,
    reference,
    run,
    torch_equivalent,
    torch_errors,
)
from sdpax.attention.bias import CausalBias, CausalVariant, causal_lower_right

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
LENGTHS = [1, 7, 64, 129, 300, 511]
HEAD_DIMS = [16, 32, 64, 72, 128, 256, 80]
MASKS = ["none", "bool_full", "bool_pad", "bool_ls", "add_heads", "add_ls_f32", "causal_ul", "causal_lr"]


def _case(idx: int, dtype, L: int, S: int):
    """A grid point: (L, S, dtype) from the full product, the other features rotated by index."""
    rank = [4, 3, 5][idx % 3]
    E = HEAD_DIMS[idx % len(HEAD_DIMS)]
    if L * S * E > 511 * 511 * 72 and dtype == torch.float64:
        E = 32  # keep the float64 points cheap; large E is covered in lower precision
    Ev = E if idx % 4 else [24, 40, 96][idx % 3]
    return {"rank": rank, "E": E, "Ev": Ev, "mask": MASKS[idx % len(MASKS)],
            "gqa": ["none", "gqa", "mqa"][(idx // 2) % 3], "sinks": idx % 5 == 0,
            "layout": "blhe" if rank == 4 and idx % 6 == 1 else "bhle", "scale": 0.3 if idx % 4 == 3 else None}


GRID = [(i, dt, L, S) for i, (dt, (L, S)) in enumerate(itertools.product(DTYPES, itertools.product(LENGTHS, LENGTHS)))]


def _shapes(c, L, S):
    hq = 4
    hk = {"none": 4, "gqa": 2, "mqa": 1}[c["gqa"]] if c["rank"] >= 3 else 1
    if c["rank"] == 3:
        lead_q, lead_k = (hq,), (hk,)
    elif c["rank"] == 4:
        lead_q, lead_k = (2, hq), (2, hk)
    else:
        lead_q, lead_k = (2, 1, hq), (2, 1, hk)
    return (*lead_q, L, c["E"]), (*lead_k, S, c["E"])


def _mask(kind, q_shape, L, S, dtype, device, gen):
    lead = q_shape[:-2]
    if kind == "bool_full":
        m = torch.rand((*lead, L, S), generator=gen) > 0.3
    elif kind == "bool_pad":
        m = torch.rand((*lead[:-1], 1, 1, S), generator=gen) > 0.2
    elif kind == "bool_ls":
        m = torch.rand((L, S), generator=gen) > 0.5
    elif kind == "add_heads":
        m = torch.randn((1,) * max(0, len(lead) - 1) + (lead[-1], L, S), generator=gen).to(dtype)
    elif kind == "add_ls_f32":
        m = torch.randn((L, S), generator=gen, dtype=torch.float32)
    else:
        return None
    return m.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("idx,dtype,L,S", GRID, ids=[f"{str(d)[6:]}-L{L}-S{S}" for _, d, L, S in GRID])
def test_forward_grid(idx, dtype, L, S, device):
    c = _case(idx, dtype, L, S)
    gen = torch.Generator().manual_seed(1000 + idx)
    q_shape, k_shape = _shapes(c, L, S)
    q, k, v = make_qkv(q_shape, k_shape, c["Ev"], dtype, device, gen, layout=c["layout"])
    mask = _mask(c["mask"], q_shape, L, S, dtype, device, gen)
    causal = {"causal_ul": UPPER_LEFT, "causal_lr": LOWER_RIGHT}.get(c["mask"], 0)
    sinks = torch.randn(q_shape[-3] if len(q_shape) >= 3 else 1, generator=gen).to(device) if c["sinks"] else None
    if sinks is not None and len(q_shape) < 3:
        sinks = None
    gqa = c["gqa"] != "none" and len(q_shape) >= 3
    ref = reference(q, k, v, mask=mask, causal=causal, scale=c["scale"], sinks=sinks)
    t_err, _ = torch_errors(q, k, v, mask=mask, causal=causal, scale=c["scale"], sinks=sinks, gqa=gqa)
    for backend in backends_for(device, dtype):
        kw = {"scale": c["scale"], "enable_gqa": gqa, "sinks": sinks}
        if causal == UPPER_LEFT:
            out = run(backend, q, k, v, is_causal=True, **kw)
        elif causal == LOWER_RIGHT:
            out = run(backend, q, k, v, attn_mask=causal_lower_right(L, S), **kw)
        else:
            out = run(backend, q, k, v, attn_mask=mask, **kw)
        assert out.dtype == dtype and out.shape == (*q_shape[:-1], c["Ev"])
        assert_close_rel(out, ref.to(out.device), t_err, dtype, what=f"{backend.name} {c}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch_same_dtype(device, dtype):
    """Where torch has the feature, sdpax's output is as close to torch's as the rule allows torch's to the
    reference: the rule with torch's result in place of the reference."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = make_qkv((2, 8, 129, 64), (2, 2, 300, 64), 64, dtype, device, gen)
    mask = (torch.rand(2, 1, 1, 300, generator=gen) > 0.3).to(device)
    theirs = torch_equivalent(q, k, v, mask=mask, gqa=True)
    t_err, _ = torch_errors(q, k, v, mask=mask, gqa=True)
    for backend in backends_for(device, dtype):
        ours = run(backend, q, k, v, attn_mask=mask, enable_gqa=True)
        assert_close_rel(ours, theirs, t_err, dtype, what=f"{backend.name} vs torch")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 5), (1, 3, 5)], ids=["L3-S5", "L1-S3"])
@pytest.mark.parametrize("variant", [UPPER_LEFT, LOWER_RIGHT], ids=["upper_left", "lower_right"])
def test_causal_alignments(device, shape, variant):
    """Both alignments, L < S and L > S (lower-right then has rows with no key: they give 0, not NaN)."""
    for L, S in [(shape[-2], shape[-1]), (shape[-1], shape[-2])]:
        gen = torch.Generator().manual_seed(L * 10 + S)
        q, k, v = make_qkv((2, 3, L, 8), (2, 3, S, 8), 8, torch.float64, device, gen)
        bias = CausalBias(CausalVariant(variant), L, S)
        ref = reference(q, k, v, causal=variant)
        for backend in backends_for(device, torch.float64):
            out = run(backend, q, k, v, attn_mask=bias)
            assert not torch.isnan(out).any()
            assert err(out, ref) < 1e-12
            dense = run(backend, q, k, v, attn_mask=causal_allowed(L, S, variant, device))
            assert err(out, dense) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_ranks(device, rank):
    gen = torch.Generator().manual_seed(rank)
    lead = [(), (3,), (2, 3), (2, 2, 3)][rank - 2]
    q, k, v = make_qkv((*lead, 9, 16), (*lead, 11, 16), 12, torch.float32, device, gen)
    out = run(backends_for(device, torch.float32, (16, 12))[-1], q, k, v)
    assert out.shape == (*lead, 9, 12)
    assert_close_rel(out, reference(q, k, v), torch_errors(q, k, v)[0], torch.float32, what=f"rank {rank}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_masked_rows_are_zero(device, dtype):
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv((2, 4, 16, 32), (2, 4, 20, 32), 32, dtype, device, gen)
    mask = torch.rand(2, 4, 16, 20, generator=gen) > 0.5
    mask[:, :, ::3] = False
    mask = mask.to(device)
    add = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, -math.inf)
    sinks = torch.randn(4, generator=gen).to(device)
    for backend in backends_for(device, dtype):
        for m in (mask, add):
            out = run(backend, q, k, v, attn_mask=m)
            assert not torch.isnan(out).any()
            assert (out[:, :, ::3] == 0).all()
            out = run(backend, q, k, v, attn_mask=m, sinks=sinks)
            assert (out[:, :, ::3] == 0).all()
            t_err, _ = torch_errors(q, k, v, mask=m, sinks=sinks)
            assert_close_rel(out, reference(q, k, v, mask=m, sinks=sinks), t_err, dtype, what=backend.name)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_sizes(device):
    for qs, ks, ev in [((2, 3, 0, 8), (2, 3, 5, 8), 8), ((0, 3, 4, 8), (0, 3, 5, 8), 6),
                       ((2, 3, 4, 8), (2, 3, 0, 8), 6)]:
        q, k, v = (torch.randn(shape, device=device) for shape in (qs, ks, (*ks[:-1], ev)))
        for backend in backends_for(device, torch.float32, (qs[-1], ev)):
            out = run(backend, q, k, v)
            assert out.shape == (*qs[:-1], ev)
            assert (out == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_propagates_like_torch_math(device):
    q, k, v = (torch.randn(1, 2, n, 8, device=device) for n in (4, 5, 5))
    q[0, 1, 2, 3] = float("nan")
    for backend in backends_for(device, torch.float32):
        out = run(backend, q, k, v)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            theirs = F.scaled_dot_product_attention(q, k, v)
        assert torch.equal(torch.isnan(out), torch.isnan(theirs))


@pytest.mark.parametrize("device", DEVICES)
def test_sinks_definition(device):
    """sinks[h] joins the denominator unscaled: a huge sink drives the output to 0, -inf sink is no sink."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = make_qkv((1, 2, 6, 8), (1, 2, 7, 8), 8, torch.float64, device, gen)
    math_ = backends_for(device, torch.float64)[0]
    plain = run(math_, q, k, v)
    no_sink = torch.full((2,), -math.inf, device=device, dtype=torch.float64)
    assert err(run(math_, q, k, v, sinks=no_sink), plain) < 1e-12
    out = run(math_, q, k, v, sinks=torch.full((2,), 80.0, device=device, dtype=torch.float64))
    assert out.abs().max() < 1e-20
    s = torch.tensor([0.5, -1.0], dtype=torch.float64, device=device)
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(8)
    denom = logits.exp().sum(-1, keepdim=True) + s.exp().view(1, 2, 1, 1)
    expected = (logits.exp() / denom) @ v
    assert err(run(math_, q, k, v, sinks=s), expected) < 1e-12
