"""Route torch.nn.functional.scaled_dot_product_attention through sdpax.

nn.MultiheadAttention, nn.TransformerEncoderLayer (on their Python path) and Hugging Face's "sdpa" attention look
the function up on torch.nn.functional at call time, so replacing that attribute is enough.
"""
from __future__ import annotations

import threading

import torch.nn.functional as F

from .functional import scaled_dot_product_attention

_lock = threading.Lock()
_original = F.scaled_dot_product_attention
_depth = 0


def _patched(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
             **kwargs):
    return scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                        enable_gqa=enable_gqa, **kwargs)


_patched.__doc__ = "sdpax's scaled_dot_product_attention, installed by sdpax.patch().\n\n" + (
    scaled_dot_product_attention.__doc__ or "")
_patched.__wrapped__ = _original


class patch:
    """`sdpax.patch()` routes torch.nn.functional.scaled_dot_product_attention to sdpax.

    Use as a context manager (restored on exit, also on exceptions), or call `sdpax.patch()` for global use and
    `sdpax.unpatch()` to undo it. Nested uses are counted; torch's function comes back when the last one ends.
    """

    def __init__(self):
        global _depth
        with _lock:
            _depth += 1
            F.scaled_dot_product_attention = _patched
        self._active = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        global _depth
        if not self._active:
            return
        self._active = False
        with _lock:
            _depth = max(0, _depth - 1)
            if _depth == 0:
                F.scaled_dot_product_attention = _original


def unpatch() -> None:
    """Undo every sdpax.patch(): torch.nn.functional.scaled_dot_product_attention is torch's again."""
    global _depth
    with _lock:
        _depth = 0
        F.scaled_dot_product_attention = _original


def is_patched() -> bool:
    return F.scaled_dot_product_attention is _patched
