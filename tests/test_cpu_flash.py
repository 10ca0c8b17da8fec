"""The fused CPU kernel (FLASH_ATTENTION on CPU), the cases that are its own: tile edges, head dims off the vector
widths, decode rows and split keys, GQA groups walked per KV head, padding by length (skipped key tiles), dropout
masks identical to MATH's, fully masked rows, bool masks with bytes above 1, thread counts, oneDNN off, memory at
long lengths. Parity of the generic features is tests/test_parity.py's and tests/test_backward.py's, which run the
CPU kernel too. Every check is the suite's one oracle and rule (helpers.py): the float64 reference, within K x
torch's own error in the same dtype (features torch lacks expressed in its terms by helpers.torch_equivalent) plus
the dtype floor; with dropout the reference applies the same keep mask and torch's error is that of the call
without dropout.
"""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sdpax
from helpers import (
    assert_close_rel,
    assert_grads_close,
    assert_lse_close,
    grad_magnitude,
    reference,
    torch_errors,
)
from sdpax import SDPBackend

pytestmark = pytest.mark.skipif("cpu" not in getattr(sdpax.build_config, "FLASH_KERNELS", {}),
                                reason="this build has no fused CPU kernel")

ops = torch.ops.sdpax
MATH, FLASH = 0, 1
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def dtype_id(dt):
    return str(dt).replace("torch.", "")


def make(shape_q, shape_k, shape_v, dtype, gen, transposed=False):
    """q, k, v with the given logical (B, H, L, E) shapes; transposed: (B, L, H, E) storage viewed as (B, H, L, E)."""
    def one(shape):
        if transposed:
            b, h, n, e = shape
            return torch.randn(b, n, h, e, generator=gen).to(dtype).transpose(1, 2)
        return torch.randn(*shape, generator=gen).to(dtype)
    return one(shape_q), one(shape_k), one(shape_v)


def check_case(dtype, B, Hq, Hkv, L, S, E, Ev, mask_kind=None, causal=0, sinks=False, dropout_p=0.0,
               transposed=False, seed=0, backward=True):
    """One FLASH call through torch.ops.sdpax (out, lse and, unless backward=False, the gradients) checked by the
    rule against the float64 reference."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make((B, Hq, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev), dtype, gen, transposed)
    mask = None
    if mask_kind == "pad":  # (B, 1, 1, S) bool padding mask
        mask = torch.rand(B, 1, 1, S, generator=gen) > 0.3
        mask[..., 0] = True
    elif mask_kind == "lengths":  # (B, 1, 1, S) padding by sequence length: hidden tails of odd lengths
        lengths = torch.tensor([S // 3 + 1, S - 3] + [S] * (B - 2))[:B]
        mask = (torch.arange(S)[None, :] < lengths[:, None]).view(B, 1, 1, S)
    elif mask_kind == "heads":  # (1, H, L, S) additive float32
        mask = torch.randn(1, Hq, L, S, generator=gen)
    elif mask_kind == "2d":  # (L, S) bool
        mask = torch.rand(L, S, generator=gen) > 0.5
        mask[:, 0] = True
    sk = torch.randn(Hq, generator=gen) if sinks else None
    rng = torch.tensor([1234567, 89], dtype=torch.int64) if dropout_p > 0 else None
    scale = 0.7 / math.sqrt(E)
    gqa = Hq != Hkv

    out, lse = ops.fwd(q, k, v, mask, dropout_p, causal, scale, gqa, sk, rng, FLASH)
    assert out.dtype == dtype and out.shape == (B, Hq, L, Ev) and out.is_contiguous()
    assert not out.isnan().any()
    keep = ops.dropout_keep_mask(rng, B * Hq, L, S, dropout_p).view(B, Hq, L, S) if dropout_p > 0 else None
    leaves = [q, k, v] + ([sk] if sinks else [])
    ref_leaves = [t.detach().double().requires_grad_(backward) for t in leaves]
    ref, ref_lse = reference(*ref_leaves[:3], mask=mask, causal=causal, scale=scale,
                             sinks=ref_leaves[3] if sinks else None, keep=keep, dropout_p=dropout_p, return_lse=True)
    go = torch.randn(out.shape, generator=gen).to(dtype) if backward else None
    t_err, t_grads = torch_errors(q, k, v, mask=mask, causal=causal, scale=scale, sinks=sk, gqa=gqa, gout=go)
    assert_close_rel(out, ref, t_err, dtype, what="out")
    assert_lse_close(lse, ref_lse)

    if not backward:
        return
    dq, dk, dv, _, dsk = ops.bwd(go, q, k, v, mask, out, lse, dropout_p, causal, scale, gqa, sk, rng, FLASH, False)
    grads = [dq, dk, dv] + ([dsk] if sinks else [])
    names = ["dq", "dk", "dv"] + (["dsinks"] if sinks else [])
    for name, g, t in zip(names, grads, leaves):
        assert g.shape == t.shape and g.dtype == t.dtype and not g.isnan().any(), name
    ref_grads = torch.autograd.grad(ref, ref_leaves, go.double())
    assert_grads_close(names, grads, ref_grads, t_grads, dtype, grad_magnitude(go, out))


# The generic features (causal alignments at L < S and L > S, GQA, padding masks, same-dtype dense masks, sinks,
# transposed views) are the shared grids' (test_parity.py, test_backward.py); these are the kernel's edges.
CASES = {
    "L1": {"B": 1, "Hq": 2, "Hkv": 2, "L": 1, "S": 129, "E": 64, "Ev": 64},
    "L7_S300": {"B": 1, "Hq": 2, "Hkv": 2, "L": 7, "S": 300, "E": 32, "Ev": 32},
    "L300_S7": {"B": 1, "Hq": 2, "Hkv": 2, "L": 300, "S": 7, "E": 32, "Ev": 32},
    "odd77": {"B": 1, "Hq": 2, "Hkv": 2, "L": 77, "S": 77, "E": 80, "Ev": 80},
    "ev_ne_e": {"B": 1, "Hq": 2, "Hkv": 2, "L": 129, "S": 200, "E": 96, "Ev": 40},
    "hd16": {"B": 1, "Hq": 2, "Hkv": 2, "L": 70, "S": 90, "E": 16, "Ev": 16},
    "hd72": {"B": 1, "Hq": 2, "Hkv": 2, "L": 70, "S": 90, "E": 72, "Ev": 72},
    "hd256": {"B": 1, "Hq": 1, "Hkv": 1, "L": 70, "S": 150, "E": 256, "Ev": 256},
    "odd_hd": {"B": 1, "Hq": 2, "Hkv": 2, "L": 33, "S": 41, "E": 7, "Ev": 5},
    "mqa_causal": {"B": 1, "Hq": 4, "Hkv": 1, "L": 150, "S": 150, "E": 64, "Ev": 64, "causal": 1},
    "mask_lengths": {"B": 2, "Hq": 3, "Hkv": 3, "L": 100, "S": 533, "E": 64, "Ev": 64, "mask_kind": "lengths"},
    "mask_lengths_decode": {"B": 2, "Hq": 4, "Hkv": 2, "L": 3, "S": 1201, "E": 64, "Ev": 64,
                            "mask_kind": "lengths"},
    "mask_heads": {"B": 2, "Hq": 3, "Hkv": 3, "L": 100, "S": 140, "E": 64, "Ev": 64, "mask_kind": "heads"},
    "mask_2d": {"B": 2, "Hq": 3, "Hkv": 3, "L": 100, "S": 140, "E": 64, "Ev": 64, "mask_kind": "2d"},
    "transposed_mask": {"B": 2, "Hq": 3, "Hkv": 3, "L": 100, "S": 140, "E": 64, "Ev": 64, "transposed": True,
                        "mask_kind": "pad"},
    "decode_L1": {"B": 1, "Hq": 8, "Hkv": 2, "L": 1, "S": 2000, "E": 128, "Ev": 128},
    "decode_L4_split": {"B": 1, "Hq": 4, "Hkv": 1, "L": 4, "S": 3000, "E": 128, "Ev": 128, "causal": 2,
                        "sinks": True},
    "decode_L4_mask": {"B": 2, "Hq": 4, "Hkv": 2, "L": 4, "S": 1500, "E": 64, "Ev": 64, "mask_kind": "pad"},
    # decode rows read K/V in place (gemv.h): head dims off the 16-lane grid, E != Ev, key counts off the 4-key
    # steps, row counts off the 4-row groups, transposed (B, S, H, E) views
    "decode_odd_dims": {"B": 1, "Hq": 6, "Hkv": 2, "L": 2, "S": 301, "E": 72, "Ev": 40, "causal": 1, "sinks": True},
    "decode_transposed": {"B": 2, "Hq": 5, "Hkv": 1, "L": 1, "S": 257, "E": 80, "Ev": 80, "transposed": True,
                          "mask_kind": "heads"},
    "long_q_tiles": {"B": 1, "Hq": 1, "Hkv": 1, "L": 520, "S": 600, "E": 64, "Ev": 64, "causal": 1},
}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_parity(case, dtype):
    kw = CASES[case]
    check_case(dtype, **kw, backward=kw["L"] > 1 or case == "L1")


ONEDNN_CASES = {
    "plain": {"B": 2, "Hq": 3, "Hkv": 3, "L": 100, "S": 130, "E": 64, "Ev": 64},
    "causal_ul": {"B": 1, "Hq": 2, "Hkv": 2, "L": 129, "S": 300, "E": 64, "Ev": 64, "causal": 1},
    "decode_L4_split": CASES["decode_L4_split"],
}


@pytest.mark.parametrize("case", list(ONEDNN_CASES), ids=str)
def test_bfloat16_with_onednn_disabled(case):
    """With oneDNN off, brgemm refuses bfloat16 in VNNI layout even on AMX CPUs: bfloat16 is widened to float32."""
    kw = ONEDNN_CASES[case]
    old = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # not mkldnn.flags(): it also sets TF32 and warns about it
    try:
        check_case(torch.bfloat16, **kw, backward=kw["L"] > 1)
    finally:
        torch.backends.mkldnn.enabled = old


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("L", [1, 4, 100], ids=lambda n: f"L{n}")
def test_dropout_same_elements_as_math(dtype, L):
    """FLASH drops exactly MATH's elements: with the same rng the outputs agree to rounding and differ from the
    dropout-free result by far more; backward regenerates the same mask."""
    check_case(dtype, B=2, Hq=4, Hkv=2, L=L, S=203, E=64, Ev=64, dropout_p=0.3, seed=3)
    gen = torch.Generator().manual_seed(5)
    q, k, v = make((1, 2, L, 32), (1, 2, 203, 32), (1, 2, 203, 32), dtype, gen)
    rng = torch.tensor([42, 7])
    a = ops.fwd(q, k, v, None, 0.5, 0, 0.2, False, None, rng, FLASH)[0]
    b = ops.fwd(q, k, v, None, 0.5, 0, 0.2, False, None, rng, FLASH)[0]
    c = ops.fwd(q, k, v, None, 0.5, 0, 0.2, False, None, torch.tensor([43, 7]), FLASH)[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_dropout_all_dropped(dtype):
    q, k, v = make((1, 2, 20, 16), (1, 2, 30, 16), (1, 2, 30, 16), dtype, torch.Generator().manual_seed(0))
    out, _ = ops.fwd(q, k, v, None, 1.0, 0, 0.25, False, None, torch.tensor([1, 2]), FLASH)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("L", [3, 100], ids=lambda n: f"L{n}")
def test_fully_masked_rows(dtype, L):
    """Rows with no allowed key give output 0, lse -inf and zero gradients (never NaN), as MATH."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = make((2, 2, L, 32), (2, 2, 300, 32), (2, 2, 300, 32), dtype, gen)
    mask = torch.rand(2, 2, L, 300, generator=gen) > 0.5
    mask[:, :, 1] = False
    mask[1] = False
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    with sdpax.sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = sdpax.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.backward(torch.ones_like(out))
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert not any(t.grad.isnan().any() for t in (q, k, v))
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))
    assert torch.equal(k.grad[1], torch.zeros_like(k.grad[1]))
    _, lse = ops.fwd(q.detach(), k.detach(), v.detach(), mask, 0.0, 0, 0.2, False, None, None, FLASH)
    assert torch.isinf(lse[:, :, 1]).all() and (lse[:, :, 1] < 0).all()
    # Lower-right causal with L > S: the first L - S rows see nothing.
    check_case(dtype, B=1, Hq=1, Hkv=1, L=L + 10, S=max(L - 5, 1), E=32, Ev=32, causal=2)


@pytest.mark.parametrize("mask_shape", [(2, 1, 70, 130), (2, 1, 1, 130), (2, 4, 70, 130)], ids=str)
def test_bool_mask_bytes_above_one(mask_shape):
    """A bool mask whose bytes are not all 0 / 1 (a uint8 tensor viewed as bool) means "nonzero = allowed", exactly
    as the same mask normalized to 0 / 1 (torch reads it so too); the CUDA kernels have the same test."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (t.requires_grad_() for t in make((2, 4, 70, 64), (2, 4, 130, 64), (2, 4, 130, 64), torch.float32,
                                                gen))
    values = torch.tensor([0, 0, 0, 1, 2, 3, 0x80, 0xFF], dtype=torch.uint8)
    raw = values[torch.randint(0, len(values), mask_shape, generator=gen)]
    raw[..., 0] = 2
    runs = []
    for m in (raw.view(torch.bool), raw != 0):
        with sdpax.sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = sdpax.scaled_dot_product_attention(q, k, v, attn_mask=m)
        runs.append([out.detach(), *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_public_api_picks_flash_and_matches_math():
    gen = torch.Generator().manual_seed(2)
    q, k, v = make((2, 4, 50, 64), (2, 4, 60, 64), (2, 4, 60, 64), torch.float32, gen)
    for dt in DTYPES:
        assert sdpax.explain(q.to(dt), k.to(dt), v.to(dt)).backend == SDPBackend.FLASH_ATTENTION
    ex = sdpax.explain(q.double(), k.double(), v.double())
    assert ex.backend == SDPBackend.MATH and ex.reasons[SDPBackend.FLASH_ATTENTION]
    t_err, _ = torch_errors(q, k, v, causal=1)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        with sdpax.sdpa_kernel(backend):
            out = sdpax.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert_close_rel(out, reference(q, k, v, causal=1), t_err, torch.float32, what=backend.name)


def test_leading_batch_dims_and_3d():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 3, 4, 20, 16, generator=gen)
    k = torch.randn(2, 3, 4, 30, 16, generator=gen)
    v = torch.randn(2, 3, 4, 30, 24, generator=gen)
    mask = torch.randn(3, 1, 20, 30, generator=gen)
    ref, ref_lse = reference(q, k, v, mask=mask, scale=0.3, return_lse=True)
    t_err, _ = torch_errors(q, k, v, mask=mask, scale=0.3)
    for backend in (FLASH, MATH):
        out, lse = ops.fwd(q, k, v, mask, 0.0, 0, 0.3, False, None, None, backend)
        assert out.shape == (2, 3, 4, 20, 24) and lse.shape == (2, 3, 4, 20)
        assert_close_rel(out, ref, t_err, torch.float32, what=f"5-D, backend {backend}")
        assert_lse_close(lse, ref_lse, what=f"5-D lse, backend {backend}")
    q, k, v = q[0, 0], k[0, 0], v[0, 0]
    ref = reference(q, k, v, causal=1, scale=0.3)
    t_err, _ = torch_errors(q, k, v, causal=1, scale=0.3)
    for backend in (FLASH, MATH):
        out, _ = ops.fwd(q, k, v, None, 0.0, 1, 0.3, False, None, None, backend)
        assert_close_rel(out, ref, t_err, torch.float32, what=f"2-D, backend {backend}")


@pytest.mark.parametrize("shape", [(0, 2, 5, 5), (1, 2, 0, 5), (1, 2, 5, 0)], ids=str)
def test_zero_sizes(shape):
    """Empty batch / queries / keys. No keys means every row is fully masked: output 0, lse -inf, zero grads."""
    B, H, L, S = shape
    q, k, v = torch.randn(B, H, L, 8), torch.randn(B, H, S, 8), torch.randn(B, H, S, 8)
    a, la = ops.fwd(q, k, v, None, 0.0, 0, 0.3, False, None, None, FLASH)
    assert a.shape == (B, H, L, 8) and la.shape == (B, H, L)
    assert torch.equal(a, torch.zeros_like(a))
    assert (la == -math.inf).all()
    grads = ops.bwd(torch.ones_like(a), q, k, v, None, a, la, 0.0, 0, 0.3, False, None, None, FLASH, False)
    for g, t in zip(grads[:3], (q, k, v)):
        assert g.shape == t.shape and torch.equal(g, torch.zeros_like(g))


def test_clear_errors():
    q = torch.randn(1, 2, 10, 300)
    with pytest.raises(RuntimeError, match="head dims from 1 to 256"):
        ops.fwd(q, q, q, None, 0.0, 0, 0.1, False, None, None, FLASH)
    q = torch.randn(1, 2, 10, 0)
    with pytest.raises(RuntimeError, match="head dims from 1 to 256"):
        ops.fwd(q, q, q, None, 0.0, 0, 0.1, False, None, None, FLASH)
    q = torch.randn(1, 2, 10, 16, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float64 runs on MATH"):
        ops.fwd(q, q, q, None, 0.0, 0, 0.1, False, None, None, FLASH)


def test_uses_thread_count():
    """Results do not depend on torch.set_num_threads (tasks own disjoint outputs)."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = make((1, 3, 200, 64), (1, 3, 230, 64), (1, 3, 230, 64), torch.float32, gen)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = ops.fwd(q, k, v, None, 0.0, 1, 0.1, False, None, None, FLASH)
        torch.set_num_threads(max(2, old))
        b = ops.fwd(q, k, v, None, 0.0, 1, 0.1, False, None, None, FLASH)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


LONG_SEQ = textwrap.dedent("""
    import torch, sdpax
    torch.manual_seed(0)
    L = 8192
    q, k, v = (torch.randn(1, 2, L, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(1, 2, L, 64, dtype=torch.bfloat16)
    def status_mb(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(key + ":")) / 1024
    def step(q, k, v, g):
        with sdpax.sdpa_kernel(sdpax.SDPBackend.FLASH_ATTENTION):
            out = sdpax.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(g)
        return out
    # Warm up on a short sequence so code pages and thread pools are already resident.
    small = [t.detach()[:, :, :256].clone().requires_grad_(True) for t in (q, k, v)]
    step(*small, g[:, :, :256])
    base = status_mb("VmRSS")
    try:  # reset the peak (VmHWM) to the current RSS; older kernels keep the peak of the warm-up
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    out = step(q, k, v, g)
    peak = status_mb("VmHWM")  # per address space: unlike ru_maxrss it does not inherit pytest's peak
    assert not out.isnan().any() and not q.grad.isnan().any()
    print(peak - base)
""")


def test_long_sequence_memory_is_linear():
    """L = S = 8192 bf16 forward + backward: extra memory stays far below one L x S float32 matrix (256 MiB).
    Measured as the growth of the peak RSS over a warmed-up baseline (outputs and gradients included)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    res = subprocess.run([sys.executable, "-c", LONG_SEQ], capture_output=True, text=True, env=env, timeout=600,
                         check=False)
    assert res.returncode == 0, res.stderr
    growth_mb = float(res.stdout.strip().splitlines()[-1])
    one_matrix_mb = 8192 * 8192 * 4 / 2**20
    # Each thread may keep O((L + S) * D) scratch: (8192 + 8192) * 64 * 4 bytes = 4 MiB; allow twice that per
    # thread (on a 16-thread machine the scratch of all threads is ~170 MiB, still far from L x S per head).
    per_thread_mb = 2 * (8192 + 8192) * 64 * 4 / 2**20
    bound = one_matrix_mb / 4 + per_thread_mb * torch.get_num_threads()
    assert growth_mb < bound, f"peak growth {growth_mb:.0f} MiB > {bound:.0f} MiB"
