"""The data of a causal bias, below functional.py: which objects describe a causal triangle and its alignment.

`attention/bias.py` builds the public `CausalBias` on `CausalBiasBase` and adds its routing of torch's function
to sdpax; functional.py and the distributed layer only need to recognise a bias (sdpax's or torch's own) and read
its variant, which is what this module gives them without importing anything above it.
"""
from __future__ import annotations

from enum import IntEnum

import torch
from torch.nn.attention.bias import CausalBias as TorchCausalBias

NONE, UPPER_LEFT, LOWER_RIGHT = 0, 1, 2  # the op's `causal` argument


class CausalVariant(IntEnum):
    """Alignment of the causal triangle; the values match torch.nn.attention.bias.CausalVariant."""

    UPPER_LEFT = UPPER_LEFT
    LOWER_RIGHT = LOWER_RIGHT


class CausalBiasBase(torch.Tensor):
    """A (seq_len_q, seq_len_kv) boolean causal mask described by its variant (and an optional sliding window);
    it holds no data.

    The tensor itself lives on the meta device, so creating one costs nothing for any L and S;
    `_materialize(device)` builds the real boolean mask when one is wanted.
    """

    @staticmethod
    def __new__(cls, variant: CausalVariant, seq_len_q: int, seq_len_kv: int, window_left: int = -1, *,
                lead_dims: int = 0):
        if not isinstance(variant, (CausalVariant, int)) or int(variant) not in (UPPER_LEFT, LOWER_RIGHT):
            raise ValueError(f"variant must be a CausalVariant, got {variant!r}")
        if seq_len_q < 0 or seq_len_kv < 0:
            raise ValueError(f"sequence lengths must be non-negative, got ({seq_len_q}, {seq_len_kv})")
        if isinstance(window_left, bool) or not isinstance(window_left, int) or window_left < -1:
            raise ValueError(f"window_left must be an int >= 0, or -1 for no window, got {window_left!r}")
        # lead_dims: leading size-1 dims, for callers that tell masks apart by rank (transformers keeps a 4-D mask
        # as it is and reads a 2-D one as padding); the pattern is the same (L, S) one.
        shell = torch.empty((1,) * lead_dims + (seq_len_q, seq_len_kv), dtype=torch.bool, device="meta")
        self = torch.Tensor._make_subclass(cls, shell)
        self.variant = CausalVariant(int(variant))
        self.seq_len_q = int(seq_len_q)
        self.seq_len_kv = int(seq_len_kv)
        # A causal sliding window: query i sees its diagonal key d and the window_left keys before it (-1: all).
        self.window_left = int(window_left)
        return self

    def _materialize(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The boolean (L, S) mask: True where query i may attend to key j."""
        L, S = self.seq_len_q, self.seq_len_kv
        shift = S - L if self.variant == CausalVariant.LOWER_RIGHT else 0
        i = torch.arange(L, device=device).unsqueeze(1)
        j = torch.arange(S, device=device).unsqueeze(0)
        allowed = j <= i + shift
        return allowed & (j >= i + shift - self.window_left) if self.window_left >= 0 else allowed


def is_causal_bias(t) -> bool:
    """Whether `t` is a causal bias object, sdpax's or torch's."""
    return isinstance(t, (CausalBiasBase, TorchCausalBias))
