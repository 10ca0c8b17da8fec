"""Backend control: SDPBackend, the sdpa_kernel context manager, and explain()."""
from __future__ import annotations

import contextlib

from .. import functional as _functional
from .._select import DEFAULT_PRIORITY, Explanation, SDPBackend, pop, push

__all__ = ["SDPBackend", "sdpa_kernel", "explain", "Explanation", "DEFAULT_PRIORITY"]


@contextlib.contextmanager
def sdpa_kernel(backends, set_priority: bool = False):
    """Restrict sdpax to `backends` (one backend or a list) inside the block, for this thread only.

    With set_priority=True the list order is the priority order; otherwise the default order (FLASH_ATTENTION,
    then MATH) applies among the enabled ones. torch.nn.attention.SDPBackend members are accepted by name.
    """
    push(backends, set_priority)
    try:
        yield
    finally:
        pop()


def explain(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False,
            sinks=None, softcap=None, window_size=None) -> Explanation:
    """Same arguments as scaled_dot_product_attention; returns which backend would run and every backend's reasons."""
    return _functional.explain(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa,
                               sinks=sinks, softcap=softcap, window_size=window_size)
