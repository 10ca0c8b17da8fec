"""sdpax FLASH_ATTENTION on CUDA vs torch, side by side in one process (the shapes of issue 4).

    python benchmarks/cuda_flash.py                 # full table, writes benchmarks/RESULTS-cuda.md
    python benchmarks/cuda_flash.py --quick         # a few rows
    python benchmarks/cuda_flash.py --no-write      # print only
    python benchmarks/cuda_flash.py --only fp32     # rows whose name contains "fp32"
    python benchmarks/cuda_flash.py --only "d64|gqa"  # several: '|' separates substrings

Builds nothing. Medians of triton.testing.do_bench (CUDA events). TFLOP/s counts 4*B*H*L*S*D per forward (half of
that when causal) and 2.5x that for the backward; decode rows report time and the K/V bytes per second.
Columns: sdpax (default selection: FLASH on CUDA for bf16/fp16/fp32), torch default F.scaled_dot_product_attention
(cuDNN on H100 for bf16, memory-efficient for fp32) and torch forced to FLASH_ATTENTION (FA2); 'n/a' where torch
cannot run the row.
"""
from __future__ import annotations

import argparse
import datetime
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend as TorchBackend
from torch.nn.attention import sdpa_kernel as torch_kernel

import sdpax

HERE = Path(__file__).resolve().parent


def rows(quick: bool):
    bf16, f32 = torch.bfloat16, torch.float32
    out = []
    # (name, B, Hq, Hkv, L, S, D, dtype, kind): 16k tokens, hidden 2048
    for d in (64, 128):
        for L in ((4096,) if quick else (1024, 4096, 16384)):
            for causal in (False, True):
                out.append((f"d{d} L{L // 1024}k" + (" causal" if causal else ""), 16384 // L, 2048 // d,
                            2048 // d, L, L, d, bf16, "causal" if causal else "plain"))
    if not quick:
        out.append(("d256 L4k", 4, 8, 8, 4096, 4096, 256, bf16, "plain"))
        out.append(("d256 L4k causal", 4, 8, 8, 4096, 4096, 256, bf16, "causal"))
    out.append(("bool mask (B,1,L,S) d128 L4k", 4, 16, 16, 4096, 4096, 128, bf16, "dense_mask"))
    out.append(("pad mask (B,1,1,S) d128 L4k", 4, 16, 16, 4096, 4096, 128, bf16, "pad_mask"))
    out.append(("gqa 32/8 causal d64 L4k", 4, 32, 8, 4096, 4096, 64, bf16, "causal"))
    out.append(("same, no gqa (32/32)", 4, 32, 32, 4096, 4096, 64, bf16, "causal"))
    out.append(("sinks d128 L4k", 4, 16, 16, 4096, 4096, 128, bf16, "sinks"))
    out.append(("same, no sinks", 4, 16, 16, 4096, 4096, 128, bf16, "plain"))
    out.append(("decode L1 S32k gqa 32/8 d128", 16, 32, 8, 1, 32768, 128, bf16, "decode"))
    # float32 (split-TF32 kernels): the 16k-token shape of issue 4, plain and causal
    out.append(("fp32 d64 L2k", 8, 16, 16, 2048, 2048, 64, f32, "plain"))
    if not quick:
        out.append(("fp32 d64 L2k causal", 8, 16, 16, 2048, 2048, 64, f32, "causal"))
        out.append(("fp32 d128 L2k", 8, 16, 16, 2048, 2048, 128, f32, "plain"))
    return out


def build(row, seed=0):
    name, B, Hq, Hkv, L, S, D, dtype, kind = row
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: torch.randn(s, generator=g, device="cuda").to(dtype).requires_grad_()  # noqa: E731
    q, k, v = mk(B, Hq, L, D), mk(B, Hkv, S, D), mk(B, Hkv, S, D)
    kw, tkw = {}, {}
    if Hq != Hkv:
        kw["enable_gqa"] = tkw["enable_gqa"] = True
    if kind == "causal":
        kw["is_causal"] = tkw["is_causal"] = True
    elif kind == "dense_mask":
        m = torch.rand(B, 1, L, S, generator=g, device="cuda") > 0.5
        m[..., 0] = True
        kw["attn_mask"] = tkw["attn_mask"] = m
    elif kind == "pad_mask":
        lengths = torch.randint(S // 2, S + 1, (B,), generator=g, device="cuda")
        m = (torch.arange(S, device="cuda")[None, :] < lengths[:, None]).view(B, 1, 1, S)
        kw["attn_mask"] = tkw["attn_mask"] = m
    elif kind == "sinks":
        kw["sinks"] = torch.randn(Hq, generator=g, device="cuda")
        tkw = None
    return q, k, v, kw, tkw


def flops(row, backward):
    name, B, Hq, Hkv, L, S, D, dtype, kind = row
    f = 4.0 * B * Hq * L * S * D
    if kind == "causal":
        f /= 2
    return f * (3.5 if backward else 1.0)


def timed(fn, backward, out_like=None):
    from triton.testing import do_bench
    if backward:
        q, k, v, call = fn
        out = call()
        dout = torch.randn_like(out)

        def step():
            o = call()
            torch.autograd.grad(o, (q, k, v), dout)
        return do_bench(step, warmup=50, rep=300, return_mode="median")
    with torch.no_grad():
        return do_bench(fn, warmup=50, rep=300, return_mode="median")


def bench_row(row, backward):
    q, k, v, kw, tkw = build(row)
    res = {}
    ours = lambda: sdpax.scaled_dot_product_attention(q, k, v, **kw)  # noqa: E731
    res["backend"] = sdpax.explain(q, k, v, **kw).backend.name
    res["sdpax"] = timed((q, k, v, ours) if backward else ours, backward)
    for col, backends in (("torch", None), ("torch FA2", [TorchBackend.FLASH_ATTENTION])):
        if tkw is None:
            res[col] = None
            continue
        call = lambda: F.scaled_dot_product_attention(q, k, v, **tkw)  # noqa: E731
        try:
            if backends is None:
                res[col] = timed((q, k, v, call) if backward else call, backward)
            else:
                with torch_kernel(backends):
                    res[col] = timed((q, k, v, call) if backward else call, backward)
        except RuntimeError:
            res[col] = None
    return res


def fmt_rate(row, ms, backward):
    if ms is None:
        return "n/a"
    if row[-1] == "decode":
        B, Hkv, S, D = row[1], row[3], row[5], row[6]
        tb = 2 * B * Hkv * S * D * 2 / (ms * 1e-3) / 1e12
        return f"{ms:.3f} ms ({tb:.2f} TB/s)"
    return f"{flops(row, backward) / (ms * 1e-3) / 1e12:.0f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--results", default=str(HERE / "RESULTS-cuda.md"))
    ap.add_argument("--only", default=None, help="only rows whose name contains this ('|' separates alternatives)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not sdpax.build_config.WITH_CUDA:
        print("cuda_flash: needs a CUDA device and a CUDA build of sdpax")
        return 1
    header = "| shape | pass | sdpax backend | sdpax TFLOP/s | torch default | torch FA2 | vs default | vs FA2 |"
    lines = [header, "|" + "---|" * 8]
    for row in [r for r in rows(args.quick) if args.only is None or any(o in r[0] for o in args.only.split("|"))]:
        for backward in (False, True):
            if row[-1] == "decode" and backward:
                continue
            torch.cuda.empty_cache()
            r = bench_row(row, backward)
            ratio = lambda other: ("n/a" if r[other] is None else f"{r[other] / r['sdpax']:.2f}x")  # noqa: E731
            line = (f"| {row[0]} | {'fwd+bwd' if backward else 'fwd'} | {r['backend']} | "
                    f"{fmt_rate(row, r['sdpax'], backward)} | {fmt_rate(row, r['torch'], backward)} | "
                    f"{fmt_rate(row, r['torch FA2'], backward)} | {ratio('torch')} | {ratio('torch FA2')} |")
            lines.append(line)
            print(line, flush=True)
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        props = torch.cuda.get_device_properties(0)
        text = (f"# sdpax CUDA FLASH_ATTENTION benchmark\n\n"
                f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n"
                f"- GPU: {props.name} ({props.multi_processor_count} SMs)\n"
                f"- torch {torch.__version__}, CUDA {torch.version.cuda}\n"
                f"- command: python benchmarks/cuda_flash.py {' '.join(argv or sys.argv[1:])}\n"
                f"- TFLOP/s: 4*B*H*L*S*D per forward (halved when causal), x3.5 for fwd+bwd; ratios are "
                f"torch time / sdpax time (> 1: sdpax faster); medians of triton.testing.do_bench\n\n"
                + table + "\n")
        Path(args.results).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
