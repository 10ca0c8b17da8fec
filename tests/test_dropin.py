"""torch's documented SDPA behaviours under sdpax.patch(), with the caller's function bound in each of the ways
code binds it:

- "attribute": `F.scaled_dot_product_attention(...)` looked up at call time (nn.MultiheadAttention, Hugging Face);
- "imported_before": `from torch.nn.functional import scaled_dot_product_attention` before patch() was entered
  (the name keeps torch's builtin; torch's and sdpax's CausalBias must still come out right);
- "imported_after": the same import made after patch() was entered (the name is sdpax's function).

Masks of every kind and broadcast, both CausalBias variants from torch and sdpax, GQA, scale, dropout statistics,
zero-size shapes, torch's sdpa_kernel inside the patch, higher-order gradients, errors and their classes. The
oracle and tolerance are the suite's: float64 reference, within a multiple of torch's own error in the same dtype.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend as TorchBackend
from torch.nn.attention import sdpa_kernel as torch_sdpa_kernel
from torch.nn.attention.bias import causal_lower_right as torch_lower_right
from torch.nn.attention.bias import causal_upper_left as torch_upper_left

import sdpax
import sdpax._select as select_mod
from helpers import (
    DEVICES,
    LOWER_RIGHT,
    UPPER_LEFT,
    assert_close_rel,
    err,
    grad_magnitude,
    reference,
    torch_errors,
)
from sdpax.attention.bias import causal_lower_right, causal_upper_left

BINDINGS = ["attribute", "imported_before", "imported_after"]


class Bound:
    """A patched session and the function as the caller holds it."""

    def __init__(self, binding: str):
        self.binding = binding
        before = F.scaled_dot_product_attention  # a caller that imported the name before the patch
        self.patch = sdpax.patch()
        after = F.scaled_dot_product_attention
        self.fn = {"attribute": lambda *a, **kw: F.scaled_dot_product_attention(*a, **kw),
                   "imported_before": before, "imported_after": after}[binding]
        self.runs_sdpax = binding != "imported_before"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.patch.close()


@pytest.fixture(params=BINDINGS)
def bound(request):
    with Bound(request.param) as b:
        yield b
    assert not sdpax.is_patched()


def _only_sdpax(bound):
    if not bound.runs_sdpax:
        pytest.skip("a plain call of torch's builtin (imported before the patch) is torch's own; "
                    "test_builtin_imported_before_is_untouched checks the patch leaves it alone")


def _qkv(shape_q, shape_k, ev, dtype, device, seed, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda s: torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_(requires_grad)
    return mk(shape_q), mk(shape_k), mk((*shape_k[:-1], ev))


MASKS = [("bool_LS", (7, 9), torch.bool), ("bool_B11S", (2, 1, 1, 9), torch.bool),
         ("bool_HLS", (4, 7, 9), torch.bool), ("float_full", (2, 4, 7, 9), torch.float32),
         ("float_1LS", (1, 7, 9), "dtype"), ("bool_rows_masked", (2, 4, 7, 9), torch.bool)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name,mshape,mdtype", MASKS, ids=[m[0] for m in MASKS])
def test_masks_every_kind_and_broadcast(bound, device, dtype, name, mshape, mdtype):
    _only_sdpax(bound)
    q, k, v = _qkv((2, 4, 7, 16), (2, 4, 9, 16), 16, dtype, device, seed=len(name))
    gen = torch.Generator().manual_seed(3)
    if mdtype == torch.bool:
        mask = torch.rand(mshape, generator=gen) > 0.3
        if name == "bool_rows_masked":
            mask[:, :, ::3] = False
    else:
        mask = torch.randn(mshape, generator=gen).to(dtype if mdtype == "dtype" else mdtype)
    mask = mask.to(device)
    out = bound.fn(q, k, v, attn_mask=mask)
    ref = reference(q, k, v, mask=mask)
    if name == "bool_rows_masked":
        assert (out[:, :, ::3] == 0).all()  # sdpax: a row with no allowed key is 0 on every torch version
    t_err, _ = torch_errors(q, k, v, mask=mask)
    assert_close_rel(out, ref.to(out.device), t_err, dtype, what=name)


CAUSAL_BIASES = [("torch_upper_left", torch_upper_left, UPPER_LEFT), ("torch_lower_right", torch_lower_right,
                                                                       LOWER_RIGHT),
                 ("sdpax_upper_left", causal_upper_left, UPPER_LEFT), ("sdpax_lower_right", causal_lower_right,
                                                                        LOWER_RIGHT)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("LS", [(4, 6), (6, 4), (5, 5)], ids=lambda ls: f"L{ls[0]}-S{ls[1]}")
@pytest.mark.parametrize("name,make,variant", CAUSAL_BIASES, ids=[c[0] for c in CAUSAL_BIASES])
def test_causal_bias_from_torch_and_sdpax(bound, device, LS, name, make, variant):
    """Any order of import and patching gives the right answer: the bias is never read as a plain tensor."""
    L, S = LS
    q, k, v = _qkv((2, 3, L, 8), (2, 3, S, 8), 8, torch.float32, device, seed=L * 10 + S, requires_grad=True)
    out = bound.fn(q, k, v, attn_mask=make(L, S))
    ok = ~torch.isnan(out)
    assert ok[..., max(0, L - S):, :].all()
    # out[ok].sum()'s gradient is that of out with an upstream gradient of 1 where ok, 0 elsewhere
    gout = ok.to(out.dtype)
    t_err, t_grads = torch_errors(q, k, v, causal=variant, gout=gout)
    rq = q.detach().double().requires_grad_()
    ref = reference(rq, k.detach().double(), v.detach().double(), causal=variant)
    assert_close_rel(out[ok], ref.detach()[ok], t_err, torch.float32, what=name)
    gq, = torch.autograd.grad(out[ok].sum(), q)
    rgq, = torch.autograd.grad(ref[ok].sum(), rq)
    assert_close_rel(gq, rgq, t_grads[0], torch.float32, what=f"{name} dq",
                     magnitude=grad_magnitude(gout, out.detach().nan_to_num()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_gqa_and_scale(bound, device, dtype):
    _only_sdpax(bound)
    q, k, v = _qkv((2, 8, 5, 24), (2, 2, 11, 24), 8, dtype, device, seed=4)
    for scale in (None, 0.05, 1.7):
        out = bound.fn(q, k, v, scale=scale, enable_gqa=True)
        ref = reference(q, k, v, scale=scale)
        t_err, _ = torch_errors(q, k, v, scale=scale, gqa=True)
        assert_close_rel(out, ref.to(out.device), t_err, dtype, what=f"scale {scale}")


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_statistics(bound, device):
    """With uniform attention (q = 0) and v = identity, out[i, j] is keep[i, j] / (S (1 - p)): the dropped fraction
    is p and the expectation is the undropped output."""
    _only_sdpax(bound)
    p, L, S = 0.3, 64, 128
    q = torch.zeros(4, 4, L, 8, device=device)
    k = torch.randn(4, 4, S, 8, device=device)
    v = torch.eye(S, device=device).expand(4, 4, S, S)
    torch.manual_seed(0)
    out = bound.fn(q, k, v, dropout_p=p)
    dropped = (out == 0).double().mean().item()
    n = out.numel()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)
    kept = out[out != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (S * (1 - p))), rtol=1e-5)
    assert abs(out.double().mean().item() - 1 / S) < 5 * math.sqrt(p / (1 - p) / n) / S
    assert (bound.fn(q, k, v, dropout_p=1.0) == 0).all()


ZERO_SIZE = [((2, 0, 10, 64), (2, 0, 10, 64), 64), ((0, 10, 64), (0, 10, 64), 64), ((0, 4, 10, 64), (0, 4, 10, 64), 64),
             ((2, 4, 0, 64), (2, 4, 10, 64), 64), ((2, 4, 10, 64), (2, 4, 0, 64), 64),
             ((1, 1, 33, 8), (1, 1, 0, 8), 8), ((2, 4, 10, 0), (2, 4, 12, 0), 64), ((2, 4, 10, 64), (2, 4, 12, 64), 0),
             ((3, 0), (5, 0), 0)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shapes", ZERO_SIZE, ids=lambda s: f"q{list(s[0])}-k{list(s[1])}-ev{s[2]}")
def test_zero_size_shapes_like_torch(bound, device, dtype, shapes):
    """Empty batch, heads, lengths and head dims give what torch gives (head dim 0: the mean of v), forward and
    backward, on every backend sdpax may choose (torch's MATH flag included)."""
    _only_sdpax(bound)
    qs, ks, ev = shapes
    for backends in (None, TorchBackend.MATH):
        q, k, v = _qkv(qs, ks, ev, dtype, device, seed=1, requires_grad=True)
        # The float64 definition, which gives torch's answers on these sizes: torch 2.11's own function crashes
        # (SIGFPE) with zero heads (seen on its CPU path).
        expected = reference(*(t.detach().double().cpu() for t in (q, k, v)))
        if backends is None:
            out = bound.fn(q, k, v)
        else:
            with torch_sdpa_kernel(backends):
                out = bound.fn(q, k, v)
        assert out.shape == expected.shape and out.dtype == dtype
        assert_close_rel(out, expected, 0.0, dtype, what="like torch in float64")
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        for g, t in zip(grads, (q, k, v)):
            assert g.shape == t.shape and torch.isfinite(g).all()


def _chosen(monkeypatch):
    """Records the enabled-backend tuple of every sdpax selection."""
    seen = []
    real = select_mod.select_cached
    monkeypatch.setattr(sdpax.functional, "_PLAIN_CACHE", _Uncached())  # every call reaches the selection

    def spy(fields):
        seen.append(select_mod.enabled())
        return real(fields)
    monkeypatch.setattr(select_mod, "select_cached", spy)
    return seen


class _Uncached(dict):
    def __setitem__(self, key, value):
        pass


MAPPINGS = [(TorchBackend.MATH, False, (sdpax.SDPBackend.MATH,)),
            (TorchBackend.FLASH_ATTENTION, False, (sdpax.SDPBackend.FLASH_ATTENTION,)),
            (TorchBackend.EFFICIENT_ATTENTION, False, (sdpax.SDPBackend.FLASH_ATTENTION,)),
            (TorchBackend.CUDNN_ATTENTION, False, (sdpax.SDPBackend.FLASH_ATTENTION,)),
            ([TorchBackend.MATH, TorchBackend.EFFICIENT_ATTENTION], True,
             (sdpax.SDPBackend.MATH, sdpax.SDPBackend.FLASH_ATTENTION))]


@pytest.mark.parametrize("torch_backends,priority,expected", MAPPINGS, ids=["math", "flash", "efficient", "cudnn",
                                                                            "math_then_efficient"])
def test_torch_sdpa_kernel_maps_onto_sdpax(monkeypatch, torch_backends, priority, expected):
    seen = _chosen(monkeypatch)
    q = torch.randn(1, 2, 4, 8)
    with sdpax.patch():
        with torch_sdpa_kernel(torch_backends, set_priority=priority):
            F.scaled_dot_product_attention(q, q, q)
        F.scaled_dot_product_attention(q, q, q)  # torch's flags are back: sdpax's default order
        # sdpax's own block is the explicit choice and wins
        with torch_sdpa_kernel(TorchBackend.FLASH_ATTENTION), sdpax.sdpa_kernel(sdpax.SDPBackend.MATH):
            F.scaled_dot_product_attention(q, q, q)
    assert seen == [expected, select_mod.DEFAULT_PRIORITY, (sdpax.SDPBackend.MATH,)]


def test_torch_sdpa_kernel_reasons_when_nothing_can_run():
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    nothing = "(?s)no enabled backend.*MATH \\(disabled by sdpa_kernel\\).*dtype float64 not supported"
    with sdpax.patch(), torch_sdpa_kernel(TorchBackend.FLASH_ATTENTION), pytest.raises(RuntimeError, match=nothing):
        F.scaled_dot_product_attention(q, q, q)
    with sdpax.patch(), torch_sdpa_kernel(TorchBackend.OVERRIDEABLE), pytest.raises(RuntimeError, match="none of"):
        F.scaled_dot_product_attention(q, q, q)


def test_torch_sdpa_kernel_inside_compiled_function():
    """Inside a compiled function torch's block is seen when the function is traced."""
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64)

    def f(q):
        with torch_sdpa_kernel(TorchBackend.MATH):
            return F.scaled_dot_product_attention(q, q, q, is_causal=True)
    with sdpax.patch():
        out = torch.compile(f, fullgraph=True, backend="eager")(q)
    assert err(out, reference(q, q, q, causal=UPPER_LEFT)) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_second_order_gradients(bound, device):
    """gradgradcheck through the patched function (float64), and a Hessian-vector product in float32 that
    matches float64."""
    if not bound.runs_sdpax:
        pytest.skip("torch's own builtin")
    q, k, v = _qkv((1, 4, 5, 6), (1, 2, 7, 6), 5, torch.float64, device, seed=7, requires_grad=True)
    mask = torch.randn(5, 7, dtype=torch.float64, device=device, requires_grad=True)
    sinks = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda q, k, v, m, s: bound.fn(q, k, v, attn_mask=m, enable_gqa=True,
                                                                       sinks=s), (q, k, v, mask, sinks))
    assert torch.autograd.gradgradcheck(lambda q, k, v: bound.fn(q, k, v, attn_mask=causal_lower_right(5, 7),
                                                                 enable_gqa=True, scale=0.4), (q, k, v))

    def hvp(dtype):
        a, b, c = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        out = bound.fn(a, b, c, enable_gqa=True, is_causal=True)
        g, = torch.autograd.grad(out.pow(2).sum(), a, create_graph=True)
        return torch.autograd.grad(g.sum(), (a, b, c))
    for h32, h64 in zip(hvp(torch.float32), hvp(torch.float64)):
        assert err(h32, h64) < 1e-4 * max(1.0, h64.abs().max().item())


def test_opcheck_bwd_with_public_api_inputs():
    """opcheck on sdpax.bwd with the tensors the public API hands it, requiring grad (double backward)."""
    q, k, v = _qkv((2, 4, 5, 8), (2, 2, 7, 8), 8, torch.float32, "cpu", seed=8, requires_grad=True)
    mask = torch.randn(5, 7, requires_grad=True)
    sinks = torch.randn(4, requires_grad=True)
    for backend in (0, 1):
        out, lse = torch.ops.sdpax.fwd(q.detach(), k.detach(), v.detach(), mask.detach(), 0.0, 0, 0.35, True,
                                       sinks.detach(), None, backend)
        torch.library.opcheck(torch.ops.sdpax.bwd.default, (torch.randn_like(out), q, k, v, mask, out, lse, 0.0, 0,
                                                            0.35, True, sinks, None, backend, backend == 0))


ERRORS = [
    ("mask_with_is_causal", lambda f, q: f(q, q, q, attn_mask=torch.ones(4, 4, dtype=torch.bool), is_causal=True)),
    ("dropout_above_one", lambda f, q: f(q, q, q, dropout_p=1.5)),
    ("mask_not_broadcastable", lambda f, q: f(q, q, q, attn_mask=torch.ones(3, 4, dtype=torch.bool))),
    ("heads_differ", lambda f, q: f(q, torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 8))),
    ("rank_one", lambda f, q: f(q[0, 0, 0], q[0, 0, 0], q[0, 0, 0])),
    ("bias_with_is_causal", lambda f, q: f(q, q, q, attn_mask=torch_lower_right(4, 4), is_causal=True)),
]


@pytest.mark.parametrize("name,call", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_are_runtime_errors(bound, name, call):
    """What torch raises as RuntimeError is catchable as RuntimeError (sdpax's AttentionError is also a
    ValueError)."""
    if not bound.runs_sdpax and name == "mask_with_is_causal":
        pytest.skip("torch's own builtin: on CPU it combines the two without an error")
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError):
        call(bound.fn, q)


def test_nested_tensors_strided_error_jagged_runs():
    """Strided nested tensors get an error naming the layout; jagged ones run per sequence (tests/test_varlen.py)."""
    parts = [torch.randn(2, n, 8) for n in (3, 5)]
    strided = torch.nested.nested_tensor(parts, layout=torch.strided)
    with pytest.raises(RuntimeError, match="nested tensor with layout torch.strided"):
        sdpax.scaled_dot_product_attention(strided, strided, strided)
    jagged = torch.nested.nested_tensor(parts, layout=torch.jagged)
    out = sdpax.scaled_dot_product_attention(jagged, jagged, jagged)
    for part, got in zip(parts, out.unbind()):
        assert torch.allclose(got, sdpax.scaled_dot_product_attention(part, part, part), atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_row_semantics(device):
    """sdpax: a row with no allowed key is 0 (and its gradients 0) on every backend, whatever torch version."""
    q, k, v = _qkv((1, 2, 4, 8), (1, 2, 6, 8), 8, torch.float32, device, seed=9, requires_grad=True)
    mask = torch.ones(4, 6, dtype=torch.bool, device=device)
    mask[1] = False
    for backend in (sdpax.SDPBackend.MATH, sdpax.SDPBackend.FLASH_ATTENTION):
        if sdpax.explain(q, k, v, attn_mask=mask).reasons[backend]:
            continue
        with sdpax.sdpa_kernel(backend):
            out = sdpax.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert (out[:, :, 1] == 0).all()
        dq, = torch.autograd.grad(out.sum(), q)
        assert (dq[:, :, 1] == 0).all()


def test_torch_causal_bias_compiled_with_a_name_imported_before_the_patch():
    """torch.compile dispatches the bias's __torch_function__ for torch's builtin too (its table of overridable
    functions is built before the patch replaces the attribute)."""
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 6, 8)
    with Bound("imported_before") as b:
        bias = torch_lower_right(4, 6)
        out = torch.compile(lambda q, k, m: b.fn(q, k, k, attn_mask=m), fullgraph=True, backend="eager")(q, k, bias)
    t_err, _ = torch_errors(q, k, k, causal=LOWER_RIGHT)
    assert_close_rel(out, reference(q, k, k, causal=LOWER_RIGHT), t_err, torch.float32, what="compiled")


@pytest.mark.parametrize("device", DEVICES)
def test_builtin_imported_before_is_untouched(device):
    """torch's builtin, imported before the patch, gives bitwise torch's own answer under it for plain tensors."""
    q, k, v = _qkv((2, 4, 7, 16), (2, 4, 9, 16), 16, torch.float32, device, seed=11)
    mask = torch.rand(7, 9, generator=torch.Generator().manual_seed(0)).to(device) > 0.3
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with Bound("imported_before") as b:
        assert torch.equal(b.fn(q, k, v, attn_mask=mask), expected)
