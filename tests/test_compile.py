"""opcheck on every op and device, torch.compile (fullgraph, dynamic, backward), torch.export."""
import pytest
import torch

import sdpax
from helpers import DEVICES, backends_for, err
from sdpax import SDPBackend, sdpa_kernel
from sdpax.attention.bias import causal_lower_right


def _inputs(device, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 16, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
    k = torch.randn(2, 2, 9, 16, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
    v = torch.randn(2, 2, 9, 8, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
    return q, k, v


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_all_ops(device, dtype):
    q, k, v = _inputs(device, dtype, grad=True)
    mask = torch.randn(4, 7, 9, device=device, dtype=dtype, requires_grad=True)
    sinks = torch.randn(4, device=device, requires_grad=True)
    rng = torch.tensor([123, 456], device=device)
    for backend in backends_for(device, dtype):
        b = int(backend)
        for args in [(q, k, v, None, 0.0, 1, 0.25, True, None, None, b),
                     (q, k, v, None, 0.0, 2, 0.25, True, sinks, None, b),
                     (q, k, v, mask.detach() > 0, 0.2, 0, 0.25, True, sinks, rng, b),
                     (q, k, v, mask if backend == SDPBackend.MATH else mask.detach(), 0.0, 0, 0.25, True, None, None,
                      b)]:
            torch.library.opcheck(torch.ops.sdpax.fwd.default, args)
        out, lse = torch.ops.sdpax.fwd(q, k, v, mask.detach(), 0.2, 0, 0.25, True, sinks, rng, b)
        torch.library.opcheck(torch.ops.sdpax.bwd.default,
                              (torch.randn_like(out), q.detach(), k.detach(), v.detach(), mask.detach(),
                               out.detach(), lse, 0.2, 0, 0.25, True, sinks.detach(), rng, b,
                               backend == SDPBackend.MATH))
    torch.library.opcheck(torch.ops.sdpax.dropout_keep_mask.default, (rng, 3, 5, 7, 0.3))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_dynamic_with_backward(device):
    torch._dynamo.reset()
    q, k, v = _inputs(device, grad=True)
    bias = causal_lower_right(7, 9)
    sinks = torch.randn(4, device=device, requires_grad=True)

    def f(q, k, v, bias, sinks):
        a = sdpax.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True, sinks=sinks)
        with sdpa_kernel(SDPBackend.MATH):
            b = sdpax.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        c = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=causal_lower_right(q.shape[-2], k.shape[-2]), enable_gqa=True)
        d = sdpax.scaled_dot_product_attention(q, k, v, dropout_p=0.2, enable_gqa=True)
        return a + b + c, d

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    (x, d), (y, _) = compiled(q, k, v, bias, sinks), f(q, k, v, bias, sinks)
    assert err(x, y) < 1e-5
    grads = torch.autograd.grad((x.sum() + d.sum()), (q, k, v, sinks))
    ref = torch.autograd.grad(y.sum(), (q, k, v, sinks))
    assert all(torch.isfinite(g).all() for g in grads)
    # dropout's gradient differs per draw; without it the compiled and eager gradients agree
    grads2 = torch.autograd.grad(compiled(q, k, v, bias, sinks)[0].sum(), (q, k, v, sinks))
    assert all(err(a, b) < 1e-4 for a, b in zip(grads2, ref))
    # a second shape reuses the dynamic graph
    q2, k2, v2 = (t.detach()[:, :, :5] for t in (q, k, v))
    x2, _ = compiled(q2, k2, v2, causal_lower_right(5, 5), sinks)
    assert err(x2, f(q2, k2, v2, causal_lower_right(5, 5), sinks)[0]) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_export(device):
    class Attn(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return sdpax.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=0.3)

    q, k, v = _inputs(device)
    mask = torch.rand(2, 1, 1, 9, device=device) > 0.3
    ep = torch.export.export(Attn(), (q, k, v, mask))
    assert any("sdpax.fwd" in str(n.target) for n in ep.graph.nodes)
    assert err(ep.module()(q, k, v, mask), Attn()(q, k, v, mask)) == 0
