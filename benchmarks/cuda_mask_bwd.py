"""Bool / padding mask cost of the CUDA backward, alone and fwd+bwd (a short run for one build).

    python benchmarks/cuda_mask_bwd.py [--dims 128,64] [--rep MS]

bf16, B=4, H=16, L=S=4096. Masks as in issue 4: "bool" (B,1,L,S) random halves (no tile skipped), "pad" (B,1,1,S)
keeping keys S/2..S, "plain" no mask. TFLOP/s counts the dense FLOPs: 4*B*H*L*S*D x2.5 for the backward alone
(torch.autograd.grad(..., retain_graph=True) after one forward) and x3.5 for fwd+bwd. Medians of do_bench.
"""
import argparse

import torch
from triton.testing import do_bench

import sdpax


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="128,64")
    ap.add_argument("--rep", type=int, default=30)
    args = ap.parse_args()
    B, H, L = 4, 16, 4096
    g = torch.Generator(device="cuda").manual_seed(0)
    for D in (int(d) for d in args.dims.split(",")):
        mk = lambda: torch.randn(B, H, L, D, generator=g, device="cuda").to(torch.bfloat16)  # noqa: E731
        q, k, v = (mk().requires_grad_() for _ in range(3))
        dout = mk()
        for kind in ("plain", "bool", "pad"):
            kw = {}
            if kind == "bool":
                kw["attn_mask"] = torch.rand(B, 1, L, L, generator=g, device="cuda") > 0.5
            elif kind == "pad":
                kw["attn_mask"] = (torch.arange(L, device="cuda") >= L // 2).view(1, 1, 1, L).expand(B, 1, 1, L)
            out = sdpax.scaled_dot_product_attention(q, k, v, **kw)
            bwd = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)  # noqa: E731
            both = lambda: torch.autograd.grad(sdpax.scaled_dot_product_attention(q, k, v, **kw), (q, k, v), dout)  # noqa
            f = 4.0 * B * H * L * L * D
            tb = do_bench(bwd, warmup=5, rep=args.rep, return_mode="median")
            tf = do_bench(both, warmup=5, rep=args.rep, return_mode="median")
            print(f"d{D} {kind:<6} bwd {tb:7.3f} ms {2.5 * f / tb / 1e9:6.1f} TFLOP/s   fwd+bwd {tf:7.3f} ms "
                  f"{3.5 * f / tf / 1e9:6.1f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
