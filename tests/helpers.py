"""The suite's one oracle and one tolerance rule, and the devices and backends every grid runs on.

The oracle, `reference`: attention in float64 written from the definition (softmax(q k^T * scale + bias) v), not
from sdpax code; fully masked rows give 0 and sinks join the softmax denominator with no value vector.

The rule, `assert_close_rel`: a result computed in `dtype` passes when

    err(result, reference) <= K * err(torch in the same dtype, reference) + FLOOR[dtype] * max(1, |reference|, m)

err is the max absolute difference (`err`); torch's error is measured on the same inputs by `torch_errors` (torch's
F.scaled_dot_product_attention, every sdpax feature but dropout expressed in torch's terms by `torch_equivalent`;
a score softcap, which torch's function cannot express, by the definition evaluated in that dtype with torch ops,
what an eager model computes);
the floor is what rounding the result itself to dtype costs, relative to the larger of the result's size and m, the
size of intermediates rounded to dtype on the way where torch's error does not see them (`grad_magnitude`).
"""
from __future__ import annotations

import contextlib
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend as TorchBackend
from torch.nn.attention import sdpa_kernel as torch_sdpa_kernel

import sdpax
from sdpax import SDPBackend
from sdpax._select import LIMITS, Call, reasons

UPPER_LEFT, LOWER_RIGHT = 1, 2

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# Every grid runs on CPU and on CUDA; without a GPU the CUDA cases show up as skipped.
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]

# The one multiple of torch's own error (FlashAttention's tests use 2, PyTorch's _check_equal 5).
K = 4.0
# Absolute error floors per dtype, on results of size ~1: what rounding the result itself costs.
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}

# torch's own function, also when a test runs inside sdpax.patch() (which replaces F.scaled_dot_product_attention).
_TORCH_SDPA = inspect.unwrap(F.scaled_dot_product_attention)


def backends_for(device: str, dtype: torch.dtype, head_dims=None) -> list:
    """The backends that claim this device and dtype in this build (so FLASH grids run where FLASH exists).
    head_dims=(E, Ev): also leave out a fused kernel that declines those head dims (e.g. CUDA's multiples of 8)."""
    out = [SDPBackend.MATH]
    flash = LIMITS[SDPBackend.FLASH_ATTENTION].devices
    declined = head_dims is not None and reasons(SDPBackend.FLASH_ATTENTION,
                                                 Call(torch.device(device), dtype, *head_dims, False))
    if device in flash and dtype in flash[device] and not declined:
        out.append(SDPBackend.FLASH_ATTENTION)
    return out


def backends_taking(q, k, v, **kwargs) -> list:
    """The backends that take this call: those explain() gives no reason against, MATH first."""
    ex = sdpax.explain(q, k, v, **kwargs)
    return [b for b in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION) if not ex.reasons[b]]


def causal_allowed(L: int, S: int, variant: int, device="cpu") -> torch.Tensor:
    i = torch.arange(L, device=device).unsqueeze(1)
    j = torch.arange(S, device=device).unsqueeze(0)
    return j <= i + (S - L if variant == LOWER_RIGHT else 0)


def reference(q, k, v, mask=None, causal=0, scale=None, sinks=None, keep=None, dropout_p=0.0,
              compute=torch.float64, return_lse=False, softcap=None):
    """Attention from the definition, in float64: the oracle. Differentiable in every tensor argument.

    keep: bool (..., Hq, L, S) dropout keep mask (or None). softcap: scaled scores s become softcap * tanh(s /
    softcap) before the mask (Gemma 2). return_lse: also the row log-sum-exp of the scaled scores
    (sinks included; -inf for a row with no allowed key and no sink), as sdpax.fwd returns it.
    compute: another dtype gives what plain attention in that dtype itself gets: the matrix products in `compute`,
    the softmax in float32 (for float32 on CUDA: cuBLAS float32 products as long as TF32 is off)."""
    acc = torch.float64 if compute == torch.float64 else torch.float32
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    hq, hk = (q.shape[-3], k.shape[-3]) if q.dim() >= 3 else (1, 1)
    if hq != hk:
        k = k.repeat_interleave(hq // hk, dim=-3)
        v = v.repeat_interleave(hq // hk, dim=-3)
    L, S = q.shape[-2], k.shape[-2]
    if scale is None:  # head dim 0: every score is an empty sum (0); any finite scale keeps it 0
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    s = (q @ k.transpose(-2, -1)).to(acc) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    allowed = torch.ones_like(s, dtype=torch.bool)
    if causal:
        allowed = allowed & causal_allowed(L, S, causal, q.device)
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            s = s + mask.to(acc)
    s = s.masked_fill(~allowed, -math.inf)
    if sinks is not None:
        sink = sinks.to(acc).view(-1, 1, 1).expand(*s.shape[:-1], 1)
        s = torch.cat([s, sink], dim=-1)
    live = (s > -math.inf).any(-1, keepdim=True)
    p = torch.where(live, torch.softmax(torch.where(live, s, 0.0), dim=-1), 0.0)
    if sinks is not None:
        p = p[..., :-1]
    if keep is not None:
        p = p * keep / (1 - dropout_p) if dropout_p < 1 else p * 0
    out = p.to(compute) @ v
    return (out, torch.logsumexp(s, dim=-1)) if return_lse else out


def err(a, b) -> float:
    """Max abs difference, NaN-aware (NaN where the other is not counts as infinite)."""
    a, b = a.detach().double(), b.detach().double().to(a.device)
    if a.shape != b.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    nan = torch.isnan(a) != torch.isnan(b)
    if nan.any():
        return math.inf
    d = (a - b).abs().nan_to_num(0.0)
    return d.max().item()


def err_where_finite(theirs, ref) -> float:
    """torch's error against the reference where torch's result is not NaN (rows torch leaves NaN, fully masked
    ones, are where sdpax differs by design); 0 if it is NaN everywhere."""
    theirs, ref = theirs.detach().double(), ref.detach().double().to(theirs.device)
    ok = ~torch.isnan(theirs)
    return (theirs[ok] - ref[ok]).abs().max().item() if ok.any() else 0.0


def coarser(*dtypes) -> torch.dtype:
    """The dtype with the larger floor (float32 sinks of bfloat16 inputs are held to bfloat16's)."""
    return max(dtypes, key=FLOOR.get)


def assert_close_rel(ours, ref, torch_err: float, dtype, what="", magnitude: float = 0.0, floor: bool = True):
    """The rule: ours vs the float64 reference within K x torch's own error (same dtype) plus the dtype floor,
    relative to the larger of the reference and `magnitude` (the size of intermediates that are rounded to dtype on
    the way, where torch's error does not see them: see grad_magnitude). floor=False: K x torch's error alone, for
    the checks that a kernel is as accurate as torch where the floor would hide a loss (float32 is not TF32)."""
    e = err(ours, ref)
    size = max(1.0, ref.detach().abs().max().item() if ref.numel() else 1.0, magnitude)
    bound = K * torch_err + (FLOOR[dtype] * size if floor else 0.0)
    assert e <= bound, f"{what}: error {e:.3g} > bound {bound:.3g} (torch's error {torch_err:.3g}, dtype {dtype})"


def assert_lse_close(lse, ref_lse, what="lse"):
    """The row log-sum-exp a kernel saves for its backward (float32, from sdpax.fwd) against reference(...,
    return_lse=True): -inf in the same rows, elsewhere the rule for a float32 result with torch's error 0 (torch
    returns no log-sum-exp to measure)."""
    fin = torch.isfinite(ref_lse).to(lse.device)
    assert torch.equal(fin, torch.isfinite(lse)), f"{what}: infinite in other rows than the reference"
    assert_close_rel(lse[fin], ref_lse.to(lse.device)[fin], 0.0, torch.float32, what=what)


def grad_magnitude(gout, out) -> float:
    """The `magnitude` of the rule for gradients: a fused backward takes Delta = rowsum(dO * O) from O as rounded to
    dtype (as FlashAttention does), an error of about eps * sqrt(Ev) * |dO| * |O| in every dS that torch's math
    backward (which derives Delta from P and dP) does not have. With dropout O is amplified by 1 / (1 - p)."""
    if out.numel() == 0:
        return 0.0
    return gout.detach().abs().max().item() * out.detach().abs().max().item() * math.sqrt(out.shape[-1])


def assert_grads_close(names, grads, ref_grads, torch_errs, dtype, magnitude: float):
    """The rule for each gradient. torch_errs: torch's errors for dq, dk, dv; gradients torch does not compute (the
    mask's, the sinks') take the largest of them."""
    for i, (name, g, rg) in enumerate(zip(names, grads, ref_grads, strict=True)):
        te = torch_errs[i] if i < len(torch_errs) else max(torch_errs, default=0.0)
        assert_close_rel(g, rg, te, coarser(dtype, g.dtype), what=name, magnitude=magnitude)


def torch_equivalent(q, k, v, mask=None, causal=0, scale=None, sinks=None, gqa=False):
    """torch's F.scaled_dot_product_attention on the same inputs (same dtype), expressing every sdpax feature but
    dropout: causal alignments and bool masks as -inf entries of an additive mask in the query's dtype (what
    every torch backend takes), and each sink as one more key with q.k = 0, an additive logit sinks[h] and a zero
    value row. Differentiable in q, k, v. On CUDA torch's efficient or math backend runs it: torch's cuDNN backend
    returns values that are neither 0 nor NaN in rows with no allowed key."""
    L, S = q.shape[-2], k.shape[-2]
    bias = torch.zeros((L, S), dtype=q.dtype, device=q.device)
    if causal:
        bias = bias.masked_fill(~causal_allowed(L, S, causal, q.device), -math.inf)
    if mask is not None:
        bias = (bias.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool
                else bias + mask.detach().to(q.dtype))
    if sinks is not None:
        hq = q.shape[-3]
        bias = bias.expand(*q.shape[:-1], S)
        col = sinks.detach().to(q.dtype).view(hq, 1, 1).expand(*q.shape[:-1], 1)
        bias = torch.cat([bias, col], dim=-1)
        k = torch.cat([k, k.new_zeros((*k.shape[:-2], 1, k.shape[-1]))], dim=-2)
        v = torch.cat([v, v.new_zeros((*v.shape[:-2], 1, v.shape[-1]))], dim=-2)
    backends = (torch_sdpa_kernel([TorchBackend.EFFICIENT_ATTENTION, TorchBackend.MATH]) if q.is_cuda
                else contextlib.nullcontext())
    with backends:
        return _TORCH_SDPA(q, k, v, attn_mask=bias, scale=scale, enable_gqa=gqa)


def torch_errors(q, k, v, mask=None, causal=0, scale=None, sinks=None, gqa=False, gout=None, softcap=None):
    """torch's own error in q's dtype on this call (without dropout) against the float64 reference: the output's,
    and with gout (the output's gradient) also [dq, dk, dv]'s; else []. Where torch's result is NaN (rows some torch
    versions leave NaN) it is not counted; an empty call has error 0."""
    if min(q.numel(), k.numel(), v.numel()) == 0:
        return 0.0, ([0.0, 0.0, 0.0] if gout is not None else [])
    grad = gout is not None
    mask = mask.detach() if mask is not None else None
    sinks = sinks.detach() if sinks is not None else None
    leaves = [t.detach().requires_grad_(grad) for t in (q, k, v)]
    ref_leaves = [t.detach().double().requires_grad_(grad) for t in (q, k, v)]
    if softcap is None:
        theirs = torch_equivalent(*leaves, mask=mask, causal=causal, scale=scale, sinks=sinks, gqa=gqa)
    else:
        theirs = reference(*leaves, mask=mask, causal=causal, scale=scale, sinks=sinks, compute=q.dtype,
                           softcap=softcap)
    ref = reference(*ref_leaves, mask=mask, causal=causal, scale=scale, sinks=sinks, softcap=softcap)
    if not grad:
        return err_where_finite(theirs, ref), []
    grads = torch.autograd.grad(theirs, leaves, gout.to(theirs.dtype))
    ref_grads = torch.autograd.grad(ref, ref_leaves, gout.double().to(ref.device))
    return err_where_finite(theirs, ref), [err_where_finite(a, b) for a, b in zip(grads, ref_grads)]


def check_every_backend(q, k, v, gout, kwargs, op_args, mask=None, causal=0, sinks=None, softcap=None,
                        gqa=False) -> list:
    """The rule for one call on every backend that takes it (MATH must): output, gradients of q, k, v (and the
    sinks) and, below float64, the log-sum-exp the op saves, against the float64 reference of the same pattern
    (mask, causal alignment, sinks, softcap), with torch's own errors on the call. kwargs: the call's arguments to
    sdpax.scaled_dot_product_attention; op_args(backend): the same call as sdpax::fwd's arguments, for the lse.
    Returns the backends checked."""
    dtype = q.dtype
    leaves = [q, k, v] + ([sinks] if sinks is not None else [])
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref, ref_lse = reference(*ref_leaves[:3], mask=mask, causal=causal, sinks=ref_leaves[3] if sinks is not None
                             else None, softcap=softcap, return_lse=True)
    ref_grads = torch.autograd.grad(ref, ref_leaves, gout.double())
    t_err, t_grad_errs = torch_errors(q, k, v, mask=mask, causal=causal, sinks=sinks, gqa=gqa, gout=gout,
                                      softcap=softcap)
    names = ["dq", "dk", "dv"] + (["dsinks"] if sinks is not None else [])
    backends = backends_taking(q, k, v, **kwargs)
    assert SDPBackend.MATH in backends
    for backend in backends:
        out = run(backend, q, k, v, **kwargs)
        assert_close_rel(out, ref, t_err, dtype, what=f"{backend.name} out")
        grads = torch.autograd.grad(out, leaves, gout)
        assert_grads_close([f"{backend.name} {n}" for n in names], grads, ref_grads, t_grad_errs, dtype,
                           grad_magnitude(gout, out))
        if dtype != torch.float64:  # the saved log-sum-exp is float32
            with torch.no_grad():
                _, lse = torch.ops.sdpax.fwd(q, k, v, *op_args(backend))
            assert_lse_close(lse, ref_lse, what=f"{backend.name} lse")
    return backends


def assert_dropout_like_math(q, k, v, select_kwargs, op_tail):
    """With dropout (p 0.3, one fixed rng) every backend that takes the call draws MATH's keep mask: its output and
    gradients match MATH's by the float32 rule. select_kwargs: the feature as sdpax's keyword arguments;
    op_tail: the same feature as sdpax::fwd's arguments after `backend`."""
    rng = torch.tensor([2024, 12], dtype=torch.int64, device=q.device)
    outs = {}
    for b in backends_taking(q, k, v, **select_kwargs):
        out = torch.ops.sdpax.fwd(q, k, v, None, 0.3, 0, 0.5, False, None, rng, int(b), *op_tail)[0]
        outs[b] = (out, torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    ref = outs.pop(SDPBackend.MATH)
    for b, (out, grads) in outs.items():
        assert_close_rel(out, ref[0], 0.0, torch.float32, what=f"{b.name} out")
        for name, g, rg in zip("qkv", grads, ref[1]):
            assert_close_rel(g, rg, 0.0, torch.float32, what=f"{b.name} d{name}")


def run(backend, *args, **kwargs):
    with sdpax.sdpa_kernel(backend):
        return sdpax.scaled_dot_product_attention(*args, **kwargs)


def make_qkv(shape_q, shape_k, ev, dtype, device, gen, layout="bhle", requires_grad=False):
    """Random q, k, v. layout 'blhe' builds (B, L, H, E) tensors and returns their (B, H, L, E) transposed views."""
    def rnd(shape):
        if layout == "blhe" and len(shape) == 4:
            b, h, n, e = shape
            t = torch.randn((b, n, h, e), generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
            t = t.transpose(1, 2)
        else:
            t = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)
    q = rnd(shape_q)
    k = rnd(shape_k)
    v = rnd((*shape_k[:-1], ev))
    return q, k, v
