"""The suites of benchmarks/bench.py.

A suite is data (name, device, what it measures, its table's columns, its own options) plus a run function that
gets the parsed arguments and the rows bench.py selected from _common.SHAPES, times sdpax and torch side by side on
the same inputs with _common.Timer and returns (markdown table, extra lines). Ratios are torch time / sdpax time
(> 1: sdpax faster) unless a column says otherwise. Nothing here touches CUDA at import time.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import random
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import _common as C
import torch
from torch.nn.attention import SDPBackend as TorchBackend

import sdpax
from sdpax import SDPBackend

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Suite:
    name: str
    device: str  # where it runs unless --device says otherwise
    devices: tuple  # the devices it accepts
    measures: str  # one paragraph: what it measures and against what
    columns: tuple  # its table's columns (--dry-run lists them)
    run: Callable
    options: Callable | None = None  # adds the suite's own arguments to an argparse group
    passes: tuple = ("fwd",)  # for --dry-run's work column


SUITES: dict = {}


def suite(**kw):
    def register(fn):
        SUITES[kw["name"]] = Suite(run=fn, **kw)
        return fn
    return register


def _progress(line: str) -> None:
    print("  " + line, flush=True)


def _free(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


# ---- default ----

def _default_options(group):
    group.add_argument("--backward", action="store_true", help="time forward + backward instead of the forward")


def _plot(results, device, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return None
    rows = [r for r in results if r["times"].get("torch")]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    for i, key in enumerate(["MATH", "FLASH_ATTENTION"]):
        vals = [r["times"]["torch"] / r["times"][key] if r["times"].get(key) else 0 for r in rows]
        ax.barh([j + 0.4 * i for j in range(len(rows))], vals, height=0.4, label=f"sdpax {key}")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks([j + 0.2 for j in range(len(rows))], [r["name"] for r in rows])
    ax.set_xlabel("speedup over torch F.scaled_dot_product_attention (higher is better)")
    ax.set_title(f"sdpax vs torch {torch.__version__} on {device}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@suite(name="default", device="cpu", devices=("cpu", "cuda"), options=_default_options,
       measures="Representative shapes (LLM, GQA, padding and dense masks, KV-cache lower-right, decode, odd sizes, "
                "sinks): the time of torch's default F.scaled_dot_product_attention and of every sdpax backend "
                "that can run the row, the max error of the backend sdpax picks against torch and of both against "
                "a float64 reference; saves the ratios as benchmarks/bench_<device>.png. CPU shapes fit 2 cores "
                "(< 1 minute); --device cuda takes longer sequences.",
       columns=("shape", "sdpax picks", "torch ms", "MATH ms", "FLASH ms", "speedup (torch/sdpax)", "err vs torch",
                "err vs fp64: torch / sdpax"))
def run_default(args, rows):
    device = args.device
    if device == "cpu":
        timer = C.Timer(device, args.budget or 4.0, min_reps=3, max_reps=7)
    else:
        timer = C.Timer(device, args.budget or 1.0, min_reps=10, max_reps=200)
    results = []
    for row in rows:
        inp = C.make_inputs(row, device, requires_grad=args.backward)
        ex = sdpax.explain(inp.q, inp.k, inp.v, **inp.ours)
        calls = {}
        if inp.theirs is not None:
            calls["torch"] = C.torch_call(inp)
        for b in SDPBackend:
            if not ex.reasons[b]:
                calls[b.name] = C.sdpax_call(inp, b)
        with torch.no_grad():
            outs = {n: c() for n, c in calls.items()}
        ref = C.reference(inp.q.detach(), inp.k.detach(), inp.v.detach(), **inp.ref)
        fns = {n: C.forward_backward(c, inp) if args.backward else C.forward(c) for n, c in calls.items()}
        times = timer(fns)
        res = {"name": row.name, "backend": ex.backend.name, "times": times,
               "err_ref": {n: C.max_abs_err(o, ref) for n, o in outs.items()}}
        if "torch" in outs:
            res["err_vs_torch"] = {n: C.max_abs_err(o, outs["torch"]) for n, o in outs.items() if n != "torch"}
        results.append(res)
        _progress(f"{row.name}: " + ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in times.items() if t))
        del inp, outs, ref
        _free(device)
    table = []
    for r in results:
        tm, er, picked = r["times"], r["err_ref"], r["backend"]
        evt = r.get("err_vs_torch", {}).get(picked)
        speed = C.ratio(tm.get("torch"), tm.get(picked)) if "torch" in tm else "- (torch lacks it)"
        table.append([r["name"], picked] + [f"{tm[n] * 1e3:.3f}" if tm.get(n) else "-"
                                            for n in ("torch", "MATH", "FLASH_ATTENTION")]
                     + [speed, "-" if evt is None else f"{evt:.2e}",
                        f"{er['torch']:.2e} / {er[picked]:.2e}" if "torch" in er else f"- / {er[picked]:.2e}"])
    extra = ["", "medians of alternating runs; speedup = torch time / time of the backend sdpax picks by default"]
    png = _plot(results, device, HERE / f"bench_{device}{'_bwd' if args.backward else ''}.png")
    if png:
        print(f"plot: {png}")
    return C.markdown_table(SUITES["default"].columns, table), extra


# ---- cpu ----

def _cpu_options(group):
    group.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every call (default 2)")
    group.add_argument("--peaks", action="store_true",
                       help="also measure the machine's float32 FMA and AVX512-BF16 peaks (compiles a small "
                            "extension; AVX-512 CPUs only) and torch.mm's rate")
    group.add_argument("--memory", action="store_true",
                       help="also measure the peak extra memory of one call at L = S = 8192, sdpax and torch, each "
                            "in its own process")


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
    #define SDPAX_SUM(a) s += _mm512_reduce_add_ps(a);
    __attribute__((target("avx512f"))) static double fma_loop(int64_t iters) {
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0,
             a9 = a0, a10 = a0, a11 = a0;
      const __m512 x = _mm512_set1_ps(1.0000001f), y = _mm512_set1_ps(0.9999999f);
      #define SDPAX_FMA(a) a = _mm512_fmadd_ps(a, x, y);
      for (int64_t it = 0; it < iters; ++it) { SDPAX_CHAINS(SDPAX_FMA) SDPAX_KEEP; }
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


def _cpu_flags() -> set:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _peaks() -> list:
    """Lines: the FMA and AVX512-BF16 dot-product peaks (GFLOP/s on the current threads) and torch.mm's rates."""
    lines = [f"## Machine peaks ({torch.get_num_threads()} threads)", ""]
    flags = _cpu_flags()
    if "avx512f" in flags:
        from torch.utils.cpp_extension import load_inline
        mod = load_inline("sdpax_bench_peak", cpp_sources=_PEAK_SRC, functions=["peak"],
                          extra_cflags=["-O2", "-fopenmp"], verbose=False)
        lines.append(f"- FMA float32 (vfmadd231ps zmm loop): {max(mod.peak(False, 20_000_000) for _ in range(3)):.0f}"
                     " GFLOP/s")
        if "avx512_bf16" in flags:
            lines.append(f"- AVX512-BF16 dot (vdpbf16ps zmm loop): "
                         f"{max(mod.peak(True, 20_000_000) for _ in range(3)):.0f} GFLOP/s")
    else:
        lines.append("- no AVX-512 on this CPU: the FMA / BF16 loops were not run")
    rates = []
    # Without AVX512-BF16 or AMX, torch multiplies bfloat16 in a scalar loop: minutes, and no peak worth knowing.
    for dt in (C.F32, C.BF16) if flags & {"avx512_bf16", "amx_bf16"} else (C.F32,):
        a, b = torch.randn(2048, 2048).to(dt), torch.randn(2048, 2048).to(dt)
        t = C.Timer("cpu", 1.0, min_reps=5, max_reps=20)({"mm": partial(torch.matmul, a, b)})["mm"]
        rates.append(f"{C.DTYPE_NAMES[dt]} {2 * 2048 ** 3 / t / 1e9:.0f} GFLOP/s")
    return lines + ["- torch.mm 2048^3: " + ", ".join(rates), ""]


_MEM_SRC = textwrap.dedent("""
    import torch, sdpax, torch.nn.functional as F
    torch.set_num_threads({threads})
    fn = sdpax.scaled_dot_product_attention if "{impl}" == "sdpax" else F.scaled_dot_product_attention
    B, H, L, S, D = {B}, {H}, {L}, {S}, {D}
    def status_mb(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(key + ":")) / 1024
    def step(q, k, v, backward):
        out = fn(q, k, v, is_causal={causal})
        if backward:
            out.backward(torch.ones_like(out))
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.{dtype}, requires_grad=True) for n in (L, S, S))
    step(*(t.detach()[:, :, :256].clone().requires_grad_(True) for t in (q, k, v)), True)  # warm-up
    for backward in (False, True):
        base = status_mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        step(q, k, v, backward)
        print(status_mb("VmHWM") - base)
""")


def _memory(threads: int) -> list:
    """Lines: peak RSS growth of one forward and one forward + backward, sdpax and torch, each in a new process."""
    (row,) = C.select("cpu-memory")
    res = {}
    for impl in ("sdpax", "torch"):
        src = _MEM_SRC.format(threads=threads, impl=impl, B=row.B, H=row.Hq, L=row.L, S=row.S, D=row.D,
                              causal=row.kind == "causal", dtype=str(row.dtype).replace("torch.", ""))
        try:
            out = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, check=True).stdout
            res[impl] = [float(x) for x in out.split()]
        except (subprocess.CalledProcessError, ValueError) as e:
            print(f"memory probe of {impl} failed: {e}", file=sys.stderr)
            res[impl] = None
    elem = torch.empty(0, dtype=row.dtype).element_size()
    inputs = (row.B * row.Hq * row.L + 2 * row.B * row.Hkv * row.S) * row.D * elem / 2 ** 20
    lines = [f"## Peak extra memory: {row.describe()}", ""]
    for impl, r in res.items():
        lines.append(f"- {impl}: " + ("failed" if r is None else
                                      f"forward {r[0]:.0f} MiB, forward+backward {r[1]:.0f} MiB"))
    return lines + [(f"- (outputs and gradients included; the inputs are {inputs:.0f} MiB, one L x S float32 matrix "
                     f"would be {row.L * row.S * 4 / 2 ** 20:.0f} MiB per head)"), ""]


@suite(name="cpu", device="cpu", devices=("cpu",), options=_cpu_options, passes=("fwd", "fwd+bwd"),
       measures="The fused CPU kernels (FLASH_ATTENTION, sdpax's default there) on the grid of LLM shapes (16/16 and "
                "GQA 32/8 heads, L 512-4096, d64/d128, plain and causal), encoder padding masks, a dense mask, "
                "decode (L 1 and 4 against 1k-16k keys) and odd sizes, float32 and bfloat16, forward and forward + "
                "backward (decode: forward), against torch's default and torch forced to FLASH_ATTENTION. "
                "GFLOP/s (decode: GB/s of K and V) and geometric means. The default grid takes about 15 minutes on "
                "2 cores; --quick a minute or two; --full is the whole grid (L = 4096).",
       columns=("group", "B", "Hq/Hkv", "L", "S", "D", "kind", "dtype", "pass", "sdpax ms", "torch ms",
                "torch flash ms", "ratio", "ratio vs flash", "sdpax GFLOP/s (decode: GB/s)"))
def run_cpu(args, rows):
    torch.set_num_threads(args.threads)
    timer = C.Timer("cpu", args.budget or 2.0, min_reps=3, max_reps=200)
    extra = []
    if args.peaks:
        extra += _peaks()
    if args.memory:
        extra += _memory(args.threads)
    results = []
    for row in rows:
        for pass_ in ("fwd",) if row.decode else ("fwd", "fwd+bwd"):
            inp = C.make_inputs(row, "cpu", requires_grad=pass_ != "fwd")
            chosen = sdpax.explain(inp.q, inp.k, inp.v, **inp.ours).backend
            if chosen != SDPBackend.FLASH_ATTENTION:
                print(f"  {row.name}: sdpax would run {chosen.name}, not FLASH_ATTENTION; skipped", file=sys.stderr)
                continue
            calls = {"sdpax": C.sdpax_call(inp), "torch": C.torch_call(inp),
                     "torch flash": C.torch_call(inp, [TorchBackend.FLASH_ATTENTION])}
            t = timer({n: C.forward(c) if pass_ == "fwd" else C.forward_backward(c, inp) for n, c in calls.items()})
            results.append({"row": row, "pass_": pass_, "t": t})
            _progress(f"{row.name:<34} {pass_:<7} sdpax {t['sdpax'] * 1e3:9.2f} ms  torch {t['torch'] * 1e3:9.2f} ms"
                      f"  {C.ratio(t['torch'], t['sdpax'])}  (vs forced flash {C.ratio(t['torch flash'], t['sdpax'])})")
    table = []
    for r in results:
        row, t = r["row"], r["t"]
        table.append([row.group, row.B, f"{row.Hq}/{row.Hkv}", row.L, row.S, row.D, row.kind,
                      C.DTYPE_NAMES[row.dtype], r["pass_"], _ms(t["sdpax"]), _ms(t["torch"]), _ms(t["torch flash"]),
                      C.ratio(t["torch"], t["sdpax"]).rstrip("x"), C.ratio(t["torch flash"], t["sdpax"]).rstrip("x"),
                      f"{C.throughput(row, r['pass_'], t['sdpax']) / 1e9:.0f}"])
    extra = ["", *extra, *_cpu_summary(results), "",
             ("times: medians of interleaved rounds (sdpax, torch default, torch forced FLASH_ATTENTION); "
              "ratio = torch / sdpax (> 1: sdpax faster)")]
    return C.markdown_table(SUITES["cpu"].columns, table), extra


def _ms(seconds) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.2f}"


def _cpu_summary(results) -> list:
    """Geometric means of torch time / sdpax time: by pass, decode, masked, and per dtype."""
    def gm(keep):
        v = C.geomean([r["t"]["torch"] / r["t"]["sdpax"] for r in results if keep(r["row"], r["pass_"])])
        return "n/a" if v is None else f"{v:.2f}"
    lowest = min((r["t"]["torch"] / r["t"]["sdpax"] for r in results if r["pass_"] == "fwd"), default=float("nan"))
    lines = ["## Summary (torch time / sdpax time, geometric means)", "",
             (f"- forward {gm(lambda row, p: p == 'fwd')} (lowest row {lowest:.2f}), forward+backward "
              f"{gm(lambda row, p: p == 'fwd+bwd')}, decode {gm(lambda row, p: row.decode)}, masked "
              f"{gm(lambda row, p: row.kind in C.MASKED)}")]
    for dt in (C.F32, C.BF16):
        lines.append(f"- {C.DTYPE_NAMES[dt]} (decode excluded): forward "
                     f"{gm(lambda row, p, dt=dt: row.dtype == dt and p == 'fwd' and not row.decode)}, "
                     f"forward+backward {gm(lambda row, p, dt=dt: row.dtype == dt and p == 'fwd+bwd')}")
    return lines


# ---- cuda ----

def _require_cuda_main_loop(what: str) -> bool:
    if C.has_main_loop_override():
        return True
    print(f"this sdpax has no sdpax.cuda_main_loop: the {what} column is left out", file=sys.stderr)
    return False


@suite(name="cuda", device="cuda", devices=("cuda",), passes=("fwd", "fwd+bwd"),
       measures="The fused CUDA kernels on 16k tokens of hidden size 2048 at d64/d128 and L 1k/4k/16k (plain and "
                "causal), d256, a bool (B,1,L,S) and a padding (B,1,1,S) mask, GQA and sinks each beside the same "
                "shape without, a decode step and float32 (split TF32); forward and forward + backward against "
                "torch's default (cuDNN for bf16 on an H100) and torch forced to FLASH_ATTENTION (FA2). TFLOP/s "
                "(decode: time and TB/s of K and V). About 75 s on an H100; --quick: the L = 4096 rows.",
       columns=("shape", "pass", "sdpax backend", "sdpax TFLOP/s", "torch default", "torch FA2", "vs default",
                "vs FA2"))
def run_cuda(args, rows):
    device = args.device
    timer = C.Timer(device, args.budget or 1.0, min_reps=10, max_reps=1000)
    table = []
    for row in rows:
        inp = C.make_inputs(row, device, requires_grad=True)
        backend = sdpax.explain(inp.q, inp.k, inp.v, **inp.ours).backend.name
        for pass_ in ("fwd",) if row.decode else ("fwd", "fwd+bwd"):
            calls = {"sdpax": C.sdpax_call(inp)}
            if inp.theirs is not None:
                calls.update({"torch": C.torch_call(inp), "fa2": C.torch_call(inp, [TorchBackend.FLASH_ATTENTION])})
            t = timer({n: C.forward(c) if pass_ == "fwd" else C.forward_backward(c, inp) for n, c in calls.items()})
            line = [row.name, pass_, backend]
            line += [C.rate(row, pass_, t.get(n), device) for n in ("sdpax", "torch", "fa2")]
            line += [C.ratio(t.get("torch"), t["sdpax"]), C.ratio(t.get("fa2"), t["sdpax"])]
            table.append(line)
            _progress(" | ".join(str(x) for x in line))
        del inp
        _free(device)
    return C.markdown_table(SUITES["cuda"].columns, table), [
        "", ("TFLOP/s: 4 B H L S D per forward (visible pairs only when causal), x3.5 for forward + backward; "
             "ratios: torch time / sdpax time (> 1: sdpax faster)")]


# ---- cuda-sm90 ----

@suite(name="cuda-sm90", device="cuda", devices=("cuda",),
       measures="Forward only: sdpax's default CUDA main loop (on an sm90a build on compute capability 9, the Hopper "
                "wgmma loop wherever the variant table lists one) against its mma.sync loop, selected with "
                "sdpax.cuda_main_loop(forward='mma'), beside torch's default and torch forced to FLASH_ATTENTION "
                "(FA2), and the relative difference of the two sdpax loops' outputs (dropout rows draw the same "
                "elements in both). --full adds the general kind's other paths (additive masks, dropout, d64 "
                "masks, fp16).",
       columns=("shape", "sdpax auto TFLOP/s", "sdpax mma.sync", "torch default", "torch FA2", "auto vs mma.sync",
                "auto vs FA2", "auto vs default", "rel diff auto / mma.sync"))
def run_cuda_sm90(args, rows):
    device = args.device
    timer = C.Timer(device, args.budget or 1.0, min_reps=10, max_reps=1000)
    loops = _require_cuda_main_loop("mma.sync")
    table = []
    for row in rows:
        inp = C.make_inputs(row, device)
        ours = C.sdpax_call(inp)
        calls = {"auto": C.forward(ours)}
        if loops:
            mma = C.main_loop(forward="mma")
            calls["mma"] = C.forward(partial(_within, mma, ours))
        if inp.theirs is not None:
            calls.update({"torch": C.forward(C.torch_call(inp)),
                          "fa2": C.forward(C.torch_call(inp, [TorchBackend.FLASH_ATTENTION]))})
        diff = "n/a"
        if loops:
            torch.manual_seed(0)  # the same dropout draws for both loops
            o_auto = calls["auto"]()
            torch.manual_seed(0)
            diff = f"{C.rel_diff([o_auto], [calls['mma']()]):.1e}"
            del o_auto
        t = timer(calls)
        line = [row.name] + [C.rate(row, "fwd", t.get(n), device) for n in ("auto", "mma", "torch", "fa2")]
        line += [C.ratio(t.get(n), t["auto"]) for n in ("mma", "fa2", "torch")] + [diff]
        table.append(line)
        _progress(" | ".join(str(x) for x in line))
        del inp, calls
        _free(device)
    return C.markdown_table(SUITES["cuda-sm90"].columns, table), [
        "", "TFLOP/s: 4 B H L S D (visible pairs only when causal); 'auto vs X' = X's time / auto's time"]


def _pair(e) -> str:
    return "n/a" if e is None else f"{e[0]:.2e} / {e[1]:.2e}"


def _within(context_factory, call):
    with context_factory():
        return call()


# ---- cuda-bwd-parts ----

def _bwd_parts_options(group):
    group.add_argument("--no-profile", action="store_true", help="skip the per-kernel profile of each row")
    group.add_argument("--once", action="store_true",
                       help="run one sdpax backward per row and time nothing (for ncu / nsys)")


@suite(name="cuda-bwd-parts", device="cuda", devices=("cuda",), options=_bwd_parts_options, passes=("bwd",),
       measures="The backward alone (one forward, then torch.autograd.grad(retain_graph=True) repeated; it includes "
                "the Delta pre-pass and the dQ finish): sdpax's default main loop, its mma.sync loop "
                "(sdpax.cuda_main_loop(backward='mma')) and its deterministic mode "
                "(torch.use_deterministic_algorithms: dQ by its own pass, no atomics), against torch's FA2 (torch's "
                "default for masked rows, which FA2 does not take), with the relative difference of the gradients; "
                "then a per-kernel profile of sdpax's backward per row. Rows: plain and causal d64/d128 (d256 by "
                "default, not --quick), the general kind (bool, padding, all-true padding, dropout) at d64/d128 "
                "(d256 with --full).",
       columns=("shape", "sdpax ms", "sdpax TFLOP/s", "mma.sync", "vs mma.sync", "rel diff mma.sync",
                "deterministic", "vs deterministic", "rel diff deterministic", "torch", "vs torch",
                "rel diff torch"))
def run_cuda_bwd_parts(args, rows):
    device = args.device
    timer = C.Timer(device, args.budget or 1.0, min_reps=10, max_reps=1000)
    loops = not args.once and _require_cuda_main_loop("mma.sync")
    table = []
    for row in rows:
        inp = C.make_inputs(row, device, requires_grad=True)
        # Each column runs its own forward: the same seed gives each the same dropout draws.
        torch.manual_seed(0)
        fns = {"sdpax": C.backward_only(C.sdpax_call(inp), inp)}
        if args.once:
            fns["sdpax"]()
            if device == "cuda":
                torch.cuda.synchronize()
            _progress(f"{row.name}: one backward")
            continue
        if loops:
            torch.manual_seed(0)
            fns["mma"] = C.backward_only(C.sdpax_call(inp), inp, around=C.main_loop(backward="mma"))
        torch.manual_seed(0)
        fns["det"] = C.backward_only(C.sdpax_call(inp), inp, around=C.deterministic_algorithms)
        torch_name = None
        if inp.theirs is not None:
            masked = "attn_mask" in inp.theirs
            torch_name = "default" if masked else "FA2"
            torch_bwd = _backward_or_none(C.torch_call(inp, None if masked else [TorchBackend.FLASH_ATTENTION]), inp)
            if torch_bwd is not None:
                fns["torch"] = torch_bwd
        grads = {n: fn() for n, fn in fns.items()}
        t = timer(fns)
        # dropout: torch drops other elements than sdpax, so its gradients are not comparable
        diffs = {n: f"{C.rel_diff(grads['sdpax'], g):.2e}" for n, g in grads.items()
                 if not (n == "torch" and row.kind == "dropout")}
        line = [row.name, f"{t['sdpax'] * 1e3:.3f}"] + [C.rate(row, "bwd", t.get(n), device) for n in ("sdpax", "mma")]
        line += [C.ratio(t.get("mma"), t["sdpax"]), diffs.get("mma", "n/a"), C.rate(row, "bwd", t.get("det"), device),
                 C.ratio(t.get("det"), t["sdpax"]), diffs.get("det", "n/a"),
                 C.rate(row, "bwd", t.get("torch"), device) + (f" ({torch_name})" if torch_name else ""),
                 C.ratio(t.get("torch"), t["sdpax"]), diffs.get("torch", "n/a")]
        table.append(line)
        _progress(" | ".join(str(x) for x in line))
        if not args.no_profile:
            _profile(row.name, fns["sdpax"], device)
        del inp, fns, grads
        _free(device)
    if args.once:
        return "(--once: nothing timed)", []
    return C.markdown_table(SUITES["cuda-bwd-parts"].columns, table), [
        "", ("TFLOP/s: 2.5 x 4 B H L S D (visible pairs only when causal; masks count dense); 'vs X' = X's time / "
             "sdpax's time; rel diff: max over dq, dk, dv of ||sdpax - X|| / ||X||")]


def _backward_or_none(call, inp):
    """C.backward_only, or None (with a note) where the forward is refused (a torch backend that cannot take the
    row)."""
    try:
        return C.backward_only(call, inp)
    except RuntimeError as e:
        print(f"    torch: not timed ({str(e).splitlines()[0][:110]})", file=sys.stderr)
        return None


def _profile(name, fn, device, calls=5, top=8):
    """Prints the kernels of `calls` calls of fn, the most expensive first (time per call)."""
    acts = [torch.profiler.ProfilerActivity.CUDA if device == "cuda" else torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    key = "device_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"  -- {name}: sdpax backward, us per call ({calls} calls)")
    for ev in sorted(prof.key_averages(), key=lambda e: -getattr(e, key))[:top]:
        print(f"     {getattr(ev, key) / calls:10.1f}  {ev.key[:100]}")


# ---- cuda-mask-bwd ----

@suite(name="cuda-mask-bwd", device="cuda", devices=("cuda",), passes=("bwd", "fwd+bwd"),
       measures="What a bool (B,1,L,S) mask of random halves and a padding (B,1,1,S) mask cost the CUDA backward, "
                "beside the same shape without a mask: the backward alone and forward + backward of sdpax and of "
                "torch's default on the same masks, d128 and d64, L = S = 4096. TFLOP/s count dense FLOPs.",
       columns=("shape", "sdpax bwd TFLOP/s", "torch bwd", "bwd vs torch", "sdpax fwd+bwd TFLOP/s", "torch fwd+bwd",
                "fwd+bwd vs torch"))
def run_cuda_mask_bwd(args, rows):
    device = args.device
    timer = C.Timer(device, args.budget or 1.0, min_reps=10, max_reps=1000)
    table = []
    for row in rows:
        inp = C.make_inputs(row, device, requires_grad=True)
        ours, theirs = C.sdpax_call(inp), C.torch_call(inp)
        bwd = {"sdpax": C.backward_only(ours, inp)}
        torch_bwd = _backward_or_none(theirs, inp)
        if torch_bwd is not None:
            bwd["torch"] = torch_bwd
        t_bwd = timer(bwd)
        t_both = timer({"sdpax": C.forward_backward(ours, inp), "torch": C.forward_backward(theirs, inp)})
        line = [row.name, C.rate(row, "bwd", t_bwd["sdpax"], device), C.rate(row, "bwd", t_bwd.get("torch"), device),
                C.ratio(t_bwd.get("torch"), t_bwd["sdpax"]), C.rate(row, "fwd+bwd", t_both["sdpax"], device),
                C.rate(row, "fwd+bwd", t_both["torch"], device), C.ratio(t_both["torch"], t_both["sdpax"])]
        table.append(line)
        _progress(" | ".join(str(x) for x in line))
        del inp
        _free(device)
    return C.markdown_table(SUITES["cuda-mask-bwd"].columns, table), [
        "", "TFLOP/s: 4 B H L S D per forward, x2.5 for the backward alone, x3.5 for forward + backward"]


# ---- varlen ----

class _TutorialAttention(torch.nn.Module):
    """The CausalSelfAttention module of torch's SDPA tutorial (no bias, no output dropout). `mask`: an attn_mask
    for padded dense input; `torch_layout`: q, k, v made contiguous in (B, j, H, D), which torch's CPU path for
    jagged inputs requires (it refuses the tutorial's views)."""

    def __init__(self, heads, embed, dtype, device):
        super().__init__()
        self.c_attn = torch.nn.Linear(embed, 3 * embed, bias=False, dtype=dtype, device=device)
        self.c_proj = torch.nn.Linear(embed, embed, bias=False, dtype=dtype, device=device)
        self.heads = heads

    def forward(self, x, is_causal=False, mask=None, torch_layout=False):
        qp = self.c_attn(x)
        b, d = qp.size(0), qp.size(2) // (3 * self.heads)
        q, k, v = (t.view(b, -1, self.heads, d).transpose(1, 2) for t in qp.chunk(3, -1))
        if torch_layout:
            q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.c_proj(y.transpose(1, 2).reshape(b, -1, self.heads * d))


def _tutorial_batch(row, device):
    """The tutorial's lengths (padding fraction ~ N(0.5, 0.01), one sequence at the maximum, fixed seed) as a jagged
    batch (B, j, E), the same data padded (B, L, E) and the padding's keep mask (B, L)."""
    rnd = random.Random(0)
    lens = [int(row.L * (1 - rnd.gauss(0.5, 0.01))) for _ in range(row.B)]
    lens[rnd.randint(0, row.B - 1)] = row.L
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, row.Hq * row.D, generator=gen).to(device, row.dtype) for n in lens]
    nested = torch.nested.nested_tensor(parts, layout=torch.jagged)
    padded = nested.to_padded_tensor(0.0)
    keep = torch.arange(row.L, device=device)[None] < torch.tensor(lens, device=device)[:, None]
    return nested, padded, keep, lens


def _varlen_options(group):
    group.add_argument("--compiled", action="store_true",
                       help="run the module through torch.compile (every row and column alike): its nested-tensor "
                            "views and projections traced instead of dispatched op by op in Python")


@suite(name="varlen", device="cpu", devices=("cpu", "cuda"), passes=("fwd", "fwd+bwd"), options=_varlen_options,
       measures="torch's SDPA tutorial: its CausalSelfAttention module (8 heads, d64) on 32 sequences of random "
                "lengths up to 512 (about half padding), the module's time including its projections: sdpax on "
                "the jagged nested batch (under sdpax.patch()), torch on the same jagged batch (on CPU torch needs "
                "its q, k, v contiguous, which the row then gives it, and refuses causal), and both on the padded "
                "dense batch with a padding mask. Plain rows: eval forward; causal rows: training forward + backward "
                "of the input.",
       columns=("shape", "pass", "sdpax jagged ms", "torch jagged ms", "sdpax padded ms", "torch padded ms",
                "vs torch jagged", "vs sdpax padded", "vs torch padded"))
def run_varlen(args, rows):
    device = args.device
    timer = C.Timer(device, args.budget or 2.0, min_reps=3, max_reps=200)
    table = []
    for row in rows:
        causal = row.kind == "causal"
        module = _TutorialAttention(row.Hq, row.Hq * row.D, row.dtype, device)
        nested, padded, keep, _ = _tutorial_batch(row, device)
        mask = keep[:, None, None, :]
        if causal:  # torch's docs make attn_mask with is_causal an error: the causal pattern goes into the mask
            mask = mask & torch.ones(row.L, row.L, dtype=torch.bool, device=device).tril()
        x_nested, x_padded = (t.detach().requires_grad_(causal) for t in (nested, padded))

        def run(x, values, sdpax_on, module=module, causal=causal, **kw):
            # One compiled function per column (each traces its own branch of the module and its own patch state).
            call = torch.compile(module) if args.compiled else module

            def go():
                with sdpax.patch() if sdpax_on else contextlib.nullcontext():
                    out = call(x, **kw)
                    if causal:  # gradients returned, not accumulated (a nested leaf's .grad cannot add up)
                        torch.autograd.grad(values(out).sum(), [x, *module.parameters()])
                return out
            return go if causal else C.forward(go)
        jag, dense = (lambda o: o.values()), (lambda o: o)
        t = timer({"sdpax jagged": run(x_nested, jag, True, is_causal=causal),
                   "torch jagged": run(x_nested, jag, False, is_causal=causal, torch_layout=device == "cpu"),
                   "sdpax padded": run(x_padded, dense, True, mask=mask),
                   "torch padded": run(x_padded, dense, False, mask=mask)})
        name = row.name + (" compiled" if args.compiled else "")
        line = [name, "fwd+bwd" if causal else "fwd"] + [_ms(t[n]) for n in ("sdpax jagged", "torch jagged",
                                                                              "sdpax padded", "torch padded")]
        line += [C.ratio(t[n], t["sdpax jagged"]) for n in ("torch jagged", "sdpax padded", "torch padded")]
        table.append(line)
        _progress(" | ".join(str(x) for x in line))
        _free(device)
    return C.markdown_table(SUITES["varlen"].columns, table), [
        "", "ratios: the other time / sdpax jagged time (> 1: sdpax on the jagged batch is faster)"]


# ---- varlen-packed ----

@suite(name="varlen-packed", device="cuda", devices=("cuda", "cpu"), passes=("fwd", "fwd+bwd"),
       measures="Throughput of one packed batch of 16k tokens (hidden 2048, bf16) through sdpax.varlen_attn, for "
                "length mixes from uniform (16 x 1k) to long-tailed (one 8k sequence and a tail from 1 token), "
                "counting only each sequence's own (query, key) pairs; against sdpax's dense kernel on a batch of "
                "the same tokens and the same work (sequences of sum(L^2) / sum(L) tokens), and torch's "
                "varlen_attn where torch has it.",
       columns=("shape", "pass", "sequences", "sdpax varlen ms", "varlen TFLOP/s", "dense TFLOP/s", "varlen / dense",
                "torch varlen ms", "vs torch varlen"))
def run_varlen_packed(args, rows):
    device = args.device
    timer = C.Timer(device, args.budget or 2.0, min_reps=3, max_reps=100)
    try:
        from torch.nn.attention.varlen import varlen_attn as torch_varlen
    except ImportError:
        torch_varlen = None
    table = []
    for row in rows:
        table += _varlen_packed_rows(row, timer, device, torch_varlen)
        _free(device)
    return C.markdown_table(SUITES["varlen-packed"].columns, table), [
        "", ("TFLOP/s: 4 H D per (query, key) pair a sequence's own causal limit lets through, x3.5 for forward + "
             "backward; vs torch varlen: torch time / sdpax time")]


def _varlen_packed_rows(row, timer, device, torch_varlen) -> list:
    lens = C.varlen_mix(row.group)
    causal = row.kind == "causal"
    align = "upper_left" if causal else None
    pairs = sum(C.visible_pairs(n, n, align) for n in lens)
    T = sum(lens)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (torch.randn(T, row.Hq, row.D, generator=gen, device=device).to(row.dtype).requires_grad_()
                     for _ in range(4))
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=device)
    calls = {"sdpax varlen": lambda: sdpax.varlen_attn(q, k, v, cu, cu, max(lens), max(lens), is_causal=causal)}
    if torch_varlen is not None:
        window = (-1, 0) if causal else (-1, -1)  # torch's varlen_attn has no is_causal from 2.11 on
        calls["torch varlen"] = lambda: torch_varlen(q, k, v, cu, cu, max(lens), max(lens), window_size=window)
    inp = C.make_inputs(row, device, requires_grad=True)  # the row's shape: the dense batch of the same work
    calls["dense"] = lambda: sdpax.scaled_dot_product_attention(inp.q, inp.k, inp.v, is_causal=causal)
    lines = []
    for pass_ in ("fwd", "fwd+bwd"):
        timed = {}
        for name, call in calls.items():
            if pass_ == "fwd":
                timed[name] = C.forward(call)
            elif name == "dense":
                timed[name] = C.forward_backward(call, inp)
            else:
                timed[name] = (lambda call=call: torch.autograd.grad(call(), (q, k, v), dout))
        t = timer(timed)
        work = 4.0 * row.Hq * row.D * pairs * C.PASS_FACTOR[pass_]
        ours_s, dense_s = t["sdpax varlen"], t["dense"]
        ours_tf = None if ours_s is None else work / ours_s / 1e12
        dense_tf = None if dense_s is None else C.flops(row, pass_) / dense_s / 1e12
        lines.append([row.name, pass_, str(len(lens)), _ms(ours_s), "n/a" if ours_tf is None else f"{ours_tf:.0f}",
                      "n/a" if dense_tf is None else f"{dense_tf:.0f}",
                      "n/a" if None in (ours_tf, dense_tf) else f"{ours_tf / dense_tf:.2f}",
                      _ms(t.get("torch varlen")), C.ratio(t.get("torch varlen"), ours_s)])
        _progress(" | ".join(lines[-1]))
    return lines


# ---- window ----

@suite(name="window", device="cuda", devices=("cuda", "cpu"), passes=("fwd", "fwd+bwd"),
       measures="A causal sliding window of S / 8 keys (window_size=(S / 8, 0): 4k keys at L = 32k on CUDA, 1k at "
                "8k on CPU): sdpax's fused window, against torch's default given the same window as a materialised "
                "(L, S) bool mask, and sdpax's full causal attention (what the window saves). Forward and forward "
                "+ backward, milliseconds per call.",
       columns=("shape", "pass", "sdpax ms", "torch masked ms", "sdpax full causal ms", "vs torch masked",
                "window / full causal", "max |diff| vs torch"))
def run_window(args, rows):
    device = args.device
    timer = C.Timer(device, args.budget or 2.0, min_reps=3, max_reps=50)
    table = []
    for row in rows:
        table += _window_row(row, timer, device)
        _free(device)
    return C.markdown_table(SUITES["window"].columns, table), [
        "", ("vs torch masked: torch time / sdpax time (> 1: sdpax faster); window / full causal: sdpax's windowed "
             "time over its full causal time on the same inputs")]


def _window_row(row, timer, device) -> list:
    W = row.S // 8
    inp = C.make_inputs(row, device, requires_grad=True)
    q, k, v = inp.q, inp.k, inp.v
    i = torch.arange(row.L, device=device)[:, None] + (row.S - row.L)
    j = torch.arange(row.S, device=device)[None, :]
    mask = (j <= i) & (j >= i - W)
    gqa = row.Hq != row.Hkv
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = {"sdpax": lambda: sdpax.scaled_dot_product_attention(q, k, v, is_causal=True, window_size=(W, 0),
                                                                   enable_gqa=gqa),
             "torch masked": lambda: sdpa(q, k, v, attn_mask=mask, enable_gqa=gqa),
             "sdpax full causal": lambda: sdpax.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)}
    with torch.no_grad():
        diff = C.max_abs_err(calls["sdpax"](), calls["torch masked"]())
    lines = []
    for pass_ in ("fwd", "fwd+bwd"):
        t = timer({n: (C.forward(c) if pass_ == "fwd" else C.forward_backward(c, inp)) for n, c in calls.items()})
        ours, full = t["sdpax"], t["sdpax full causal"]
        lines.append([row.name, pass_, _ms(ours), _ms(t["torch masked"]), _ms(full),
                      C.ratio(t["torch masked"], ours), "n/a" if None in (ours, full) else f"{ours / full:.2f}",
                      f"{diff:.2e}"])
        _progress(" | ".join(str(x) for x in lines[-1]))
    return lines


# ---- paged-decode ----

@suite(name="paged-decode", device="cpu", devices=("cpu", "cuda"),
       measures="A decode step (one query per sequence) of sdpax.varlen_attn over B sequences of S keys each, the KV "
                "cache contiguous (cu_seq_k) or paged (block_table, seqused_k; the pages in shuffled order), GQA: "
                "the cost of reading pages. The CPU kernels read pages in place (the decode kernel always, the "
                "others when each key tile lies in one page) and gather them otherwise; the CUDA kernels read them in "
                "place.",
       columns=("shape", "contiguous ms", "paged ms", "paged / contiguous"))
def run_paged_decode(args, rows):
    device = args.device
    timer = C.Timer(device, args.budget or 2.0, min_reps=5, max_reps=100)
    table = [_paged_row(row, timer, device) for row in rows]
    return C.markdown_table(SUITES["paged-decode"].columns, table), []


def _paged_row(row, timer, device) -> list:
    gen = torch.Generator().manual_seed(0)
    N, S, page = row.B, row.S, int(row.group)
    k, v = (torch.randn(N * S, row.Hkv, row.D, generator=gen).to(device, row.dtype) for _ in range(2))
    q = torch.randn(N, row.Hq, row.D, generator=gen).to(device, row.dtype)
    cq = torch.arange(N + 1, dtype=torch.int32, device=device)
    ck = cq * S
    slots = torch.randperm(N * S // page, generator=gen)  # page p of the cache sits in slot slots[p]
    kp, vp = (torch.empty(N * S // page, page, row.Hkv, row.D, device=device, dtype=row.dtype) for _ in range(2))
    kp[slots.to(device)] = k.view(-1, page, row.Hkv, row.D)
    vp[slots.to(device)] = v.view(-1, page, row.Hkv, row.D)
    table = slots.view(N, S // page).to(device=device, dtype=torch.int32)
    used = torch.full((N,), S, dtype=torch.int32, device=device)
    calls = {"contiguous": lambda: sdpax.varlen_attn(q, k, v, cq, ck, 1, S, enable_gqa=True),
             "paged": lambda: sdpax.varlen_attn(q, kp, vp, cq, None, 1, S, enable_gqa=True, seqused_k=used,
                                                block_table=table)}
    with torch.no_grad():
        assert torch.equal(calls["contiguous"](), calls["paged"]()), row.name
        t = timer(calls)
    line = [row.name, _ms(t["contiguous"]), _ms(t["paged"]),
            "n/a" if None in (t["contiguous"], t["paged"]) else f"{t['paged'] / t['contiguous']:.2f}"]
    _progress(" | ".join(line))
    return line


# ---- overhead ----

@suite(name="overhead", device="cpu", devices=("cpu", "cuda"),
       measures="The cost of one call too small for its kernel to matter (a decode step: one query, 256 keys): "
                "microseconds per call of torch's F.scaled_dot_product_attention, of sdpax's, and of sdpax's op "
                "called directly below autograd (the part of sdpax's cost that is not Python); on CUDA also a step "
                "replayed from a CUDA graph of 16 steps. Calls are queued back to back (CUDA: synchronised once "
                "per round of 2000); the best of 7 rounds.",
       columns=("shape", "torch us", "sdpax us", "sdpax op us", "sdpax Python us", "sdpax in a CUDA graph us"))
def run_overhead(args, rows):
    table = [_overhead_row(row, args.device) for row in rows]
    return C.markdown_table(SUITES["overhead"].columns, table), []


def _overhead_row(row, device) -> list:
    inp = C.make_inputs(row, device)
    q, k, v = inp.q, inp.k, inp.v
    scale = 1.0 / math.sqrt(row.D)
    op, below = torch.ops.sdpax.fwd.default, torch._C._AutoDispatchBelowAutograd
    backend = int(sdpax.explain(q, k, v).backend)

    def raw():
        with below():
            return op(q, k, v, None, 0.0, 0, scale, False, None, None, backend)
    with torch.no_grad():
        t = {"torch": _per_call(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), device),
             "sdpax": _per_call(lambda: sdpax.scaled_dot_product_attention(q, k, v), device),
             "op": _per_call(raw, device)}
        graph = "n/a"
        if device == "cuda":
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                sdpax.scaled_dot_product_attention(q, k, v)
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                for _ in range(16):
                    sdpax.scaled_dot_product_attention(q, k, v)
            graph = f"{_per_call(g.replay, device, n=200) / 16:.2f}"
    line = [row.name] + [f"{t[n]:.2f}" for n in ("torch", "sdpax", "op")] + [f"{t['sdpax'] - t['op']:.2f}", graph]
    _progress(" | ".join(line))
    return line


def _per_call(fn, device, n=2000) -> float:
    """Microseconds per call of fn called n times back to back, best of 7 rounds."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(200):
        fn()
    sync()
    best = math.inf
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


# ---- models ----

_MODEL_IMPLS = ("sdpax", "sdpa", "eager")


def _hf_model(row, device):
    """A 2-layer model of row.group's family with hidden size Hq x D on row's dtype and device, or None when this
    transformers lacks the family."""
    import transformers as tf
    hidden = row.Hq * row.D
    common = {"vocab_size": 1024, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 2,
              "num_attention_heads": row.Hq, "num_key_value_heads": row.Hkv,
              "max_position_embeddings": max(row.L, 512)}
    g = row.group
    if g == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif g == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif g == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=row.L // 4))
    elif g == "gemma2":
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, head_dim=row.D, sliding_window=row.L // 4,
                                                     attn_logit_softcapping=50.0, query_pre_attn_scalar=row.D))
    elif g == "gpt-oss":
        if not hasattr(tf, "GptOssConfig"):
            return None
        model = tf.GptOssForCausalLM(tf.GptOssConfig(**{**common, "intermediate_size": hidden}, head_dim=row.D,
                                                     sliding_window=128,
                                                     layer_types=["sliding_attention", "full_attention"],
                                                     # every token to every expert: a routing decision that
                                                     # flips on a rounding difference would hide the attention's
                                                     num_local_experts=2, num_experts_per_tok=2))
    else:  # bert
        model = tf.BertForMaskedLM(tf.BertConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden,
                                                 num_hidden_layers=2, num_attention_heads=row.Hq,
                                                 max_position_embeddings=max(row.L, 512)))
    return model.to(device=device, dtype=row.dtype).eval()


@suite(name="models", device="cuda", devices=("cuda", "cpu"), passes=("fwd", "fwd+bwd"),
       measures="One step of small transformers models (2 layers, hidden Hq x D, built from configs; no downloads) "
                "with each attention implementation on the same weights and tokens: sdpax's "
                "(sdpax.integrations.transformers), torch's SDPA ('sdpa', where the model declares SDPA support) "
                "and 'eager'. fwd: an eval forward (prefill); fwd+bwd: forward and backward of the mean logit. "
                "'vs fastest built-in': the faster of sdpa / eager over sdpax (> 1: sdpax faster), counting only "
                "implementations that compute the model's attention ('sdpa' drops Gemma 2's softcap where "
                "transformers lets it run). The last columns: the largest logit difference from eager, relative to "
                "the largest eager logit (random weights keep scores small, where the softcap barely bends them).",
       columns=("model", "pass", "sdpax ms", "sdpa ms", "eager ms", "vs fastest built-in",
                "sdpax vs eager (rel)", "sdpa vs eager (rel)"))
def run_models(args, rows):
    try:
        import transformers  # noqa: F401

        from sdpax.integrations import transformers as hf
    except ImportError as e:
        return f"models suite: transformers is not installed ({e})", []
    device = args.device
    timer = C.Timer(device, args.budget or 2.0, min_reps=3, max_reps=50)
    table = []
    for row in rows:
        table += _models_row(row, timer, device, hf.ATTN_IMPLEMENTATION)
        _free(device)
    return C.markdown_table(SUITES["models"].columns, table), []


def _models_row(row, timer, device, sdpax_name) -> list:
    torch.manual_seed(0)
    base = _hf_model(row, device)
    if base is None:
        return [[row.name, "-", "n/a (not in this transformers)"] + [""] * 5]
    models = {}
    for impl in _MODEL_IMPLS:
        if impl == "sdpa" and not getattr(base, "_supports_sdpa", False):
            continue
        m = _hf_model(row, device)
        m.load_state_dict(base.state_dict())
        m.set_attn_implementation(sdpax_name if impl == "sdpax" else impl)
        models[impl] = m
    del base
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1024, (row.B, row.L), generator=gen).to(device)
    kw = {}
    if row.kind == "pad_mask":  # random lengths from L / 2 to L, padded at the end
        lens = torch.randint(row.L // 2, row.L + 1, (row.B,), generator=gen)
        kw["attention_mask"] = (torch.arange(row.L)[None] < lens[:, None]).to(device=device, dtype=torch.long)
    with torch.no_grad():
        logits = {n: m(ids, **kw).logits.float() for n, m in models.items()}
    keep = kw["attention_mask"].bool()[..., None] if kw else torch.ones_like(logits["eager"][..., :1]).bool()
    scale = logits["eager"].abs().max().item()
    rel = {n: ((x - logits["eager"]).abs() * keep).max().item() / scale for n, x in logits.items()}
    del logits

    def step(m, train):
        def go():
            if train:
                m(ids, **kw).logits.float().mean().backward()
                return None
            with torch.no_grad():
                return m(ids, **kw).logits
        return go
    # torch's SDPA has no softcap: transformers versions that let a softcapped model run "sdpa" drop the cap, so that
    # run is timed but is not an implementation that gives the model's answer.
    drops_softcap = getattr(models["eager"].config, "attn_logit_softcapping", None) is not None
    sdpa_note = "no SDPA support" if "sdpa" not in rel else (
        f"{rel['sdpa']:.1e}" + (" (drops the softcap)" if drops_softcap else ""))
    lines = []
    for pass_, train in (("fwd", False), ("fwd+bwd", True)):
        t = timer({n: step(m, train) for n, m in models.items()})
        same_answer = ("eager",) if drops_softcap else ("sdpa", "eager")
        built_in = [t[n] for n in same_answer if t.get(n) is not None]
        lines.append([row.name, pass_] + [_ms(t.get(n)) for n in _MODEL_IMPLS] + [
            C.ratio(min(built_in) if built_in else None, t["sdpax"]), f"{rel['sdpax']:.1e}", sdpa_note])
        _progress(" | ".join(str(x) for x in lines[-1]))
    return lines


# ---- fp32-accuracy ----

_TENSORS = ("out", "dq", "dk", "dv")


@suite(name="fp32-accuracy", device="cuda", devices=("cuda", "cpu"), passes=("fwd+bwd",),
       measures="float32 accuracy against float64 (out, dq, dk, dv; max-relative and RMS-relative errors): sdpax "
                "FLASH_ATTENTION (on CUDA the split-TF32 kernels) next to torch's own float32 attention, its MATH "
                "backend with TF32 off (the baseline) and its default backend; the last columns are sdpax's errors "
                "over torch MATH's, and the summary gives the worst ratio per tensor. B 2, H 4, L = S in 128, 1024, "
                "4096, head dims 64, 128, 256, no mask / causal / bool / additive. Runs on CPU too (--device cpu).",
       columns=("case", "tensor", "sdpax max / rms", "torch MATH max / rms", "torch default max / rms",
                "sdpax/MATH max", "sdpax/MATH rms"))
def run_fp32_accuracy(args, rows):
    device = args.device
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    # torch's float32 baselines must be true float32: no TF32 in cuBLAS or cuDNN.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    table, worst = [], {n: [0.0, 0.0, ""] for n in _TENSORS}
    try:
        for row in rows:
            inp = C.make_inputs(row, device, requires_grad=True)
            leaves = [t.detach().double().requires_grad_() for t in (inp.q, inp.k, inp.v)]
            out = C.reference(*leaves, **inp.ref)
            ref = [out.detach(), *torch.autograd.grad(out, leaves, inp.dout.double())]
            del out, leaves
            errs = {}
            for col, call in (("sdpax", C.sdpax_call(inp, SDPBackend.FLASH_ATTENTION)),
                              ("math", C.torch_call(inp, [TorchBackend.MATH])), ("default", C.torch_call(inp))):
                try:
                    got = call()
                    got = [got.detach(), *torch.autograd.grad(got, (inp.q, inp.k, inp.v), inp.dout)]
                    errs[col] = [C.rel_errors(x, r) for x, r in zip(got, ref)]
                except RuntimeError as e:  # a call that backend cannot make
                    print(f"  {row.name} {col}: {str(e).splitlines()[0][:100]}", file=sys.stderr)
                    errs[col] = None
            for i, n in enumerate(_TENSORS):
                o, m = errs["sdpax"], errs["math"]
                d = errs["default"][i] if errs["default"] else None
                r_max = o[i][0] / m[i][0] if o and m and m[i][0] > 0 else float("nan")
                r_rms = o[i][1] / m[i][1] if o and m and m[i][1] > 0 else float("nan")
                if r_max > worst[n][0]:
                    worst[n][0], worst[n][2] = r_max, row.name
                worst[n][1] = max(worst[n][1], r_rms) if not math.isnan(r_rms) else worst[n][1]
                table.append([row.name, n, _pair(o[i] if o else None), _pair(m[i] if m else None), _pair(d),
                              f"{r_max:.2f}", f"{r_rms:.2f}"])
                _progress(" | ".join(str(x) for x in table[-1]))
            del inp, ref
            _free(device)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    extra = ["", "worst sdpax / torch MATH ratio over all cases (max-relative, at; RMS-relative):"]
    extra += [f"- {n}: {w[0]:.2f} ({w[2]}); {w[1]:.2f}" for n, w in worst.items()]
    return C.markdown_table(SUITES["fp32-accuracy"].columns, table), extra


# ---- cp-speed-model ----

def _cp_options(group):
    group.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8], help="simulated world sizes P")


def _pair_calls(q, k, v, world, causal):
    """Every rank's (query chunk, key chunk) kernel calls of sdpax.distributed's forward, without the merges."""
    import sdpax.distributed as cp
    from sdpax import _ops
    qs, ks, vs = ([cp.shard_of(t, r, world) for r in range(world)] for t in (q, k, v))
    scale = 1 / math.sqrt(q.shape[-1])
    plans = [cp._Plan(qs[r], ks[r], vs[r], causal, scale, q.shape[1] != k.shape[1], None, r, world)
             for r in range(world)]

    calls = [(r, owner, plan.calls(owner)) for r, plan in enumerate(plans) for owner in range(world)]

    def run():
        for r, owner, some in calls:
            for rs, kk, c, _ in some:
                _ops.fwd(qs[r][..., rs, :], ks[owner][..., kk, :], vs[owner][..., kk, :], None, 0.0, c,
                         plans[r].scale, plans[r].gqa, None, None, int(plans[r].backend))
    return run


@suite(name="cp-speed-model", device="cuda", devices=("cuda", "cpu"), options=_cp_options,
       measures="Context parallelism's speed model on one device: the per-pair kernel calls of sdpax.distributed "
                "for P ranks (the kernel work P GPUs would share), all run here one after another, and the whole "
                "simulated forward (calls + log-sum-exp merges, sdpax.distributed.simulate), against one dense sdpax "
                "call and one dense torch call on the whole sequence (same inputs, same process). Exchanges are "
                "not timed.",
       columns=("shape", "P", "sdpax dense ms", "dense TFLOP/s", "torch dense ms", "dense vs torch", "pairs ms",
                "pairs / dense", "simulated ms", "simulated / dense"))
def run_cp_speed_model(args, rows):
    import sdpax.distributed as cp
    device = args.device
    timer = C.Timer(device, args.budget or 5.0, min_reps=3, max_reps=50)
    table = []
    for row in rows:
        inp = C.make_inputs(row, device)
        causal = row.kind == "causal"
        gqa = row.Hq != row.Hkv
        for world in args.ranks:
            if row.L % (2 * world) or row.S % (2 * world):
                print(f"  {row.name}: L and S must be multiples of 2P = {2 * world}; P = {world} skipped",
                      file=sys.stderr)
                continue
            fns = {"dense": C.forward(C.sdpax_call(inp)), "torch": C.forward(C.torch_call(inp)),
                   "pairs": C.forward(_pair_calls(inp.q, inp.k, inp.v, world, 1 if causal else 0)),
                   "sim": C.forward(partial(cp.simulate, inp.q, inp.k, inp.v, world, is_causal=causal,
                                            enable_gqa=gqa))}
            t = timer(fns)
            line = [row.name, world, _ms(t["dense"]), C.rate(row, "fwd", t["dense"], device), _ms(t["torch"]),
                    C.ratio(t["torch"], t["dense"]), _ms(t["pairs"]), _share(t["pairs"], t["dense"]), _ms(t["sim"]),
                    _share(t["sim"], t["dense"])]
            table.append(line)
            _progress(" | ".join(str(x) for x in line))
        del inp
        _free(device)
    return C.markdown_table(SUITES["cp-speed-model"].columns, table), [
        "", "TFLOP/s: 4 B Hq L S D (visible pairs only when causal); 'dense vs torch' = torch time / sdpax time"]


def _share(part, whole) -> str:
    return "n/a" if part is None or whole is None else f"{part / whole:.3f}"


def describe_rows(suite_: Suite, rows, device) -> str:
    """The --dry-run listing: each row's shape and work per pass."""
    unit = "TFLOP" if device == "cuda" else "GFLOP"
    scale = 1e12 if device == "cuda" else 1e9
    lines = []
    for r in rows:
        work = ", ".join(f"{p} {C.flops(r, p) / scale:.3g} {unit}" for p in suite_.passes)
        if r.decode:
            work += f", K/V {C.kv_bytes(r) / 2 ** 20:.0f} MiB"
        lines.append(f"  {r.name:<40} {r.describe():<58} {work}")
    return "\n".join(lines)

