"""Shared test helpers: an independent float64 reference, torch-relative tolerances, devices and backends.

The reference is written from the definition of attention (softmax(q k^T * scale + bias) v), not from sdpax code;
fully masked rows give 0 and sinks join the softmax denominator with no value vector.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sdpax
from sdpax import SDPBackend
from sdpax._select import LIMITS, Call, reasons

UPPER_LEFT, LOWER_RIGHT = 1, 2

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# Every grid runs on CPU and on CUDA; without a GPU the CUDA cases show up as skipped.
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]

# Absolute error floors per dtype, on outputs of size ~1: what rounding the output itself costs.
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def backends_for(device: str, dtype: torch.dtype, head_dims=None) -> list:
    """The backends that claim this device and dtype in this build (so FLASH grids run where FLASH exists).
    head_dims=(E, Ev): also leave out a fused kernel that declines those head dims (e.g. CUDA's multiples of 8)."""
    out = [SDPBackend.MATH]
    flash = LIMITS[SDPBackend.FLASH_ATTENTION].devices
    if device in flash and dtype in flash[device]:
        if head_dims is None or not reasons(SDPBackend.FLASH_ATTENTION,
                                            Call(torch.device(device), dtype, *head_dims, False)):
            out.append(SDPBackend.FLASH_ATTENTION)
    return out


def causal_allowed(L: int, S: int, variant: int, device="cpu") -> torch.Tensor:
    i = torch.arange(L, device=device).unsqueeze(1)
    j = torch.arange(S, device=device).unsqueeze(0)
    return j <= i + (S - L if variant == LOWER_RIGHT else 0)


def reference(q, k, v, mask=None, causal=0, scale=None, sinks=None, keep=None, dropout_p=0.0):
    """float64 attention from the definition. keep: bool (..., Hq, L, S) dropout keep mask (or None)."""
    q, k, v = q.double(), k.double(), v.double()
    hq, hk = (q.shape[-3], k.shape[-3]) if q.dim() >= 3 else (1, 1)
    if hq != hk:
        k = k.repeat_interleave(hq // hk, dim=-3)
        v = v.repeat_interleave(hq // hk, dim=-3)
    L, S = q.shape[-2], k.shape[-2]
    if scale is None:  # head dim 0: every score is an empty sum (0); any finite scale keeps it 0
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    s = (q @ k.transpose(-2, -1)) * scale
    allowed = torch.ones_like(s, dtype=torch.bool)
    if causal:
        allowed = allowed & causal_allowed(L, S, causal, q.device)
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            s = s + mask.double()
    s = s.masked_fill(~allowed, -math.inf)
    if sinks is not None:
        sink = sinks.double().view(-1, 1, 1).expand(*s.shape[:-1], 1)
        s = torch.cat([s, sink], dim=-1)
    live = (s > -math.inf).any(-1, keepdim=True)
    p = torch.where(live, torch.softmax(torch.where(live, s, 0.0), dim=-1), 0.0)
    if sinks is not None:
        p = p[..., :-1]
    if keep is not None:
        p = p * keep / (1 - dropout_p) if dropout_p < 1 else p * 0
    return p @ v


def err(a, b) -> float:
    """Max abs difference, NaN-aware (NaN where the other is not counts as infinite)."""
    a, b = a.double(), b.double()
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


def assert_close_rel(ours, ref, torch_err: float, dtype, k: float = 3.0, what="", magnitude: float = 0.0):
    """ours vs the float64 reference within k x torch's own error (same dtype) plus the dtype floor, relative to the
    larger of the result and `magnitude` (the size of intermediates that are rounded to dtype on the way, where
    torch's error does not see them: e.g. the dropped-out output, amplified by 1 / (1 - p), in the backward)."""
    e = err(ours, ref)
    bound = k * torch_err + FLOOR[dtype] * max(1.0, ref.abs().max().item() if ref.numel() else 1.0, magnitude)
    assert e <= bound, f"{what}: error {e:.3g} > bound {bound:.3g} (torch's error {torch_err:.3g}, dtype {dtype})"


def torch_error(q, k, v, ref, mask=None, causal=0, scale=None, gqa=False) -> float:
    """torch's F.scaled_dot_product_attention error vs the reference on the same inputs (rows torch leaves NaN,
    i.e. fully masked ones, are excluded: there torch and sdpax differ by design)."""
    kw = dict(scale=scale, enable_gqa=gqa)
    try:
        if causal == UPPER_LEFT:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
        elif causal == LOWER_RIGHT:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_allowed(q.shape[-2], k.shape[-2],
                                                                                   LOWER_RIGHT, q.device), **kw)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
    except RuntimeError:
        out = F.scaled_dot_product_attention(q, k, v, **kw)
        ref = reference(q, k, v, scale=scale)
    return err_where_finite(out, ref)


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



def torch_equivalent(q, k, v, mask=None, causal=0, scale=None, sinks=None, gqa=False):
    """torch's F.scaled_dot_product_attention on the same inputs (same dtype), expressing every sdpax feature but
    dropout: causal alignments and bool masks as -inf entries of an additive mask in the query's dtype (what
    every torch backend takes), and each sink as one more key with q.k = 0, an additive logit sinks[h] and a zero
    value row. Differentiable in q, k, v."""
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
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=gqa)
