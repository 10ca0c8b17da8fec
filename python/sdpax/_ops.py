"""The torch.ops.sdpax operators: loading the extension, fake (meta) kernels and autograd.

The ops themselves are defined in csrc/ops.cpp; this file adds what the dispatcher needs for torch.compile,
torch.export and autograd, beside the op as torch.library recommends.
"""
import torch

from . import _C  # noqa: F401  (importing the extension runs its TORCH_LIBRARY registrations)
from . import _composite

fwd = torch.ops.sdpax.fwd.default
bwd = torch.ops.sdpax.bwd.default
varlen_fwd = torch.ops.sdpax.varlen_fwd.default
varlen_bwd = torch.ops.sdpax.varlen_bwd.default
dropout_keep_mask = torch.ops.sdpax.dropout_keep_mask.default
cuda_plan = torch.ops.sdpax.cuda_plan.default


def lse_dtype(query: torch.Tensor) -> torch.dtype:
    """The log-sum-exp is float32, or float64 for float64 inputs (so float64 gradients stay float64-exact)."""
    return torch.float64 if query.dtype == torch.float64 else torch.float32


@torch.library.register_fake("sdpax::fwd")
def _fwd_fake(query, key, value, attn_mask, dropout_p, causal, scale, enable_gqa, sinks, rng, backend, softcap=0.0,
              window_left=-1, window_right=-1):
    out = query.new_empty((*query.shape[:-1], value.shape[-1]))
    lse = query.new_empty(query.shape[:-1], dtype=lse_dtype(query))
    return out, lse


@torch.library.register_fake("sdpax::bwd")
def _bwd_fake(grad_out, query, key, value, attn_mask, out, lse, dropout_p, causal, scale, enable_gqa, sinks, rng,
              backend, mask_grad, softcap=0.0, window_left=-1, window_right=-1):
    grad_mask = (attn_mask.new_empty(attn_mask.shape)
                 if mask_grad and attn_mask is not None and attn_mask.dtype != torch.bool
                 else query.new_empty((0,)))
    grad_sinks = sinks.new_empty(sinks.shape) if sinks is not None else query.new_empty((0,))
    return (query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape), grad_mask,
            grad_sinks)


@torch.library.register_fake("sdpax::dropout_keep_mask")
def _keep_fake(rng, bh, L, S, dropout_p):
    return rng.new_empty((bh, L, S), dtype=torch.bool)


def _setup_context(ctx, inputs, output):
    query, key, value, attn_mask, dropout_p, causal, scale, enable_gqa, sinks, rng, backend, softcap, wl, wr = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(query, key, value, attn_mask, out, lse, sinks, rng)
    ctx.args = (dropout_p, causal, scale, enable_gqa, backend, softcap, (wl, wr))


def _backward(ctx, grad_out, _grad_lse):
    query, key, value, attn_mask, out, lse, sinks, rng = ctx.saved_tensors
    dropout_p, causal, scale, enable_gqa, backend, softcap, window = ctx.args
    mask_grad = bool(ctx.needs_input_grad[3])
    if _differentiated(grad_out, query, key, value, attn_mask, sinks):
        # create_graph=True: the gradient must be differentiable in the inputs, so it is computed from a
        # recomputed forward (out and lse as functions of q, k, v) rather than by the first-order kernels.
        re_out, re_lse = _composite.forward(query, key, value, attn_mask, dropout_p, causal, scale, sinks, rng,
                                            softcap, window)
        grads = _composite.gradients(grad_out, query, key, value, attn_mask, re_out, re_lse, dropout_p, causal,
                                     scale, sinks, rng, mask_grad, softcap, window)
    else:
        grads = bwd(grad_out, query, key, value, attn_mask, out, lse, dropout_p, causal, scale, enable_gqa, sinks,
                    rng, backend, mask_grad, softcap, *window)
    dq, dk, dv, dmask, dsinks = grads
    return (dq, dk, dv, dmask if mask_grad else None, None, None, None, None,
            dsinks if sinks is not None else None, None, None, None, None, None)


def _differentiated(*tensors) -> bool:
    """Whether autograd records what is computed from these (grad mode on and one of them requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


torch.library.register_autograd("sdpax::fwd", _backward, setup_context=_setup_context)


def _bwd_autograd(grad_out, query, key, value, attn_mask, out, lse, dropout_p, causal, scale, enable_gqa, sinks,
                  rng, backend, mask_grad, softcap=0.0, window_left=-1, window_right=-1):
    """sdpax::bwd at the Autograd key: differentiable through the composite when a gradient of the gradient is
    being recorded, the kernels of the chosen backend otherwise."""
    if _differentiated(grad_out, query, key, value, attn_mask, out, lse, sinks):
        return _composite.gradients(grad_out, query, key, value, attn_mask, out, lse, dropout_p, causal, scale,
                                    sinks, rng, mask_grad, softcap, (window_left, window_right))
    with torch._C._AutoDispatchBelowAutograd():
        return bwd(grad_out, query, key, value, attn_mask, out, lse, dropout_p, causal, scale, enable_gqa, sinks,
                   rng, backend, mask_grad, softcap, window_left, window_right)


_lib = torch.library.Library("sdpax", "IMPL")  # noqa: TOR901 (a Python kernel at the Autograd key)
_lib.impl("bwd", _bwd_autograd, "Autograd")


@torch.library.register_fake("sdpax::varlen_fwd")
def _varlen_fwd_fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, dropout_p, causal, scale, enable_gqa,
                     sinks, rng, backend, softcap=0.0, window_left=-1, window_right=-1, seqused_k=None,
                     block_table=None):
    out = query.new_empty((query.shape[0], query.shape[1], value.shape[-1]))
    lse = query.new_empty((query.shape[1], query.shape[0]), dtype=lse_dtype(query))
    return out, lse


@torch.library.register_fake("sdpax::varlen_bwd")
def _varlen_bwd_fake(grad_out, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, out, lse, dropout_p, causal,
                     scale, enable_gqa, sinks, rng, backend, softcap=0.0, window_left=-1, window_right=-1):
    grad_sinks = sinks.new_empty(sinks.shape) if sinks is not None else query.new_empty((0,))
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape), grad_sinks


def _varlen_setup_context(ctx, inputs, output):
    (query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, dropout_p, causal, scale, enable_gqa, sinks, rng, backend,
     softcap, window_left, window_right, seqused_k, block_table) = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.paged = seqused_k is not None or block_table is not None
    ctx.save_for_backward(query, key, value, cu_seq_q, cu_seq_k, out, lse, sinks, rng)
    ctx.args = (max_q, max_k, dropout_p, causal, scale, enable_gqa, backend, softcap, window_left, window_right)


def _varlen_backward(ctx, grad_out, _grad_lse):
    if ctx.paged:
        raise RuntimeError("sdpax: varlen attention with a block_table or seqused_k is forward only (a KV cache "
                           "being read); it has no backward")
    query, key, value, cu_seq_q, cu_seq_k, out, lse, sinks, rng = ctx.saved_tensors
    max_q, max_k, dropout_p, causal, scale, enable_gqa, backend, softcap, wl, wr = ctx.args
    if _differentiated(grad_out, query, key, value, sinks):
        # create_graph=True: the composite per sequence, from a recomputed forward (as the dense op's backward).
        dq, dk, dv, dsinks = _composite.varlen_gradients(grad_out, query, key, value, cu_seq_q, cu_seq_k,
                                                         dropout_p, causal, scale, sinks, rng, softcap, (wl, wr))
        return (dq, dk, dv) + (None,) * 8 + (dsinks,) + (None,) * 7
    dq, dk, dv, dsinks = varlen_bwd(grad_out, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, out, lse,
                                    dropout_p, causal, scale, enable_gqa, sinks, rng, backend, softcap, wl, wr)
    return (dq, dk, dv) + (None,) * 8 + (dsinks if sinks is not None else None,) + (None,) * 7


torch.library.register_autograd("sdpax::varlen_fwd", _varlen_backward, setup_context=_varlen_setup_context)
