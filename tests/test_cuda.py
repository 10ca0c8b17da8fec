"""CUDA FLASH_ATTENTION kernels: parity with a float64 reference (within a multiple of the same-dtype attention's own
error: bfloat16/float16 with float32 softmax, float32 with true float32 matrix products, never TF32), every fused
feature, dropout masks identical to MATH, CUDA graphs, opcheck, torch.compile, memory.

Skips cleanly without a GPU or without the CUDA build.
"""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import sdpax
from sdpax import SDPBackend, sdpa_kernel

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or not sdpax.build_config.WITH_CUDA,
                       reason="needs a CUDA device and a CUDA build of sdpax"),
]

DEV = "cuda"
FLASH, MATH = int(SDPBackend.FLASH_ATTENTION), int(SDPBackend.MATH)


# ---- references ----

def reference(q, k, v, mask=None, causal=0, scale=None, sinks=None, compute=torch.float64):
    """Attention written out with plain torch ops. compute=float64: the golden answer. compute=q.dtype: what
    attention in that dtype itself gets (matrix products rounded to the input dtype, softmax in float32; for float32,
    cuBLAS float32 products as long as TF32 is off, see fp32_exact)."""
    L, S, E = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1 / math.sqrt(E) if scale is None else scale
    G = q.shape[-3] // k.shape[-3]
    k = k.repeat_interleave(G, dim=-3)
    v = v.repeat_interleave(G, dim=-3)
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    acc = torch.float64 if compute == torch.float64 else torch.float32
    s = (qc @ kc.transpose(-2, -1)).to(acc) * scale
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.to(acc)
    if causal:
        shift = S - L if causal == 2 else 0
        i = torch.arange(L, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        s = s.masked_fill(j > i + shift, -math.inf)
    cols = [s]
    if sinks is not None:
        cols.append(sinks.to(acc).view(-1, 1, 1).expand(*s.shape[:-1], 1))
    z = torch.cat(cols, -1)
    mx = z.amax(-1, keepdim=True).clamp_min(torch.finfo(acc).min).nan_to_num(0.0)
    e = (z - mx).exp()
    p = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(acc).tiny)
    p = p[..., :S]
    out = p.to(compute) @ vc
    return out


def rel_err(a, b):
    # Relative, with an absolute floor of 1e-3 per element (so an all-zero golden gradient is not divided by 0).
    floor = 1e-3 * math.sqrt(max(b.numel(), 1))
    return ((a.double() - b.double()).norm() / (b.double().norm() + floor)).item()


def assert_close(ours, golden, base, k=3.0, floor=2e-3, what="out", alt=None):
    """alt: another same-dtype result (torch's fused kernel); the larger of the two errors is the baseline."""
    e_ours, e_base = rel_err(ours, golden), rel_err(base, golden)
    if alt is not None and torch.isfinite(alt).all():
        e_base = max(e_base, rel_err(alt, golden))
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    assert e_ours <= k * e_base + floor, f"{what}: err {e_ours:.3e} vs same-dtype attention {e_base:.3e}"


# (k, output floor, gradient floor) of assert_close per dtype. float32: k = 3 over torch's own float32 error (the
# split-TF32 kernels measure up to 2.9x it here, on L = 1 rows), and a floor of 1e-7, below torch's float32 error
# everywhere it is not 0, for the cases where that is exactly 0 (one visible key: out = v): the split operands keep
# 22 of float32's 24 mantissa bits (mma.h), so such an output still differs by ~4e-8. (Until the fresh per-k16
# accumulator the kernels were at 4-29x torch's error, hidden by a floor of 1e-5.)
TOL = {torch.bfloat16: (3.0, 2e-3, 5e-3), torch.float16: (3.0, 2e-3, 5e-3), torch.float32: (3.0, 1e-7, 1e-7)}
# The sinks gradient -sum_i exp(sink - lse_i) Delta_i inherits the float32 rounding of the stored lse (|lse| ~ 5:
# ~3e-7 relative in each sink probability), which the autograd reference does not have: float32 k = 6 there
# (measured up to 4.5x).
K_DSINKS_FP32 = 6.0


@contextlib.contextmanager
def fp32_exact():
    """The float32 baselines must not use TF32 themselves (torch's default, asserted rather than assumed)."""
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def torch_fused_grads(q, k, v, dout, mask, causal, scale):
    """float32 gradients of torch's own F.scaled_dot_product_attention (its default fused backward) on the same
    inputs. Its dS = P (dP - rowsum(dO O)) cancels to rounding error where the exact gradient is 0 (a row with one
    visible key): the autograd reference gets exactly 0 there, torch's kernel (and any FlashAttention-style one)
    gets float32 rounding of dP, so this is the float32 baseline too."""
    L, S = q.shape[-2], k.shape[-2]
    if causal == 2:
        mask = torch.arange(S, device=DEV)[None, :] <= torch.arange(L, device=DEV)[:, None] + (S - L)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    # GQA as repeated K/V (autograd sums dK, dV over the group): torch runs enable_gqa calls on its math backend,
    # which is the autograd reference again, not its fused kernel.
    G = q.shape[-3] // k.shape[-3]
    kk, vv = (t.repeat_interleave(G, dim=-3) for t in leaves[1:])
    try:
        with fp32_exact():
            out = F.scaled_dot_product_attention(leaves[0], kk, vv, attn_mask=mask, is_causal=causal == 1,
                                                 scale=scale)
            return torch.autograd.grad(out, leaves, dout)
    except RuntimeError:  # a call torch cannot make: the autograd reference alone is the baseline
        return [None] * 3


def make(shape, dtype, gen, requires_grad=True):
    return torch.randn(shape, generator=gen, device=DEV, dtype=torch.float32).to(dtype).requires_grad_(requires_grad)


def flash(*args, **kw):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return sdpax.scaled_dot_product_attention(*args, **kw)


@contextlib.contextmanager
def _deterministic(on=True):
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


def check_case(B, Hq, Hkv, L, S, E, Ev, dtype, mask_kind=None, causal=0, sinks=False, scale=None, layout="bhle",
               backward=True, seed=0, lead=None, mask_shape=None, mask_grad=False, deterministic=False):
    """One call checked against the float64 reference (forward, and the gradients unless backward=False); returns
    the gradients. deterministic: torch.use_deterministic_algorithms(True) around sdpax's forward and backward."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    lead_q = (B, Hq) if lead is None else (*lead, Hq)
    lead_k = (B, Hkv) if lead is None else (*lead, Hkv)
    if layout == "blhe":  # (B, L, H, E) storage, viewed as (B, H, L, E) without a copy
        q = make((B, L, Hq, E), dtype, gen, False).transpose(1, 2).requires_grad_()
        k = make((B, S, Hkv, E), dtype, gen, False).transpose(1, 2).requires_grad_()
        v = make((B, S, Hkv, Ev), dtype, gen, False).transpose(1, 2).requires_grad_()
    else:
        q = make((*lead_q, L, E), dtype, gen)
        k = make((*lead_k, S, E), dtype, gen)
        v = make((*lead_k, S, Ev), dtype, gen)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand((*lead_q[:-1], 1, L, S), generator=gen, device=DEV) > 0.3
    elif mask_kind == "bool_blocks":  # whole 64x64 tiles masked out, to exercise tile skipping
        blocks = torch.rand((L + 63) // 64, (S + 63) // 64, generator=gen, device=DEV) > 0.5
        mask = blocks.repeat_interleave(64, 0).repeat_interleave(64, 1)[:L, :S]
        mask[:, 0] = True
    elif mask_kind == "pad":
        mask = torch.rand((*lead_q[:-1], 1, 1, S), generator=gen, device=DEV) > 0.2
    elif mask_kind == "pad_len":  # padding by length: whole key tiles visible, one partial, the rest skipped
        lengths = torch.randint(1, S + 1, (B,), generator=gen, device=DEV)
        mask = (torch.arange(S, device=DEV)[None, :] < lengths[:, None]).view(B, *([1] * (len(lead_q) - 1)), 1, S)
    elif mask_kind == "add_f32":
        mask = torch.randn((Hq, L, S), generator=gen, device=DEV)
    elif mask_kind == "add_same":
        mask = torch.randn((*lead_q, L, S), generator=gen, device=DEV).to(dtype)
    elif mask_kind == "bool_rows":  # some rows fully masked: output 0, zero gradients
        mask = torch.rand((L, S), generator=gen, device=DEV) > 0.5
        mask[::3] = False
    elif mask_kind == "add_shape":  # float32 additive mask of the given broadcast shape
        mask = torch.randn(mask_shape, generator=gen, device=DEV)
    elif mask_kind == "add_shape_same":  # the same in the input dtype
        mask = torch.randn(mask_shape, generator=gen, device=DEV).to(dtype)
    if mask_grad:
        mask.requires_grad_()
    snk = (torch.randn(Hq, generator=gen, device=DEV) * 2).requires_grad_() if sinks else None
    # A mask and a causal alignment cannot both reach sdpax (a CausalBias is the mask): one or the other.
    assert mask is None or not causal, "check_case takes a mask kind or a causal alignment, not both"
    kw = dict(scale=scale, enable_gqa=Hq != Hkv, sinks=snk)
    if causal == 1:
        kw["is_causal"] = True
    elif causal == 2:
        kw["attn_mask"] = sdpax.attention.bias.causal_lower_right(L, S)
    if mask is not None:
        kw["attn_mask"] = mask
    with contextlib.nullcontext() if backward else torch.no_grad(), _deterministic(deterministic):
        ex = sdpax.explain(q, k, v, **kw)
        assert ex.backend == SDPBackend.FLASH_ATTENTION, str(ex)
        out = flash(q, k, v, **kw)
    assert out.shape == (*q.shape[:-1], Ev) and out.dtype == dtype

    leaves = [q, k, v] + ([snk] if snk is not None else []) + ([mask] if mask_grad else [])
    names = ["q", "k", "v"] + (["sinks"] if snk is not None else []) + (["mask"] if mask_grad else [])
    k_tol, floor, g_floor = TOL[dtype]

    def ref_of(ls, compute=torch.float64):
        kw = dict(zip(names[3:], ls[3:]))
        m = kw.get("mask", None if mask is None else mask.detach())
        return reference(*ls[:3], mask=m, sinks=kw.get("sinks"), causal=causal, scale=scale, compute=compute)

    with fp32_exact():
        golden = ref_of([t.detach() for t in leaves])
        base = ref_of([t.detach() for t in leaves], compute=dtype)
    assert_close(out, golden, base, k=k_tol, floor=floor)
    if not backward:
        return
    dout = torch.randn(out.shape, generator=gen, device=DEV).to(dtype)
    with _deterministic(deterministic):
        grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    base_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    with fp32_exact():
        g_golden = torch.autograd.grad(ref_of(ref_leaves), ref_leaves, dout.double())
        g_base = torch.autograd.grad(ref_of(base_leaves, compute=dtype), base_leaves, dout)
    g_torch = [None] * len(leaves)
    if dtype == torch.float32 and snk is None and not mask_grad:
        g_torch = list(torch_fused_grads(q, k, v, dout, mask, causal, scale))
    for name, a, g, bse, alt in zip(names, grads, g_golden, g_base, g_torch):
        assert a.shape == g.shape and a.dtype == bse.dtype, name
        k_g = K_DSINKS_FP32 if dtype == torch.float32 and name == "sinks" else k_tol
        assert_close(a, g, bse, k=k_g, floor=g_floor, what=f"d{name}", alt=alt)
    return grads


DTYPES = [torch.bfloat16, torch.float16, torch.float32]
LENGTHS = [(1, 1), (7, 97), (97, 7), (1025, 1025), (97, 1025), (1, 1025)]
HEAD_DIMS = [64, 72, 80, 96, 128, 256]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L,S", LENGTHS, ids=lambda x: str(x))
@pytest.mark.parametrize("E", HEAD_DIMS)
def test_plain_grid(dtype, L, S, E):
    check_case(2, 3, 3, L, S, E, E, dtype, backward=L * S <= 1025 * 97 or E in (128, 256))


FEATURES = {
    "causal_ul": dict(causal=1),
    "causal_lr": dict(causal=2),
    "bool": dict(mask_kind="bool"),
    "bool_blocks": dict(mask_kind="bool_blocks"),
    "pad": dict(mask_kind="pad"),
    "add_f32": dict(mask_kind="add_f32"),
    "add_same": dict(mask_kind="add_same"),
    "rows_fully_masked": dict(mask_kind="bool_rows"),
    "sinks": dict(sinks=True),
    "sinks_causal_lr": dict(sinks=True, causal=2),
    "scale": dict(scale=0.37),
    "blhe": dict(layout="blhe"),
    "gqa": dict(gqa=True),
    "gqa_causal": dict(gqa=True, causal=1),
    "gqa_mask_sinks": dict(gqa=True, mask_kind="pad", sinks=True),
    "ev_ne_e": dict(ev=40),
    "lead_dims": dict(lead=(2, 2)),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("L,S", [(97, 200), (200, 97), (1, 300), (256, 256)], ids=str)
@pytest.mark.parametrize("E", [64, 128])
def test_features(feature, L, S, E, dtype):
    f = dict(FEATURES[feature])
    hq, hkv = (8, 2) if f.pop("gqa", False) else (4, 4)
    ev = f.pop("ev", E)
    check_case(2, hq, hkv, L, S, E, ev, dtype, **f)


@pytest.mark.parametrize("feature", ["causal_ul", "causal_lr", "bool", "sinks", "gqa_mask_sinks", "add_same", "blhe",
                                     "ev_ne_e", "pad", "add_f32", "bool_blocks", "rows_fully_masked", "gqa_causal"])
def test_features_fp16_d256(feature):
    f = dict(FEATURES[feature])
    hq, hkv = (8, 2) if f.pop("gqa", False) else (4, 4)
    ev = f.pop("ev", 256)
    check_case(1, hq, hkv, 129, 300, 256, ev, torch.float16, **f)
    check_case(1, hq, hkv, 7, 1025, 200, min(ev, 200), torch.bfloat16, **f)


# ---- the float mask gradient (fused: dS reduced over the mask's broadcast dims) ----

MASK_SHAPES = {
    "full": lambda B, H, L, S: (B, H, L, S),
    "b1ls": lambda B, H, L, S: (B, 1, L, S),
    "11ls": lambda B, H, L, S: (1, 1, L, S),
    "b11s": lambda B, H, L, S: (B, 1, 1, S),
    "1h1s": lambda B, H, L, S: (1, H, 1, S),
    "ls": lambda B, H, L, S: (L, S),
    "bhl1": lambda B, H, L, S: (B, H, L, 1),
    "s": lambda B, H, L, S: (S,),
}


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("shape", list(MASK_SHAPES))
@pytest.mark.parametrize("L,S,E", [(97, 200, 64), (200, 97, 128), (7, 1025, 256), (70, 130, 256), (1, 300, 80)],
                         ids=str)
def test_mask_grad(shape, L, S, E, deterministic):
    B, H = 2, 4
    kind = "add_shape_same" if E == 128 else "add_shape"
    check_case(B, H, 2 if E == 64 else H, L, S, E, E, torch.bfloat16, mask_kind=kind,
               mask_shape=MASK_SHAPES[shape](B, H, L, S), mask_grad=True, sinks=E == 80, deterministic=deterministic)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_mask_grad_lead_dims_and_dropout(deterministic):
    # (2, 3) leading batch dims with the mask broadcast over one of them and over heads; dropout on top (the same
    # keep mask as MATH).
    gen = torch.Generator(device=DEV).manual_seed(21)
    q = make((2, 3, 4, 33, 64), torch.bfloat16, gen)
    k = make((2, 3, 4, 47, 64), torch.bfloat16, gen)
    v = make((2, 3, 4, 47, 64), torch.bfloat16, gen)
    m = torch.randn(1, 3, 1, 33, 47, generator=gen, device=DEV).requires_grad_()
    rng = torch.tensor([11, 12], dtype=torch.int64, device=DEV)
    outs = {}
    dout = torch.randn(2, 3, 4, 33, 64, generator=gen, device=DEV).to(torch.bfloat16)
    for backend in (FLASH, MATH):
        o, lse = torch.ops.sdpax.fwd(q, k, v, m, 0.25, 0, 0.125, False, None, rng, backend)
        with _deterministic(deterministic and backend == FLASH):
            outs[backend] = torch.ops.sdpax.bwd(dout, q, k, v, m, o, lse, 0.25, 0, 0.125, False, None, rng,
                                                backend, True)
            if deterministic and backend == FLASH:
                again = torch.ops.sdpax.bwd(dout, q, k, v, m, o, lse, 0.25, 0, 0.125, False, None, rng, backend,
                                            True)
                assert all(torch.equal(a, b) for a, b in zip(outs[FLASH][:4], again[:4]))
    for a, b in zip(outs[FLASH][:4], outs[MATH][:4]):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel_err(a, b) < 2e-2


# ---- deterministic mode ----

DET_CASES = {
    "plain_d64": dict(B=2, Hq=4, Hkv=4, L=1025, S=1025, E=64),
    "causal_lr_d128": dict(B=2, Hq=4, Hkv=4, L=300, S=700, E=128, causal=2),
    "gqa_causal_d128": dict(B=2, Hq=8, Hkv=2, L=513, S=513, E=128, causal=1),
    "gqa_sinks_pad_d96": dict(B=2, Hq=8, Hkv=2, L=257, S=129, E=96, mask_kind="pad", sinks=True),
    "d256_blhe": dict(B=1, Hq=4, Hkv=4, L=300, S=300, E=256, layout="blhe"),
    "mask_grad_b1ls": dict(B=2, Hq=4, Hkv=4, L=200, S=300, E=64, mask_kind="add_shape",
                           mask_shape=(2, 1, 200, 300), mask_grad=True),
    "mask_grad_pad_d256": dict(B=2, Hq=4, Hkv=2, L=130, S=300, E=256, mask_kind="add_shape",
                               mask_shape=(2, 1, 1, 300), mask_grad=True),
    "gqa_causal_lr_d256": dict(B=2, Hq=8, Hkv=2, L=200, S=330, E=256, causal=2),
    "mask_grad_b1ls_d256": dict(B=2, Hq=4, Hkv=4, L=150, S=200, E=256, mask_kind="add_shape",
                                mask_shape=(2, 1, 150, 200), mask_grad=True),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("E", [64, 128])
@pytest.mark.parametrize("mask_shape", ["b1ls", "bhls", "b11s", "11ls"])
def test_bool_mask_bytes_above_one(mask_shape, E, dtype):
    """A bool mask whose bytes are not all 0 / 1 (a uint8 tensor viewed as bool) means "nonzero = allowed", exactly
    as the same mask normalized to 0 / 1: the kernels' fast 0 / 1 packing must fall back, never mis-read it."""
    B, H, L, S = 2, 4, 200, 300
    gen = torch.Generator(device=DEV).manual_seed(5)
    shape = {"b1ls": (B, 1, L, S), "bhls": (B, H, L, S), "b11s": (B, 1, 1, S), "11ls": (1, 1, L, S)}[mask_shape]
    values = torch.tensor([0, 0, 0, 1, 2, 3, 0x80, 0xFF], dtype=torch.uint8, device=DEV)
    raw = values[torch.randint(0, len(values), shape, generator=gen, device=DEV)]
    raw[..., 0] = 2  # every row keeps a key
    odd, norm = raw.view(torch.bool), raw != 0
    q, k, v = (make((B, H, L if i == 0 else S, E), dtype, gen) for i in range(3))
    dout = torch.randn(B, H, L, E, generator=gen, device=DEV).to(dtype)
    runs = []
    for m in (odd, norm):
        out = flash(q, k, v, attn_mask=m)
        runs.append([out.detach(), *torch.autograd.grad(out, (q, k, v), dout)])
    (o1, dq1, dk1, dv1), (o2, dq2, dk2, dv2) = runs
    assert torch.equal(o1, o2) and torch.equal(dk1, dk2) and torch.equal(dv1, dv2)
    assert rel_err(dq1, dq2) < 1e-3  # float atomics: the same sums in another order (bf16 rounding flips)
    golden = reference(q, k, v, mask=norm.expand(B, H, L, S))
    assert rel_err(o1.double(), golden) < 2e-2


@pytest.mark.parametrize("case", list(DET_CASES))
def test_deterministic_backward_bitwise(case):
    c = dict(DET_CASES[case])
    B, Hq, Hkv, L, S, E = (c.pop(n) for n in ("B", "Hq", "Hkv", "L", "S", "E"))
    # check_case asserts that FLASH runs and checks parity with the float64 reference each time.
    first = check_case(B, Hq, Hkv, L, S, E, E, torch.bfloat16, deterministic=True, **c)
    for _ in range(3):
        again = check_case(B, Hq, Hkv, L, S, E, E, torch.bfloat16, deterministic=True, **c)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_deterministic_dropout_bitwise():
    gen = torch.Generator(device=DEV).manual_seed(23)
    q = make((2, 8, 300, 128), torch.bfloat16, gen)
    k = make((2, 2, 400, 128), torch.bfloat16, gen)
    v = make((2, 2, 400, 128), torch.bfloat16, gen)
    rng = torch.tensor([5, 6], dtype=torch.int64, device=DEV)
    dout = torch.randn(2, 8, 300, 128, generator=gen, device=DEV).to(torch.bfloat16)
    with _deterministic():
        o, lse = torch.ops.sdpax.fwd(q, k, v, None, 0.2, 0, 0.1, True, None, rng, FLASH)
        runs = [torch.ops.sdpax.bwd(dout, q, k, v, None, o, lse, 0.2, 0, 0.1, True, None, rng, FLASH, False)[:3]
                for _ in range(3)]
    o_m, lse_m = torch.ops.sdpax.fwd(q, k, v, None, 0.2, 0, 0.1, True, None, rng, MATH)
    g_m = torch.ops.sdpax.bwd(dout, q, k, v, None, o_m, lse_m, 0.2, 0, 0.1, True, None, rng, MATH, False)
    for r in runs[1:]:
        for a, b in zip(runs[0], r):
            assert torch.equal(a, b)
    for a, b in zip(runs[0], g_m[:3]):
        assert rel_err(a, b) < 2e-2


@pytest.mark.parametrize("feature", ["causal_ul", "causal_lr", "bool", "add_f32", "sinks", "gqa_mask_sinks"])
def test_features_fp32_d256(feature):
    f = dict(FEATURES[feature])
    hq, hkv = (8, 2) if f.pop("gqa", False) else (4, 4)
    check_case(1, hq, hkv, 129, 300, 256, 256, torch.float32, **f)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("S", [4097, 32768])
def test_decode_split_keys(S, dtype):
    # L = 1 with GQA 32/8: the split-key path (blocks over key ranges merged by log-sum-exp).
    check_case(2, 32, 8, 1, S, 128, 128, dtype, sinks=True, backward=S < 10000)
    check_case(2, 32, 8, 3, S, 64, 64, dtype, causal=2, backward=False)
    check_case(2, 32, 8, 3, S, 64, 64, dtype, mask_kind="pad", backward=False)


@pytest.mark.parametrize("E", [64, 128])
def test_fp32_is_not_tf32(E):
    """float32 FLASH error stays at float32 level: far below what the same attention with TF32 products gets."""
    gen = torch.Generator(device=DEV).manual_seed(21)
    q, k, v = (make((2, 4, 1025, E), torch.float32, gen, False) for _ in range(3))
    out = flash(q, k, v, is_causal=True)
    golden = reference(q, k, v, causal=1)
    with fp32_exact():
        e_f32 = rel_err(reference(q, k, v, causal=1, compute=torch.float32), golden)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        e_tf32 = rel_err(reference(q, k, v, causal=1, compute=torch.float32), golden)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    e_ours = rel_err(out, golden)
    assert e_ours <= 2 * e_f32 and e_ours * 20 < e_tf32, (e_ours, e_f32, e_tf32)


# sdpax float32 FLASH against torch's own float32 attention (F.scaled_dot_product_attention on its MATH backend,
# TF32 off: cuBLAS float32 products), both measured against float64: out, dq, dk, dv. RMS-relative error (the
# stable statistic) within FP32_RMS_RATIO x torch's, max-relative (one element; noisier) within FP32_MAX_RATIO x.
# Measured on the H100 (benchmarks/cuda_fp32_accuracy.py, 36 shapes): the kernels are at 0.3-1.2x torch's RMS
# error and at most 2.5x its max error; before the fresh per-k16 accumulator (mma.h) they were 4-7x (RMS) at
# L = 128 and 11-29x at L >= 1024, which both bounds reject.
FP32_RMS_RATIO, FP32_MAX_RATIO = 2.0, 4.0


@pytest.mark.parametrize("L,E,kind", [(128, 256, "plain"), (128, 64, "causal"), (1024, 128, "bool"),
                                      (1024, 64, "add"), (4096, 64, "causal")], ids=str)
def test_fp32_error_within_torch_fp32(L, E, kind):
    from torch.nn.attention import SDPBackend as TorchBackend
    from torch.nn.attention import sdpa_kernel as torch_kernel
    gen = torch.Generator(device=DEV).manual_seed(31)
    B, H = 2, 4
    q, k, v, dout = (torch.randn(B, H, L, E, generator=gen, device=DEV) for _ in range(4))
    kw = {}
    if kind == "causal":
        kw["is_causal"] = True
    elif kind == "bool":
        kw["attn_mask"] = torch.rand(B, 1, L, L, generator=gen, device=DEV) > 0.3
    elif kind == "add":
        kw["attn_mask"] = torch.randn(B, 1, L, L, generator=gen, device=DEV)

    def run(call, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        kk = {n: (m.to(dtype) if m.is_floating_point() else m) if n == "attn_mask" else m for n, m in kw.items()}
        out = call(*leaves, **kk)
        return [out.detach(), *torch.autograd.grad(out, leaves, dout.to(dtype))]

    def torch_math(*a, **kk):
        with torch_kernel([TorchBackend.MATH]):
            return F.scaled_dot_product_attention(*a, **kk)

    assert sdpax.explain(q, k, v, **kw).backend == SDPBackend.FLASH_ATTENTION
    with fp32_exact():
        gold = run(torch_math, torch.float64)
        base = run(torch_math, torch.float32)
    ours = run(flash, torch.float32)
    for name, o, b, g in zip(("out", "dq", "dk", "dv"), ours, base, gold):
        d_o, d_b = o.double() - g, b.double() - g
        rms_o, rms_b = (d_o.norm() / g.norm()).item(), (d_b.norm() / g.norm()).item()
        max_o, max_b = (d_o.abs().max() / g.abs().max()).item(), (d_b.abs().max() / g.abs().max()).item()
        assert rms_o <= FP32_RMS_RATIO * rms_b, f"{name}: RMS-relative {rms_o:.2e} vs torch float32 {rms_b:.2e}"
        assert max_o <= FP32_MAX_RATIO * max_b, f"{name}: max-relative {max_o:.2e} vs torch float32 {max_b:.2e}"


# ---- dropout ----

@pytest.mark.parametrize("dtype,E", [(torch.bfloat16, 64), (torch.bfloat16, 128), (torch.bfloat16, 256), (torch.float32, 64)],
                         ids=str)
@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("mask", [False, True])
def test_dropout_same_elements_as_math(gqa, mask, dtype, E):
    gen = torch.Generator(device=DEV).manual_seed(3)
    B, hq, hkv, L, S = 2, 4, (2 if gqa else 4), 67, 131
    q = make((B, hq, L, E), dtype, gen)
    k = make((B, hkv, S, E), dtype, gen)
    v = make((B, hkv, S, E), dtype, gen)
    # Different keep masks change each output row by O(1); identical ones leave rounding only.
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-5
    m = (torch.rand(B, 1, 1, S, generator=gen, device=DEV) > 0.2) if mask else None
    rng = torch.tensor([1234567891234, 77], dtype=torch.int64, device=DEV)
    args = (m, 0.3, 0, 1 / 8, gqa, None, rng)
    o_f, lse_f = torch.ops.sdpax.fwd(q, k, v, *args, FLASH)
    with fp32_exact():
        o_m, lse_m = torch.ops.sdpax.fwd(q, k, v, *args, MATH)
    assert (o_f.float() - o_m.float()).abs().max().item() < tol
    assert (lse_f - lse_m).abs().max().item() < min(tol, 1e-3)
    # and the mask does matter: another offset gives a different result
    rng2 = torch.tensor([1234567891234, 78], dtype=torch.int64, device=DEV)
    o_2, _ = torch.ops.sdpax.fwd(q, k, v, m, 0.3, 0, 1 / 8, gqa, None, rng2, FLASH)
    assert (o_2.float() - o_m.float()).abs().max().item() > 0.1
    dout = torch.randn(o_f.shape, generator=gen, device=DEV).to(dtype)
    g_f = torch.ops.sdpax.bwd(dout, q, k, v, m, o_f, lse_f, 0.3, 0, 1 / 8, gqa, None, rng, FLASH, False)
    with fp32_exact():
        g_m = torch.ops.sdpax.bwd(dout, q, k, v, m, o_m, lse_m, 0.3, 0, 1 / 8, gqa, None, rng, MATH, False)
    for a, b in zip(g_f[:3], g_m[:3]):
        assert rel_err(a, b) < tol


def test_dropout_statistics():
    gen = torch.Generator(device=DEV).manual_seed(5)
    q = make((2, 4, 256, 64), torch.bfloat16, gen, False)
    k = make((2, 4, 512, 64), torch.bfloat16, gen, False)
    v = torch.ones(2, 4, 512, 64, device=DEV, dtype=torch.bfloat16)
    torch.manual_seed(0)
    out = flash(q, k, v, dropout_p=0.4)
    # Each output is sum_j p_j keep_j / (1 - p): mean 1 over many rows, and not all 1.
    assert abs(out.float().mean().item() - 1.0) < 0.02
    assert out.float().std().item() > 0.05
    out1 = flash(q, k, v, dropout_p=1.0)
    assert out1.abs().max().item() == 0.0


# ---- torch integration ----

def test_cuda_graph_capture_and_replay():
    gen = torch.Generator(device=DEV).manual_seed(7)
    q = make((2, 4, 300, 64), torch.bfloat16, gen, False)
    k = make((2, 4, 300, 64), torch.bfloat16, gen, False)
    v = make((2, 4, 300, 64), torch.bfloat16, gen, False)
    rng = torch.tensor([99, 5], dtype=torch.int64, device=DEV)
    fn = lambda: torch.ops.sdpax.fwd(q, k, v, None, 0.2, 1, 0.125, False, None, rng, FLASH)[0]  # noqa: E731
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    for trial in range(2):
        q.copy_(torch.randn(q.shape, generator=gen, device=DEV))
        rng[1] = 5 + trial  # seed/offset are read from device memory at run time, so a replay sees new values
        g.replay()
        torch.cuda.synchronize()
        eager = torch.ops.sdpax.fwd(q, k, v, None, 0.2, 1, 0.125, False, None, rng, FLASH)[0]
        assert torch.equal(out, eager)


def test_opcheck_cuda():
    gen = torch.Generator(device=DEV).manual_seed(9)
    q = make((2, 4, 33, 64), torch.bfloat16, gen)
    k = make((2, 2, 47, 64), torch.bfloat16, gen)
    v = make((2, 2, 47, 64), torch.bfloat16, gen)
    sinks = torch.randn(4, device=DEV, requires_grad=True)
    mask = torch.rand(2, 1, 33, 47, device=DEV) > 0.3
    rng = torch.tensor([3, 4], dtype=torch.int64, device=DEV)
    for args in [(q, k, v, None, 0.0, 1, 0.125, True, sinks, None, FLASH),
                 (q, k, v, mask, 0.25, 0, 0.125, True, None, rng, FLASH)]:
        torch.library.opcheck(torch.ops.sdpax.fwd.default, args)


def test_torch_compile_cuda():
    gen = torch.Generator(device=DEV).manual_seed(11)
    q = make((2, 4, 129, 64), torch.bfloat16, gen)
    k = make((2, 4, 129, 64), torch.bfloat16, gen)
    v = make((2, 4, 129, 64), torch.bfloat16, gen)

    def f(q, k, v):
        return sdpax.scaled_dot_product_attention(q, k, v, is_causal=True).sum()

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        eager = f(q, k, v)
        ge = torch.autograd.grad(eager, (q, k, v))
        comp = torch.compile(f)
        got = comp(q, k, v)
        gc = torch.autograd.grad(got, (q, k, v))
    torch.testing.assert_close(got, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


def test_gradients_stay_on_flash():
    # Head dim 256, a float mask that requires grad, deterministic mode: all served by the fused backward.
    q = torch.randn(1, 2, 64, 256, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    m = torch.randn(1, 1, 64, 64, device=DEV, requires_grad=True)
    for det in (False, True):
        with _deterministic(det):
            for args in [(q, q, q), (q, q, q, m)]:
                ex = sdpax.explain(*args)
                assert ex.backend == SDPBackend.FLASH_ATTENTION and not ex.reasons[SDPBackend.FLASH_ATTENTION], str(ex)


def test_reasons_route_unsupported_to_math():
    for dtype, E in [(torch.float64, 64), (torch.bfloat16, 20), (torch.float32, 264)]:
        q = torch.randn(1, 2, 16, E, device=DEV, dtype=dtype)
        ex = sdpax.explain(q, q, q)
        assert ex.backend == SDPBackend.MATH and ex.reasons[SDPBackend.FLASH_ATTENTION], str(ex)
        out = sdpax.scaled_dot_product_attention(q, q, q)
        assert torch.isfinite(out).all()


# ---- size ----

@pytest.mark.parametrize("mask", [False, True])
def test_memory_32k(mask):
    L = S = 32768
    B, H, E = 1, 4, 128
    gen = torch.Generator(device=DEV).manual_seed(13)
    q = make((B, H, L, E), torch.bfloat16, gen, False)
    k = make((B, H, S, E), torch.bfloat16, gen, False)
    v = make((B, H, S, E), torch.bfloat16, gen, False)
    m = torch.ones(B, 1, L, S, dtype=torch.bool, device=DEV).tril_() if mask else None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = flash(q, k, v, attn_mask=m, is_causal=not mask)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    out_bytes = out.numel() * out.element_size()
    assert extra <= 3 * out_bytes, f"peak extra {extra / 2**20:.0f} MiB for an output of {out_bytes / 2**20:.0f} MiB"
    rows = torch.tensor([0, 1, 4097, L - 1], device=DEV)
    sub_ref = reference(q[:, :, rows], k, v, causal=0,
                        mask=torch.arange(S, device=DEV)[None, :] <= rows[:, None])
    assert rel_err(out[:, :, rows], sub_ref) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_more_than_2_31_elements(dtype):
    # q and out hold 2^31 + 448 elements: every offset must be 64-bit.
    L, E = 2 ** 25 + 7, 64
    gen = torch.Generator(device=DEV).manual_seed(17)
    q = torch.randn(1, 1, L, E, generator=gen, device=DEV, dtype=dtype)
    k = torch.randn(1, 1, 37, E, generator=gen, device=DEV, dtype=dtype)
    v = torch.randn(1, 1, 37, E, generator=gen, device=DEV, dtype=dtype)
    out = flash(q, k, v)
    rows = torch.tensor([0, 2 ** 24, L - 2, L - 1], device=DEV)
    assert rel_err(out[:, :, rows], reference(q[:, :, rows], k, v)) < (1e-2 if dtype == torch.bfloat16 else 1e-5)
    del out
