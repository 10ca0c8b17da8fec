"""sdpax FLASH_ATTENTION on CPU vs torch, side by side in one process (issue 3's benchmark).

    python benchmarks/cpu_flash.py                         # default grid (L <= 2048), ~15 min on 2 shared cores
    python benchmarks/cpu_flash.py --full                  # the issue's whole grid, L up to 4096
    python benchmarks/cpu_flash.py --results benchmarks/RESULTS-cpu.md
    python benchmarks/bench.py --suite cpu-flash           # the same, through the lead's driver

Every shape is timed for sdpax FLASH, torch's F.scaled_dot_product_attention with its default selection and with
sdpa_kernel(FLASH_ATTENTION) forced (where torch accepts it), alternating the three calls and taking medians, with
torch.set_num_threads(2) for all. Ratio = torch time / sdpax time (> 1: sdpax is faster). Also measured once:
the machine's FMA (float32) and bf16 dot-product (vdpbf16ps) peaks with a tiny AVX-512 loop, and the peak extra
memory of sdpax at L = S = 8192 bf16.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend as TorchBackend
from torch.nn.attention import sdpa_kernel as torch_sdpa_kernel

import sdpax
from sdpax import SDPBackend

HERE = Path(__file__).resolve().parent


def shapes(full: bool):
    """Rows: (group, B, Hq, Hkv, L, S, D, kind). kind: plain, causal, pad_mask, dense_mask."""
    rows = []
    lens = (512, 1024, 2048, 4096) if full else (512, 1024, 2048)
    for hq, hkv in ((16, 16), (32, 8)):
        for L in lens:
            for d in (64, 128):
                for kind in ("plain", "causal"):
                    if not full and L == 2048 and (d == 64 or hq == 32):
                        continue
                    rows.append(("llm", 1, hq, hkv, L, L, d, kind))
    for L in (128, 512):
        rows.append(("encoder pad", 8, 12, 12, L, L, 64, "pad_mask"))
    rows.append(("dense mask", 1, 12, 12, 1024, 1024, 64, "dense_mask"))
    for L in (1, 4):
        for S in (1024, 4096, 16384):
            rows.append(("decode", 1, 32, 8, L, S, 128, "plain"))
    for L in (77, 1000):
        for d in (80, 96):
            rows.append(("odd", 2, 16, 16, L, L, d, "plain"))
    return rows


def make_inputs(row, dtype, requires_grad, seed=0):
    _, B, Hq, Hkv, L, S, D, kind = row
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    if requires_grad:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    kw = dict(is_causal=kind == "causal", enable_gqa=Hq != Hkv)
    if kind == "pad_mask":
        lengths = torch.randint(S // 2, S + 1, (B,), generator=g)
        kw["attn_mask"] = (torch.arange(S)[None, :] < lengths[:, None]).view(B, 1, 1, S)
    elif kind == "dense_mask":
        kw["attn_mask"] = torch.rand(B, 1, L, S, generator=g) > 0.5
    return q, k, v, kw


def flops(row, backward):
    _, B, Hq, _, L, S, D, kind = row
    f = 4.0 * B * Hq * L * S * D
    if kind == "causal":
        f *= 0.5
    return f * (3.5 if backward else 1.0)  # backward: 5 GEMMs of the forward's 2 (+ the forward itself)


def _callers(q, k, v, kw, backward):
    grads = [torch.ones(*q.shape[:-1], v.shape[-1], dtype=q.dtype)] if backward else None

    def wrap(fn):
        def call():
            out = fn()
            if backward:
                out.backward(grads[0])
                for t in (q, k, v):
                    t.grad = None
            return out
        return call

    # FLASH is sdpax's default on CPU for these dtypes (checked in time_row), so no context manager is needed,
    # just as torch's default call has none.
    def ours():
        return sdpax.scaled_dot_product_attention(q, k, v, **kw)

    def torch_default():
        return F.scaled_dot_product_attention(q, k, v, **kw)

    def torch_flash():
        with torch_sdpa_kernel(TorchBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, **kw)

    return {"sdpax": wrap(ours), "torch": wrap(torch_default), "torch_flash": wrap(torch_flash)}


def time_row(row, dtype, backward, reps, budget_s):
    q, k, v, kw = make_inputs(row, dtype, backward)
    chosen = sdpax.explain(q, k, v, **kw).backend
    assert chosen == SDPBackend.FLASH_ATTENTION, f"sdpax would run {chosen} for {row}"
    calls = _callers(q, k, v, kw, backward)
    times = {name: [] for name in calls}
    usable = {}
    for name, fn in calls.items():
        try:
            t0 = time.perf_counter()
            fn()
            usable[name] = time.perf_counter() - t0
        except RuntimeError:
            usable[name] = None  # torch refuses this input with the forced backend
    live = [n for n in calls if usable[n] is not None]
    # As many rounds as fit in the time budget (fast shapes get many, so their medians are stable), at least
    # `reps`, at most 200.
    per_round = sum(usable[n] for n in live)
    n = max(reps, min(200, int(budget_s / max(per_round, 1e-6))))
    for _ in range(n):
        for name in live:  # interleaved: noise from other processes hits all three alike
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(times[name]) if times[name] else None for name in calls}
    group, B, Hq, Hkv, L, S, D, kind = row
    res = dict(group=group, B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, D=D, kind=kind, dtype=str(dtype).replace("torch.", ""),
               pass_="fwd+bwd" if backward else "fwd", reps=n, sdpax_ms=med["sdpax"] * 1e3,
               torch_ms=med["torch"] * 1e3,
               torch_flash_ms=med["torch_flash"] * 1e3 if med["torch_flash"] is not None else None)
    res["ratio"] = med["torch"] / med["sdpax"]
    res["ratio_flash"] = med["torch_flash"] / med["sdpax"] if med["torch_flash"] is not None else None
    res["sdpax_gflops"] = flops(row, backward) / med["sdpax"] / 1e9
    return res


def run_suite(full: bool = False, dtypes=("float32", "bfloat16"), passes=("fwd", "fwd+bwd"), reps: int = 3,
              budget_s: float = 2.0, threads: int = 2, only: str | None = None, log=print) -> list[dict]:
    """Time every (shape, dtype, pass); returns one dict per row (times in ms, ratios torch / sdpax)."""
    torch.set_num_threads(threads)
    rows = []
    for row in shapes(full):
        if only and only not in row[0]:
            continue
        for dt in dtypes:
            for ps in passes:
                if ps == "fwd+bwd" and row[0] == "decode":
                    continue  # decode is inference only
                r = time_row(row, getattr(torch, dt), ps == "fwd+bwd", reps, budget_s)
                rows.append(r)
                if log:
                    log(format_row(r))
    return rows


# ---- peaks ----

_PEAK_SRC = textwrap.dedent(r"""
    #include <torch/extension.h>
    #include <ATen/Parallel.h>
    #include <immintrin.h>
    #include <chrono>
    // Twelve independent accumulator chains in named registers (an array gets spilled to the stack, and the
    // loop then measures store forwarding): more chains than FMA latency x ports, so the loop is throughput bound.
    #define SDPAX_CHAINS(OP) OP(a0) OP(a1) OP(a2) OP(a3) OP(a4) OP(a5) OP(a6) OP(a7) OP(a8) OP(a9) OP(a10) OP(a11)
    #define SDPAX_KEEP asm volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), \
                                       "+v"(a7), "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11))
    __attribute__((target("avx512f"))) static double fma_loop(int64_t iters) {
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0,
             a9 = a0, a10 = a0, a11 = a0;
      const __m512 x = _mm512_set1_ps(1.0000001f), y = _mm512_set1_ps(0.9999999f);
      #define SDPAX_FMA(a) a = _mm512_fmadd_ps(a, x, y);
      for (int64_t it = 0; it < iters; ++it) { SDPAX_CHAINS(SDPAX_FMA) SDPAX_KEEP; }
      #define SDPAX_SUM(a) s += _mm512_reduce_add_ps(a);
      float s = 0; SDPAX_CHAINS(SDPAX_SUM)
      return s;
    }
    __attribute__((target("avx512f,avx512bf16"))) static double bf16_loop(int64_t iters) {
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0,
             a9 = a0, a10 = a0, a11 = a0;
      const __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80), y = (__m512bh)_mm512_set1_epi16(0x3f80);
      #define SDPAX_DP(a) a = _mm512_dpbf16_ps(a, x, y);
      for (int64_t it = 0; it < iters; ++it) { SDPAX_CHAINS(SDPAX_DP) SDPAX_KEEP; }
      float s = 0; SDPAX_CHAINS(SDPAX_SUM)
      return s;
    }
    // GFLOP/s of all threads together: fma = 2 * 16 flops per instruction, dpbf16 = 2 * 32.
    double peak(bool bf16, int64_t iters) {
      const int n = at::get_num_threads();
      auto t0 = std::chrono::steady_clock::now();
      std::vector<double> sink(n);
      at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) sink[t] = bf16 ? bf16_loop(iters) : fma_loop(iters);
      });
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      double flop = double(n) * iters * 12 * (bf16 ? 64.0 : 32.0);
      return flop / s / 1e9 + 0 * sink[0];
    }
""")


def measure_peaks(threads: int = 2) -> dict:
    """FMA (float32) and AVX512-BF16 dot-product peaks in GFLOP/s on `threads` threads, plus torch GEMM rates."""
    from torch.utils.cpp_extension import load_inline
    torch.set_num_threads(threads)
    mod = load_inline("sdpax_peak_v2", cpp_sources=_PEAK_SRC, functions=["peak"],
                      extra_cflags=["-O2", "-fopenmp"], verbose=False)
    res = {"fma_fp32_gflops": max(mod.peak(False, 20_000_000) for _ in range(3)),
           "dpbf16_gflops": max(mod.peak(True, 20_000_000) for _ in range(3))}
    for dt in (torch.float32, torch.bfloat16):
        a = torch.randn(2048, 2048).to(dt)
        b = torch.randn(2048, 2048).to(dt)
        a @ b
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            ts.append(time.perf_counter() - t0)
        res[f"torch_mm_{str(dt).replace('torch.', '')}_gflops"] = 2 * 2048 ** 3 / statistics.median(ts) / 1e9
    return res


_MEM_SRC = textwrap.dedent("""
    import torch, sdpax
    torch.set_num_threads({threads})
    L = 8192
    q, k, v = (torch.randn(1, 8, L, 128, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    def status_mb(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(key + ":")) / 1024
    def step(q, k, v, backward):
        with sdpax.sdpa_kernel(sdpax.SDPBackend.FLASH_ATTENTION):
            out = sdpax.scaled_dot_product_attention(q, k, v, is_causal=True)
        if backward:
            out.backward(torch.ones_like(out))
    small = [t.detach()[:, :, :256].clone().requires_grad_(True) for t in (q, k, v)]
    step(*small, True)
    for backward in (False, True):
        base = status_mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        step(q, k, v, backward)
        print(status_mb("VmHWM") - base)
""")


def measure_memory(threads: int = 2) -> dict:
    """Peak RSS growth (MiB) of sdpax FLASH at L = S = 8192, B=1, H=8, D=128 bf16, causal: forward and fwd+bwd."""
    out = subprocess.run([sys.executable, "-c", _MEM_SRC.format(threads=threads)], capture_output=True, text=True,
                         check=True).stdout.split()
    inputs_mb = 3 * 8 * 8192 * 128 * 2 / 2 ** 20
    return {"fwd_extra_mib": float(out[0]), "fwd_bwd_extra_mib": float(out[1]), "inputs_mib": inputs_mb,
            "one_LxS_fp32_mib": 8192 * 8192 * 4 / 2 ** 20}


# ---- reporting ----

def _fmt(x, spec=".2f"):
    return "n/a" if x is None else format(x, spec)


def format_row(r) -> str:
    return (f"{r['group']:<12} B{r['B']} H{r['Hq']}/{r['Hkv']} L{r['L']} S{r['S']} D{r['D']} {r['kind']:<10} "
            f"{r['dtype']:<8} {r['pass_']:<7} sdpax {r['sdpax_ms']:9.2f} ms  torch {r['torch_ms']:9.2f} ms  "
            f"x{r['ratio']:.2f}  (vs forced flash x{_fmt(r['ratio_flash'])})  {r['sdpax_gflops']:.0f} GFLOP/s")


def geomean(xs):
    xs = [x for x in xs if x is not None]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summary(rows) -> dict:
    fwd = [r for r in rows if r["pass_"] == "fwd"]
    out = {
        "fwd geomean": geomean([r["ratio"] for r in fwd]),
        "fwd min": min((r["ratio"] for r in fwd), default=None),
        "fwd+bwd geomean": geomean([r["ratio"] for r in rows if r["pass_"] == "fwd+bwd"]),
        "decode geomean": geomean([r["ratio"] for r in rows if r["group"] == "decode"]),
        "masked geomean": geomean([r["ratio"] for r in rows if r["kind"] in ("pad_mask", "dense_mask")]),
    }
    return out


def markdown(rows, peaks, mem, command, load=None, budget_s=2.0) -> str:
    lines = [f"# sdpax FLASH_ATTENTION on CPU vs torch", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- CPU: {_cpu_name()} ({torch.get_num_threads()} threads used, machine shared with other jobs)",
             f"- torch {torch.__version__}, sdpax {sdpax.__version__}, build ISA {sdpax.build_config.CPU_ISA}",
             f"- command: `{command}`",
             f"- 1-minute load average before / after the run (2 cores; this run alone adds ~2): "
             f"{_fmt(load[0], '.2f') if load else 'n/a'} / {_fmt(load[1], '.2f') if load else 'n/a'}",
             "- times are medians of interleaved rounds (sdpax, torch default, torch forced FLASH_ATTENTION), at least 3 "
             f"rounds and about {budget_s:g} s per row; "
             "ratio = torch / sdpax (> 1: sdpax faster)", ""]
    if peaks:
        lines += ["## Machine peaks (2 threads)", "",
                  f"- FMA float32 (vfmadd231ps zmm loop): {peaks['fma_fp32_gflops']:.0f} GFLOP/s",
                  f"- AVX512-BF16 dot (vdpbf16ps zmm loop): {peaks['dpbf16_gflops']:.0f} GFLOP/s",
                  f"- torch.mm 2048^3: float32 {peaks['torch_mm_float32_gflops']:.0f} GFLOP/s, "
                  f"bfloat16 {peaks['torch_mm_bfloat16_gflops']:.0f} GFLOP/s (AMX)", ""]
    if mem:
        lines += ["## Peak extra memory, L = S = 8192, B 1, H 8, D 128, bf16, causal", "",
                  f"- forward: {mem['fwd_extra_mib']:.0f} MiB, forward+backward: {mem['fwd_bwd_extra_mib']:.0f} MiB "
                  f"(outputs and gradients included; inputs are {mem['inputs_mib']:.0f} MiB, one L x S float32 "
                  f"matrix would be {mem['one_LxS_fp32_mib']:.0f} MiB per head)", ""]
    s = summary(rows)
    lines += ["## Summary", ""] + [f"- {k}: {_fmt(v)}" for k, v in s.items()] + [""]
    lines += ["## Table", "",
              "| group | B | Hq/Hkv | L | S | D | kind | dtype | pass | sdpax ms | torch ms | torch flash ms | "
              "ratio | ratio vs flash | sdpax GFLOP/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['group']} | {r['B']} | {r['Hq']}/{r['Hkv']} | {r['L']} | {r['S']} | {r['D']} | "
                     f"{r['kind']} | {r['dtype']} | {r['pass_']} | {r['sdpax_ms']:.2f} | {r['torch_ms']:.2f} | "
                     f"{_fmt(r['torch_flash_ms'])} | {r['ratio']:.2f} | {_fmt(r['ratio_flash'])} | "
                     f"{r['sdpax_gflops']:.0f} |")
    return "\n".join(lines) + "\n"


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the whole grid of the issue (L up to 4096)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--passes", default="fwd,fwd+bwd")
    ap.add_argument("--only", help="only shape groups whose name contains this (llm, encoder, dense, decode, odd)")
    ap.add_argument("--reps", type=int, default=3, help="minimum rounds per row")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of rounds per row (more rounds for fast rows)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-peaks", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--results", help="write the markdown report to this file")
    args = ap.parse_args(argv)
    command = "python benchmarks/cpu_flash.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load_before = os.getloadavg()[0]
    peaks = None if args.no_peaks else measure_peaks(args.threads)
    if peaks:
        print(peaks)
    mem = None if args.no_memory else measure_memory(args.threads)
    if mem:
        print(mem)
    rows = run_suite(full=args.full, dtypes=tuple(args.dtypes.split(",")), passes=tuple(args.passes.split(",")),
                     reps=args.reps, budget_s=args.budget, threads=args.threads, only=args.only)
    for k, v in summary(rows).items():
        print(f"{k}: {_fmt(v)}")
    if args.results:
        Path(args.results).write_text(markdown(rows, peaks, mem, command.strip(), (load_before, os.getloadavg()[0]), args.budget))
    return 0


if __name__ == "__main__":
    sys.exit(main())
