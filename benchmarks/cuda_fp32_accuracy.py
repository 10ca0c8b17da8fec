"""float32 accuracy of sdpax FLASH_ATTENTION on CUDA against float64, next to torch's own float32 attention.

    python benchmarks/cuda_fp32_accuracy.py                       # L in 128 1024 4096, D in 64 128 256, 4 masks
    python benchmarks/cuda_fp32_accuracy.py --lengths 1024 --dims 64 --masks plain causal
    python benchmarks/cuda_fp32_accuracy.py --out acc.md          # also write the table to a file

Builds nothing. For each case (B=2, H=4, L=S, head dim D; mask: plain / causal / bool (B,1,L,S) / additive float32
(B,1,L,S)) it computes out, dq, dk, dv with
  sdpax      sdpax FLASH forced (float32 split-TF32 kernels),
  torch MATH torch's F.scaled_dot_product_attention on its MATH backend in float32 with TF32 off (cuBLAS FFMA
             products: torch's own float32 attention, the baseline of the issue),
  torch def  torch's default backend in float32 (memory-efficient attention for these calls), TF32 off,
and the float64 MATH result as the reference. Errors are max-relative (max |x - ref| / max |ref|) and RMS-relative
(||x - ref|| / ||ref||); the last columns are sdpax's errors over torch MATH's. The summary line per tensor gives
the worst ratio over all cases.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend as TorchBackend
from torch.nn.attention import sdpa_kernel as torch_kernel

import sdpax

NAMES = ("out", "dq", "dk", "dv")


def errors(x, ref):
    d = (x.double() - ref).abs()
    return (d.max() / ref.abs().max().clamp_min(1e-300)).item(), (d.norm() / ref.norm().clamp_min(1e-300)).item()


def run_case(L, D, mask_kind, B=2, H=4, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g, device="cuda") for _ in range(3))
    dout = torch.randn(B, H, L, D, generator=g, device="cuda")
    kw = {}
    if mask_kind == "causal":
        kw["is_causal"] = True
    elif mask_kind == "bool":
        m = torch.rand(B, 1, L, L, generator=g, device="cuda") > 0.3
        m[..., 0] = True  # no fully masked row
        kw["attn_mask"] = m
    elif mask_kind == "add":
        kw["attn_mask"] = torch.randn(B, 1, L, L, generator=g, device="cuda")

    def grads(call, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        kk = dict(kw)
        if "attn_mask" in kk and kk["attn_mask"].is_floating_point():
            kk["attn_mask"] = kk["attn_mask"].to(dtype)
        out = call(*leaves, **kk)
        gr = torch.autograd.grad(out, leaves, dout.to(dtype))
        return [out.detach(), *gr]

    def ours(*a, **kk):
        ex = sdpax.explain(*a, **kk)
        assert ex.backend == sdpax.SDPBackend.FLASH_ATTENTION, str(ex)
        with sdpax.sdpa_kernel(sdpax.SDPBackend.FLASH_ATTENTION):
            return sdpax.scaled_dot_product_attention(*a, **kk)

    def torch_math(*a, **kk):
        with torch_kernel([TorchBackend.MATH]):
            return F.scaled_dot_product_attention(*a, **kk)

    res = {}
    ref = grads(torch_math, torch.float64)
    for col, call in (("sdpax", ours), ("torch MATH", torch_math), ("torch def", F.scaled_dot_product_attention)):
        try:
            res[col] = [errors(x, r) for x, r in zip(grads(call, torch.float32), ref)]
        except RuntimeError as e:  # a call that backend cannot make
            print(f"  {col}: {str(e).splitlines()[0][:100]}", file=sys.stderr)
            res[col] = None
    del ref
    torch.cuda.empty_cache()
    return res


def fmt(e):
    return "n/a" if e is None else f"{e[0]:.2e} / {e[1]:.2e}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 1024, 4096])
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--masks", nargs="+", default=["plain", "causal", "bool", "add"],
                    choices=["plain", "causal", "bool", "add"])
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not sdpax.build_config.WITH_CUDA:
        print("cuda_fp32_accuracy: needs a CUDA device and a CUDA build of sdpax")
        return 1
    # torch's float32 baselines must be true float32 (no TF32 in cuBLAS or cuDNN).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    lines = ["| case | tensor | sdpax max / rms | torch MATH max / rms | torch def max / rms | sdpax/MATH max | "
             "sdpax/MATH rms |", "|" + "---|" * 7]
    print(lines[0], flush=True)
    worst = {n: [0.0, 0.0, ""] for n in NAMES}
    for L in args.lengths:
        for D in args.dims:
            for mk in args.masks:
                res = run_case(L, D, mk)
                case = f"L{L} d{D} {mk}"
                for i, n in enumerate(NAMES):
                    o, m, t = res["sdpax"][i], res["torch MATH"][i], (res["torch def"] or [None] * 4)[i]
                    r_max, r_rms = o[0] / m[0], o[1] / m[1]
                    if r_max > worst[n][0]:
                        worst[n][0], worst[n][2] = r_max, case
                    worst[n][1] = max(worst[n][1], r_rms)
                    line = f"| {case} | {n} | {fmt(o)} | {fmt(m)} | {fmt(t)} | {r_max:.2f} | {r_rms:.2f} |"
                    lines.append(line)
                    print(line, flush=True)
    summary = ["", "worst sdpax / torch MATH ratio over all cases (max-relative, at; RMS-relative):"]
    summary += [f"  {n}: {w[0]:.2f} ({w[2]}); {w[1]:.2f}" for n, w in worst.items()]
    print("\n".join(summary))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines + summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
