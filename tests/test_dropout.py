"""Dropout: the Philox keep function (checked against published test vectors and an independent Python
implementation), statistics, seed reproducibility, and every backend dropping the same elements."""
import math

import pytest
import torch

from helpers import DEVICES, assert_close_rel, backends_for, err, make_qkv, reference, run, torch_errors

M0, M1, W0, W1, MASK = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF


def philox_py(ctr, key):
    """Philox-4x32-10 from the Random123 paper, in Python integers."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
        p0, p1 = M0 * c0, M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK, p1 & MASK, ((p0 >> 32) ^ c3 ^ k1) & MASK, p0 & MASK
    return c0, c1, c2, c3


def test_philox_known_answers():
    # Random123 kat_vectors for philox4x32_10
    assert philox_py((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert philox_py((MASK,) * 4, (MASK, MASK)) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert philox_py((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == (
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed,offset", [(0, 0), (-1, -1), (2 ** 40 + 17, 3), (-(2 ** 62) + 5, 2 ** 35 + 9)])
def test_keep_mask_is_the_documented_function(device, seed, offset):
    """keep(bh, i, j) = philox((j // 4, i, bh, offset_lo32), (seed_lo32, seed_hi32))[j % 4] >= floor(p * 2^32)."""
    bh, L, S, p = 3, 5, 10, 0.37
    rng = torch.tensor([seed, offset], dtype=torch.int64, device=device)
    keep = torch.ops.sdpax.dropout_keep_mask(rng, bh, L, S, p).cpu()
    thr = math.floor(p * 2 ** 32)
    s, o = seed & 0xFFFFFFFFFFFFFFFF, offset & 0xFFFFFFFFFFFFFFFF
    expected = torch.zeros(bh, L, S, dtype=torch.bool)
    for b in range(bh):
        for i in range(L):
            for j4 in range((S + 3) // 4):
                words = philox_py((j4, i, b, o & MASK), (s & MASK, s >> 32))
                for t in range(4):
                    if 4 * j4 + t < S:
                        expected[b, i, 4 * j4 + t] = words[t] >= thr
    assert torch.equal(keep, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_output_equals_reference_with_its_mask(device):
    gen = torch.Generator().manual_seed(0)
    q, k, v = make_qkv((2, 4, 33, 16), (2, 2, 45, 16), 8, torch.float64, device, gen)
    sinks = torch.randn(4, generator=gen, dtype=torch.float64).to(device)
    rng = torch.tensor([99, 7], dtype=torch.int64, device=device)
    p = 0.3
    keep = torch.ops.sdpax.dropout_keep_mask(rng, 8, 33, 45, p).view(2, 4, 33, 45)
    ref = reference(q, k, v, causal=2, sinks=sinks, keep=keep, dropout_p=p, scale=0.25)
    for backend in backends_for(device, torch.float64):
        out, _ = torch.ops.sdpax.fwd(q, k, v, None, p, 2, 0.25, True, sinks, rng, int(backend))
        assert err(out, ref) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_statistics(device, p):
    rng = torch.tensor([2024, 11], dtype=torch.int64, device=device)
    keep = torch.ops.sdpax.dropout_keep_mask(rng, 16, 128, 257, p).double()
    n = keep.numel()
    rate = 1 - keep.mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n)
    # neighbours within a Philox group of four and across rows are uncorrelated
    a, b = keep[..., :-1].flatten() - (1 - p), keep[..., 1:].flatten() - (1 - p)
    assert abs((a * b).mean().item()) < 5 * p * (1 - p) / math.sqrt(a.numel())
    # the expectation of dropout(P) V is P V: mean output over many seeds approaches the no-dropout output
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv((1, 2, 4, 8), (1, 2, 6, 8), 8, torch.float64, device, gen)
    base = run(backends_for(device, torch.float64)[0], q, k, v)
    torch.manual_seed(0)
    outs = torch.stack([run(backends_for(device, torch.float64)[0], q, k, v, dropout_p=p) for _ in range(400)])
    sem = outs.std(0) / math.sqrt(outs.shape[0])
    assert ((outs.mean(0) - base).abs() <= 5 * sem + 1e-9).all()


@pytest.mark.parametrize("device", DEVICES)
def test_seed_reproducibility(device):
    gen = torch.Generator().manual_seed(4)
    q, k, v = make_qkv((2, 3, 20, 16), (2, 3, 24, 16), 16, torch.float32, device, gen, requires_grad=True)
    for backend in backends_for(device, torch.float32):
        torch.manual_seed(123)
        a = run(backend, q, k, v, dropout_p=0.5)
        ga = torch.autograd.grad(a.sum(), q)[0]
        torch.manual_seed(123)
        b = run(backend, q, k, v, dropout_p=0.5)
        gb = torch.autograd.grad(b.sum(), q)[0]
        c = run(backend, q, k, v, dropout_p=0.5)
        assert torch.equal(a, b) and torch.equal(ga, gb)
        assert not torch.equal(a, c)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_edges(device):
    gen = torch.Generator().manual_seed(5)
    q, k, v = make_qkv((2, 3, 9, 16), (2, 3, 11, 16), 16, torch.float32, device, gen, requires_grad=True)
    for backend in backends_for(device, torch.float32):
        out = run(backend, q, k, v, dropout_p=1.0)
        assert (out == 0).all() and not torch.isnan(out).any()
        dq, = torch.autograd.grad(out.sum(), q)
        assert (dq == 0).all()
        assert torch.equal(run(backend, q, k, v, dropout_p=0.0), run(backend, q, k, v))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backends_drop_the_same_elements(device, dtype):
    """MATH and the fused kernel of a device apply the same keep mask for the same rng."""
    backends = backends_for(device, dtype)
    if len(backends) < 2:
        pytest.skip(f"only MATH is built for {device}/{dtype}")
    gen = torch.Generator().manual_seed(6)
    q, k, v = make_qkv((2, 4, 70, 64), (2, 2, 130, 64), 64, dtype, device, gen)
    rng = torch.tensor([31337, 5], dtype=torch.int64, device=device)
    keep = torch.ops.sdpax.dropout_keep_mask(rng, 8, 70, 130, 0.25).view(2, 4, 70, 130)
    ref = reference(q, k, v, keep=keep, dropout_p=0.25, scale=0.125)
    t_err, _ = torch_errors(q, k, v, scale=0.125, gqa=True)  # torch's error on the call without dropout
    for b in backends:
        out = torch.ops.sdpax.fwd(q, k, v, None, 0.25, 0, 0.125, True, None, rng, int(b))[0]
        assert_close_rel(out, ref, t_err, dtype, what=b.name)
