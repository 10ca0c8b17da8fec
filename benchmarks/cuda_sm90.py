"""Forward only: sdpax's Hopper main loop (fwd_sm90.h, wgmma) vs its mma.sync main loop (fwd_kernel.h) vs torch's
default and torch forced to FLASH_ATTENTION (FA2), side by side in one process, plus the agreement of the two sdpax
main loops on the timed inputs.

    python benchmarks/cuda_sm90.py [--rep MS]

Builds nothing. SDPAX_CUDA_FWD_SM90=0 switches sdpax to the mma.sync loop (read per call). Medians of
triton.testing.do_bench (CUDA events). TFLOP/s counts 4*B*H*L*S*D per forward (half when causal).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend as TorchBackend
from torch.nn.attention import sdpa_kernel as torch_kernel

import sdpax

from cuda_flash import build, flops


def rows():
    bf16 = torch.bfloat16
    out = []
    for d in (64, 128):
        for L in (1024, 4096, 16384):
            for causal in (False, True):
                out.append((f"d{d} L{L // 1024}k" + (" causal" if causal else ""), 16384 // L, 2048 // d,
                            2048 // d, L, L, d, bf16, "causal" if causal else "plain"))
    out.append(("d128 L4k fp16", 4, 16, 16, 4096, 4096, 128, torch.float16, "plain"))
    # d256 (64-key tiles on the sm90 loop); cuda_flash.py's d256 row is the first
    out.append(("d256 L4k", 4, 8, 8, 4096, 4096, 256, bf16, "plain"))
    out.append(("d256 L4k causal", 4, 8, 8, 4096, 4096, 256, bf16, "causal"))
    out.append(("d256 L16k causal", 1, 8, 8, 16384, 16384, 256, bf16, "causal"))
    out.append(("d256 L4k fp16", 4, 8, 8, 4096, 4096, 256, torch.float16, "plain"))
    out.append(("bool mask (B,1,L,S) d256 L4k", 4, 8, 8, 4096, 4096, 256, bf16, "dense_mask"))
    out.append(("pad mask (B,1,1,S) d256 L4k", 4, 8, 8, 4096, 4096, 256, bf16, "pad_mask"))
    out.append(("bool mask (B,1,L,S) d128 L4k", 4, 16, 16, 4096, 4096, 128, bf16, "dense_mask"))
    out.append(("pad mask (B,1,1,S) d128 L4k", 4, 16, 16, 4096, 4096, 128, bf16, "pad_mask"))
    return out


def extra_rows():
    """The general kind's other paths: additive masks (read element by element), dropout, d64, fp16."""
    bf16, fp16 = torch.bfloat16, torch.float16
    return [("additive mask (B,1,L,S) d128 L4k", 4, 16, 16, 4096, 4096, 128, bf16, "add_mask"),
            ("dropout 0.1 d128 L4k", 4, 16, 16, 4096, 4096, 128, bf16, "dropout"),
            ("pad mask (B,1,1,S) d64 L4k", 4, 32, 32, 4096, 4096, 64, bf16, "pad_mask"),
            ("bool mask (B,1,L,S) d64 L4k fp16", 4, 32, 32, 4096, 4096, 64, fp16, "dense_mask"),
            ("d64 L4k fp16", 4, 32, 32, 4096, 4096, 64, fp16, "plain"),
            ("dropout 0.1 d256 L4k", 4, 8, 8, 4096, 4096, 256, bf16, "dropout"),
            ("additive mask (B,1,L,S) d256 L4k", 4, 8, 8, 4096, 4096, 256, bf16, "add_mask")]


def build_any(row):
    kind = row[-1]
    if kind not in ("add_mask", "dropout"):
        return build(row)
    q, k, v, kw, tkw = build(row[:-1] + ("plain",))
    if kind == "add_mask":
        g = torch.Generator(device="cuda").manual_seed(1)
        B, L, S = row[1], row[4], row[5]
        m = torch.randn(B, 1, L, S, generator=g, device="cuda").to(row[7])
        kw["attn_mask"] = tkw["attn_mask"] = m
    else:
        kw["dropout_p"] = tkw["dropout_p"] = 0.1
    return q, k, v, kw, tkw


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--extra", action="store_true", help="only the general kind's other paths (extra_rows)")
    ap.add_argument("--only", default=None, help="only rows whose name contains this")
    args = ap.parse_args(argv)
    from triton.testing import do_bench
    bench = lambda fn: do_bench(fn, warmup=25, rep=args.rep, return_mode="median")  # noqa: E731
    lines = ["| shape | sm90 | mma.sync | torch default | torch FA2 | sm90 / mma.sync | sm90 vs FA2 | "
             "sm90 vs default | rel diff |", "|" + "---|" * 9]
    for row in [r for r in (extra_rows() if args.extra else rows()) if args.only is None or args.only in r[0]]:
        torch.cuda.empty_cache()
        q, k, v, kw, tkw = build_any(row)
        with torch.no_grad():
            ours = lambda: sdpax.scaled_dot_product_attention(q, k, v, **kw)  # noqa: E731
            res = {}
            os.environ["SDPAX_CUDA_FWD_SM90"] = "1"
            torch.manual_seed(0)  # the same dropout offsets for both loops' outputs
            o1 = ours()
            res["sm90"] = bench(ours)
            os.environ["SDPAX_CUDA_FWD_SM90"] = "0"
            torch.manual_seed(0)
            o0 = ours()
            res["mma"] = bench(ours)
            os.environ["SDPAX_CUDA_FWD_SM90"] = "1"
            # Dropout: both loops drop the same elements (common/philox.h), so they agree to rounding as well.
            diff = ((o1.float() - o0.float()).norm() / o0.float().norm()).item()
            call = lambda: F.scaled_dot_product_attention(q, k, v, **tkw)  # noqa: E731
            res["torch"] = bench(call)
            try:
                with torch_kernel([TorchBackend.FLASH_ATTENTION]):
                    res["fa2"] = bench(call)
            except RuntimeError:
                res["fa2"] = None
        tf = lambda ms: "n/a" if ms is None else f"{flops(row, False) / (ms * 1e-3) / 1e12:.0f}"  # noqa: E731
        rt = lambda o: "n/a" if res[o] is None else f"{res[o] / res['sm90']:.2f}x"  # noqa: E731
        line = (f"| {row[0]} | {tf(res['sm90'])} | {tf(res['mma'])} | {tf(res['torch'])} | {tf(res['fa2'])} | "
                f"{rt('mma')} | {rt('fa2')} | {rt('torch')} | {diff:.1e} |")
        lines.append(line)
        print(line, flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
