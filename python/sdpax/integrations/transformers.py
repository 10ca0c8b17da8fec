"""sdpax as a Hugging Face transformers attention backend.

    import sdpax.integrations.transformers as sdpax_hf
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=sdpax_hf.ATTN_IMPLEMENTATION)
    model.set_attn_implementation(sdpax_hf.ATTN_IMPLEMENTATION)       # or switch an existing model

Importing this module registers two functions under `ATTN_IMPLEMENTATION`:

- `build_mask`, in transformers' `AttentionMaskInterface`: the mask a model builds once per forward (without this
  registration transformers hands a custom backend no mask at all). It returns None where the pattern is the
  layer's plain causal (or bidirectional) one, so that the fused causal path runs; the padding alone as a
  `(B, 1, 1, S)` bool mask where that is all there is; and otherwise the bool mask transformers' "sdpa" backend
  would build. The decision is taken from the arguments (mask function, offsets, padding), never by reading a
  materialised mask.
- `attention_forward`, in `AttentionInterface`: every attention layer's call, mapped onto
  `sdpax.scaled_dot_product_attention` (see `attention_forward` for what maps to what).

The name is not "sdpax": transformers treats any implementation whose name contains "sdpa" as torch's SDPA and
refuses it for models that declare no SDPA support (Gemma 2, gpt-oss).
"""
from __future__ import annotations

import math

import torch
from transformers import AttentionInterface
from transformers.masking_utils import (
    AttentionMaskInterface,
    and_masks,
    bidirectional_mask_function,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
    sliding_window_overlay,
)
from transformers.utils import logging
from transformers.utils.import_utils import is_torchdynamo_exporting, is_tracing

from .._causal import CausalBiasBase
from ..attention.bias import CausalBias, CausalVariant, causal_lower_right, causal_upper_left
from ..functional import scaled_dot_product_attention
from ..varlen import varlen_attn

__all__ = ["ATTN_IMPLEMENTATION", "attention_forward", "build_mask"]

ATTN_IMPLEMENTATION = "sdp_ax"

logger = logging.get_logger(__name__)


def _values_unreadable(*tensors) -> bool:
    """Whether deciding from these tensors' values is ruled out now (compile, export, jit, CUDA graph capture)."""
    if is_torchdynamo_exporting() or is_tracing():
        return True
    return any(is_tracing(t) for t in tensors if isinstance(t, torch.Tensor))


def _all_real(padding, kv_offset: int, n: int) -> bool:
    """Whether keys [0, n) of this call are all real tokens (not padding)."""
    return padding is None or bool(padding[:, kv_offset:kv_offset + n].all())


_AND_CODE = and_masks(causal_mask_function).__code__
_SLIDING_CODE = sliding_window_overlay(1).__code__


def _closure(fn) -> dict:
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))


try:  # packed-sequence detection in the masks (transformers releases without it build no such masks)
    from transformers.masking_utils import packed_sequence_mask_function, remap_positions_for_packed_sequence
    _PACKED_CODE = packed_sequence_mask_function(None).__code__
    _REMAP_CODE = remap_positions_for_packed_sequence(causal_mask_function, None).__code__
except ImportError:
    _PACKED_CODE = _REMAP_CODE = None


def _parts(mask_function) -> tuple:
    """The two functions of an `and_masks(f, g)`, else ()."""
    if getattr(mask_function, "__code__", None) is not _AND_CODE:
        return ()
    parts = _closure(mask_function).get("mask_functions", ())
    return parts if len(parts) == 2 else ()


def _packing_of(mask_function):
    """(sequence ids (B, T), left window or -1) if mask_function is transformers' causal (or causal sliding-window)
    attention within packed sequences: `and_masks(remap_positions_for_packed_sequence(f, positions),
    packed_sequence_mask_function(ids))` with f causal or a causal sliding window; else None. Within one packed
    sequence the positions rise by one per token, so the remapped f is f on token indices."""
    parts = _parts(mask_function)
    codes = [getattr(f, "__code__", None) for f in parts]
    if _PACKED_CODE is None or _PACKED_CODE not in codes or _REMAP_CODE not in codes:
        return None
    ids = _closure(parts[codes.index(_PACKED_CODE)])["packed_sequence_mask"]
    inner = _closure(parts[codes.index(_REMAP_CODE)])["mask_function"]
    if inner is causal_mask_function:
        return ids, -1
    window = _sliding_window_of(inner)
    return (ids, window - 1) if window is not None else None


class PackedSequences(torch.Tensor):
    """The mask `build_mask` returns for packed sequences (several sequences in one row, positions restarting):
    the offsets of every sequence of the batch, flattened over (B, T) tokens, and the causal window (-1: none). A
    4-D (B, 1, T, T) shell on the meta device, so transformers passes it on as a prepared mask; it holds no data.
    `attention_forward` runs it as one packed call (sdpax.varlen_attn)."""

    @staticmethod
    def __new__(cls, cu_seqlens: torch.Tensor, max_len: int, batch: int, length: int, window_left: int):
        self = torch.Tensor._make_subclass(cls, torch.empty((batch, 1, length, length), dtype=torch.bool,
                                                            device="meta"))
        self.cu_seqlens, self.max_len, self.window_left = cu_seqlens, max_len, window_left
        return self

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.contiguous:
            return args[0]  # a described pattern has no memory layout (generate() asks for one)
        return super().__torch_function__(func, types, args, kwargs or {})


def _packed_sequences(ids: torch.Tensor, window_left: int) -> PackedSequences:
    """The offsets of the sequences in rows of sequence ids (B, T), over the flattened B * T tokens."""
    B, T = ids.shape
    flat = (ids + torch.arange(B, device=ids.device).unsqueeze(1) * (int(ids.max()) + 1)).reshape(-1)
    starts = (flat[1:] != flat[:-1]).nonzero().squeeze(1) + 1
    bounds = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), B * T)])
    return PackedSequences(bounds.to(torch.int32), int(bounds.diff().max()), B, T, window_left)


def _sliding_window_of(mask_function) -> int | None:
    """W if mask_function is transformers' causal sliding window of W keys (key j visible from query i when
    i - W < j <= i: `and_masks(sliding_window_overlay(W), causal_mask_function)`), else None. Read from the
    function's code and closure, never by evaluating it; anything else (chunked attention, overlays) is None."""
    parts = _parts(mask_function)
    if causal_mask_function not in parts:
        return None
    overlay = parts[0] if parts[1] is causal_mask_function else parts[1]
    if getattr(overlay, "__code__", None) is not _SLIDING_CODE:
        return None
    window = _closure(overlay).get("sliding_window")
    return window if isinstance(window, int) and window > 0 else None


def build_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
               attention_mask=None, local_size=None, allow_is_causal_skip=True, allow_is_bidirectional_skip=False,
               **kwargs):
    """The mask of one forward, in the form `attention_forward` reads (transformers' mask-interface signature).

    None means: no pattern beyond the layer's own causality, with the causal triangle aligned bottom-right (query i
    sees keys j <= i + S - L, what a KV cache needs; the same as upper-left when L == S). transformers' "sdpa" mask
    uses None differently (upper-left when S > L), so its skips are never taken here: a mask is either recognised
    below or materialised in full by `sdpa_mask` with every skip disabled.

    transformers sets `allow_is_causal_skip` / `allow_is_bidirectional_skip` only when the mask function is its
    plain causal / bidirectional one (or the sliding / chunked variant, which comes with `local_size`): overlays,
    packed sequences and block masks turn them off. A causal sliding window over real keys (the mask function's
    structure says so) is returned as a windowed CausalBias; a chunk can only be ignored while the keys are fewer
    than the chunk (transformers' own rule), past that it is materialised.
    """
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    packing = _packing_of(mask_function)
    if (packing is not None and q_offset == kv_offset == 0 and q_length == kv_length
            and not _values_unreadable(padding, packing[0]) and _all_real(padding, 0, kv_length)):
        return _packed_sequences(*packing)  # padding-free training: one packed call, no block-diagonal mask
    window = _sliding_window_of(mask_function) if allow_is_causal_skip and local_size is not None else None
    if window is not None and window == local_size and not _values_unreadable(padding, q_offset):
        # A causal sliding window over real keys: a windowed CausalBias, so the fused kernels skip the key tiles
        # outside the window instead of reading an L x S mask.
        # Four-dimensional, so that transformers passes it on as a prepared mask (generate() hands the masks it
        # built back to the model, which would read a 2-D one as padding).
        d = int(q_offset) - int(kv_offset)
        if d == kv_length - q_length and _all_real(padding, kv_offset, kv_length):
            return CausalBias(CausalVariant.LOWER_RIGHT, q_length, kv_length, window - 1, lead_dims=2)
        if d == 0 and q_length < kv_length and _all_real(padding, kv_offset, q_length):
            return CausalBias(CausalVariant.UPPER_LEFT, q_length, kv_length, window - 1, lead_dims=2)
    plain_function = local_size is not None or mask_function in (causal_mask_function, bidirectional_mask_function)
    window_applies = local_size is not None and kv_length >= local_size
    readable = plain_function and not window_applies and not _values_unreadable(padding, q_offset)
    if readable and allow_is_causal_skip:
        d = int(q_offset) - int(kv_offset)  # query i sees keys j <= i + d
        if d == kv_length - q_length and _all_real(padding, kv_offset, kv_length):
            return None
        if d == 0 and q_length < kv_length and _all_real(padding, kv_offset, q_length):
            # Static-cache prefill: upper-left, the cache's empty slots lying past the queries. One (1, 1, L, S)
            # mask for the batch (generate() makes the mask contiguous, so a mark on it would not survive).
            return causal_upper_left(q_length, kv_length)._materialize(kwargs.get("device"))[None, None]
    elif readable and allow_is_bidirectional_skip:
        if _all_real(padding, kv_offset, kv_length):
            return None
        return padding[:, kv_offset:kv_offset + kv_length][:, None, None, :]
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     local_size=local_size, allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs)


def _causal_mask(L: int, S: int):
    """The bottom-right causal triangle as sdpax's arguments: (attn_mask, is_causal)."""
    if L == 1 and S >= 1:
        return None, False  # the one query is the last position: it sees every key
    if L == S:
        return None, True
    return causal_lower_right(L, S), False


def _with_position_bias(bias, mask, is_causal: bool, query):
    """An additive mask: the position bias (T5-style models) where the mask allows, -inf elsewhere."""
    if is_causal:  # L == S
        mask = causal_upper_left(query.shape[-2], query.shape[-2])
    if isinstance(mask, CausalBiasBase):
        mask = mask._materialize(query.device)
    if mask is None:
        out = bias
    elif mask.dtype == torch.bool:
        out = torch.where(mask, bias, -math.inf)
    else:
        out = bias + mask
    return out if out.dtype in (torch.float32, query.dtype) else out.to(query.dtype)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      sliding_window=None, softcap=None, s_aux=None, position_bias=None, **kwargs):
    """One attention layer on sdpax: query (B, Hq, L, E), key/value (B, H, S, E/Ev) -> ((B, L, Hq, Ev), None).

    - GQA/MQA: `enable_gqa=True` when Hq != H (K/V are not repeated).
    - `scaling` -> `scale`; `dropout` -> `dropout_p` (the models pass 0 outside training).
    - `s_aux` (gpt-oss' attention sinks, one logit per query head joining each row's softmax denominator, not
      scaled) -> `sinks`.
    - The mask from `build_mask`: None in a causal layer -> `is_causal=True` when L == S, the fused bottom-right
      triangle `causal_lower_right(L, S)` when a KV cache makes L < S, nothing for a single query; None in a
      bidirectional layer -> nothing; a mask (padding, sliding window, packed sequences; bool or additive) ->
      `attn_mask` as it is.
    - `position_bias` (T5-style relative bias) -> an additive mask, the mask's pattern as -inf (bias gradient kept).
    - Packed sequences (`build_mask`'s PackedSequences: several sequences per row, positions restarting) -> one
      `sdpax.varlen_attn` call over the batch's B * T tokens, causal (and windowed) within each sequence.
    - `sliding_window`: the causal sliding windows that `build_mask` recognises arrive as windowed CausalBias
      objects (fused, tiles outside the window skipped); a window with padding is the bool mask transformers
      builds; a layer called with no mask and more keys than its window gets the windowed bias here.
    - `softcap` (Gemma 2's logit softcapping, applied to the scaled scores before the mask) -> `softcap`.
    """
    if kwargs.get("output_attentions", False):
        logger.warning_once(f"{ATTN_IMPLEMENTATION!r} attention (sdpax) does not return attention weights "
                            "(output_attentions=True); use attn_implementation=\"eager\" for them.")
    if isinstance(attention_mask, PackedSequences):
        return _packed_attention(query, key, value, attention_mask, dropout, scaling, softcap, s_aux), None
    L, S = query.shape[-2], key.shape[-2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    mask, use_causal = attention_mask, False
    if mask is None:
        if causal and sliding_window is not None and S > sliding_window:
            # transformers' window of W keys: i - W < j <= i
            mask = CausalBias(CausalVariant.LOWER_RIGHT, L, S, sliding_window - 1)
        elif causal:
            mask, use_causal = _causal_mask(L, S)
    elif mask.dtype != torch.bool and mask.dtype not in (torch.float32, query.dtype):
        mask = mask.to(query.dtype)  # sdpax takes additive masks in float32 or the query's dtype
    if position_bias is not None:
        mask, use_causal = _with_position_bias(position_bias, mask, use_causal, query), False
    out = scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=use_causal,
                                       scale=scaling, enable_gqa=query.shape[-3] != key.shape[-3], sinks=s_aux,
                                       softcap=softcap)
    return out.transpose(1, 2).contiguous(), None


def _packed_attention(query, key, value, packed: PackedSequences, dropout, scaling, softcap, sinks):
    """(B, H, T, D) rows of packed sequences as one varlen call over the B * T tokens -> (B, T, Hq, Ev)."""
    B, Hq, T, _ = query.shape
    q, k, v = (t.transpose(1, 2).reshape(B * T, t.shape[1], t.shape[3]) for t in (query, key, value))
    cu, n = packed.cu_seqlens.to(query.device), packed.max_len
    window = (packed.window_left, 0) if packed.window_left >= 0 else (-1, -1)
    out = varlen_attn(q, k, v, cu, cu, n, n, scale=scaling, is_causal=True, window_size=window,
                      enable_gqa=Hq != key.shape[1], sinks=sinks, dropout_p=dropout, softcap=softcap)
    return out.reshape(B, T, Hq, value.shape[-1])


AttentionInterface.register(ATTN_IMPLEMENTATION, attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, build_mask)
