"""Backward alone of the CUDA FLASH backend, and where its time goes (per-kernel times), vs torch's FA2.

    python benchmarks/cuda_bwd_parts.py [--rep MS] [--only NAME] [--general] [--dims 64,128,256] [--sm90]

bf16, B=4, H=16 (d256: H=8), L=S=4096 (d64 / d128 by default, causal and not), side by side in one process.
--general: the general kind instead (each head dim with a bool mask (B,1,L,S) of random halves, a padding mask
(B,1,1,S) keeping S/2..S keys, an all-true padding mask ("pad1": the general kind's cost without skipped tiles),
dropout 0.1); torch's column is then its default backend for the masks (FA2 takes no mask) and FA2 for dropout, and
the rel diff is left out where dropout makes the two differ. The backward is timed on its own: one forward, then
torch.autograd.grad(..., retain_graph=True) repeated (medians of do_bench, CUDA events); it includes the Delta pre-
pass, the zeroed dq_accum and its conversion to dq. TFLOP/s counts 2.5 x 4*B*H*L*S*D (half when causal). Then one
profiled backward of sdpax per row lists each kernel's time. --sm90: also time
sdpax's mma.sync backward main loop (SDPAX_CUDA_BWD_SM90=0, read per call) beside the Hopper one (=1) in the same
process ("mma" column).
"""
import argparse
import contextlib
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import sdpax


def bwd_runner(fn, q, k, v, dout, causal, **kw):
    out = fn(q, k, v, is_causal=causal, **kw)
    return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--only", default=None)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--general", action="store_true")
    ap.add_argument("--dims", default="64,128", help="head dims, comma-separated (d256 rows take H=8)")
    ap.add_argument("--sm90", action="store_true")
    args = ap.parse_args()
    B, L = 4, 4096
    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; backward only, bf16, B={B} H=16 (d256: 8) "
          f"L=S={L}")
    table = []
    kinds = ("bool", "pad", "pad1", "dropout") if args.general else ("plain", "causal")
    for D in (int(d) for d in args.dims.split(",")):
        H = 16 if D <= 128 else 8
        for kind in kinds:
            causal = kind == "causal"
            name = f"d{D}" + ("" if kind == "plain" else " " + kind)
            if args.only and args.only not in name:
                continue
            mk = lambda: torch.randn(B, H, L, D, generator=g, device="cuda").to(torch.bfloat16)  # noqa
            q, k, v = (mk().requires_grad_() for _ in range(3))
            dout = mk()
            kw = {}
            if kind == "bool":
                m = torch.rand(B, 1, L, L, generator=g, device="cuda") > 0.5
                m[..., 0] = True
                kw["attn_mask"] = m
            elif kind == "pad":
                lengths = torch.randint(L // 2, L + 1, (B,), generator=g, device="cuda")
                kw["attn_mask"] = (torch.arange(L, device="cuda")[None, :] < lengths[:, None]).view(B, 1, 1, L)
            elif kind == "pad1":
                kw["attn_mask"] = torch.ones(B, 1, 1, L, dtype=torch.bool, device="cuda")
            elif kind == "dropout":
                kw["dropout_p"] = 0.1
            flops = 2.5 * 4 * B * H * L * L * D * (0.5 if causal else 1.0)
            run = bwd_runner(sdpax.scaled_dot_product_attention, q, k, v, dout, causal, **kw)
            ours = run()
            ms = do_bench(run, warmup=10, rep=args.rep, return_mode="median")
            ms2 = do_bench(run, warmup=10, rep=args.rep, return_mode="median")
            row = [name, ms, flops / ms / 1e9, flops / ms2 / 1e9]
            if args.sm90:
                os.environ["SDPAX_CUDA_BWD_SM90"] = "0"
                old = run()
                mms = do_bench(run, warmup=10, rep=args.rep, return_mode="median")
                os.environ["SDPAX_CUDA_BWD_SM90"] = "1"
                diff = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(ours, old))
                row += [flops / mms / 1e9, diff]
            if not args.no_torch:
                masked = "attn_mask" in kw
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if not masked else contextlib.nullcontext():
                    trun = bwd_runner(F.scaled_dot_product_attention, q, k, v, dout, causal, **kw)
                    ref = trun()
                    tms = do_bench(trun, warmup=10, rep=args.rep, return_mode="median")
                err = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(ours, ref)]
                if kind == "dropout":
                    err = [float("nan")]
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
    print(f"{'case':<12}{'sdpax ms':>10}{'TFLOP/s':>9}{'(again)':>9}"
          + (f"{'mma':>9}{'vs mma':>10}" if args.sm90 else "") + f"{'torch':>9}{'rel diff':>10}")
    for r in table:
        extra = r[4:]
        text = f"{r[0]:<12}{r[1]:10.3f}{r[2]:9.1f}{r[3]:9.1f}"
        if args.sm90:
            text += f"{extra[0]:9.1f}{extra[1]:10.2e}"
            extra = extra[2:]
        if extra:
            text += f"{extra[0]:9.1f}{extra[1]:10.2e}"
        print(text)


if __name__ == "__main__":
    main()
