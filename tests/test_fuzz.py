"""Property-based fuzz against the float64 reference: shapes (zero sizes included), strides, views, broadcast
masks, -inf rows, scales, GQA, sinks, causal alignments, dropout, forward and backward, on every backend a call
can take.

Bounded for CI: SDPAX_FUZZ_EXAMPLES examples per device (default 150) from a fixed seed, so a run is repeatable;
raise it (and set SDPAX_FUZZ_SEED) for a longer search. The tolerance is the suite's one rule (helpers.py): the error
against float64 within K times torch's own error on the same inputs in the same dtype, plus the dtype's floor.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import sdpax
from helpers import (
    DEVICES,
    LOWER_RIGHT,
    UPPER_LEFT,
    assert_close_rel,
    assert_grads_close,
    grad_magnitude,
    reference,
    torch_errors,
)
from sdpax import SDPBackend
from sdpax.attention.bias import causal_lower_right, causal_upper_left

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

EXAMPLES = int(os.environ.get("SDPAX_FUZZ_EXAMPLES", "150"))
SEED = int(os.environ.get("SDPAX_FUZZ_SEED", "0"))
SIZES = [1, 2, 3, 7, 16, 33, 70, 129]
HEAD_DIMS = [1, 8, 16, 24, 40, 64, 72]


@st.composite
def calls(draw, device):
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]))
    rank = draw(st.sampled_from([2, 3, 4, 4, 5]))
    hkv = draw(st.sampled_from([1, 2, 3])) if rank >= 3 else 1
    group = draw(st.sampled_from([1, 1, 2, 3])) if rank >= 3 else 1
    lead = [draw(st.sampled_from([1, 2])) for _ in range(max(0, rank - 3))]
    L, S = draw(st.sampled_from(SIZES)), draw(st.sampled_from(SIZES))
    E, Ev = draw(st.sampled_from(HEAD_DIMS)), draw(st.sampled_from(HEAD_DIMS))
    # About one call in six has one zero-size dim: batch, heads, lengths or head dims.
    zero = draw(st.sampled_from(["none"] * 5 + ["one"]))
    if zero == "one":
        dims = ["L", "S", "E", "Ev"] + (["hkv"] if rank >= 3 else []) + (["lead"] if lead else [])
        which = draw(st.sampled_from(dims))
        L, S, E, Ev = (0 if which == n else x for n, x in (("L", L), ("S", S), ("E", E), ("Ev", Ev)))
        hkv = 0 if which == "hkv" else hkv
        lead = [0, *lead[1:]] if which == "lead" else lead
    hq = hkv * group
    q_shape = (*lead, hq, L, E)[-rank:]
    k_shape = (*lead, hkv, S, E)[-rank:]
    v_shape = (*lead, hkv, S, Ev)[-rank:]
    kind = draw(st.sampled_from(["none", "bool", "float", "float_neg_inf_rows", "is_causal", "upper_left_bias",
                                 "lower_right_bias", "torch_lower_right_bias"]))
    # Which dims of (lead..., Hq, L, S) the mask has (1 where it broadcasts), and how many leading dims it drops.
    full = (*q_shape[:-1], S)
    mask_shape = tuple(n if draw(st.booleans()) else 1 for n in full)[draw(st.integers(0, len(full) - 2)):]
    return {
        "dtype": dtype, "q_shape": q_shape, "k_shape": k_shape, "v_shape": v_shape, "gqa": group > 1, "kind": kind,
        "mask_shape": mask_shape, "layout": draw(st.sampled_from(["contiguous", "transposed", "strided"])),
        "scale": draw(st.sampled_from([None, None, 0.0, 0.3, -0.7, 2.5])),
        "sinks": rank >= 3 and draw(st.booleans()),
        "dropout_p": draw(st.sampled_from([0.0, 0.0, 0.0, 0.25])),
        "grad": draw(st.booleans()), "math_only": draw(st.booleans()), "data_seed": draw(st.integers(0, 2 ** 31 - 1)),
        "device": device,
    }


def _tensor(shape, layout, dtype, device, gen):
    """A random tensor of `shape` as a contiguous tensor, a transposed view (rows and heads swapped in memory) or
    a view with a stride of 2 in the last dim."""
    if layout == "transposed" and len(shape) >= 3:
        base = torch.randn((*shape[:-3], shape[-2], shape[-3], shape[-1]), generator=gen, dtype=torch.float64)
        return base.to(device=device, dtype=dtype).transpose(-3, -2)
    if layout == "strided":
        base = torch.randn((*shape[:-1], 2 * shape[-1]), generator=gen, dtype=torch.float64)
        return base.to(device=device, dtype=dtype)[..., ::2]
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def _build(c):
    gen = torch.Generator().manual_seed(c["data_seed"])
    dev, dtype = c["device"], c["dtype"]
    q, k, v = (_tensor(s, c["layout"], dtype, dev, gen) for s in (c["q_shape"], c["k_shape"], c["v_shape"]))
    L, S = c["q_shape"][-2], c["k_shape"][-2]
    kind, mask, causal, attn_mask, is_causal = c["kind"], None, 0, None, False
    if kind == "bool":
        mask = (torch.rand(c["mask_shape"], generator=gen) > 0.3).to(dev)
    elif kind.startswith("float"):
        mask = torch.randn(c["mask_shape"], generator=gen, dtype=torch.float64)
        if kind == "float_neg_inf_rows" and mask.dim() >= 2 and mask.shape[-2] > 1:
            mask[..., ::2, :] = -math.inf  # every other row sees no key
        mask = mask.to(device=dev, dtype=dtype if dtype != torch.float64 and c["data_seed"] % 2 else
                       (torch.float64 if dtype == torch.float64 else torch.float32))
    elif kind == "is_causal":
        causal, is_causal = UPPER_LEFT, True
    elif kind == "upper_left_bias":
        causal, attn_mask = UPPER_LEFT, causal_upper_left(L, S)
    elif kind == "lower_right_bias":
        causal, attn_mask = LOWER_RIGHT, causal_lower_right(L, S)
    else:
        causal, attn_mask = LOWER_RIGHT, torch.nn.attention.bias.causal_lower_right(L, S)
    if mask is not None:
        attn_mask = mask
    hq = c["q_shape"][-3] if len(c["q_shape"]) >= 3 else 1
    sinks = (torch.randn(hq, generator=gen, dtype=torch.float64) * 2).to(dev, torch.float32) if c["sinks"] else None
    return q, k, v, mask, causal, attn_mask, is_causal, sinks


def _keep(c, rng, q, S):
    """The keep mask sdpax applies for this rng, shaped like the scores."""
    L = q.shape[-2]
    keep = torch.ops.sdpax.dropout_keep_mask(rng, math.prod(q.shape[:-2]), L, S, c["dropout_p"])
    return keep.view(*q.shape[:-1], S)


def _check(c):
    q, k, v, mask, causal, attn_mask, is_causal, sinks = _build(c)
    dev, dtype, p = c["device"], c["dtype"], c["dropout_p"]
    S = k.shape[-2]
    leaves = [q, k, v] + ([sinks] if sinks is not None else [])
    if c["grad"]:
        for t in leaves:
            t.requires_grad_()
    kw = {"attn_mask": attn_mask, "dropout_p": p, "is_causal": is_causal, "scale": c["scale"],
          "enable_gqa": c["gqa"], "sinks": sinks}
    choice = sdpax.explain(q, k, v, **kw).backend
    torch.manual_seed(c["data_seed"])
    with sdpax.sdpa_kernel(SDPBackend.MATH if c["math_only"] else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        out = sdpax.scaled_dot_product_attention(q, k, v, **kw)
    assert out.shape == (*q.shape[:-1], v.shape[-1]) and out.dtype == dtype and out.device == q.device
    for what in (f"backend {getattr(choice, 'name', None) if not c['math_only'] else 'MATH'}", f"mask {c['kind']}",
                 f"dtype {dtype}", "empty" if min(q.numel(), k.numel(), v.numel()) == 0 else "non-empty"):
        hypothesis.event(what)  # pytest --hypothesis-show-statistics prints the counts

    keep = None
    if p > 0:
        torch.manual_seed(c["data_seed"])  # the {seed, offset} sdpax drew, from the same generator state
        rng = torch.randint(-(2 ** 63), 2 ** 63 - 1, (2,), dtype=torch.int64, device=dev)
        keep = _keep(c, rng, q, S)
    ref_leaves = [t.detach().double().requires_grad_(c["grad"]) for t in leaves]
    rq, rk, rv = ref_leaves[:3]
    rs = ref_leaves[3] if sinks is not None else None
    ref = reference(rq, rk, rv, mask=mask, causal=causal, scale=c["scale"], sinks=rs, keep=keep, dropout_p=p)
    gout = None
    if c["grad"]:
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dev)
    # torch's own error in this dtype, on the same call without dropout
    torch_err, t_grads = torch_errors(q, k, v, mask=mask, causal=causal, scale=c["scale"], sinks=sinks,
                                      gqa=c["gqa"], gout=gout)
    assert_close_rel(out, ref, torch_err, dtype, what=f"out ({getattr(choice, 'name', '-')})")

    if c["grad"]:
        grads = torch.autograd.grad(out, leaves, gout.to(dtype), allow_unused=True)
        ref_grads = torch.autograd.grad(ref, ref_leaves, gout, allow_unused=True)
        names = ["dq", "dk", "dv", "dsinks"][:len(leaves)]
        ref_grads = [torch.zeros_like(t, dtype=torch.float64) if rg is None else rg
                     for t, rg in zip(leaves, ref_grads)]
        for name, g, t in zip(names, grads, leaves):
            assert g is not None and g.shape == t.shape and g.dtype == t.dtype, name
        assert_grads_close(names, grads, ref_grads, t_grads, dtype, grad_magnitude(gout, out))


@pytest.mark.parametrize("device", DEVICES)
@hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=SEED == 0,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.seed(SEED)
@hypothesis.given(data=st.data())
def test_fuzz_against_float64(device, data):
    _check(data.draw(calls(device)))
