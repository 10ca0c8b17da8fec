"""sdpax.distributed: context-parallel attention on 2 and 4 gloo ranks (processes on this machine) and simulated
ranks, forward and backward on the gathered tensors, by the suite's one rule against the float64 reference; the
pair decomposition of a causal chunk pair checked exhaustively against the mask it stands for."""
from __future__ import annotations

import itertools
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sdpax.distributed as cp
from helpers import (
    DEVICES,
    LOWER_RIGHT,
    UPPER_LEFT,
    assert_close_rel,
    assert_grads_close,
    causal_allowed,
    grad_magnitude,
    reference,
    torch_errors,
)
from sdpax.attention.bias import causal_lower_right

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")

# (name, dtype, q shape (global), k shape (global), Ev, causal, gqa, sinks, mask kind, strategy)
CASES = [
    ("plain_f32_ring", torch.float32, (2, 4, 16, 16), (2, 4, 16, 16), 16, 0, False, False, None, "ring"),
    ("causal_f32_ring", torch.float32, (1, 4, 32, 16), (1, 4, 32, 16), 8, UPPER_LEFT, False, False, None, "ring"),
    ("causal_f64_allgather", torch.float64, (1, 2, 16, 8), (1, 2, 16, 8), 8, UPPER_LEFT, False, False, None,
     "allgather"),
    ("lower_right_L<S_gqa_sinks", torch.float32, (1, 4, 16, 16), (1, 2, 48, 16), 16, LOWER_RIGHT, True, True, None,
     "ring"),
    ("lower_right_L>S", torch.float64, (1, 2, 48, 8), (1, 2, 16, 8), 8, LOWER_RIGHT, False, False, None, "ring"),
    ("upper_left_L>S_sinks", torch.float32, (2, 2, 32, 16), (2, 2, 16, 16), 16, UPPER_LEFT, False, True, None,
     "allgather"),
    ("bool_keys_L>S", torch.float32, (2, 2, 32, 16), (2, 2, 16, 16), 16, 0, False, True, "bool", "ring"),
    ("float_keys_gqa_auto", torch.float32, (2, 8, 16, 16), (2, 2, 32, 16), 16, 0, True, False, "float", "auto"),
    ("bf16_causal", torch.bfloat16, (1, 4, 64, 32), (1, 4, 64, 32), 32, UPPER_LEFT, False, True, None, "ring"),
    ("bf16_bool_keys", torch.bfloat16, (1, 4, 32, 32), (1, 4, 64, 32), 32, 0, False, False, "bool", "allgather"),
]


def _full_inputs(case, seed):
    _, dtype, qs, ks, ev, _, _, sinks, mask_kind, _ = case
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda s: torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)
    q, k, v = rnd(qs), rnd(ks), rnd((*ks[:-1], ev))
    s = torch.randn(qs[-3], generator=gen, dtype=torch.float64).float() if sinks else None
    mask = None
    if mask_kind == "bool":
        mask = torch.rand((ks[0], 1, 1, ks[-2]), generator=gen) > 0.25
        mask[..., :2] = True
    elif mask_kind == "float":
        mask = torch.randn((ks[0], 1, 1, ks[-2]), generator=gen).to(dtype)
    gout = rnd((*qs[:-1], ev))
    return q, k, v, s, mask, gout


def _worker(rank, world, init_file, cases, errors, dropout_p=0.0):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        for i, case in enumerate(cases):
            q, k, v, s, mask, gout = _full_inputs(case, seed=i)
            causal, gqa = case[5], case[6]
            ql, kl, vl = (cp.shard(t, -2).detach().requires_grad_() for t in (q, k, v))
            sl = s.detach().clone().requires_grad_() if s is not None else None
            L, S = q.shape[-2], k.shape[-2]
            am = cp.shard(mask, -1) if mask is not None else (causal_lower_right(L, S) if causal == LOWER_RIGHT
                                                               else None)
            torch.manual_seed(1000 + i)  # with dropout: the first rank's draw is the single-device call's
            out_l = cp.attention(ql, kl, vl, attn_mask=am, is_causal=causal == UPPER_LEFT, enable_gqa=gqa,
                                 sinks=sl, strategy=case[9], dropout_p=dropout_p)
            grads_l = torch.autograd.grad(out_l, [ql, kl, vl] + ([sl] if sl is not None else []),
                                          cp.shard(gout, -2))
            got = [cp.unshard(out_l.detach(), -2)] + [cp.unshard(g, -2) for g in grads_l[:3]] + list(grads_l[3:])
            if rank == 0:
                errors.put((case[0], _compare(case, got, q, k, v, s, mask, gout, dropout_p, 1000 + i)))
    except Exception as e:  # reported to the test in the parent process, then raised
        errors.put((f"rank {rank}", repr(e)))
        raise
    finally:
        dist.destroy_process_group()


def _compare(case, got, q, k, v, s, mask, gout, dropout_p=0.0, seed=None):
    """'' if the distributed result (out, dq, dk, dv[, dsinks]) is within the suite's rule of the float64 reference,
    else a message. With dropout the reference drops what a single-device call drops after torch.manual_seed(seed)
    (torch's error without dropout is the scale)."""
    dtype, causal, gqa = case[1], case[5], case[6]
    rq, rk, rv = (t.double().requires_grad_() for t in (q, k, v))
    rs = s.double().requires_grad_() if s is not None else None
    keep = None
    if dropout_p:
        torch.manual_seed(seed)
        rng = torch.randint(-(2 ** 63), 2 ** 63 - 1, (2,), dtype=torch.int64, device=q.device)
        bh, L, S = q.numel() // (q.shape[-2] * q.shape[-1]), q.shape[-2], k.shape[-2]
        keep = torch.ops.sdpax.dropout_keep_mask(rng, bh, L, S, dropout_p).view(*q.shape[:-1], S)
    ref = reference(rq, rk, rv, mask=mask, causal=causal, sinks=rs, keep=keep, dropout_p=dropout_p)
    ref_all = [ref.detach(), *torch.autograd.grad(ref, [rq, rk, rv] + ([rs] if rs is not None else []),
                                                  gout.double())]
    t_err, t_grads = torch_errors(q, k, v, mask=mask, causal=causal, sinks=s, gqa=gqa, gout=gout)
    like = [ref, q, k, v] + ([s] if s is not None else [])
    names = ["out", "dq", "dk", "dv", "dsinks"]
    for name, g, t in zip(names, got, like):
        if g.shape != t.shape or g.dtype != (dtype if name == "out" else t.dtype):
            return f"{name}: {tuple(g.shape)} {g.dtype} vs {tuple(t.shape)} {t.dtype}"
    try:
        assert_close_rel(got[0], ref_all[0], t_err, dtype, what="out")
        assert_grads_close(names[1:len(got)], got[1:], ref_all[1:], t_grads, dtype, grad_magnitude(gout, got[0]))
    except AssertionError as e:
        return str(e)
    return ""


def _run(world, cases, dropout_p=0.0):
    with tempfile.TemporaryDirectory() as d:
        errors = mp.get_context("spawn").SimpleQueue()
        mp.spawn(_worker, args=(world, os.path.join(d, "init"), cases, errors, dropout_p), nprocs=world, join=True)
        results = []
        while not errors.empty():
            results.append(errors.get())
    assert len(results) == len(cases), results
    bad = [f"{name}: {msg}" for name, msg in results if msg]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_matches_single_device(world):
    _run(world, CASES if world > 1 else CASES[:3])


@pytest.mark.parametrize("world", [2, 4])
def test_dropout_matches_single_device(world):
    """Each pair's kernel call draws its decisions at its origin in the global problem (rng {seed, offset, row0,
    col0}), so the sharded run drops exactly what one device drops: forward and backward."""
    _run(world, [CASES[i] for i in (1, 2, 3, 7, 8)], dropout_p=0.3)


def test_dropout_origin_is_a_block_of_the_whole():
    rng = torch.tensor([1234, 99], dtype=torch.int64)
    full = torch.ops.sdpax.dropout_keep_mask(rng, 6, 40, 50, 0.3)
    for r0, c0 in ((0, 0), (3, 5), (8, 13), (17, 30)):
        block = torch.ops.sdpax.dropout_keep_mask(torch.cat([rng, torch.tensor([r0, c0])]), 6, 10, 20, 0.3)
        assert torch.equal(block, full[:, r0:r0 + 10, c0:c0 + 20]), (r0, c0)


def test_pair_decomposition_is_the_causal_mask():
    """Every (query chunk, key chunk) pair's calls cover exactly the allowed entries of the global causal mask."""
    for L, S, world, variant in itertools.product([8, 16, 24], [8, 16, 40], [1, 2, 4], [UPPER_LEFT, LOWER_RIGHT]):
        if L % (2 * world) or S % (2 * world):
            continue
        allowed = causal_allowed(L, S, variant)
        covered = torch.zeros(L, S, dtype=torch.int64)
        shift = S - L if variant == LOWER_RIGHT else 0
        for r, owner in itertools.product(range(world), range(world)):
            for qs, lq in cp.chunk_positions(L, r, world):
                for ks, lk in cp.chunk_positions(S, owner, world):
                    for rows, keys, causal in cp._Pair(qs, lq, ks, lk, variant, shift).calls:
                        block = torch.ones(rows.stop - rows.start, keys.stop - keys.start, dtype=torch.bool)
                        if causal == UPPER_LEFT:
                            block = causal_allowed(*block.shape, UPPER_LEFT)
                        covered[qs + rows.start:qs + rows.stop, ks + keys.start:ks + keys.stop] += block
        assert torch.equal(covered, allowed.long()), (L, S, world, variant)


def test_merged_calls_are_the_causal_mask():
    """The kernel calls of every rank against every K/V shard (adjacent blocks merged when there is no dropout)
    cover exactly the allowed entries of the global mask, each once; with dropout nothing merges (one origin per
    call)."""
    def global_index(n, rank, world):  # shard position -> global position
        return torch.cat([torch.arange(s, s + c) for s, c in cp.chunk_positions(n, rank, world)])
    for L, S, world, variant in itertools.product([8, 24], [8, 40], [1, 2, 4], [0, UPPER_LEFT, LOWER_RIGHT]):
        if L % (2 * world) or S % (2 * world):
            continue
        allowed = causal_allowed(L, S, variant) if variant else torch.ones(L, S, dtype=torch.bool)
        q, k = torch.randn(1, 1, L // world, 8), torch.randn(1, 1, S // world, 8)
        covered = torch.zeros(L, S, dtype=torch.int64)
        for r, owner in itertools.product(range(world), range(world)):
            plan = cp._Plan(q, k, k, variant, 1.0, False, None, r, world)
            calls = plan.calls(owner)
            assert len(calls) <= sum(len(p.calls) for *_, p in plan.pairs(owner))
            rows_g, keys_g = global_index(L, r, world), global_index(S, owner, world)
            for rs, ks, causal, rng in calls:
                assert rng is None
                n_r, n_k = rs.stop - rs.start, ks.stop - ks.start
                block = causal_allowed(n_r, n_k, causal) if causal else torch.ones(n_r, n_k, dtype=torch.bool)
                covered[rows_g[rs][:, None], keys_g[ks][None, :]] += block
            drop = cp._Plan(q, k, k, variant, 1.0, False, None, r, world, 0.5, torch.tensor([1, 2]))
            assert len(drop.calls(owner)) == sum(len(p.calls) for *_, p in drop.pairs(owner))
        assert torch.equal(covered, allowed.long()), (L, S, world, variant)
    q = torch.randn(1, 1, 64, 8)
    n_calls = sum(len(cp._Plan(q, q, q, 0, 1.0, False, None, r, 4).calls(o)) for r in range(4) for o in range(4))
    assert n_calls == 16  # one call per (rank, K/V shard) without a mask


def test_chunks_and_errors():
    assert cp.chunk_positions(16, 1, 2) == [(4, 4), (8, 4)]
    with pytest.raises(RuntimeError, match="multiple of 2 x 3"):
        cp.chunk_positions(10, 0, 3)
    if not dist.is_initialized():
        q = torch.randn(1, 2, 8, 4)
        with pytest.raises(RuntimeError, match="process group"):
            cp.attention(q, q, q)


SIM_CASES = [("causal", UPPER_LEFT, False, False, None), ("lower_right_gqa_sinks", LOWER_RIGHT, True, True, None),
             ("bool_keys", 0, False, True, "bool"), ("float_keys_gqa", 0, True, False, "float")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name,causal,gqa,sinks,mask_kind", SIM_CASES, ids=[c[0] for c in SIM_CASES])
@pytest.mark.parametrize("world", [1, 3, 8])
def test_simulated_ranks_match_dense(world, name, causal, gqa, sinks, mask_kind, dtype, device):
    _simulated_case(world, name, causal, gqa, sinks, mask_kind, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("world", [2, 3])
def test_simulated_dropout_matches_dense(world, dtype, device):
    """Dropout through the simulated ranks; causal pairs cut at the diagonal put origins off the 4-key groups of
    the Philox words."""
    _simulated_case(world, "lower_right_gqa_sinks", LOWER_RIGHT, True, True, None, dtype, device, dropout_p=0.25)


def _simulated_case(world, name, causal, gqa, sinks, mask_kind, dtype, device, dropout_p=0.0):
    """The ranks' steps run in one process (cp.simulate) give the dense kernel's answer, forward and backward."""
    if dtype == torch.float64 and device == "cpu" and world == 8:
        pytest.skip("covered at smaller world sizes")
    case = (name, dtype, (1, 4, 48, 16), (1, 2 if gqa else 4, 96 if causal != UPPER_LEFT else 48, 16), 16, causal,
            gqa, sinks, mask_kind, "ring")
    q, k, v, s, mask, gout = (t.to(device) if t is not None else None for t in _full_inputs(case, seed=world))
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)] + (
        [s.detach().clone().requires_grad_()] if s is not None else [])
    L, S = q.shape[-2], k.shape[-2]
    am = mask if mask is not None else (causal_lower_right(L, S) if causal == LOWER_RIGHT else None)
    torch.manual_seed(77)
    out = cp.simulate(*leaves[:3], world, attn_mask=am, is_causal=causal == UPPER_LEFT, enable_gqa=gqa,
                      sinks=leaves[3] if s is not None else None, dropout_p=dropout_p)
    got = [out.detach()] + list(torch.autograd.grad(out, leaves, gout))
    msg = _compare(case, got, q, k, v, s, mask, gout, dropout_p, 77)
    assert not msg, msg
