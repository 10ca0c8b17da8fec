"""Backward alone of the CUDA FLASH backend, and where its time goes (per-kernel times), vs torch's FA2.

    python benchmarks/cuda_bwd_parts.py [--rep MS] [--only NAME]

bf16, B=4, H=16, L=S=4096 (d64 / d128, causal and not), side by side in one process. The backward is timed on
its own: one forward, then torch.autograd.grad(..., retain_graph=True) repeated (medians of do_bench, CUDA events);
it includes the Delta pre-pass, the zeroed dq_accum and its conversion to dq. TFLOP/s counts 2.5 x 4*B*H*L*S*D
(half when causal). Then one profiled backward of sdpax per row lists each kernel's time.
"""
import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import sdpax


def bwd_runner(fn, q, k, v, dout, causal):
    out = fn(q, k, v, is_causal=causal)
    return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--only", default=None)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    B, H, L = 4, 16, 4096
    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; backward only, bf16, B={B} H={H} L=S={L}")
    table = []
    for D in (64, 128):
        for causal in (False, True):
            name = f"d{D}" + (" causal" if causal else "")
            if args.only and args.only not in name:
                continue
            mk = lambda: torch.randn(B, H, L, D, generator=g, device="cuda").to(torch.bfloat16)  # noqa
            q, k, v = (mk().requires_grad_() for _ in range(3))
            dout = mk()
            flops = 2.5 * 4 * B * H * L * L * D * (0.5 if causal else 1.0)
            run = bwd_runner(sdpax.scaled_dot_product_attention, q, k, v, dout, causal)
            ours = run()
            ms = do_bench(run, warmup=10, rep=args.rep, return_mode="median")
            ms2 = do_bench(run, warmup=10, rep=args.rep, return_mode="median")
            row = [name, ms, flops / ms / 1e9, flops / ms2 / 1e9]
            if not args.no_torch:
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    trun = bwd_runner(F.scaled_dot_product_attention, q, k, v, dout, causal)
                    ref = trun()
                    tms = do_bench(trun, warmup=10, rep=args.rep, return_mode="median")
                err = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(ours, ref)]
                row += [flops / tms / 1e9, max(err)]
            table.append(row)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    run()
                torch.cuda.synchronize()
            print(f"-- {name}: sdpax backward kernels (us per call, 5 calls)")
            for ev in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]:
                print(f"   {ev.device_time_total / 5:10.1f}  {ev.key[:100]}")
            del q, k, v, dout, run, ours
    print(f"{'case':<12}{'sdpax ms':>10}{'TFLOP/s':>9}{'(again)':>9}{'FA2':>9}{'rel diff':>10}")
    for r in table:
        print(f"{r[0]:<12}{r[1]:10.3f}{r[2]:9.1f}{r[3]:9.1f}" + (f"{r[4]:9.1f}{r[5]:10.2e}" if len(r) > 4 else ""))


if __name__ == "__main__":
    main()
