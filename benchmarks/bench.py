"""sdpax vs torch, side by side in one process: max error and time for representative shapes.

    python benchmarks/bench.py                      # CPU, forward, < 1 minute on 2 cores
    python benchmarks/bench.py --backward           # forward + backward
    python benchmarks/bench.py --device cuda        # on a GPU
    python benchmarks/bench.py --results benchmarks/RESULTS.md   # also record the table there

For every shape it times torch's F.scaled_dot_product_attention (default backend selection) and each sdpax
backend that can run the input, on the same tensors, alternating calls, and reports medians, the speed ratio
(torch time / sdpax time: > 1 means sdpax is faster), the max error against torch in the same dtype and each
side's max error against a float64 reference. A bar chart of the ratios is saved next to this file.
"""
from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sdpax
from sdpax import SDPBackend
from sdpax.attention.bias import causal_lower_right

HERE = Path(__file__).resolve().parent


def shapes(device: str):
    """(name, B, Hq, Hkv, L, S, E, dtype, kind). kind: plain, causal, lower_right, pad_mask, dense_mask, sinks."""
    big = device == "cuda"
    n = 4096 if big else 512
    bf16 = torch.bfloat16
    f32 = torch.float32
    rows = [
        ("llm fp32", 1, 16, 16, n, n, 64, f32, "plain"),
        ("llm causal fp32", 1, 16, 16, n, n, 64, f32, "causal"),
        ("llm causal bf16", 1, 16, 16, n, n, 128, bf16, "causal"),
        ("gqa 32/8 causal bf16", 1, 32, 8, n, n, 128, bf16, "causal"),
        ("encoder pad mask fp32", 8, 12, 12, 128 if not big else 1024, 128 if not big else 1024, 64, f32, "pad_mask"),
        ("dense bool mask bf16", 1, 8, 8, n, n, 64, bf16, "dense_mask"),
        ("kv-cache lower-right bf16", 1, 32, 8, 16, 4 * n, 128, bf16, "lower_right"),
        ("decode L=1 gqa bf16", 1, 32, 8, 1, 8 * n, 128, bf16, "plain"),
        ("odd L=77 D=80 fp32", 4, 8, 8, 77, 77, 80, f32, "plain"),
        ("sinks bf16", 1, 16, 16, n, n, 64, bf16, "sinks"),
    ]
    return rows


def make(row, device, seed=0):
    name, B, Hq, Hkv, L, S, E, dtype, kind = row
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, E, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, Hkv, S, E, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, Hkv, S, E, generator=g).to(device=device, dtype=dtype)
    ours, theirs = {}, {}
    if Hq != Hkv:
        ours["enable_gqa"] = theirs["enable_gqa"] = True
    if kind == "causal":
        ours["is_causal"] = theirs["is_causal"] = True
    elif kind == "lower_right":
        ours["attn_mask"] = causal_lower_right(L, S)
        i = torch.arange(L, device=device).unsqueeze(1)
        theirs["attn_mask"] = torch.arange(S, device=device).unsqueeze(0) <= i + (S - L)
    elif kind == "pad_mask":
        lengths = torch.randint(S // 2, S + 1, (B,), generator=g)
        m = (torch.arange(S).unsqueeze(0) < lengths.unsqueeze(1)).view(B, 1, 1, S).to(device)
        ours["attn_mask"] = theirs["attn_mask"] = m
    elif kind == "dense_mask":
        m = (torch.rand(B, 1, L, S, generator=g) > 0.5).to(device)
        m[..., 0] = True
        ours["attn_mask"] = theirs["attn_mask"] = m
    elif kind == "sinks":
        ours["sinks"] = torch.randn(Hq, generator=g).to(device)
        theirs = None  # torch has no sinks: no torch column for this row
    return q, k, v, ours, theirs


def reference(q, k, v, kw):
    """float64 reference from the definition (computed on the inputs' device, chunked over heads)."""
    q, k, v = q.double(), k.double(), v.double()
    if q.shape[1] != k.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    L, S = q.shape[-2], k.shape[-2]
    mask = kw.get("attn_mask")
    if hasattr(mask, "_materialize"):
        mask = mask._materialize(q.device)
    if kw.get("is_causal"):
        mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=torch.float64, device=q.device)
    for h in range(q.shape[1]):
        s = q[:, h] @ k[:, h].transpose(-2, -1) / math.sqrt(q.shape[-1])
        if mask is not None:
            mh = mask if mask.dim() < 4 else mask[:, min(h, mask.shape[1] - 1)]
            s = s.masked_fill(~mh, -math.inf)
        if kw.get("sinks") is not None:
            s = torch.cat([s, kw["sinks"][h].double().expand(*s.shape[:-1], 1)], -1)
        live = (s > -math.inf).any(-1, keepdim=True)
        p = torch.where(live, torch.softmax(torch.where(live, s, 0.0), -1), 0.0)
        if kw.get("sinks") is not None:
            p = p[..., :-1]
        out[:, h] = p @ v[:, h]
    return out


def maxerr(a, b):
    a, b = a.double(), b.double()
    ok = ~(torch.isnan(a) | torch.isnan(b))
    return (a - b)[ok].abs().max().item() if ok.any() else float("nan")


def timer(device):
    if device == "cuda":
        def t(fn):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            return s.elapsed_time(e) * 1e-3
    else:
        def t(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return t


def bench_row(row, device, backward, reps, budget_s):
    q, k, v, ours_kw, theirs_kw = make(row, device)
    if backward:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    ref = reference(q.detach(), k.detach(), v.detach(), ours_kw)
    ex = sdpax.explain(q, k, v, **ours_kw)
    runnable = [b for b in SDPBackend if not ex.reasons[b]]

    def step(fn):
        def go():
            out = fn()
            if backward:
                out.backward(torch.ones_like(out))
            return out
        return go

    fns = {}
    if theirs_kw is not None:
        fns["torch"] = step(lambda: F.scaled_dot_product_attention(q, k, v, **theirs_kw))
    for b in runnable:
        def call(b=b):
            with sdpax.sdpa_kernel(b):
                return sdpax.scaled_dot_product_attention(q, k, v, **ours_kw)
        fns[b.name] = step(call)

    outs = {name: fn().detach() for name, fn in fns.items()}  # warm-up, and the outputs for the error columns
    t = timer(device)
    times = {name: [] for name in fns}
    start = time.perf_counter()
    for i in range(reps):
        for name, fn in (list(fns.items()) if i % 2 == 0 else list(fns.items())[::-1]):
            times[name].append(t(fn))
        if time.perf_counter() - start > budget_s and i >= 2:
            break
    med = {name: statistics.median(ts) for name, ts in times.items()}
    res = dict(name=row[0], backend=ex.backend.name, times=med, err_ref={n: maxerr(o, ref) for n, o in outs.items()})
    if "torch" in outs:
        res["err_vs_torch"] = {n: maxerr(o, outs["torch"]) for n, o in outs.items() if n != "torch"}
    return res


def fmt_table(results, backward):
    cols = ["shape", "sdpax picks", "torch ms", "MATH ms", "FLASH ms", "speedup (torch/sdpax)", "err vs torch",
            "err vs fp64: torch / sdpax"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        tm = r["times"]
        ms = lambda n: f"{tm[n] * 1e3:.3f}" if n in tm else "-"  # noqa: E731
        picked = r["backend"]
        speed = f"{tm['torch'] / tm[picked]:.2f}x" if "torch" in tm and picked in tm else "- (torch lacks it)"
        evt = r.get("err_vs_torch", {}).get(picked)
        er = r["err_ref"]
        torch_ref = f"{er['torch']:.2e}" if "torch" in er else "-"
        lines.append(f"| {r['name']} | {picked} | {ms('torch')} | {ms('MATH')} | {ms('FLASH_ATTENTION')} | {speed} | "
                     f"{'-' if evt is None else f'{evt:.2e}'} | "
                     f"{torch_ref} / {er[picked]:.2e} |")
    return "\n".join(lines)


def plot(results, device, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return None
    rows = [r for r in results if "torch" in r["times"]]
    names = [r["name"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    for i, key in enumerate(["MATH", "FLASH_ATTENTION"]):
        vals = [r["times"]["torch"] / r["times"][key] if key in r["times"] else 0 for r in rows]
        ax.barh([j + 0.4 * i for j in range(len(rows))], vals, height=0.4, label=f"sdpax {key}")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks([j + 0.2 for j in range(len(rows))], names)
    ax.set_xlabel("speedup over torch F.scaled_dot_product_attention (higher is better)")
    ax.set_title(f"sdpax vs torch {torch.__version__} on {device}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def machine(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backward", action="store_true", help="time forward + backward")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--results", type=Path, default=None, help="append the table to this markdown file")
    ap.add_argument("--suite", default="default", choices=["default", "cpu-flash", "cuda-flash"],
                    help="cpu-flash / cuda-flash: the fused-kernel suites of benchmarks/cpu_flash.py, cuda_flash.py")
    args, rest = ap.parse_known_args(argv)
    if args.suite != "default":
        sys.path.insert(0, str(HERE))
        mod = __import__(args.suite.replace("-", "_"))
        return mod.main(rest)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    if args.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    reps = args.reps or (30 if args.device == "cuda" else 7)
    results = []
    for row in shapes(args.device):
        r = bench_row(row, args.device, args.backward, reps, budget_s=4.0)
        results.append(r)
        print(f"  {r['name']}: " + ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in r["times"].items()), flush=True)
    what = "forward + backward" if args.backward else "forward"
    cmd = "python benchmarks/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"### {what}, {args.device}: {datetime.date.today()}\n\n"
              f"- machine: {machine(args.device)}\n- torch {torch.__version__}, sdpax {sdpax.__version__}\n"
              f"- command: `{cmd.strip()}`\n- medians of alternating runs; speedup = torch time / time of the "
              f"backend sdpax picks by default\n")
    table = fmt_table(results, args.backward)
    print()
    print(header)
    print(table)
    png = plot(results, args.device, HERE / f"bench_{args.device}{'_bwd' if args.backward else ''}.png")
    if png:
        print(f"\nplot: {png}")
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + header + "\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
