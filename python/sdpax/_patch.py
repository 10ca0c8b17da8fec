"""Route torch.nn.functional.scaled_dot_product_attention through sdpax.

nn.MultiheadAttention, nn.TransformerEncoderLayer (on their Python path) and Hugging Face's "sdpa" attention look
the function up on torch.nn.functional at call time, so replacing that attribute is enough for them. Two more
things must follow the patch for it to be a drop-in:

- torch's `CausalBias.__torch_function__` recognises only the function object that is
  `F.scaled_dot_product_attention` at the time of the call. Code that imported torch's function by name before
  the patch still calls torch's builtin; with a CausalBias that builtin would then see the bias as a plain (empty)
  tensor. While patched, the bias routes torch's builtin and the patched function alike to sdpax.
- torch.nn.attention.sdpa_kernel sets torch's global backend flags. While patched, those flags choose among sdpax's
  backends (MATH -> MATH; FLASH_ATTENTION, EFFICIENT_ATTENTION, CUDNN_ATTENTION -> sdpax's fused kernel), unless
  an sdpax.sdpa_kernel block is active: sdpax's own selection is the explicit one and wins.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias as _TorchCausalBias

from . import _select
from ._errors import AttentionError
from ._select import SDPBackend
from .functional import scaled_dot_product_attention

_lock = threading.Lock()
_original = F.scaled_dot_product_attention
_original_bias_torch_function = _TorchCausalBias.__dict__["__torch_function__"]
_depth = 0

# torch's backend flags (their getters, resolved once: this runs on every patched call), torch's id of each backend
# and the sdpax backend it maps onto. OVERRIDEABLE (out-of-tree devices) has none.
_TorchBackend = torch.nn.attention.SDPBackend
_TORCH_FLAGS = tuple(
    (getattr(torch._C, f"_get_{flag}_sdp_enabled", None), int(theirs), ours)
    for flag, theirs, ours in (("math", _TorchBackend.MATH, SDPBackend.MATH),
                               ("flash", _TorchBackend.FLASH_ATTENTION, SDPBackend.FLASH_ATTENTION),
                               ("mem_efficient", _TorchBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION),
                               ("cudnn", _TorchBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION)))
_torch_priority = getattr(torch._C, "_get_sdp_priority_order", None)
_flag_getters = tuple(getter for getter, _, _ in _TORCH_FLAGS if getter is not None)


def torch_backend_choice() -> tuple | None:
    """sdpax's backends in the order torch's flags allow them, or None when torch's flags restrict nothing (every
    torch backend enabled) and sdpax's default applies."""
    for getter in _flag_getters:  # the common case first: nothing restricted
        if not getter():
            break
    else:
        return None
    on = [(theirs, ours) for getter, theirs, ours in _TORCH_FLAGS if getter is None or getter()]
    if not on:
        raise AttentionError(
            "sdpax: torch.nn.attention.sdpa_kernel enabled none of MATH, FLASH_ATTENTION, EFFICIENT_ATTENTION or "
            "CUDNN_ATTENTION, so no sdpax backend may run under sdpax.patch()")
    # torch's backend ids, highest priority first (set by sdpa_kernel(..., set_priority=True)). torch.compile
    # cannot trace this getter; compiled code keeps torch's default order among the enabled backends.
    order = list(_torch_priority()) if _torch_priority is not None and not torch.compiler.is_compiling() else []
    on.sort(key=lambda entry: order.index(entry[0]) if entry[0] in order else len(order))
    return tuple(dict.fromkeys(ours for _, ours in on))


def _patched(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
             **kwargs):
    choice = None if _select.explicitly_chosen() else torch_backend_choice()
    if choice is None:
        return scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                            enable_gqa=enable_gqa, **kwargs)
    _select.push(choice, set_priority=True)
    try:
        return scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                            enable_gqa=enable_gqa, **kwargs)
    finally:
        _select.pop()


_patched.__doc__ = "sdpax's scaled_dot_product_attention, installed by sdpax.patch().\n\n" + (
    scaled_dot_product_attention.__doc__ or "")
_patched.__wrapped__ = _original


def _is_sdpa(func) -> bool:
    """Whether func is torch's builtin scaled_dot_product_attention or the patched function. torch.compile does not
    decide `is` between two references to the same builtin while tracing, so the builtin is also known by name."""
    if func is _original or func is _patched:
        return True
    return (getattr(func, "__name__", None) == "scaled_dot_product_attention"
            and getattr(func, "__module__", None) in ("torch._C._nn", "torch.nn.functional"))


def _bias_torch_function(cls, func, types, args=(), kwargs=None):
    """torch's CausalBias while patched: torch's builtin (imported by name before the patch) and the patched
    function both run on sdpax; everything else is torch's own handling."""
    if _is_sdpa(func):
        return _patched(*args, **(kwargs or {}))
    return _original_bias_torch_function.__get__(None, cls)(func, types, args, kwargs)


def _install() -> None:
    # torch.compile dispatches __torch_function__ (a CausalBias's) only for functions in torch's table of
    # overridable functions, which torch builds once by walking torch.nn.functional and caches. Built while
    # patched, it would list the patched function instead of torch's builtin; build it before the first patch.
    torch.overrides.get_overridable_functions()
    F.scaled_dot_product_attention = _patched
    _TorchCausalBias.__torch_function__ = classmethod(_bias_torch_function)


def _restore() -> None:
    F.scaled_dot_product_attention = _original
    _TorchCausalBias.__torch_function__ = _original_bias_torch_function


class patch:
    """`sdpax.patch()` routes torch.nn.functional.scaled_dot_product_attention to sdpax.

    Use as a context manager (restored on exit, also on exceptions), or call `sdpax.patch()` for global use and
    `sdpax.unpatch()` to undo it. Nested uses are counted; torch's function comes back when the last one ends.
    """

    def __init__(self):
        global _depth
        with _lock:
            _depth += 1
            _install()
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
                _restore()


def unpatch() -> None:
    """Undo every sdpax.patch(): torch.nn.functional.scaled_dot_product_attention is torch's again."""
    global _depth
    with _lock:
        _depth = 0
        _restore()


def is_patched() -> bool:
    return F.scaled_dot_product_attention is _patched
