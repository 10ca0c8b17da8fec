"""Attention and its gradient as differentiable compositions of torch ops: what higher-order gradients
differentiate.

The fused kernels and MATH's C++ backward compute first derivatives only. Two things need the first derivative
as a function autograd can differentiate again:
- `torch.autograd.grad(..., create_graph=True)` through sdpax (gradient penalties, Hessian-vector products): the
  backward of `sdpax::fwd` then returns `gradients()` on a recomputed forward instead of calling `sdpax::bwd`;
- `sdpax::bwd` called with inputs that require grad (its Autograd kernel): `gradients()` on the given `out` and
  `lse`, which is exactly what the op computes, as a function of every input.

Same semantics as the ops (csrc/ops.cpp): scale multiplies q.k^T, a softcap c > 0 maps the scaled score s to
c tanh(s / c) before the mask, the causal edge and the sliding window hide keys as band_hidden says, sinks join
the denominator unscaled and carry no value, a row with no allowed key gives 0, dropout applies the Philox keep
mask of `rng`, GQA folds the query group into the row dimension (K and V are not repeated). Work runs in float32
(float64 for float64 inputs); results come back in the inputs' dtypes.
"""
from __future__ import annotations

import math

import torch

_UPPER_LEFT, _LOWER_RIGHT = 1, 2


class _Shape:
    """The 4-D (B, H, rows, cols) views of a call's tensors, as the C++ side canonicalises them."""

    def __init__(self, query, key, value):
        self.q_shape, self.k_shape, self.v_shape = query.shape, key.shape, value.shape
        self.Hq = query.shape[-3] if query.dim() >= 3 else 1
        self.Hkv = key.shape[-3] if key.dim() >= 3 else 1
        self.B = math.prod(query.shape[:-3]) if query.dim() >= 4 else 1
        self.L, self.S, self.E, self.Ev = query.shape[-2], key.shape[-2], query.shape[-1], value.shape[-1]
        self.G = self.Hq // self.Hkv if self.Hkv > 0 else 1

    def four(self, t, heads):
        return t.reshape(self.B, heads, t.shape[-2], t.shape[-1])

    def grouped(self, t):
        """(B, Hq, L, X) -> (B, Hkv, G * L, X): each K/V head's query group as one block of rows."""
        return t.reshape(self.B, self.Hkv, self.G * self.L, t.shape[-1])

    def mask4(self, mask):
        full = (*self.q_shape[:-1], self.S)
        return mask.expand(full).reshape(self.B, self.Hq, self.L, self.S)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scores(sh: _Shape, q4, k4, mask, causal: int, scale: float, softcap: float = 0.0, window=(-1, -1)):
    """Scaled (and softcapped), masked scores (B, Hq, L, S), disallowed entries -inf, and the softcap's
    derivative 1 - tanh^2 (None without a softcap)."""
    s = (sh.grouped(q4) @ k4.transpose(-2, -1)).reshape(sh.B, sh.Hq, sh.L, sh.S) * scale
    cap_grad = None
    if softcap > 0.0:
        t = torch.tanh(s / softcap)
        cap_grad = 1.0 - t * t
        s = t * softcap
    if mask is not None:
        m = sh.mask4(mask)
        s = s.masked_fill(~m, -math.inf) if m.dtype == torch.bool else s + m.to(s.dtype)
    hidden = band_hidden(sh.L, sh.S, causal, *window, device=s.device)
    if hidden is not None:
        s = s.masked_fill(hidden, -math.inf)
    return s, cap_grad


def band_hidden(L: int, S: int, causal: int, left: int, right: int, device=None):
    """The (L, S) bool of the keys the causal edge and the window hide (True: hidden), or None if neither applies.
    The op's rule (csrc/ops.cpp): key j is seen by row i iff -left <= j - d(i) <= right, with d(i) = i + S - L
    except under an upper-left causal variant (d(i) = i), right = 0 under a causal variant and -1 = unbounded."""
    if causal:
        right = 0
    if right < 0 and left < 0:
        return None
    shift = 0 if causal == _UPPER_LEFT else S - L
    d = torch.arange(S, device=device).unsqueeze(0) - (torch.arange(L, device=device).unsqueeze(1) + shift)
    hidden = d > right if right >= 0 else torch.zeros_like(d, dtype=torch.bool)
    return hidden | (d < -left) if left >= 0 else hidden


def _sink_logits(sh: _Shape, sinks, dtype):
    return sinks.to(dtype).view(1, sh.Hq, 1)


def _keep(sh: _Shape, rng, dropout_p: float, dtype):
    """The dropout keep mask times 1 / (1 - p), (B, Hq, L, S), or None without dropout."""
    if dropout_p <= 0.0:
        return None
    if dropout_p >= 1.0:
        return torch.zeros((sh.B, sh.Hq, sh.L, sh.S), dtype=dtype, device=rng.device)
    keep = torch.ops.sdpax.dropout_keep_mask(rng, sh.B * sh.Hq, sh.L, sh.S, dropout_p)
    return keep.view(sh.B, sh.Hq, sh.L, sh.S).to(dtype) / (1.0 - dropout_p)


def forward(query, key, value, attn_mask, dropout_p, causal, scale, sinks, rng, softcap=0.0, window=(-1, -1)):
    """(out, lse) of the attention, differentiable in query, key, value, an additive mask and sinks."""
    sh = _Shape(query, key, value)
    acc = acc_dtype(query.dtype)
    q4, k4, v4 = sh.four(query, sh.Hq).to(acc), sh.four(key, sh.Hkv).to(acc), sh.four(value, sh.Hkv).to(acc)
    s, _ = _scores(sh, q4, k4, attn_mask, causal, scale, softcap, window)
    # The shift only keeps exp in range; softmax does not depend on it, so it carries no gradient.
    shift = s.detach().amax(-1) if sh.S > 0 else s.new_full((sh.B, sh.Hq, sh.L), -math.inf)
    if sinks is not None:
        shift = torch.maximum(shift, _sink_logits(sh, sinks, acc).detach())
    shift = torch.where(torch.isfinite(shift), shift, 0.0)
    e = torch.exp(s - shift.unsqueeze(-1))
    denom = e.sum(-1)
    if sinks is not None:
        denom = denom + torch.exp(_sink_logits(sh, sinks, acc) - shift)
    live = denom > 0  # a row with no allowed key and no sink: output 0, lse -inf
    safe = torch.where(live, denom, 1.0)
    p = e / safe.unsqueeze(-1)
    keep = _keep(sh, rng, dropout_p, acc)
    if keep is not None:
        p = p * keep
    out = sh.grouped(p) @ v4
    lse = torch.where(live, torch.log(safe) + shift, -math.inf)
    out = out.reshape(*sh.q_shape[:-1], sh.Ev).to(query.dtype)
    return out, lse.reshape(sh.q_shape[:-1])


def gradients(grad_out, query, key, value, attn_mask, out, lse, dropout_p, causal, scale, sinks, rng, mask_grad,
              softcap=0.0, window=(-1, -1)):
    """(dq, dk, dv, dmask, dsinks) as sdpax::bwd defines them, from the forward's out and lse (P = exp(s - lse),
    Delta = rowsum(dO * O)); differentiable in every tensor argument. With a softcap, q and k see dS through the
    cap's derivative 1 - tanh^2; the mask (added after the cap) sees dS itself."""
    sh = _Shape(query, key, value)
    acc = acc_dtype(query.dtype)
    q4, k4, v4 = sh.four(query, sh.Hq).to(acc), sh.four(key, sh.Hkv).to(acc), sh.four(value, sh.Hkv).to(acc)
    do4 = sh.four(grad_out, sh.Hq).to(acc)
    lse4 = lse.reshape(sh.B, sh.Hq, sh.L).to(acc)
    lse4 = torch.where(lse4 == -math.inf, 0.0, lse4)  # rows with no allowed key: every s is -inf, P is 0
    s, cap_grad = _scores(sh, q4, k4, attn_mask, causal, scale, softcap, window)
    p = torch.exp(s - lse4.unsqueeze(-1))
    keep = _keep(sh, rng, dropout_p, acc)
    p_used = p if keep is None else p * keep
    dv = sh.grouped(p_used).transpose(-2, -1) @ sh.grouped(do4)
    dp = (sh.grouped(do4) @ v4.transpose(-2, -1)).reshape(sh.B, sh.Hq, sh.L, sh.S)
    if keep is not None:
        dp = dp * keep
    delta = (do4 * sh.four(out, sh.Hq).to(acc)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    ds_qk = ds if cap_grad is None else ds * cap_grad
    dq = (sh.grouped(ds_qk) @ k4) * scale
    dk = (sh.grouped(ds_qk).transpose(-2, -1) @ sh.grouped(q4)) * scale
    empty = query.new_empty((0,))
    dmask = empty
    if mask_grad and attn_mask is not None and attn_mask.dtype != torch.bool:
        dmask = ds.reshape(*sh.q_shape[:-1], sh.S).sum_to_size(attn_mask.shape).to(attn_mask.dtype)
    dsinks = empty
    if sinks is not None:
        p_sink = torch.exp(_sink_logits(sh, sinks, acc) - lse4)
        dsinks = -(p_sink * delta.squeeze(-1)).sum((0, 2)).to(sinks.dtype)
    return (dq.reshape(sh.q_shape).to(query.dtype), dk.reshape(sh.k_shape).to(key.dtype),
            dv.reshape(sh.v_shape).to(value.dtype), dmask, dsinks)


def varlen_gradients(grad_out, query, key, value, cu_seq_q, cu_seq_k, dropout_p, causal, scale, sinks, rng,
                     softcap=0.0, window=(-1, -1)):
    """(dq, dk, dv, dsinks) of a packed call (sdpax::varlen_fwd), differentiable: `gradients` on each sequence's
    recomputed forward, sequence b with rng offset + b as the op draws it. Only the gradient of a gradient comes
    here, so the loop over sequences is Python."""
    cq, ck = cu_seq_q.tolist(), cu_seq_k.tolist()
    dq, dk, dv, dsinks = [], [], [], None

    def seq(t, a, b):  # (T, H, D) rows [a, b) as (1, H, n, D)
        return t[a:b].transpose(0, 1).unsqueeze(0)
    for b in range(len(cq) - 1):
        (q0, q1), (k0, k1) = (cq[b], cq[b + 1]), (ck[b], ck[b + 1])
        if q1 == q0 or k1 == k0:  # no query or no key: zero gradients
            dq.append(query.new_zeros((q1 - q0, *query.shape[1:])))
            dk.append(key.new_zeros((k1 - k0, *key.shape[1:])))
            dv.append(value.new_zeros((k1 - k0, *value.shape[1:])))
            continue
        qb, kb, vb, gb = seq(query, q0, q1), seq(key, k0, k1), seq(value, k0, k1), seq(grad_out, q0, q1)
        rb = rng + torch.tensor([0, b] + [0] * (rng.numel() - 2), device=rng.device) if dropout_p > 0.0 else rng
        out, lse = forward(qb, kb, vb, None, dropout_p, causal, scale, sinks, rb, softcap, window)
        g = gradients(gb, qb, kb, vb, None, out, lse, dropout_p, causal, scale, sinks, rb, False, softcap, window)
        dq.append(g[0][0].transpose(0, 1))
        dk.append(g[1][0].transpose(0, 1))
        dv.append(g[2][0].transpose(0, 1))
        if sinks is not None:
            dsinks = g[4] if dsinks is None else dsinks + g[4]
    if sinks is not None and dsinks is None:
        dsinks = torch.zeros_like(sinks)
    return torch.cat(dq), torch.cat(dk), torch.cat(dv), dsinks
