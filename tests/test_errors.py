"""Bad input gets a clear error naming the problem."""
import pytest
import torch

import sdpax
from sdpax.attention.bias import causal_upper_left

sdpa = sdpax.scaled_dot_product_attention


def qkv(q=(2, 4, 8, 16), k=(2, 4, 10, 16), v=None, dtype=torch.float32, device="cpu"):
    v = v or (*k[:-1], k[-1])
    return (torch.randn(q, dtype=dtype, device=device), torch.randn(k, dtype=dtype, device=device),
            torch.randn(v, dtype=dtype, device=device))


CASES = [
    ("rank1", lambda: sdpa(torch.randn(4), torch.randn(4), torch.randn(4)), RuntimeError, "at least 2 dimensional"),
    ("dtype_mismatch", lambda: sdpa(*qkv()[:2], qkv()[2].double()), RuntimeError, "same dtype"),
    ("integer_inputs", lambda: sdpa(*(t.long() for t in qkv())), RuntimeError, "floating point"),
    ("batch_mismatch", lambda: sdpa(*qkv(q=(3, 4, 8, 16))), RuntimeError, "batch dimensions"),
    ("rank_mismatch", lambda: sdpa(*qkv(q=(4, 8, 16))), RuntimeError, "same rank"),
    ("head_dim_mismatch", lambda: sdpa(*qkv(q=(2, 4, 8, 32))), RuntimeError, "head dimension"),
    ("kv_length_mismatch", lambda: sdpa(*qkv(v=(2, 4, 9, 16))), RuntimeError, "sequence length"),
    ("heads_without_gqa", lambda: sdpa(*qkv(k=(2, 2, 10, 16))), RuntimeError, "enable_gqa"),
    ("heads_not_divisible", lambda: sdpa(*qkv(k=(2, 3, 10, 16)), enable_gqa=True), RuntimeError, "divisible"),
    ("kv_heads_differ", lambda: sdpa(*qkv(k=(2, 2, 10, 16), v=(2, 4, 10, 16)), enable_gqa=True), RuntimeError,
     "key and value must have the same number of heads"),
    ("mask_not_broadcastable", lambda: sdpa(*qkv(), attn_mask=torch.ones(8, 9, dtype=torch.bool)), RuntimeError,
     "not broadcastable"),
    ("mask_too_many_dims", lambda: sdpa(*qkv(), attn_mask=torch.ones(1, 2, 4, 8, 10, dtype=torch.bool)),
     RuntimeError, "not broadcastable"),
    ("mask_bad_dtype", lambda: sdpa(*qkv(), attn_mask=torch.ones(8, 10, dtype=torch.int32)), RuntimeError,
     "attn_mask dtype"),
    ("mask_with_is_causal", lambda: sdpa(*qkv(), attn_mask=torch.ones(8, 10, dtype=torch.bool), is_causal=True),
     ValueError, "cannot be combined"),
    ("bias_with_is_causal", lambda: sdpa(*qkv(), attn_mask=causal_upper_left(8, 10), is_causal=True), ValueError,
     "not both"),
    ("bias_wrong_lengths", lambda: sdpa(*qkv(), attn_mask=causal_upper_left(8, 11)), ValueError, "CausalBias is for"),
    ("dropout_negative", lambda: sdpa(*qkv(), dropout_p=-0.1), ValueError, "dropout_p"),
    ("dropout_above_one", lambda: sdpa(*qkv(), dropout_p=1.5), ValueError, "dropout_p"),
    ("sinks_wrong_shape", lambda: sdpa(*qkv(), sinks=torch.zeros(3)), RuntimeError, "sinks must have shape"),
    ("sinks_2d", lambda: sdpa(*qkv(), sinks=torch.zeros(1, 4)), RuntimeError, "sinks must have shape"),
    ("sinks_not_tensor", lambda: sdpa(*qkv(), sinks=[0.0] * 4), TypeError, "sinks must be a torch.Tensor"),
    ("unknown_backend", lambda: sdpax.sdpa_kernel("FAST").__enter__(), ValueError, "no backend"),
    ("mask_wrong_device", lambda: sdpa(*qkv(), attn_mask=torch.ones(8, 10, dtype=torch.bool, device="meta")),
     RuntimeError, "device"),
    ("sinks_wrong_device", lambda: sdpa(*qkv(), sinks=torch.zeros(4, device="meta")), RuntimeError, "device"),
    ("device_mismatch", lambda: sdpa(*qkv()[:2], qkv()[2].to("meta")), RuntimeError, "same device"),
]


@pytest.mark.parametrize("name,fn,exc,match", CASES, ids=[c[0] for c in CASES])
def test_error(name, fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_raw_op_checks_too():
    """Direct callers of torch.ops.sdpax.fwd get the same checks from C++."""
    q, k, v = qkv(k=(2, 2, 10, 16))
    with pytest.raises(RuntimeError, match="enable_gqa"):
        torch.ops.sdpax.fwd(q, k, v, None, 0.0, 0, 1.0, False, None, None, 0)
    with pytest.raises(RuntimeError, match="needs rng"):
        torch.ops.sdpax.fwd(q, k, v, None, 0.5, 0, 1.0, True, None, None, 0)
    with pytest.raises(RuntimeError, match="unknown backend"):
        torch.ops.sdpax.fwd(q, k, v, None, 0.0, 0, 1.0, True, None, None, 7)
    with pytest.raises(RuntimeError, match="cannot be combined"):
        torch.ops.sdpax.fwd(q, k, v, torch.ones(8, 10, dtype=torch.bool), 0.0, 1, 1.0, True, None, None, 0)


def test_no_backend_can_run_lists_reasons():
    q, k, v = qkv(dtype=torch.float64)
    with sdpax.sdpa_kernel(sdpax.SDPBackend.FLASH_ATTENTION), pytest.raises(RuntimeError) as e:
        sdpa(q, k, v)
    msg = str(e.value)
    assert "no enabled backend" in msg and "FLASH_ATTENTION" in msg and "MATH (disabled by sdpa_kernel)" in msg
