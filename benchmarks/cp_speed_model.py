"""Context parallelism's speed model on one GPU: the per-pair kernel calls of sdpax.distributed for P ranks,
all run on this device, against one dense call on the whole sequence (same inputs, same process).

    python benchmarks/cp_speed_model.py [--L 131072] [--ranks 2 4 8]

Prints, per P: the time of the pair calls alone (what the ranks' kernels cost in total), of the whole simulated
forward (calls + log-sum-exp merges), and their ratios to the dense call. Exchanges are not timed (one device).
FLOPs: 4 * B * Hq * L * S * D per forward, halved when causal.
"""
from __future__ import annotations

import argparse
import math

import torch

import sdpax
import sdpax.distributed as cp
from sdpax import _ops


def timed(fn, iters=3):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = math.inf
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def pair_calls(q, k, v, world, causal):
    """Every rank's pair calls of the forward, without the merges."""
    plans = [cp._Plan(cp.shard_of(q, r, world), cp.shard_of(k, r, world), v, causal, 1 / math.sqrt(q.shape[-1]),
                      True, None, r, world) for r in range(world)]
    qs = [cp.shard_of(q, r, world) for r in range(world)]
    ks = [cp.shard_of(k, r, world) for r in range(world)]
    vs = [cp.shard_of(v, r, world) for r in range(world)]

    def run():
        for r, plan in enumerate(plans):
            for owner in range(world):
                for r0, c0, pair in plan.pairs(owner):
                    for rows, keys, c in pair.calls:
                        rs = slice(r0 + rows.start, r0 + rows.stop)
                        kk = slice(c0 + keys.start, c0 + keys.stop)
                        _ops.fwd(qs[r][..., rs, :], ks[owner][..., kk, :], vs[owner][..., kk, :], None, 0.0, c,
                                 plan.scale, True, None, None, int(plan.backend))
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, default=131072)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    L, D = args.L, args.d
    q = torch.randn(1, args.hq, L, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, args.hkv, L, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, args.hkv, L, D, device="cuda", dtype=torch.bfloat16)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  bf16  B=1 Hq={args.hq} Hkv={args.hkv} "
          f"L=S={L} D={D}")
    print(f"{'causal':>6} {'P':>3} {'dense ms':>9} {'TFLOP/s':>8} {'pairs ms':>9} {'pairs/dense':>11} "
          f"{'sim fwd ms':>10} {'sim/dense':>9}")
    for causal in (False, True):
        flops = 4 * args.hq * L * L * D / (2 if causal else 1)
        dense = timed(lambda: sdpax.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True))
        for world in args.ranks:
            pairs = timed(pair_calls(q, k, v, world, 1 if causal else 0))
            sim = timed(lambda: cp.simulate(q, k, v, world, is_causal=causal, enable_gqa=True))
            print(f"{str(causal):>6} {world:>3} {dense * 1e3:>9.2f} {flops / dense / 1e12:>8.0f} {pairs * 1e3:>9.2f} "
                  f"{pairs / dense:>11.3f} {sim * 1e3:>10.2f} {sim / dense:>9.3f}")


if __name__ == "__main__":
    main()
