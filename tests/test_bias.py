"""CausalBias: construction, materialisation, routing of sdpax's and torch's function, torch's own objects."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import bias as torch_bias

import sdpax
from helpers import DEVICES, causal_allowed, err, reference
from sdpax.attention.bias import CausalBias, CausalVariant, causal_lower_right, causal_upper_left


@pytest.mark.parametrize("L,S", [(4, 7), (7, 4), (5, 5)])
def test_materialize(L, S):
    assert torch.equal(causal_upper_left(L, S)._materialize(), causal_allowed(L, S, 1))
    assert torch.equal(causal_lower_right(L, S)._materialize(), causal_allowed(L, S, 2))
    b = causal_lower_right((L, S))
    assert isinstance(b, torch.Tensor) and b.variant == CausalVariant.LOWER_RIGHT
    assert (b.seq_len_q, b.seq_len_kv) == (L, S)
    assert "LOWER_RIGHT" in repr(b)


def test_huge_bias_costs_nothing():
    b = causal_lower_right(1 << 20, 1 << 20)  # a materialised mask would be 1 TiB
    assert b.device.type == "meta" and b.shape == (1 << 20, 1 << 20)


def test_bad_variant():
    with pytest.raises(ValueError):
        CausalBias(7, 3, 3)
    with pytest.raises(ValueError):
        causal_upper_left(3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", [1, 2])
def test_routes_both_functions_and_torch_objects(device, variant):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 8, device=device, dtype=torch.float64) for _ in range(3))
    k, v = torch.randn(2, 3, 9, 8, device=device, dtype=torch.float64), torch.randn(2, 3, 9, 4, device=device,
                                                                                    dtype=torch.float64)
    ours = CausalBias(CausalVariant(variant), 6, 9)
    theirs = torch_bias.CausalBias(torch_bias.CausalVariant(variant), 6, 9)
    ref = reference(q, k, v, causal=variant)
    assert err(sdpax.scaled_dot_product_attention(q, k, v, ours), ref) < 1e-12
    assert err(sdpax.scaled_dot_product_attention(q, k, v, attn_mask=theirs), ref) < 1e-12
    # torch's function with sdpax's bias runs sdpax, GQA included
    assert err(F.scaled_dot_product_attention(q, k, v, ours), ref) < 1e-12
    kg, vg = k[:, :1], v[:, :1]
    out = F.scaled_dot_product_attention(q, kg, vg, attn_mask=ours, enable_gqa=True)
    assert err(out, reference(q, kg, vg, causal=variant)) < 1e-12
    sinks = torch.randn(3, device=device, dtype=torch.float64)
    out = sdpax.scaled_dot_product_attention(q, k, v, attn_mask=ours, sinks=sinks)
    assert err(out, reference(q, k, v, causal=variant, sinks=sinks)) < 1e-12
