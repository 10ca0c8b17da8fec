"""The call arguments every entry point shares (dense, nested, packed, torch's flash registry): the window, the
softcap, the dropout rng, the default scale and the selection's call features. Imports nothing of sdpax's above it."""
from __future__ import annotations

import math

import torch

from ._causal import NONE, UPPER_LEFT
from ._errors import AttentionError


def _window(window_size) -> tuple[int, int]:
    """The op's (window_left, window_right) for a window_size argument: None is (-1, -1), no window."""
    if window_size is None:
        return -1, -1
    ok = isinstance(window_size, (tuple, list)) and len(window_size) == 2
    ok = ok and all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)
    if not ok:
        raise AttentionError("sdpax: window_size must be None or (left, right), two ints >= 0 or -1 for "
                             f"unbounded, got {window_size!r}")
    return int(window_size[0]), int(window_size[1])


def causal_window(bias, is_causal: bool, window_size, is_causal_variant: int = UPPER_LEFT) -> tuple:
    """(causal id, (window_left, window_right)) of a call: `bias` is (variant, window left or -1) of a CausalBias
    passed as attn_mask, or None; is_causal means `is_causal_variant`. With a causal variant the causal edge is the
    window's right edge, so the op's window_right is -1; right 0 or -1 allows it, more is an error."""
    if bias is None and window_size is None:  # the common call: nothing to combine
        return (is_causal_variant if is_causal else NONE), (-1, -1)
    window = _window(window_size)
    if bias is not None:
        if is_causal:
            raise AttentionError("sdpax: pass either a CausalBias as attn_mask or is_causal=True, not both")
        causal, bias_left = bias
        if bias_left >= 0:
            if window_size is not None:
                raise AttentionError("sdpax: the CausalBias already carries a sliding window; pass window_size "
                                     "or a windowed bias, not both")
            window = (bias_left, -1)
    else:
        causal = is_causal_variant if is_causal else NONE
    if causal != NONE:
        if window[1] > 0:
            raise AttentionError(f"sdpax: window_size {window_size!r} reaches {window[1]} keys right of the "
                                 "diagonal, past the causal edge; with is_causal or a CausalBias use right = 0 or -1")
        window = (window[0], -1)
    return causal, window


def _call_key(query, value, attn_mask, key=None, sinks=None, scale=None, softcap=0.0, window=(-1, -1),
              varlen=False) -> tuple:
    """The fields of _select.Call for this call, in order: a plain tuple is what the selection cache hashes, and
    building the frozen dataclass on every call cost more than the rest of the selection."""
    grad_mode = torch.is_grad_enabled()
    mask_grad = grad_mode and attn_mask is not None and attn_mask.requires_grad
    needs_grad = grad_mode and (query.requires_grad or value.requires_grad or mask_grad
                                or (key is not None and key.requires_grad)
                                or (sinks is not None and sinks.requires_grad))
    return (query.device, query.dtype, query.shape[-1], value.shape[-1], mask_grad, needs_grad,
            needs_grad and torch.are_deterministic_algorithms_enabled(), scale == 0.0, softcap > 0.0, False,
            window != (-1, -1), varlen)


def _softcap(softcap) -> float:
    """The op's softcap argument: 0.0 for None, else a finite number > 0."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0.0 < softcap < math.inf:
        raise AttentionError(f"sdpax: softcap must be None or a finite number > 0, got {softcap!r}")
    return float(softcap)


def _draw_rng(device) -> torch.Tensor:
    """A call's dropout {seed, offset}, from torch's generator for the device, so torch.manual_seed makes dropout
    reproducible; it stays on the device (CUDA-graph safe) and backward reuses it."""
    return torch.randint(-(2 ** 63), 2 ** 63 - 1, (2,), dtype=torch.int64, device=device)


def default_scale(query, scale) -> float:
    """The scale a call uses: `scale`, or 1 / sqrt(E). Head dim 0: every score is an empty sum, 0 whatever the
    scale, and torch's 1/sqrt(0) would make it 0 * inf, so 1."""
    if scale is not None:
        return float(scale)
    return 1.0 / math.sqrt(query.shape[-1]) if query.shape[-1] > 0 else 1.0
