"""Context-parallel attention: q, k and v sharded along the sequence over a torch.distributed process group.

    q_r, k_r, v_r = (sdpax.distributed.shard(t, dim=-2, group=pg) for t in (q, k, v))   # this rank's shard
    out_r = sdpax.distributed.attention(q_r, k_r, v_r, group=pg, is_causal=True)
    out = sdpax.distributed.unshard(out_r, dim=-2, group=pg)                            # == sdpax on q, k, v

Each rank holds the same two chunks of the query sequence and of the key sequence: with P ranks a sequence is cut
into 2P equal chunks and rank r holds chunks r and 2P - 1 - r ("zig-zag"), so under a causal mask every rank does
the same work. The result on a rank is its shard of the output, equal to single-device sdpax on the gathered
tensors within rounding; forward and backward.

How: every (query chunk, key chunk) pair is computed by sdpax's kernels, which return the rows' log-sum-exp; the
partial outputs are merged by log-sum-exp in float32 (float64 for float64 inputs) on the device, and sinks join
the denominator once, after the merge. A causal pair whose diagonal is offset from the kernel's alignments is cut
into at most two calls that are upper-left-aligned or unmasked, so no L x S mask is ever built. Without dropout,
calls on adjacent blocks of the shards merge into one (one call per K/V shard when nothing is masked, P + 1 per
rank under the zig-zag causal layout instead of about 2P): fewer launches, each paying its ramp-up once. The
backward is FlashAttention's: each pair's gradient from the merged output and log-sum-exp, dK/dV summed on the
owning rank.

Strategies (`strategy=`): "ring" passes K/V (and the key side of the mask) around the ring, the next transfer
posted before the current pair is computed so that communication overlaps compute; in the backward dK/dV travel
with them back to their owner. "allgather" gathers K/V once (one collective, memory for the whole K/V sequence)
and sums dK/dV with one all-reduce. "auto" (the default) gathers when the whole sequence's K/V is no larger than
this rank's queries and outputs (GQA-heavy shapes: per-rank memory stays O(L / P)), and rings otherwise.

Features: both causal alignments (`is_causal=True` or a `CausalBias` of the global lengths, sdpax's or torch's),
L != S, GQA, sinks, custom scale, and a key-side mask (bool or additive, size 1 in the query dim, sharded with
K/V), and dropout: every pair's kernel call gets rng = {seed, offset, row0, col0}, its origin in the global
problem, so it draws the decisions of those elements of the single-device call (the {seed, offset} is drawn on
the group's first rank and broadcast). Every backend takes an origin (on CUDA the mma.sync loops: the Hopper
forward does not).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from . import _causal, _composite, _ops, _select
from ._errors import AttentionError
from .functional import _bias_of, _check, _draw_rng, default_scale

__all__ = ["attention", "shard", "unshard", "shard_of", "from_shards", "chunk_positions", "choose_strategy", "simulate",
           "ContextParallelAttention"]

_NONE, _UPPER_LEFT, _LOWER_RIGHT = 0, 1, 2


# ---- the zig-zag layout ----

def chunk_positions(n: int, rank: int, world: int) -> list[tuple[int, int]]:
    """(start, length) in the global sequence of the chunks rank holds, in the order it holds them."""
    if n % (2 * world):
        raise AttentionError(f"sdpax.distributed: sequence length {n} must be a multiple of 2 x {world} ranks "
                             "(two chunks per rank)")
    c = n // (2 * world)
    return [(rank * c, c), ((2 * world - 1 - rank) * c, c)]


def shard_of(t: torch.Tensor, rank: int, world: int, dim: int = -2) -> torch.Tensor:
    """Rank `rank`'s zig-zag shard of a full-sequence tensor, for `world` ranks (no communication)."""
    return torch.cat([t.narrow(dim, s, n) for s, n in chunk_positions(t.shape[dim], rank, world)], dim)


def from_shards(parts: list, dim: int = -2) -> torch.Tensor:
    """The full-sequence tensor from every rank's zig-zag shard, in rank order (no communication)."""
    world = len(parts)
    n = parts[0].shape[dim] * world
    out = [None] * (2 * world)
    for r, part in enumerate(parts):
        for (s, c), piece in zip(chunk_positions(n, r, world), part.split(part.shape[dim] // 2, dim)):
            out[s // c] = piece
    return torch.cat(out, dim)


def shard(t: torch.Tensor, dim: int = -2, group=None) -> torch.Tensor:
    """This rank's zig-zag shard of a full-sequence tensor (dim is the sequence dim)."""
    return shard_of(t, dist.get_rank(group), dist.get_world_size(group), dim)


def unshard(t: torch.Tensor, dim: int = -2, group=None) -> torch.Tensor:
    """The full-sequence tensor from every rank's zig-zag shard (an all-gather)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return from_shards(parts, dim)


# ---- one (query chunk, key chunk) pair ----

class _Pair:
    """The calls that compute query chunk (qs, lq) against key chunk (ks, lk): a list of (row slice, key slice,
    causal) with causal in {none, upper-left} relative to the slices; empty when no key is visible."""

    def __init__(self, qs, lq, ks, lk, causal: int, shift: int):
        self.calls = []
        if causal == _NONE:
            self.calls.append((slice(0, lq), slice(0, lk), _NONE))
            return
        d = qs - ks + shift  # key j of the chunk is visible to row i iff j <= i + d
        if d >= lk - 1:
            self.calls.append((slice(0, lq), slice(0, lk), _NONE))
        elif d + lq - 1 < 0:
            pass
        elif d >= 0:  # keys [0, d) are visible to every row; keys [d, lk) form an upper-left triangle
            if d > 0:
                self.calls.append((slice(0, lq), slice(0, d), _NONE))
            self.calls.append((slice(0, lq), slice(d, lk), _UPPER_LEFT))
        else:  # rows [0, -d) see no key; rows [-d, lq) form an upper-left triangle
            self.calls.append((slice(-d, lq), slice(0, lk), _UPPER_LEFT))


def _merge_calls(calls):
    """Calls without dropout, merged while two of them cover adjacent blocks: unmasked ones with the same rows and
    adjacent keys (or the same keys and adjacent rows), and an unmasked block followed by a square upper-left
    triangle on the same rows, which together are one lower-right triangle (row i sees the unmasked keys and the
    triangle's first i + 1)."""
    calls = list(calls)
    merged = True
    while merged:
        merged = False
        for a in range(len(calls)):
            for b in range(len(calls)):
                if a == b:
                    continue
                (ra, ka, ca, _), (rb, kb, cb, _) = calls[a], calls[b]
                joined = None
                if ca == _NONE and ka.stop == kb.start and ra == rb:
                    if cb == _NONE:
                        joined = (ra, slice(ka.start, kb.stop), _NONE, None)
                    elif cb == _UPPER_LEFT and rb.stop - rb.start == kb.stop - kb.start:
                        joined = (ra, slice(ka.start, kb.stop), _LOWER_RIGHT, None)
                elif ca == cb == _NONE and ka == kb and ra.stop == rb.start:
                    joined = (slice(ra.start, rb.stop), ka, _NONE, None)
                if joined is not None:
                    calls = [c for i, c in enumerate(calls) if i not in (a, b)] + [joined]
                    merged = True
                    break
            if merged:
                break
    return calls


def _merge_into(out_acc, lse_acc, out_b, lse_b):
    """Merges a partial (out_b, lse_b) into the running (out_acc, lse_acc) over the same rows, in place (views of
    the accumulators: one read and one write of the float32 output per pair)."""
    new = torch.logaddexp(lse_acc, lse_b)
    safe = torch.where(torch.isfinite(new), new, 0.0)
    w_acc = torch.where(torch.isfinite(lse_acc), torch.exp(lse_acc - safe), 0.0)
    w_b = torch.where(torch.isfinite(lse_b), torch.exp(lse_b - safe), 0.0)
    out_acc.mul_(w_acc.unsqueeze(-1)).addcmul_(out_b, w_b.unsqueeze(-1))
    lse_acc.copy_(new)


def _rows(t, sl):
    return t[..., sl, :]


class _Plan:
    """What every pair of this call needs: lengths, causal alignment, scale, backend, the chunks per rank."""

    def __init__(self, query, key, value, causal, scale, enable_gqa, group, rank, world, dropout_p=0.0, rng=None):
        self.group, self.rank, self.world = group, rank, world
        self.dropout_p, self.rng = float(dropout_p), rng  # rng: {seed, offset}, the same on every rank
        self.L, self.S = query.shape[-2] * world, key.shape[-2] * world
        self.causal = causal
        self.shift = self.S - self.L if causal == _LOWER_RIGHT else 0
        self.scale = scale
        self.gqa = enable_gqa
        self.acc = _composite.acc_dtype(query.dtype)
        call = _select.Call(query.device, query.dtype, query.shape[-1], value.shape[-1], False,
                            zero_scale=scale == 0.0, dropout_origin=self.dropout_p > 0.0)
        self.backend = _select.select(call)
        self.q_chunks = chunk_positions(self.L, self.rank, self.world)
        self._calls = {}  # owner -> calls(owner)

    def k_chunks(self, owner):
        return chunk_positions(self.S, owner, self.world)

    def pairs(self, owner):
        """(row offset in this rank's shard, key offset in the owner's shard, (row, key) offsets in the global
        sequences, _Pair) of every pair with a visible key, for the K/V shard of rank `owner`."""
        for qi, (qs, lq) in enumerate(self.q_chunks):
            for ki, (ks, lk) in enumerate(self.k_chunks(owner)):
                pair = _Pair(qs, lq, ks, lk, self.causal, self.shift)
                if pair.calls:
                    yield qi * lq, ki * lk, (qs, ks), pair

    def calls(self, owner):
        """(row slice of this rank's shard, key slice of the owner's shard, causal, rng) of every kernel call against
        the K/V shard of rank `owner`. Without dropout, calls on adjacent slices merge (_merge_calls): fewer, larger
        launches, each paying its ramp-up and tail once. With dropout each call keeps one origin (a merged call's
        keys would not be contiguous in the global sequence). Computed once per owner: the backward reuses the
        forward's plan, calls and rng tensors."""
        if owner in self._calls:
            return self._calls[owner]
        out = []
        for r0, c0, origin, pair in self.pairs(owner):
            for rows, keys, causal in pair.calls:
                out.append((slice(r0 + rows.start, r0 + rows.stop), slice(c0 + keys.start, c0 + keys.stop), causal,
                            self.call_rng(origin, rows, keys)))
        self._calls[owner] = out if self.dropout_p > 0.0 else _merge_calls(out)
        return self._calls[owner]

    def call_rng(self, origin, rows, keys):
        """The rng of one kernel call: {seed, offset, row0, col0} with the call's origin in the global problem, so
        its dropout decisions are the single-device call's (None without dropout)."""
        if self.dropout_p == 0.0:
            return None
        at = torch.tensor([origin[0] + rows.start, origin[1] + keys.start], dtype=torch.int64)
        return torch.cat([self.rng, at.to(self.rng.device)])


def _forward_block(plan, q, k, v, mask, out_acc, lse_acc, owner):
    for rs, ks, causal, rng in plan.calls(owner):
        m = None if mask is None else mask[..., ks]
        o, lse = _ops.fwd(_rows(q, rs), _rows(k, ks), _rows(v, ks), m, plan.dropout_p, causal, plan.scale, plan.gqa,
                          None, rng, int(plan.backend))
        _merge_into(out_acc[..., rs, :], lse_acc[..., rs], o, lse.to(plan.acc))


def _backward_block(plan, q, k, v, mask, out, lse, dout, dq, dk, dv, owner):
    """Adds this K/V block's contributions to dq (this rank's rows) and dk, dv (the block's keys)."""
    for rs, ks, causal, rng in plan.calls(owner):
        m = None if mask is None else mask[..., ks]
        args = (_rows(dout, rs), _rows(q, rs), _rows(k, ks), _rows(v, ks), m, _rows(out, rs),
                lse[..., rs].contiguous())
        if plan.backend == _select.SDPBackend.MATH:
            # MATH's own backward recomputes the softmax from the pair's scores alone; the pair's share of the
            # gradient needs the merged lse and output, which the composite takes as given.
            g = _composite.gradients(*args, plan.dropout_p, causal, plan.scale, None, rng, False)
        else:
            g = _ops.bwd(*args, plan.dropout_p, causal, plan.scale, plan.gqa, None, rng, int(plan.backend), False)
        dq[..., rs, :] += g[0].to(dq.dtype)
        dk[..., ks, :] += g[1].to(dk.dtype)
        dv[..., ks, :] += g[2].to(dv.dtype)


def _with_sinks(plan, out_acc, lse_acc, sinks, dtype):
    """The merged rows with the sinks joining each denominator once, after every block: (out in dtype, lse)."""
    if sinks is not None:
        sink = sinks.to(plan.acc).view(-1, 1)
        lse_all = torch.logaddexp(lse_acc, sink.expand_as(lse_acc))
        out_acc = out_acc * torch.where(torch.isfinite(lse_acc), torch.exp(lse_acc - lse_all), 0.0).unsqueeze(-1)
        lse_acc = lse_all
    return out_acc.to(dtype), lse_acc


def _sinks_grad(plan, dout, out, lse, sinks):
    """This rank's rows' share of d(loss)/d(sinks): -sum over rows of P(sink) * rowsum(dO * O)."""
    delta = (dout.to(plan.acc) * out.to(plan.acc)).sum(-1)
    p_sink = torch.exp(sinks.to(plan.acc).view(-1, 1) - lse)
    return -(p_sink * delta).sum(-1).reshape(-1, sinks.shape[0]).sum(0)


# ---- communication ----

def _ring_exchange(plan, tensors):
    """Posts the send of `tensors` to the next rank and the receive of the previous rank's; returns (received
    buffers, requests)."""
    nxt, prv = (plan.rank + 1) % plan.world, (plan.rank - 1) % plan.world
    g = plan.group
    nxt_g = nxt if g is None else dist.get_global_rank(g, nxt)
    prv_g = prv if g is None else dist.get_global_rank(g, prv)
    recv = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), nxt_g, g) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, prv_g, g) for r in recv]
    return recv, dist.batch_isend_irecv(ops)


def _gather(plan, t):
    parts = [torch.empty_like(t) for _ in range(plan.world)]
    dist.all_gather(parts, t.contiguous(), group=plan.group)
    return parts


def choose_strategy(query, key, value, world: int) -> str:
    """The "auto" rule: "allgather" when the whole sequence's K/V (what gathering holds on every rank) is no larger
    than this rank's queries and outputs, so per-rank memory stays O(L / P); "ring" otherwise."""
    kv_all = (key.numel() + value.numel()) * world
    q_and_out = query.numel() + math.prod(query.shape[:-1]) * value.shape[-1]
    return "allgather" if kv_all <= q_and_out else "ring"


class _ContextParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, sinks, mask, plan, strategy):
        out_acc = query.new_zeros((*query.shape[:-1], value.shape[-1]), dtype=plan.acc)
        lse_acc = query.new_full(query.shape[:-1], -math.inf, dtype=plan.acc)
        tensors = [key, value] + ([mask] if mask is not None else [])
        if strategy == "allgather":
            gathered = [_gather(plan, t) for t in tensors]
            for owner in range(plan.world):
                k, v, *m = (g[owner] for g in gathered)
                _forward_block(plan, query, k, v, m[0] if m else None, out_acc, lse_acc, owner)
        else:
            current = tensors
            for step in range(plan.world):
                owner = (plan.rank - step) % plan.world
                pending = _ring_exchange(plan, current) if step + 1 < plan.world else None
                k, v, *m = current
                _forward_block(plan, query, k, v, m[0] if m else None, out_acc, lse_acc, owner)
                if pending is not None:
                    current, reqs = pending
                    for req in reqs:
                        req.wait()
        out, lse_acc = _with_sinks(plan, out_acc, lse_acc, sinks, query.dtype)
        ctx.save_for_backward(query, key, value, sinks, mask, out, lse_acc)
        ctx.plan, ctx.strategy = plan, strategy
        return out

    @staticmethod
    def backward(ctx, dout):
        query, key, value, sinks, mask, out, lse = ctx.saved_tensors
        plan, strategy = ctx.plan, ctx.strategy
        dout = dout.contiguous()
        dq = torch.zeros_like(query, dtype=plan.acc)
        tensors = [key, value] + ([mask] if mask is not None else [])
        if strategy == "allgather":
            gathered = [_gather(plan, t) for t in tensors]
            dks = [torch.zeros_like(key, dtype=plan.acc) for _ in range(plan.world)]
            dvs = [torch.zeros_like(value, dtype=plan.acc) for _ in range(plan.world)]
            for owner in range(plan.world):
                k, v, *m = (g[owner] for g in gathered)
                _backward_block(plan, query, k, v, m[0] if m else None, out, lse, dout, dq, dks[owner], dvs[owner],
                                owner)
            dk_all, dv_all = torch.stack(dks), torch.stack(dvs)
            dist.all_reduce(dk_all, group=plan.group)
            dist.all_reduce(dv_all, group=plan.group)
            dk, dv = dk_all[plan.rank], dv_all[plan.rank]
        else:
            dk, dv = torch.zeros_like(key, dtype=plan.acc), torch.zeros_like(value, dtype=plan.acc)
            current = tensors
            for step in range(plan.world):
                owner = (plan.rank - step) % plan.world
                pending = _ring_exchange(plan, current) if step + 1 < plan.world else None
                k, v, *m = current
                _backward_block(plan, query, k, v, m[0] if m else None, out, lse, dout, dq, dk, dv, owner)
                if plan.world > 1:  # dK/dV of this block travel one step behind it: after the last step, home
                    grads, greqs = _ring_exchange(plan, [dk, dv])
                    for req in greqs:
                        req.wait()
                    dk, dv = grads
                if pending is not None:
                    current, reqs = pending
                    for req in reqs:
                        req.wait()
        dsinks = None
        if sinks is not None:
            dsinks = _sinks_grad(plan, dout, out, lse, sinks)
            dist.all_reduce(dsinks, group=plan.group)  # the sinks are replicated: every rank gets the whole sum
            dsinks = dsinks.to(sinks.dtype)
        return (dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype), dsinks, None, None, None)


def _prepare(query, key, value, attn_mask, is_causal, scale, enable_gqa, sinks, world, dropout_p=0.0):
    """Checks the arguments of this rank's shards; returns (key-side mask or None, causal id, scale)."""
    mask = attn_mask if attn_mask is not None and not _causal.is_causal_bias(attn_mask) else None
    _check(query, key, value, mask, dropout_p, sinks)
    L, S = query.shape[-2] * world, key.shape[-2] * world
    bias = _bias_of(attn_mask, L, S) if mask is None and attn_mask is not None else None
    if bias is not None and bias[1] >= 0:
        raise AttentionError("sdpax.distributed: a sliding-window CausalBias is not supported; the ring runs whole "
                             "causal or non-causal attention")
    causal = None if bias is None else bias[0]
    if causal is not None and is_causal:
        raise AttentionError("sdpax.distributed: pass either a CausalBias or is_causal=True, not both")
    if mask is not None and is_causal:
        raise AttentionError("sdpax.distributed: attn_mask and is_causal=True cannot be combined")
    causal = causal if causal is not None else (_UPPER_LEFT if is_causal else _NONE)
    if mask is not None:
        if mask.dim() < 2 or mask.shape[-2] != 1 or mask.shape[-1] != key.shape[-2]:
            raise AttentionError(
                "sdpax.distributed: attn_mask must be the key side of a mask: size 1 in the query dim and this "
                f"rank's {key.shape[-2]} keys in the last dim, got shape {tuple(mask.shape)}")
        mask = mask.expand(*query.shape[:-2], 1, key.shape[-2]) if mask.dim() < query.dim() else mask
    if query.shape[-1] == 0:
        raise AttentionError("sdpax.distributed: head dim 0 is not supported")
    scale = default_scale(query, scale)
    hq = query.shape[-3] if query.dim() >= 3 else 1
    hk = key.shape[-3] if key.dim() >= 3 else 1
    if hq != hk and not (enable_gqa and hk > 0 and hq % hk == 0):
        raise AttentionError(f"sdpax.distributed: query has {hq} heads and key/value {hk}; pass enable_gqa=True "
                             "with a number of query heads divisible by the key/value heads")
    return mask, causal, scale


def attention(query, key, value, group=None, *, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
              sinks=None, dropout_p=0.0, strategy="auto"):
    """Exact attention over sequence-sharded q, k, v (this rank's zig-zag shards); returns this rank's shard of
    the output. attn_mask: None, a CausalBias of the global lengths (sdpax's or torch's), or a key-side mask of
    this rank's keys (size 1 in the query dim, bool or additive). dropout_p: the elements a single-device call
    drops with the generator state of the group's first rank (its {seed, offset} is broadcast)."""
    if not dist.is_available() or not dist.is_initialized():
        raise AttentionError("sdpax.distributed.attention needs an initialised torch.distributed process group")
    world = dist.get_world_size(group)
    mask, causal, scale = _prepare(query, key, value, attn_mask, is_causal, scale, enable_gqa, sinks, world,
                                   dropout_p)
    if strategy not in ("auto", "ring", "allgather"):
        raise AttentionError(f"sdpax.distributed: strategy must be 'auto', 'ring' or 'allgather', got {strategy!r}")
    if strategy == "auto":
        strategy = choose_strategy(query, key, value, world)
    rng = None
    if dropout_p > 0.0:
        rng = _draw_rng(query.device)
        dist.broadcast(rng, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    plan = _Plan(query, key, value, causal, scale, bool(enable_gqa), group, dist.get_rank(group), world, dropout_p,
                 rng)
    return _ContextParallel.apply(query, key, value, sinks, mask, plan, strategy)


class _Simulated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, sinks, mask, plans):
        world = len(plans)
        qs, ks, vs = ([shard_of(t, r, world) for r in range(world)] for t in (query, key, value))
        ms = [shard_of(mask, r, world, -1) if mask is not None else None for r in range(world)]
        outs, lses = [], []
        for r, plan in enumerate(plans):
            out_acc = qs[r].new_zeros((*qs[r].shape[:-1], value.shape[-1]), dtype=plan.acc)
            lse_acc = qs[r].new_full(qs[r].shape[:-1], -math.inf, dtype=plan.acc)
            for owner in range(world):
                _forward_block(plan, qs[r], ks[owner], vs[owner], ms[owner], out_acc, lse_acc, owner)
            out, lse = _with_sinks(plan, out_acc, lse_acc, sinks, query.dtype)
            outs.append(out)
            lses.append(lse)
        ctx.save_for_backward(sinks, *qs, *ks, *vs, *outs, *lses)
        ctx.plans, ctx.ms = plans, ms
        return from_shards(outs)

    @staticmethod
    def backward(ctx, dout):
        plans, ms, world = ctx.plans, ctx.ms, len(ctx.plans)
        sinks, *saved = ctx.saved_tensors
        qs, ks, vs, outs, lses = (saved[i * world:(i + 1) * world] for i in range(5))
        douts = [shard_of(dout, r, world).contiguous() for r in range(world)]
        acc = plans[0].acc
        dqs = [torch.zeros_like(q, dtype=acc) for q in qs]
        dks = [torch.zeros_like(k, dtype=acc) for k in ks]
        dvs = [torch.zeros_like(v, dtype=acc) for v in vs]
        for r, plan in enumerate(plans):
            for owner in range(world):
                _backward_block(plan, qs[r], ks[owner], vs[owner], ms[owner], outs[r], lses[r], douts[r], dqs[r],
                                dks[owner], dvs[owner], owner)
        dsinks = None
        if sinks is not None:
            dsinks = sum(_sinks_grad(p, douts[r], outs[r], lses[r], sinks) for r, p in enumerate(plans))
            dsinks = dsinks.to(sinks.dtype)
        return (from_shards(dqs).to(qs[0].dtype), from_shards(dks).to(ks[0].dtype), from_shards(dvs).to(vs[0].dtype),
                dsinks, None, None)


def simulate(query, key, value, world: int, *, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
             sinks=None, dropout_p=0.0):
    """`attention`'s algorithm for `world` ranks run in this process on full-sequence tensors: every rank's shards,
    pairs, kernel calls and merges, with the exchanges replaced by indexing; returns the full output
    (differentiable). For checking and timing the per-pair kernel calls on one device. attn_mask: a CausalBias of
    the full lengths or a full key-side mask."""
    for t in (query, key):
        chunk_positions(t.shape[-2], 0, world)  # the lengths must split into 2 x world chunks
    qs, ks, vs = (shard_of(t, 0, world) for t in (query, key, value))
    m0 = attn_mask
    if isinstance(attn_mask, torch.Tensor) and not _causal.is_causal_bias(attn_mask):
        m0 = shard_of(attn_mask, 0, world, -1)
    mask, causal, scale = _prepare(qs, ks, vs, m0, is_causal, scale, enable_gqa, sinks, world, dropout_p)
    if mask is not None:
        mask = attn_mask.expand(*query.shape[:-2], 1, key.shape[-2]) if attn_mask.dim() < query.dim() else attn_mask
    rng = _draw_rng(query.device) if dropout_p > 0.0 else None
    plans = [_Plan(qs, ks, vs, causal, scale, bool(enable_gqa), None, r, world, dropout_p, rng) for r in range(world)]
    return _Simulated.apply(query, key, value, sinks, mask, plans)


class ContextParallelAttention(torch.nn.Module):
    """nn.Module form of `attention` for one process group: forward(q, k, v, **kwargs) on this rank's shards."""

    def __init__(self, group=None, strategy: str = "auto"):
        super().__init__()
        self.group, self.strategy = group, strategy

    def forward(self, query, key, value, **kwargs):
        return attention(query, key, value, self.group, strategy=self.strategy, **kwargs)
