"""sdpax.functional.scaled_dot_product_attention: torch's signature and semantics, on sdpax's backends."""
from __future__ import annotations

import torch

from . import _causal, _nested, _ops, _plan, _select
from ._args import _call_key, _draw_rng, _softcap, causal_window, default_scale
from ._errors import AttentionError

__all__ = ["scaled_dot_product_attention"]

_UPPER_LEFT, _LOWER_RIGHT = _causal.UPPER_LEFT, _causal.LOWER_RIGHT
_is_causal_bias = _causal.is_causal_bias


def _bias_of(attn_mask, L: int, S: int) -> tuple[int, int] | None:
    """(causal variant, window left size or -1) of a CausalBias (sdpax's or torch's), or None if attn_mask is
    not one."""
    if attn_mask is None or not _is_causal_bias(attn_mask):
        return None
    if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (L, S):
        raise AttentionError(f"sdpax: CausalBias is for (L, S) = ({attn_mask.seq_len_q}, "
                             f"{attn_mask.seq_len_kv}) but the inputs have (L, S) = ({L}, {S})")
    variant = int(attn_mask.variant)
    if variant not in (_UPPER_LEFT, _LOWER_RIGHT):
        raise AttentionError(f"sdpax: unknown CausalBias variant {attn_mask.variant!r}")
    return variant, getattr(attn_mask, "window_left", -1)


def _check(query, key, value, attn_mask, dropout_p, sinks):
    """User-facing checks the C++ op repeats for direct callers; here they raise before any tracing."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"sdpax: {name} must be a torch.Tensor, got {type(t).__name__}")
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise RuntimeError("Expected query, key, and value to all be  at least 2 dimensional, but got query.dim: "
                           f"{query.dim()} key.dim: {key.dim()} and value.dim: {value.dim()} instead.")
    if not query.is_floating_point() or not key.is_floating_point() or not value.is_floating_point():
        raise RuntimeError("sdpax: query, key and value must be floating point (float64, float32, bfloat16, "
                           f"float16), got {query.dtype}, {key.dtype}, {value.dtype}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise AttentionError(f"sdpax: dropout_p must be a number in [0, 1], got {dropout_p!r}")
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"sdpax: attn_mask must be a torch.Tensor or a CausalBias, got {type(attn_mask).__name__}")
    if sinks is not None and not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sdpax: sinks must be a torch.Tensor of shape (Hq,), got {type(sinks).__name__}")
    # Checked here as well as in C++: with a meta tensor among the inputs the dispatcher would pick the fake kernel.
    if key.device != query.device or value.device != query.device:
        raise RuntimeError(f"sdpax: query, key and value must be on the same device, got {query.device}, "
                           f"{key.device} and {value.device}")
    for name, t in (("attn_mask", attn_mask), ("sinks", sinks)):
        if t is not None and not _is_causal_bias(t) and t.device != query.device:
            raise RuntimeError(f"sdpax: {name} must be on the query's device {query.device}, got {t.device}")


def _call_features(query, value, attn_mask, key=None, sinks=None, scale=None, softcap=0.0,
                   window=(-1, -1)) -> _select.Call:
    return _select.Call(*_call_key(query, value, attn_mask, key, sinks, scale, softcap, window))


def _prepare(query, key, value, attn_mask, dropout_p, is_causal, scale, sinks, window_size=None):
    """Validate and turn the public arguments into (mask, causal id, scale, (window_left, window_right))."""
    _check(query, key, value, attn_mask, dropout_p, sinks)
    L, S = query.shape[-2], key.shape[-2]
    bias = _bias_of(attn_mask, L, S)
    if bias is None and is_causal and attn_mask is not None:
        raise AttentionError("sdpax: attn_mask and is_causal=True cannot be combined (torch's documentation "
                             "makes this an error); fold the causal pattern into the mask or drop one")
    causal, window = causal_window(bias, is_causal, window_size)
    if bias is not None:
        attn_mask = None
    return attn_mask, causal, default_scale(query, scale), window


def _nested_inputs(query, key, value) -> bool:
    """Whether any input is a nested tensor (unrolled: this runs on every call)."""
    return ((isinstance(query, torch.Tensor) and query.is_nested) or (isinstance(key, torch.Tensor) and key.is_nested)
            or (isinstance(value, torch.Tensor) and value.is_nested))


_Tensor = torch.Tensor
_compiling = torch.compiler.is_compiling
_below_autograd = torch._C._AutoDispatchBelowAutograd
_grad_enabled = torch.is_grad_enabled
_deterministic = torch.are_deterministic_algorithms_enabled
_fwd_op = getattr(_ops.fwd, "_op", _ops.fwd)  # the overload's C++ callable: one Python frame less per call
# The common call's (op backend id, scale) per (device, dtype, head dims, scale argument, gradient state, enabled
# backends, CUDA main loops): everything the general path's selection and default scale depend on for such a call.
_PLAIN_CACHE: dict = {}


def _plain_call(query, key, value, is_causal, scale, enable_gqa):
    """The common eager call (dense tensors of one device; no mask, dropout, sinks, softcap or window) in the fewest
    Python steps: the same selection, scale and op arguments as the general path below (computed by it once per
    kind of call and cached), whose checks the op repeats with the same messages. None when the call is not that
    one; the general path then runs."""
    if query.is_nested or key.is_nested or value.is_nested or _compiling():
        return None
    device = query.device
    if (key.device != device or value.device != device or query.dim() < 2 or value.dim() < 2
            or (scale is not None and scale.__class__ is not float)):
        return None  # the general path names the problem (or converts the scale)
    grad = _grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    state = _select._state
    ck = (device, query.dtype, query.shape[-1], value.shape[-1], scale, grad, grad and _deterministic(),
          state.stack[-1] if state.stack else None, state.loop_bits)
    hit = _PLAIN_CACHE.get(ck)
    if hit is None:
        op_scale = default_scale(query, scale)
        backend = _select.select_cached(_call_key(query, value, None, key, None, op_scale))  # raises if none can run
        hit = _select.remember(_PLAIN_CACHE, ck, (int(backend) | state.loop_bits, op_scale))
    args = (query, key, value, None, 0.0, _UPPER_LEFT if is_causal else 0, hit[1], bool(enable_gqa), None, None,
            hit[0])  # softcap and window: the schema's defaults
    return _run_fwd(args, grad)


def _run_fwd(args, needs_grad: bool):
    """The op's output for these arguments. No gradient can be taken (needs_grad False, eager): below autograd,
    skipping the Python autograd wrapper (torch.library's register_autograd), which would only redispatch below
    autograd itself; on short calls (decode) it costs as much as a small kernel. Compiled code takes the first
    branch (torch.compile traces the overload, not its C++ callable)."""
    if needs_grad:
        return _ops.fwd(*args)[0]
    with _below_autograd():
        return _fwd_op(*args)[0]


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
                                 enable_gqa=False, sinks=None, softcap=None, window_size=None):
    """softmax(q @ k^T * scale + bias) @ v, with torch.nn.functional.scaled_dot_product_attention's API.

    Extra: ``sinks`` (shape ``(Hq,)``, not scaled) adds exp(sinks[h]) to each row's softmax denominator.
    ``softcap`` (a number > 0; Gemma 2's logit softcapping) maps each scaled score s to softcap * tanh(s / softcap)
    before the mask and the causal limit apply.
    ``window_size=(left, right)`` (sliding window; -1: unbounded on that side): query i sees key j only if
    d - left <= j <= d + right, d = i + S - L its diagonal key (FlashAttention's lower-right alignment). With
    ``is_causal`` or a CausalBias the window takes the causal alignment and the causal edge is its right edge
    (right 0 or -1). It combines with ``attn_mask``.
    A row with no allowed key yields zeros (never NaN). See the README for the full semantics.
    """
    if (attn_mask is None and sinks is None and softcap is None and window_size is None and type(query) is _Tensor
            and type(key) is _Tensor and type(value) is _Tensor and dropout_p.__class__ is float and dropout_p == 0.0):
        out = _plain_call(query, key, value, is_causal, scale, enable_gqa)
        if out is not None:
            return out
    if _nested_inputs(query, key, value):
        return _nested.nested_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, sinks,
                                        softcap, window_size)
    mask, causal, scale, window = _prepare(query, key, value, attn_mask, dropout_p, is_causal, scale, sinks,
                                           window_size)
    cap = _softcap(softcap)
    fields = _call_key(query, value, mask, key, sinks, scale, cap, window)
    compiling = torch.compiler.is_compiling()
    backend = _select.select(_select.Call(*fields)) if compiling else _select.select_cached(fields)
    rng = _draw_rng(query.device) if dropout_p > 0.0 else None
    # The backend id carries the CUDA main loops of sdpax.cuda_main_loop (bits 4-8): the backward reads them too.
    args = (query, key, value, mask, float(dropout_p), causal, scale, bool(enable_gqa), sinks, rng,
            int(backend) | _select.loop_bits(), cap, *window)
    return _run_fwd(args, fields[5] or compiling)  # fields[5]: Call.needs_grad


def explain(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False,
            sinks=None, softcap=None, window_size=None) -> _select.Explanation:
    """Which backend scaled_dot_product_attention would use for these arguments, and why each other would not."""
    if _nested_inputs(query, key, value):
        fields = _nested.prepare(query, key, value, attn_mask, dropout_p, is_causal, scale, sinks, softcap,
                                 window_size)[-1]
        return _select.explain_call(_select.Call(*fields))
    mask, causal, scale, window = _prepare(query, key, value, attn_mask, dropout_p, is_causal, scale, sinks,
                                           window_size)
    call = _call_features(query, value, mask, key, sinks, scale, _softcap(softcap), window)
    ex = _select.explain_call(call)
    if ex.backend == _select.SDPBackend.FLASH_ATTENTION and query.device.type == "cuda":
        ex.plan = _plan.cuda_plan(query, key, value, mask, dropout_p, causal, enable_gqa,
                                  mask_grad=call.mask_requires_grad, deterministic=call.deterministic_grad,
                                  window=window, softcap=_softcap(softcap))
    return ex
