"""Jagged nested tensors in sdpax.scaled_dot_product_attention: (B, H, j, D) inputs with a ragged sequence dim,
as torch's SDPA tutorial builds them (`view(B, -1, H, D).transpose(1, 2)` of a `layout=torch.jagged` batch),
run as one packed variable-length call (sdpax::varlen_fwd) on their values: no padding, no per-sequence Python
loop. Every feature that makes sense per sequence applies per sequence: is_causal (upper-left, as for dense
inputs), a CausalBias's variant and sliding window, window_size, GQA, sinks, softcap, dropout, scale. The output is
a jagged nested tensor (B, Hq, j, Ev) on the query's offsets, so it combines with the inputs' other nested tensors.
"""
from __future__ import annotations

import torch

from . import _causal, _ops, _select
from ._args import _call_key, _draw_rng, _softcap, causal_window, default_scale
from ._errors import AttentionError


def _packed(t: torch.Tensor, name: str) -> torch.Tensor:
    """The (T, H, D) values of a (B, H, j, D) jagged nested tensor (a view)."""
    if t.layout != torch.jagged:
        raise AttentionError(f"sdpax: {name} is a nested tensor with layout {t.layout}; sdpax takes jagged nested "
                             "tensors (torch.nested.nested_tensor(..., layout=torch.jagged))")
    if t.dim() != 4 or t._ragged_idx != 2:
        raise AttentionError(f"sdpax: {name} must be a (B, H, j, D) jagged nested tensor with the ragged sequence "
                             f"in dim 2 (view(B, -1, H, D).transpose(1, 2)), got shape {tuple(t.shape)} with the "
                             f"ragged dim at {t._ragged_idx}")
    if t._lengths is not None:
        raise AttentionError(f"sdpax: {name} is a nested tensor with holes (offsets and lengths); make it "
                             "contiguous first")
    return t.values().transpose(0, 1)


def _max_len(t: torch.Tensor):
    """The longest sequence (the nested tensor's cached maximum, symbolic under torch.compile)."""
    cached = t._maybe_max_seqlen
    if cached is not None:
        return cached
    return int(t.offsets().diff().max()) if t.offsets().numel() > 1 else 0


def prepare(query, key, value, attn_mask, dropout_p, is_causal, scale, sinks, softcap, window_size):
    """Validate nested inputs; (packed q, k, v, causal id, window, scale, softcap, the selection's call fields)."""
    tensors = {"query": query, "key": key, "value": value}
    dense = [n for n, t in tensors.items() if not (isinstance(t, torch.Tensor) and t.is_nested)]
    if dense:
        nested = [n for n in tensors if n not in dense]
        raise AttentionError(f"sdpax: nested {' and '.join(nested)} with dense {' and '.join(dense)}; pass all "
                             "three as jagged nested tensors or all as dense tensors")
    q, k, v = (_packed(t, n) for n, t in tensors.items())
    if not (query.shape[0] == key.shape[0] == value.shape[0]):
        raise AttentionError(f"sdpax: query, key and value hold {query.shape[0]}, {key.shape[0]} and "
                             f"{value.shape[0]} sequences; they must hold the same number")
    if key.offsets() is not value.offsets() and not torch.equal(key.offsets(), value.offsets()):
        raise AttentionError("sdpax: key and value must have the same sequence lengths")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise AttentionError(f"sdpax: dropout_p must be a number in [0, 1], got {dropout_p!r}")
    bias = None
    if attn_mask is not None:
        if not _causal.is_causal_bias(attn_mask):
            raise AttentionError("sdpax: attn_mask with nested inputs must be a CausalBias (its variant and window "
                                 "apply within each sequence); a tensor mask has no per-sequence shape")
        bias = (int(attn_mask.variant), getattr(attn_mask, "window_left", -1))
    causal, (left, right) = causal_window(bias, is_causal, window_size)
    scale = default_scale(q, scale)
    cap = _softcap(softcap)
    return q, k, v, causal, (left, right), scale, cap, _call_key(q, v, None, k, sinks, scale, cap, (left, right), True)


def nested_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, sinks, softcap,
                     window_size):
    q, k, v, causal, (left, right), scale, cap, fields = prepare(query, key, value, attn_mask, dropout_p, is_causal,
                                                                 scale, sinks, softcap, window_size)
    compiling = torch.compiler.is_compiling()
    backend = _select.select(_select.Call(*fields)) if compiling else _select.select_cached(fields)
    rng = _draw_rng(q.device) if dropout_p > 0.0 else None
    out, _ = _ops.varlen_fwd(q, k, v, query.offsets(), key.offsets(), _max_len(query), _max_len(key),
                             float(dropout_p), causal, scale, bool(enable_gqa), sinks, rng,
                             int(backend) | _select.loop_bits(), cap, left, right)
    return torch.nested.nested_tensor_from_jagged(out, query.offsets(), jagged_dim=1).transpose(1, 2)
