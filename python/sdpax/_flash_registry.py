"""sdpax in torch's flash-attention registry (`torch.nn.attention.register_flash_attention_impl`, torch 2.11 on).

`import sdpax` registers the implementation "sdpax" there (registering activates nothing, as torch asks of
providers). `torch.nn.attention.activate_flash_attention_impl("sdpax")` then routes torch's own flash operators on
CUDA to sdpax's kernels with no monkeypatching: `aten::_scaled_dot_product_flash_attention` (+ backward), what
`F.scaled_dot_product_attention`'s FLASH_ATTENTION backend runs, and `aten::_flash_attention_forward` (+ backward,
+ the in-place no-dropout forward), what torch's nested-tensor attention and `varlen_attn` run.
`torch.nn.attention.restore_flash_attention_impl()` puts torch's own kernels back.

Each operator keeps torch's semantics: the SDPA operator takes (B, H, L, D) and `is_causal` upper-left (torch only
sends it L == S when causal); `_flash_attention_forward` takes FlashAttention's (B, L, H, D) or packed (T, H, D) with
cum_seq offsets, `is_causal` and the window lower-right aligned. The log-sum-exp has the layout torch's flash kernels
give ((B, H, L), or (H, T) packed) and rng_state carries sdpax's {seed, offset}, so the backward drops what the
forward dropped.
"""
from __future__ import annotations

import torch

from . import _causal, _ops, _select
from ._args import _call_key, _draw_rng, default_scale

IMPL_NAME = "sdpax"
_KERNELS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
            "_flash_attention_forward", "_flash_attention_backward", "_flash_attention_forward_no_dropout_inplace")


def _backend(query, key, value, scale, window=(-1, -1), varlen=False) -> int:
    fields = _call_key(query, value, None, key, None, scale, 0.0, window, varlen)
    return int(_select.select_cached(fields)) | _select.loop_bits()


def _scale(query, scale) -> float:
    return default_scale(query, scale)


def _rng(query, dropout_p):
    """(rng for the op, rng_state to return): sdpax's {seed, offset} drawn from torch's generator, as uint64 bits."""
    if dropout_p <= 0.0:
        return None, torch.zeros(2, dtype=torch.uint64, device=query.device)
    rng = _draw_rng(query.device)
    return rng, rng.view(torch.uint64)


def _saved_rng(rng_state, dropout_p):
    return rng_state.view(torch.int64) if dropout_p > 0.0 else None


def _unused(query):
    return torch.zeros((), dtype=torch.uint64, device=query.device)


def _no_debug_mask(return_debug_mask, query):
    if return_debug_mask:
        raise RuntimeError("sdpax: return_debug_mask (the dropout mask of the call) is not supported by the sdpax "
                           "flash implementation; torch.ops.sdpax.dropout_keep_mask gives sdpax's keep mask")
    return torch.empty(0, dtype=query.dtype, device=query.device)


def sdpa_flash_forward(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    """aten::_scaled_dot_product_flash_attention: (B, H, L, D) inputs."""
    debug = _no_debug_mask(return_debug_mask, query)
    scale = _scale(query, scale)
    rng, rng_state = _rng(query, dropout_p)
    causal = _causal.UPPER_LEFT if is_causal else _causal.NONE
    gqa = query.shape[-3] != key.shape[-3]
    out, lse = _ops.fwd(query, key, value, None, float(dropout_p), causal, scale, gqa, None, rng,
                        _backend(query, key, value, scale))
    empty = query.new_empty(0)
    return out, lse, empty, empty, query.shape[-2], key.shape[-2], rng_state, _unused(query), debug


def sdpa_flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                        is_causal, philox_seed, philox_offset, *, scale=None):
    """aten::_scaled_dot_product_flash_attention_backward."""
    scale = _scale(query, scale)
    causal = _causal.UPPER_LEFT if is_causal else _causal.NONE
    gqa = query.shape[-3] != key.shape[-3]
    dq, dk, dv, _, _ = _ops.bwd(grad_out, query, key, value, None, out, logsumexp, float(dropout_p), causal, scale,
                                gqa, None, _saved_rng(philox_seed, dropout_p), _backend(query, key, value, scale),
                                False)
    return dq, dk, dv


def _fa_window(is_causal, left, right):
    """(causal id, window_left, window_right) for FlashAttention's arguments: lower-right, None = -1 = open; causal
    is the right edge at 0."""
    left = -1 if left is None else int(left)
    right = -1 if right is None else int(right)
    if is_causal or right == 0:
        return _causal.LOWER_RIGHT, left, -1
    return _causal.NONE, left, right


def flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask,
                  *, scale=None, window_size_left=None, window_size_right=None, seqused_k=None, alibi_slopes=None,
                  block_table=None, num_splits=None):
    """aten::_flash_attention_forward: (B, L, H, D), or packed (T, H, D) with cum_seq offsets."""
    if alibi_slopes is not None:
        raise RuntimeError("sdpax: ALiBi slopes are not supported by the sdpax flash implementation; pass them as "
                           "an additive attn_mask to sdpax.scaled_dot_product_attention")
    debug = _no_debug_mask(return_debug_mask, query)
    scale = _scale(query, scale)
    rng, rng_state = _rng(query, dropout_p)
    causal, left, right = _fa_window(is_causal, window_size_left, window_size_right)
    heads_k = key.shape[-2]
    gqa = query.shape[-2] != heads_k
    if cum_seq_q is not None or block_table is not None:
        backend = _backend(query, key, value, scale, (left, right), varlen=True)
        out, lse = _ops.varlen_fwd(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, float(dropout_p), causal,
                                   scale, gqa, None, rng, backend, 0.0, left, right, seqused_k, block_table)
        return out, lse, rng_state, _unused(query), debug
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out, lse = _ops.fwd(q, k, v, None, float(dropout_p), causal, scale, gqa, None, rng,
                        _backend(q, k, v, scale, (left, right)), 0.0, left, right)
    return out.transpose(1, 2).contiguous(), lse, rng_state, _unused(query), debug


def flash_forward_inplace(out, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                          return_debug_mask, **kwargs):
    """aten::_flash_attention_forward_no_dropout_inplace: the forward written into `out`; returns the lse."""
    if dropout_p > 0.0:
        raise RuntimeError("sdpax: _flash_attention_forward_no_dropout_inplace called with dropout_p > 0")
    result, lse, _, _, _ = flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, 0.0, is_causal,
                                         return_debug_mask, **kwargs)
    out.copy_(result)
    return lse


def flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                   is_causal, rng_state, unused, *, scale=None, window_size_left=None, window_size_right=None):
    """aten::_flash_attention_backward."""
    scale = _scale(query, scale)
    causal, left, right = _fa_window(is_causal, window_size_left, window_size_right)
    rng = _saved_rng(rng_state, dropout_p)
    gqa = query.shape[-2] != key.shape[-2]
    if cum_seq_q is not None and cum_seq_q.numel() > 0:
        backend = _backend(query, key, value, scale, (left, right), varlen=True)
        dq, dk, dv, _ = _ops.varlen_bwd(grad_out, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, out,
                                        logsumexp, float(dropout_p), causal, scale, gqa, None, rng, backend, 0.0,
                                        left, right)
        return dq, dk, dv
    q, k, v, o, go = (t.transpose(1, 2) for t in (query, key, value, out, grad_out))
    dq, dk, dv, _, _ = _ops.bwd(go, q, k, v, None, o, logsumexp, float(dropout_p), causal, scale, gqa, None, rng,
                                _backend(q, k, v, scale, (left, right)), False, 0.0, left, right)
    return tuple(t.transpose(1, 2).contiguous() for t in (dq, dk, dv))


class _Handle:
    """What activate_flash_attention_impl keeps: the aten library holding sdpax's kernels; remove() drops them."""

    def __init__(self, library):
        self.library = library

    def remove(self) -> None:
        self.library = None


def _activate() -> _Handle:
    lib = torch.library.Library("aten", "IMPL", "CUDA")  # noqa: TOR901 (overriding torch's own CUDA kernels)
    for name, fn in zip(_KERNELS, (sdpa_flash_forward, sdpa_flash_backward, flash_forward, flash_backward,
                                   flash_forward_inplace)):
        if hasattr(torch.ops.aten, name):  # the in-place forward is newer than the registry (torch 2.11 lacks it)
            lib.impl(name, fn, "CUDA")
    return _Handle(lib)


def register() -> bool:
    """Registers "sdpax" with torch's flash registry where torch has one (2.11 and later); True if it did."""
    reg = getattr(torch.nn.attention, "register_flash_attention_impl", None)
    if reg is None:
        return False
    reg(IMPL_NAME, register_fn=_activate)
    return True
