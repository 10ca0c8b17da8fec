"""Causal biases that describe a triangular mask without materialising it.

`CausalVariant.UPPER_LEFT`: query i attends to keys j <= i (torch's `is_causal=True`).
`CausalVariant.LOWER_RIGHT`: query i attends to keys j <= i + (S - L): the diagonal ends in the bottom-right
corner, which is what decoding with a KV cache wants. Rows with no allowed key (L > S) produce zeros.
`sliding_window(L, S, left, variant)`: the causal bias of that variant whose rows also stop `left` keys before
their diagonal key d (keys d - left .. d), Mistral's and Gemma's sliding window (a model's window W is left = W - 1).

Passing a CausalBias as `attn_mask` to sdpax's or torch's scaled_dot_product_attention runs sdpax's fused causal
path; torch's own `torch.nn.attention.bias.CausalBias` objects are honoured by sdpax the same way.
"""
from __future__ import annotations

import torch

from .. import _patch
from .._causal import CausalBiasBase, CausalVariant
from ..functional import scaled_dot_product_attention as _sdpax_sdpa

__all__ = ["CausalVariant", "CausalBias", "causal_upper_left", "causal_lower_right", "sliding_window"]


class CausalBias(CausalBiasBase):
    """A (seq_len_q, seq_len_kv) boolean causal mask described by its variant; it holds no data.

    The tensor itself lives on the meta device, so creating one costs nothing for any L and S;
    `_materialize(device)` builds the real boolean mask when one is wanted. Passed to torch's
    scaled_dot_product_attention, it routes the call to sdpax.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _torch_sdpa or func is _sdpax_sdpa:
            # Under sdpax.patch(), torch's backend flags apply as to any patched call.
            target = torch.nn.functional.scaled_dot_product_attention if _patch.is_patched() else _sdpax_sdpa
            return target(*args, **kwargs)
        if func is torch.Tensor.contiguous:
            return args[0]  # a described pattern has no memory layout (transformers' generate() asks for one)
        return super().__torch_function__(func, types, args, kwargs)

    def __repr__(self) -> str:
        window = f", window_left={self.window_left}" if self.window_left >= 0 else ""
        return (f"CausalBias(variant={self.variant.name}, seq_len_q={self.seq_len_q}, seq_len_kv={self.seq_len_kv}"
                f"{window})")

    def __reduce_ex__(self, protocol):
        if self.dim() > 2:
            return (_with_lead_dims, (self.variant, self.seq_len_q, self.seq_len_kv, self.window_left, self.dim() - 2))
        return (CausalBias, (self.variant, self.seq_len_q, self.seq_len_kv, self.window_left))


def causal_upper_left(*size) -> CausalBias:
    """Causal bias with query i attending to keys j <= i. `size` is (L, S)."""
    L, S = _two_sizes(size)
    return CausalBias(CausalVariant.UPPER_LEFT, L, S)


def causal_lower_right(*size) -> CausalBias:
    """Causal bias with query i attending to keys j <= i + (S - L). `size` is (L, S)."""
    L, S = _two_sizes(size)
    return CausalBias(CausalVariant.LOWER_RIGHT, L, S)


def sliding_window(seq_len_q: int, seq_len_kv: int, left: int,
                   variant: CausalVariant = CausalVariant.LOWER_RIGHT) -> CausalBias:
    """Causal sliding window: query i attends to keys d - left .. d, d = i (UPPER_LEFT) or i + S - L (LOWER_RIGHT,
    the default: a KV cache's alignment). A model's window of W keys is left = W - 1."""
    if isinstance(left, bool) or not isinstance(left, int) or left < 0:
        raise ValueError(f"left must be an int >= 0, got {left!r}")
    return CausalBias(variant, int(seq_len_q), int(seq_len_kv), left)


def _with_lead_dims(variant, seq_len_q, seq_len_kv, window_left, lead_dims):
    return CausalBias(variant, seq_len_q, seq_len_kv, window_left, lead_dims=lead_dims)


def _two_sizes(size):
    if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
        size = tuple(size[0])
    if len(size) != 2:
        raise ValueError(f"expected (seq_len_q, seq_len_kv), got {size!r}")
    return int(size[0]), int(size[1])


_torch_sdpa = torch.nn.functional.scaled_dot_product_attention  # torch's builtin, bound before any patch
