"""sdpax.varlen_attn: attention over a packed batch of variable-length sequences (no padding).

Sequence b's queries are rows [cu_seq_q[b], cu_seq_q[b + 1]) of query (Tq, Hq, E) and its keys rows
[cu_seq_k[b], cu_seq_k[b + 1]) of key / value (Tk, Hkv, E / Ev); each sequence attends only within itself, with
the dense semantics (README) per sequence. Where the arguments overlap torch's `torch.nn.attention.varlen.varlen_attn`
they mean the same: `window_size=(left, right)` is lower-right aligned within each sequence and
`is_causal=True` is `(-1, 0)`: the last query of a sequence sees its last key (chunked prefill, decoding).
A paged KV cache: key / value are a pool of pages (P, page, Hkv, E / Ev), `block_table` (int32, (N, max_pages))
lists each sequence's pages and `seqused_k` (N,) how many keys it has; forward only, as torch's.
"""
from __future__ import annotations

import torch

from . import _causal, _ops, _select
from ._args import _call_key, _draw_rng, _softcap, causal_window, default_scale
from ._errors import AttentionError

__all__ = ["varlen_attn", "explain"]


def _check(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, dropout_p, sinks, seqused_k, block_table):
    """What must hold before the op is traced; the C++ op checks the offsets' values and repeats the rest."""
    named = {"query": query, "key": key, "value": value, "cu_seq_q": cu_seq_q}
    named.update({n: t for n, t in (("cu_seq_k", cu_seq_k), ("sinks", sinks), ("seqused_k", seqused_k),
                                    ("block_table", block_table)) if t is not None})
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"sdpax: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != query.device:
            raise RuntimeError(f"sdpax: {name} must be on the query's device {query.device}, got {t.device}")
    kv_dim = 4 if block_table is not None else 3
    if query.dim() != 3 or key.dim() != kv_dim or value.dim() != kv_dim:
        layout = "pages (P, page, Hkv, E)" if block_table is not None else "(Tk, Hkv, E)"
        raise AttentionError(f"sdpax: varlen_attn takes packed query (Tq, Hq, E) and key / value {layout}, got "
                             f"shapes {tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}")
    if not query.is_floating_point() or key.dtype != query.dtype or value.dtype != query.dtype:
        raise RuntimeError("sdpax: query, key and value must be floating point of one dtype, got "
                           f"{query.dtype}, {key.dtype} and {value.dtype}")
    if cu_seq_k is None and block_table is None:
        raise AttentionError("sdpax: cu_seq_k is required unless a block_table gives the keys")
    if block_table is not None and seqused_k is None:
        raise AttentionError("sdpax: a block_table needs seqused_k (the keys each sequence uses)")
    for name, m in (("max_q", max_q), ("max_k", max_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise AttentionError(f"sdpax: {name} must be an int >= 0, got {m!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise AttentionError(f"sdpax: dropout_p must be a number in [0, 1], got {dropout_p!r}")


def _prepare(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, is_causal, window_size, sinks, dropout_p,
             seqused_k, block_table, softcap):
    """Validate; (causal id, window, scale, softcap, the selection's call fields)."""
    _check(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, dropout_p, sinks, seqused_k, block_table)
    # (left, 0) and is_causal are the same pattern: the causal edge is the window's right edge at 0.
    window_size = None if window_size is None else tuple(window_size)
    is_causal = is_causal or (window_size is not None and len(window_size) == 2 and window_size[1] == 0)
    causal, window = causal_window(None, is_causal, window_size, is_causal_variant=_causal.LOWER_RIGHT)
    scale = default_scale(query, scale)
    cap = _softcap(softcap)
    return causal, window, scale, cap, _call_key(query, value, None, key, sinks, scale, cap, window, True)


def explain(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, is_causal=False,
            window_size=(-1, -1), enable_gqa=False, sinks=None, dropout_p=0.0, seqused_k=None, block_table=None,
            softcap=None) -> _select.Explanation:
    """Which backend varlen_attn would use for these arguments, and why each other would not."""
    fields = _prepare(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, is_causal, window_size, sinks,
                      dropout_p, seqused_k, block_table, softcap)[-1]
    return _select.explain_call(_select.Call(*fields))


def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, is_causal=False,
                window_size=(-1, -1), enable_gqa=False, sinks=None, dropout_p=0.0, return_lse=False,
                seqused_k=None, block_table=None, softcap=None):
    """Attention of each packed sequence within itself: out (Tq, Hq, Ev), or (out, lse) with lse (Hq, Tq) float32
    (float64 for float64 inputs) when return_lse. See the module docstring for the layout and the options;
    `sinks`, `softcap` and `dropout_p` are as in `sdpax.scaled_dot_product_attention` (sequence b drops what a
    dense call on it alone with the call's rng at offset + b would)."""
    causal, window, scale, cap, fields = _prepare(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale,
                                                  is_causal, window_size, sinks, dropout_p, seqused_k, block_table,
                                                  softcap)
    compiling = torch.compiler.is_compiling()
    backend = _select.select(_select.Call(*fields)) if compiling else _select.select_cached(fields)
    rng = _draw_rng(query.device) if dropout_p > 0.0 else None
    out, lse = _ops.varlen_fwd(query, key, value, cu_seq_q, cu_seq_k, int(max_q), int(max_k), float(dropout_p),
                               causal, scale, bool(enable_gqa), sinks, rng, int(backend) | _select.loop_bits(), cap,
                               *window, seqused_k, block_table)
    return (out, lse) if return_lse else out
