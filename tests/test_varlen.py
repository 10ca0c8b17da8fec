"""Packed variable-length batches: sdpax.varlen_attn and jagged nested tensors through
sdpax.scaled_dot_product_attention (and F.scaled_dot_product_attention under patch()).

Parity is per sequence: the packed output (and its gradients) against each sequence run alone through the float64
reference, by the suite's rule, with torch's error measured the same way (torch's function on each sequence in the
same dtype). Length mixes include empty sequences, length 1 and L != S. Also: dropout equals the per-sequence dense
calls it is defined by, the paged KV cache equals the contiguous one, the tutorial's module under patch() (eval and
training), compile and opcheck, the reason on devices whose kernels lack it, and the errors."""
import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F
from test_window import window_allowed
from torch import nn

import sdpax
from helpers import (
    DEVICES,
    LOWER_RIGHT,
    UPPER_LEFT,
    assert_close_rel,
    assert_grads_close,
    assert_lse_close,
    err,
    grad_magnitude,
    needs_cuda,
    reference,
    torch_equivalent,
)
from sdpax import SDPBackend

MIXES = {"mixed": ([5, 0, 130, 1, 64], [7, 3, 130, 40, 1]),  # empty, length 1, L != S, L > S
         "self": ([33, 1, 100, 17], [33, 1, 100, 17])}
FEATURES = ["plain", "causal", "window", "gqa_sinks", "softcap"]
CASES = list(itertools.product([torch.float64, torch.float32, torch.bfloat16, torch.float16], list(MIXES), FEATURES))


def offsets(lengths, device):
    return torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device=device)


def per_sequence(fn, q, k, v, cq, ck, **kwargs):
    """fn on each sequence alone, as (1, H, L, D) tensors sliced from the packed ones (differentiably); the outputs
    packed back to (Tq, H, Ev)."""
    outs = []
    for b in range(cq.numel() - 1):
        q0, q1, k0, k1 = int(cq[b]), int(cq[b + 1]), int(ck[b]), int(ck[b + 1])
        if q1 == q0:
            continue
        qb, kb, vb = (t.transpose(0, 1).unsqueeze(0) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        outs.append(fn(qb, kb, vb, q1 - q0, k1 - k0, **kwargs)[0][0].transpose(0, 1))
    return torch.cat(outs) if outs else q.new_zeros((0, q.shape[1], v.shape[-1]))


def _pattern(feature, L, S, device):
    """(causal id, bool mask or None) of a feature for one sequence of the reference."""
    if feature == "causal":
        return LOWER_RIGHT, None
    if feature == "window":
        return 0, window_allowed(L, S, 9, 4, LOWER_RIGHT, device)
    return 0, None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,mix,feature", CASES, ids=[f"{str(d)[6:]}-{m}-{f}" for d, m, f in CASES])
def test_varlen_matches_each_sequence(dtype, mix, feature, device):
    idx = CASES.index((dtype, mix, feature))
    gen = torch.Generator().manual_seed(500 + idx)
    lq, lk = MIXES[mix]
    hq, hk, E = 4, (2 if feature == "gqa_sinks" else 4), [32, 64, 128][idx % 3]

    def rnd(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    q, k, v = rnd(sum(lq), hq, E).requires_grad_(), rnd(sum(lk), hk, E).requires_grad_(), rnd(sum(lk), hk, E)
    v.requires_grad_()
    cq, ck = offsets(lq, device), offsets(lk, device)
    sinks = (torch.randn(hq, generator=gen).to(device).requires_grad_() if feature == "gqa_sinks" else None)
    cap = 3.0 if feature == "softcap" else None
    kwargs = {"is_causal": feature == "causal", "window_size": (9, 4) if feature == "window" else (-1, -1),
              "enable_gqa": hk != hq, "sinks": sinks, "softcap": cap}
    gout = rnd(sum(lq), hq, E)

    def ref_fn(qb, kb, vb, L, S, compute=torch.float64):
        causal, mask = _pattern(feature, L, S, device)
        s = None if sinks is None else sinks.detach().double().requires_grad_(False)
        return reference(qb, kb, vb, mask=mask, causal=causal, sinks=s if compute == torch.float64 else sinks,
                         softcap=cap, compute=compute, return_lse=True)

    def torch_fn(qb, kb, vb, L, S):
        if cap is not None:  # torch's function has no softcap: the definition in this dtype
            return ref_fn(qb, kb, vb, L, S, compute=dtype)
        causal, mask = _pattern(feature, L, S, device)
        return torch_equivalent(qb, kb, vb, mask=mask, causal=causal, sinks=sinks, gqa=hk != hq), None

    leaves = [q, k, v] + ([sinks] if sinks is not None else [])
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = per_sequence(ref_fn, *ref_leaves, cq, ck)
    ref_grads = torch.autograd.grad(ref, ref_leaves, gout.double())
    t_leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    theirs = per_sequence(torch_fn, *t_leaves, cq, ck)
    t_err = err(theirs, ref)
    t_grad_errs = [err(a, b) for a, b in zip(torch.autograd.grad(theirs, t_leaves, gout), ref_grads)]
    if sinks is not None:  # the sinks' reference gradient, from the float64 sequences
        s64 = sinks.detach().double().requires_grad_()
        ref_s = per_sequence(lambda qb, kb, vb, L, S: reference(
            qb, kb, vb, sinks=s64, return_lse=True), *(t.detach().double() for t in (q, k, v)), cq, ck)
        ref_grads = (*ref_grads, torch.autograd.grad(ref_s, s64, gout.double())[0])

    ex_backends = [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]
    if dtype == torch.float64:
        ex_backends = [SDPBackend.MATH]  # FLASH has no float64
    for backend in ex_backends:
        with sdpax.sdpa_kernel(backend):
            out, lse = sdpax.varlen_attn(q, k, v, cq, ck, max(lq), max(lk), return_lse=True, **kwargs)
        assert out.shape == (sum(lq), hq, E) and lse.shape == (hq, sum(lq))
        assert_close_rel(out, ref, t_err, dtype, what=f"{backend.name} out")
        grads = torch.autograd.grad(out, leaves, gout)
        assert_grads_close([f"{backend.name} d{n}" for n in ("q", "k", "v", "sinks")[:len(leaves)]], grads,
                           ref_grads, t_grad_errs, dtype, grad_magnitude(gout, out))
        if dtype != torch.float64:
            ref_lse = torch.cat([ref_fn(*(t.detach().double().transpose(0, 1).unsqueeze(0)
                                          for t in (q[int(cq[b]):int(cq[b + 1])], k[int(ck[b]):int(ck[b + 1])],
                                                    v[int(ck[b]):int(ck[b + 1])])), lq[b], lk[b])[1][0]
                                 for b in range(len(lq)) if lq[b]], dim=-1)
            assert_lse_close(lse, ref_lse, what=f"{backend.name} lse")


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_dropout_is_the_per_sequence_dense_dropout(device):
    """Sequence b drops what a dense call on it alone drops with the call's rng at offset + b (same backend)."""
    gen = torch.Generator().manual_seed(11)
    lq, lk = [20, 0, 70], [20, 5, 90]
    q = torch.randn(sum(lq), 2, 32, generator=gen).to(device)
    k, v = (torch.randn(sum(lk), 2, 32, generator=gen).to(device) for _ in range(2))
    cq, ck = offsets(lq, device), offsets(lk, device)
    rng = torch.tensor([77, 1000], dtype=torch.int64, device=device)
    for backend in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION):
        out, _ = torch.ops.sdpax.varlen_fwd(q, k, v, cq, ck, 70, 90, 0.4, LOWER_RIGHT, 0.3, False, None, rng,
                                            int(backend))
        for b in range(3):
            if not lq[b]:
                continue
            qb, kb, vb = (t.transpose(0, 1).unsqueeze(0) for t in (q[int(cq[b]):int(cq[b + 1])],
                                                                    k[int(ck[b]):int(ck[b + 1])],
                                                                    v[int(ck[b]):int(ck[b + 1])]))
            dense, _ = torch.ops.sdpax.fwd(qb, kb, vb, None, 0.4, LOWER_RIGHT, 0.3, False, None,
                                           rng + torch.tensor([0, b], device=device), int(backend))
            assert torch.equal(out[int(cq[b]):int(cq[b + 1])], dense[0].transpose(0, 1)), (backend, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("queries", ["decode", "prefill"])
@pytest.mark.parametrize("page", [16, 256])
def test_varlen_paged_cache_equals_contiguous(page, queries, dtype, device):
    """A paged KV cache (pages in shuffled order, the last one partly used) gives the contiguous cache's answer:
    decode steps (read in place at any page size) and prefill chunks (in place where pages hold whole key tiles,
    else gathered)."""
    gen = torch.Generator().manual_seed(12)
    used, lq = [300, 1, 17, 0], ([1, 1, 3, 1] if queries == "decode" else [40, 1, 130, 9])
    hq, hk, E = 4, 2, 64
    k = torch.randn(sum(used), hk, E, generator=gen).to(device, dtype)
    v = torch.randn(sum(used), hk, E, generator=gen).to(device, dtype)
    q = torch.randn(sum(lq), hq, E, generator=gen).to(device, dtype)
    mq = max(lq)
    cq, ck = offsets(lq, device), offsets(used, device)
    pages_per = [max(1, math.ceil(n / page)) for n in used]
    order = torch.randperm(sum(pages_per), generator=gen).tolist()
    kp = torch.zeros(len(order), page, hk, E, device=device, dtype=dtype)
    vp = torch.zeros_like(kp)
    table = torch.zeros(len(used), max(pages_per), dtype=torch.int32)
    nxt = 0
    for b, n in enumerate(used):
        for p in range(pages_per[b]):
            slot = order[nxt]
            nxt += 1
            table[b, p] = slot
            rows = slice(int(ck[b]) + p * page, int(ck[b]) + min(n, (p + 1) * page))
            cnt = rows.stop - rows.start
            kp[slot, :cnt], vp[slot, :cnt] = k[rows], v[rows]
    seqused = torch.tensor(used, dtype=torch.int32, device=device)
    for backend in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION):
        with sdpax.sdpa_kernel(backend):
            contiguous = sdpax.varlen_attn(q, k, v, cq, ck, mq, 300, is_causal=True, enable_gqa=True)
            paged = sdpax.varlen_attn(q, kp, vp, cq, None, mq, 300, is_causal=True, enable_gqa=True,
                                      seqused_k=seqused, block_table=table.to(device))
        assert torch.equal(paged, contiguous), backend
    # seqused_k alone: the first keys of each packed sequence.
    short = torch.tensor([100, 1, 5, 0], dtype=torch.int32, device=device)
    got = sdpax.varlen_attn(q, k, v, cq, ck, mq, 300, seqused_k=short, enable_gqa=True)
    keep = torch.cat([torch.arange(int(ck[b]), int(ck[b]) + int(short[b])) for b in range(4)]).to(device)
    want = sdpax.varlen_attn(q, k[keep], v[keep], cq, offsets(short.tolist(), device), mq, 100, enable_gqa=True)
    assert torch.equal(got, want)
    kg = kp.clone().requires_grad_()
    out = sdpax.varlen_attn(q, kg, vp, cq, None, mq, 300, seqused_k=seqused, block_table=table.to(device),
                            enable_gqa=True)
    with pytest.raises(RuntimeError, match="forward only"):
        out.sum().backward()


class CausalSelfAttention(nn.Module):
    """torch's SDPA tutorial module, as written there."""

    def __init__(self, num_heads, embed_dimension, is_causal=False, dropout=0.0):
        super().__init__()
        self.c_attn = nn.Linear(embed_dimension, 3 * embed_dimension, bias=False)
        self.c_proj = nn.Linear(embed_dimension, embed_dimension, bias=False)
        self.dropout, self.num_heads, self.is_causal = dropout, num_heads, is_causal

    def forward(self, x):
        qp = self.c_attn(x)
        batch_size, head_dim = qp.size(0), qp.size(2) // (self.num_heads * 3)
        query, key, value = qp.chunk(3, -1)
        query = query.view(batch_size, -1, self.num_heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, self.num_heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, self.num_heads, head_dim).transpose(1, 2)
        dropout, is_causal = (self.dropout, self.is_causal) if self.training else (0.0, False)
        y = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=dropout, is_causal=is_causal)
        y = y.transpose(1, 2).view(batch_size, -1, self.num_heads * head_dim)
        return self.c_proj(y)


def _tutorial_batch(dtype, n=6, max_len=40, seed=0):
    rnd = random.Random(seed)
    lens = [max(1, int(max_len * (1 - rnd.gauss(0.5, 0.1)))) for _ in range(n)]
    lens[1] = max_len
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randn(n_, 64, generator=gen, dtype=torch.float64).to(dtype) for n_ in lens]
    return torch.nested.nested_tensor(parts, layout=torch.jagged), parts


@pytest.mark.parametrize("training", [False, True])
def test_tutorial_module_on_jagged_input_under_patch(training):
    """The tutorial's module on a jagged batch under sdpax.patch(): each sequence's output and the gradients equal
    the module run on that sequence alone (dense, float64); training mode runs causal attention (no dropout
    here: the dropout test covers its mask)."""
    torch.manual_seed(0)
    model = CausalSelfAttention(4, 64, is_causal=True, dropout=0.0).train(training)
    nt, parts = _tutorial_batch(torch.float32)
    nt.requires_grad_()
    with sdpax.patch():
        out = model(nt)
        out.values().sum().backward()
    model64 = CausalSelfAttention(4, 64, is_causal=True).double().train(training)
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    grads = [p.grad.clone() for p in model.parameters()]
    for p in model64.parameters():
        p.grad = None
    for part, got in zip(parts, out.unbind()):
        want = model64(part.double().unsqueeze(0))[0]
        want.sum().backward()
        assert_close_rel(got, want, 0.0, torch.float32, what="output", magnitude=10.0)
    for g, p in zip(grads, model64.parameters()):
        assert_close_rel(g, p.grad, 0.0, torch.float32, what="weight grad", magnitude=100.0)


def test_nested_training_with_dropout_runs_and_is_reproducible():
    model = CausalSelfAttention(4, 64, is_causal=True, dropout=0.3).train()
    nt, _ = _tutorial_batch(torch.float32, seed=1)

    def step(seed):
        torch.manual_seed(seed)
        with sdpax.patch():
            out = model(nt)
        out.values().square().sum().backward()
        return out.values().detach(), model.c_attn.weight.grad.clone()
    a, ga = step(5)
    model.zero_grad()
    b, gb = step(5)
    assert torch.equal(a, b) and torch.equal(ga, gb)
    model.zero_grad()
    c, _ = step(6)
    assert not torch.equal(a, c)


def test_nested_compiles_fullgraph():
    model = CausalSelfAttention(4, 64, is_causal=True).eval()
    nt, _ = _tutorial_batch(torch.float32, seed=2)

    def f(x):
        qp = model.c_attn(x)
        q, k, v = (t.view(x.size(0), -1, 4, 16).transpose(1, 2) for t in qp.chunk(3, -1))
        return sdpax.scaled_dot_product_attention(q, k, v, is_causal=True)
    with torch.no_grad():
        expected = f(nt)
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(nt)
    assert torch.equal(got.values(), expected.values())


def test_varlen_compiles_and_opcheck():
    gen = torch.Generator().manual_seed(13)
    q = torch.randn(30, 2, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(40, 2, 16, generator=gen, requires_grad=True) for _ in range(2))
    cq, ck = offsets([10, 0, 20], "cpu"), offsets([15, 5, 20], "cpu")

    def f(q, k, v):
        return sdpax.varlen_attn(q, k, v, cq, ck, 20, 20, is_causal=True)
    out, expected = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v), f(q, k, v)
    assert torch.equal(out, expected)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(expected.sum(), (q, k, v))):
        assert torch.equal(a, b)
    args = (q.detach(), k.detach(), v.detach(), cq, ck, 20, 20, 0.0, LOWER_RIGHT, 0.25, False, None, None, 1)
    torch.library.opcheck(torch.ops.sdpax.varlen_fwd.default, args)


def _qkv(lq=(3, 4), lk=(3, 4)):
    return (torch.randn(sum(lq), 2, 8), torch.randn(sum(lk), 2, 8), torch.randn(sum(lk), 2, 8),
            offsets(lq, "cpu"), offsets(lk, "cpu"))


@pytest.mark.parametrize("change,match", [
    (lambda a: {**a, "cu_seq_q": torch.tensor([0, 5, 4, 7], dtype=torch.int32)}, "must not decrease"),
    (lambda a: {**a, "cu_seq_q": torch.tensor([0, 3, 6], dtype=torch.int32)}, "ends at 6 but the packed tensor"),
    (lambda a: {**a, "cu_seq_q": torch.tensor([1, 3, 7], dtype=torch.int32)}, "must start at 0"),
    (lambda a: {**a, "cu_seq_k": torch.tensor([0, 3, 7.0])}, "1-D int32 or int64"),
    (lambda a: {**a, "cu_seq_k": torch.tensor([0, 7], dtype=torch.int32)}, "same number of sequences"),
    (lambda a: {**a, "max_q": 3}, "has 4 queries, more than max_q = 3"),
    (lambda a: {**a, "max_k": 2}, "more than max_k = 2"),
    (lambda a: {**a, "max_k": -1}, "max_k must be an int >= 0"),
    (lambda a: {**a, "cu_seq_k": None}, "cu_seq_k is required"),
    (lambda a: {**a, "query": a["query"][None]}, "packed query"),
    (lambda a: {**a, "seqused_k": torch.tensor([5, 1], dtype=torch.int32)}, r"seqused_k\[0\] = 5 is outside"),
    (lambda a: {**a, "window_size": (2, 1), "is_causal": True}, "past the causal edge"),
    (lambda a: {**a, "dropout_p": 1.5}, "dropout_p must be"),
])
def test_varlen_errors(change, match):
    q, k, v, cq, ck = _qkv()
    a = change({"query": q, "key": k, "value": v, "cu_seq_q": cq, "cu_seq_k": ck, "max_q": 4, "max_k": 4})
    with pytest.raises(RuntimeError, match=match):
        sdpax.varlen_attn(**a)


def test_varlen_page_errors():
    q, _, _, cq, _ = _qkv()
    kp = torch.randn(3, 4, 2, 8)
    used = torch.tensor([3, 4], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="needs seqused_k"):
        sdpax.varlen_attn(q, kp, kp, cq, None, 4, 8, block_table=torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"block_table\[1, 0\] = 9 is not a page"):
        sdpax.varlen_attn(q, kp, kp, cq, None, 4, 8, block_table=torch.tensor([[0, 1], [9, 2]], dtype=torch.int32),
                          seqused_k=used)
    with pytest.raises(RuntimeError, match="int32 tensor"):
        sdpax.varlen_attn(q, kp, kp, cq, None, 4, 8, block_table=torch.zeros(2, 2, dtype=torch.int64),
                          seqused_k=used)


def test_nested_errors():
    nt, _ = _tutorial_batch(torch.float32)
    q = nt.view(nt.size(0), -1, 4, 16).transpose(1, 2)
    dense = torch.randn(6, 4, 40, 16)
    with pytest.raises(RuntimeError, match="nested query with dense key and value"):
        sdpax.scaled_dot_product_attention(q, dense, dense)
    with pytest.raises(RuntimeError, match="ragged sequence in dim 2"):
        sdpax.scaled_dot_product_attention(*(nt.view(nt.size(0), -1, 4, 16),) * 3)
    with pytest.raises(RuntimeError, match="must be a CausalBias"):
        sdpax.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(40, 40, dtype=torch.bool))
    strided = torch.nested.nested_tensor([torch.randn(2, 3, 8), torch.randn(2, 5, 8)])
    with pytest.raises(RuntimeError, match="layout torch.strided"):
        sdpax.scaled_dot_product_attention(strided, strided, strided)


def test_nested_causal_bias_and_window_apply_per_sequence():
    """A CausalBias's variant and window apply within each sequence of nested inputs."""
    from sdpax.attention.bias import causal_lower_right, sliding_window
    nt, parts = _tutorial_batch(torch.float64, seed=3)
    q = nt.view(nt.size(0), -1, 4, 16).transpose(1, 2)
    out_lr = sdpax.scaled_dot_product_attention(q, q, q, attn_mask=causal_lower_right(40, 40))
    out_w = sdpax.scaled_dot_product_attention(q, q, q, attn_mask=sliding_window(40, 40, 3, UPPER_LEFT))
    out_ws = sdpax.scaled_dot_product_attention(q, q, q, window_size=(2, 2))
    for part, lr, w, ws in zip(parts, out_lr.unbind(), out_w.unbind(), out_ws.unbind()):
        x = part.view(-1, 4, 16).transpose(0, 1)[None]
        L = x.shape[-2]
        assert err(lr, reference(x, x, x, causal=LOWER_RIGHT)[0]) < 1e-12
        assert err(w, reference(x, x, x, mask=window_allowed(L, L, 3, 0, UPPER_LEFT))[0]) < 1e-12
        assert err(ws, reference(x, x, x, mask=window_allowed(L, L, 2, 2, LOWER_RIGHT))[0]) < 1e-12


def test_explain_packed_and_nested():
    """explain() covers the new inputs: the backend a packed or nested call takes and every backend's reasons."""
    q, k, v, cq, ck = _qkv()
    assert sdpax.varlen.explain(q, k, v, cq, ck, 4, 4).backend == SDPBackend.FLASH_ATTENTION
    ex = sdpax.varlen.explain(q.double(), k.double(), v.double(), cq, ck, 4, 4, is_causal=True)
    assert ex.backend == SDPBackend.MATH and any("float64" in r for r in ex.reasons[SDPBackend.FLASH_ATTENTION])
    nt, _ = _tutorial_batch(torch.bfloat16)
    qn = nt.view(nt.size(0), -1, 4, 16).transpose(1, 2)
    assert sdpax.explain(qn, qn, qn, is_causal=True).backend == SDPBackend.FLASH_ATTENTION
    with pytest.raises(RuntimeError, match="must be a CausalBias"):
        sdpax.explain(qn, qn, qn, attn_mask=torch.ones(40, 40, dtype=torch.bool))


@needs_cuda
@pytest.mark.parametrize("dtype,E,feature,mix", [
    (torch.bfloat16, 128, "causal_gqa", "long-tailed"), (torch.float16, 64, "plain", "long-tailed"),
    (torch.bfloat16, 256, "window_sinks", "long-tailed"), (torch.float32, 64, "causal_gqa", "long-tailed"),
    (torch.float16, 128, "dropout", "long-tailed"), (torch.bfloat16, 128, "window_sinks", "split keys"),
    (torch.float16, 64, "causal_gqa", "split keys")])
@pytest.mark.parametrize("deterministic", [False, True])
def test_varlen_cuda_one_launch(dtype, E, feature, mix, deterministic):
    """Packed batches in one launch per pass of the mma.sync kernels (explain says FLASH), forward and backward
    (both dQ modes) against each sequence alone: the float64 reference by the suite's rule, and with dropout, the
    dense kernels on each sequence with the call's rng at offset + b (the same decisions: equal to the rounding of
    the two launches). Mixes: long-tailed (empty, 1, several row and key blocks, L != S); split keys (few rows
    over long keys: the forward splits the keys and merges them)."""
    gen = torch.Generator().manual_seed(21)
    rnd = random.Random(21)
    if mix == "split keys":
        lq, lk = [40, 1, 17, 0], [3000, 2000, 40, 7]
    else:
        lq = [0, 1, 700] + [min(700, int(rnd.paretovariate(1.2) * 20)) for _ in range(37)]
        lk = [5, 1, 650] + [max(1, n + rnd.randint(-10, 30)) for n in lq[3:]]
    hq, hk = 8, (2 if feature == "causal_gqa" else 8)
    q, k, v = (torch.randn(sum(n), h, E, generator=gen).to("cuda", dtype).requires_grad_()
               for n, h in ((lq, hq), (lk, hk), (lk, hk)))
    cq, ck = offsets(lq, "cuda"), offsets(lk, "cuda")
    sinks = torch.randn(hq, generator=gen).cuda().requires_grad_() if feature == "window_sinks" else None
    kwargs = {"is_causal": feature == "causal_gqa", "enable_gqa": hk != hq, "sinks": sinks,
              "window_size": (40, 8) if feature == "window_sinks" else (-1, -1)}
    gout = torch.randn(sum(lq), hq, E, generator=gen).to("cuda", dtype)
    ex = sdpax.varlen.explain(q, k, v, cq, ck, max(lq), max(lk), **kwargs)
    assert ex.backend == SDPBackend.FLASH_ATTENTION, ex
    leaves = [q, k, v] + ([sinks] if sinks is not None else [])
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        if feature == "dropout":
            rng = torch.tensor([5, 40], dtype=torch.int64, device="cuda")
            fl = int(SDPBackend.FLASH_ATTENTION)
            out, lse = torch.ops.sdpax.varlen_fwd(q, k, v, cq, ck, max(lq), max(lk), 0.3, 0, 0.1, False, None,
                                                  rng, fl)
            dq, dk, dv, _ = torch.ops.sdpax.varlen_bwd(gout, q, k, v, cq, ck, max(lq), max(lk), out, lse, 0.3, 0,
                                                       0.1, False, None, rng, fl)
            for b in range(len(lq)):
                q0, q1, k0, k1 = int(cq[b]), int(cq[b + 1]), int(ck[b]), int(ck[b + 1])
                if q0 == q1:
                    continue
                qb, kb, vb, gb = (t[a:z].transpose(0, 1).unsqueeze(0).detach()
                                  for t, a, z in ((q, q0, q1), (k, k0, k1), (v, k0, k1), (gout, q0, q1)))
                rb = rng + torch.tensor([0, b], device="cuda")
                ob, lb = torch.ops.sdpax.fwd(qb, kb, vb, None, 0.3, 0, 0.1, False, None, rb, fl)
                gq, gk, gv, _, _ = torch.ops.sdpax.bwd(gb, qb, kb, vb, None, ob, lb, 0.3, 0, 0.1, False, None, rb,
                                                       fl, False)
                for name, packed, dense in (("out", out[q0:q1], ob), ("dq", dq[q0:q1], gq), ("dk", dk[k0:k1], gk),
                                            ("dv", dv[k0:k1], gv)):
                    # The dense call may split its keys (a merge's rounding) and adds dQ in another order; a
                    # different dropout decision would differ by the element itself.
                    dense = dense[0].transpose(0, 1).float()
                    assert (packed.float() - dense).abs().max().item() <= 1e-2 * dense.abs().max().item(), (name, b)
            return
        out = sdpax.varlen_attn(q, k, v, cq, ck, max(lq), max(lk), **kwargs)
        grads = torch.autograd.grad(out, leaves, gout)
    finally:
        torch.use_deterministic_algorithms(old)

    causal = LOWER_RIGHT if feature == "causal_gqa" else 0

    def ref_fn(qb, kb, vb, L, S, compute=torch.float64):
        mask = window_allowed(L, S, 40, 8, LOWER_RIGHT, "cuda") if feature == "window_sinks" else None
        s = None if sinks is None else (sinks.detach().double() if compute == torch.float64 else sinks.detach())
        return reference(qb, kb, vb, mask=mask, causal=causal, sinks=s, compute=compute, return_lse=True)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = per_sequence(ref_fn, *ref_leaves, cq, ck)
    ref_grads = torch.autograd.grad(ref, ref_leaves, gout.double())
    t_leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    theirs = per_sequence(lambda *a: ref_fn(*a, compute=dtype), *t_leaves, cq, ck)
    t_grad_errs = [err(a, b) for a, b in zip(torch.autograd.grad(theirs, t_leaves, gout), ref_grads)]
    assert_close_rel(out, ref, err(theirs, ref), dtype, what="out")
    assert_grads_close(["dq", "dk", "dv"], grads[:3], ref_grads, t_grad_errs, dtype, grad_magnitude(gout, out))


def test_varlen_gradcheck_and_second_order():
    """float64 gradcheck and gradgradcheck of a packed call (GQA, causal, a window, sinks), the second order by
    the composite per sequence."""
    gen = torch.Generator().manual_seed(15)
    q = torch.randn(7, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(9, 2, 5, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    sinks = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    cq, ck = offsets([3, 0, 4], "cpu"), offsets([4, 2, 3], "cpu")

    def f(q, k, v, sinks):
        return sdpax.varlen_attn(q, k, v, cq, ck, 4, 4, is_causal=True, window_size=(2, 0), enable_gqa=True,
                                 sinks=sinks)
    assert torch.autograd.gradcheck(f, (q, k, v, sinks))
    assert torch.autograd.gradgradcheck(f, (q, k, v, sinks))
