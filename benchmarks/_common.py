"""Shared parts of benchmarks/bench.py: the one shapes table, the one FLOP / byte formula, the one timer, the inputs
of a row, the float64 reference, the error measures and the header every recorded table carries.

Suites (_suites.py) take their rows from SHAPES by tag and tier; none defines shapes of its own.
"""
from __future__ import annotations

import contextlib
import datetime
import itertools
import math
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch.nn.attention import sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

import sdpax
from sdpax.attention.bias import causal_lower_right

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPE_NAMES = {F32: "fp32", BF16: "bf16", F16: "fp16", torch.float64: "fp64"}

# What a row adds to q, k, v (both sides get the same tensors):
#   plain        nothing                            causal       is_causal=True (upper-left)
#   lower_right  causal_lower_right(L, S) for sdpax, the same pattern as a bool (L, S) mask for torch
#   pad_mask     bool (B, 1, 1, S), each batch keeps a random S/2..S first keys
#   pad_all      bool (B, 1, 1, S), all True (the masked code path with nothing to skip)
#   dense_mask   bool (B, 1, L, S), random halves, key 0 always allowed (no fully masked row: torch's cuDNN
#                backend returns garbage for those)
#   add_mask     additive (B, 1, L, S) in the inputs' dtype, standard normal
#   sinks        sinks=(Hq,) float32 for sdpax; torch has no sinks, so no torch column
#   dropout      dropout_p=0.1
KINDS = ("plain", "causal", "lower_right", "pad_mask", "pad_all", "dense_mask", "add_mask", "sinks", "dropout")
MASKED = ("pad_mask", "pad_all", "dense_mask", "add_mask")
# --quick runs tier 0, the default tiers 0-1, --full tiers 0-2.
TIERS = {"quick": 0, "default": 1, "full": 2}


@dataclass(frozen=True)
class Shape:
    """One row: q (B, Hq, L, D), k and v (B, Hkv, S, D). tags: (tag, tier, order) triples (a suite lists its rows
    in the order it tagged them); device: only on that device."""

    name: str
    B: int
    Hq: int
    Hkv: int
    L: int
    S: int
    D: int
    dtype: torch.dtype
    kind: str = "plain"
    group: str = ""
    tags: tuple = ()
    device: str | None = None

    def tier(self, tag: str) -> int | None:
        return min((t for g, t, _ in self.tags if g == tag), default=None)

    def order(self, tag: str) -> int:
        return min(o for g, _, o in self.tags if g == tag)

    @property
    def decode(self) -> bool:
        """A decode step: bound by reading K and V, so it is reported in bytes per second."""
        return self.group == "decode"

    def describe(self) -> str:
        return (f"B {self.B}, H {self.Hq}/{self.Hkv}, L {self.L}, S {self.S}, D {self.D}, "
                f"{DTYPE_NAMES[self.dtype]}, {self.kind}")


def varlen_mix(mix: str, tokens: int = 16384) -> list:
    """Sequence lengths summing to `tokens`: "uniform" 1k each; "mixed" uniform in [1, 2k]; "long-tailed" one 8k
    sequence and a Pareto tail from 1 up (fixed seed). The last length takes what is left."""
    if mix == "uniform":
        return [1024] * (tokens // 1024)
    rnd = random.Random(0)
    lens = [8192] if mix == "long-tailed" else []
    while sum(lens) < tokens:
        n = rnd.randint(1, 2048) if mix == "mixed" else min(4096, int(rnd.paretovariate(1.1)))
        lens.append(min(n, tokens - sum(lens)))
    return lens


def _table() -> tuple:
    rows: dict = {}
    order = itertools.count()

    def add(name, B, Hq, Hkv, L, S, D, dtype, kind="plain", group="", tags="", device=None):
        """tags: space-separated 'tag' or 'tag:tier' (tier 0 when left out). A row added again under the same name
        (another suite using it) must be the same shape; it gains the new tags."""
        assert kind in KINDS, kind
        parsed = tuple((t.split(":")[0], int(t.split(":")[1]) if ":" in t else 0, next(order)) for t in tags.split())
        new = Shape(name, B, Hq, Hkv, L, S, D, dtype, kind, group, parsed, device)
        old = rows.get((name, device))
        if old is not None:
            assert replace(old, tags=()) == replace(new, tags=()), f"two shapes named {name!r}"
            new = replace(old, tags=old.tags + parsed)
        rows[(name, device)] = new

    # default: representative shapes, forward (or forward + backward) of torch and every sdpax backend; the CPU
    # set is small enough for 2 cores.
    for device, n, enc in (("cpu", 512, 128), ("cuda", 4096, 1024)):
        row = partial(add, tags="default", device=device)
        row("llm fp32", 1, 16, 16, n, n, 64, F32)
        row("llm causal fp32", 1, 16, 16, n, n, 64, F32, kind="causal")
        row("llm causal bf16", 1, 16, 16, n, n, 128, BF16, kind="causal")
        row("gqa 32/8 causal bf16", 1, 32, 8, n, n, 128, BF16, kind="causal")
        row("encoder pad mask fp32", 8, 12, 12, enc, enc, 64, F32, kind="pad_mask")
        row("dense bool mask bf16", 1, 8, 8, n, n, 64, BF16, kind="dense_mask")
        row("kv-cache lower-right bf16", 1, 32, 8, 16, 4 * n, 128, BF16, kind="lower_right")
        row("decode L=1 gqa bf16", 1, 32, 8, 1, 8 * n, 128, BF16, group="decode")
        row("odd L=77 D=80 fp32", 4, 8, 8, 77, 77, 80, F32)
        row("sinks bf16", 1, 16, 16, n, n, 64, BF16, kind="sinks")

    # cpu: the fused CPU kernels on the grid of LLM, encoder, mask, decode and odd shapes, float32 and bfloat16.
    for dt in (F32, BF16):
        name = DTYPE_NAMES[dt]
        for hq, hkv in ((16, 16), (32, 8)):
            for L in (512, 1024, 2048, 4096):
                for d in (64, 128):
                    for kind in ("plain", "causal"):
                        big = L == 4096 or (L == 2048 and (d == 64 or hq == 32))
                        tier = 2 if big else (0 if L == 512 and hq == 16 else 1)
                        add(f"llm {hq}/{hkv} L{L} d{d} {kind} {name}", 1, hq, hkv, L, L, d, dt, kind, "llm",
                            f"cpu:{tier}")
        for L in (128, 512):
            add(f"encoder pad B8 H12 L{L} d64 {name}", 8, 12, 12, L, L, 64, dt, "pad_mask", "encoder pad",
                f"cpu:{0 if L == 128 else 1}")
        add(f"dense mask H12 L1024 d64 {name}", 1, 12, 12, 1024, 1024, 64, dt, "dense_mask", "dense mask", "cpu:1")
        for L in (1, 4):
            for S in (1024, 4096, 16384):
                add(f"decode 32/8 L{L} S{S} d128 {name}", 1, 32, 8, L, S, 128, dt, "plain", "decode",
                    f"cpu:{0 if (L, S) == (1, 4096) else 1}")
        for L in (77, 1000):
            for d in (80, 96):
                add(f"odd B2 H16 L{L} d{d} {name}", 2, 16, 16, L, L, d, dt, "plain", "odd",
                    f"cpu:{0 if (L, d) == (77, 80) else 1}")
    # The cpu suite's --memory probe (peak extra memory of one call at a length where an L x S matrix would hurt).
    add("memory L8k causal d128 bf16", 1, 8, 8, 8192, 8192, 128, BF16, "causal", "memory", "cpu-memory")

    # cuda: 16k tokens of hidden size 2048 at each length, masks, GQA, sinks, decode and float32; forward and
    # forward + backward against torch's default and torch's FLASH_ATTENTION (FA2).
    # cuda-sm90: forward of sdpax's two CUDA main loops on the same rows and more.
    for d in (64, 128):
        for L in (1024, 4096, 16384):
            for kind in ("plain", "causal"):
                tier = 0 if L == 4096 else 1
                add(f"d{d} L{L // 1024}k" + (" causal" if kind == "causal" else ""), 16384 // L, 2048 // d,
                    2048 // d, L, L, d, BF16, kind, tags=f"cuda:{tier} cuda-sm90:{tier}")
    add("d256 L4k", 4, 8, 8, 4096, 4096, 256, BF16, tags="cuda:1 cuda-sm90")
    add("d256 L4k causal", 4, 8, 8, 4096, 4096, 256, BF16, "causal", tags="cuda:1 cuda-sm90")
    add("bool mask (B,1,L,S) d128 L4k", 4, 16, 16, 4096, 4096, 128, BF16, "dense_mask", tags="cuda cuda-sm90")
    add("pad mask (B,1,1,S) d128 L4k", 4, 16, 16, 4096, 4096, 128, BF16, "pad_mask", tags="cuda cuda-sm90")
    add("gqa 32/8 causal d64 L4k", 4, 32, 8, 4096, 4096, 64, BF16, "causal", tags="cuda")
    add("same, no gqa (32/32)", 4, 32, 32, 4096, 4096, 64, BF16, "causal", tags="cuda")
    add("sinks d128 L4k", 4, 16, 16, 4096, 4096, 128, BF16, "sinks", tags="cuda")
    add("same, no sinks", 4, 16, 16, 4096, 4096, 128, BF16, tags="cuda")
    add("decode L1 S32k gqa 32/8 d128", 16, 32, 8, 1, 32768, 128, BF16, group="decode", tags="cuda")
    add("fp32 d64 L2k", 8, 16, 16, 2048, 2048, 64, F32, tags="cuda")
    add("fp32 d64 L2k causal", 8, 16, 16, 2048, 2048, 64, F32, "causal", tags="cuda:1")
    add("fp32 d128 L2k", 8, 16, 16, 2048, 2048, 128, F32, tags="cuda:1")
    add("d128 L4k fp16", 4, 16, 16, 4096, 4096, 128, F16, tags="cuda-sm90")
    add("d256 L16k causal", 1, 8, 8, 16384, 16384, 256, BF16, "causal", tags="cuda-sm90:1")
    add("d256 L4k fp16", 4, 8, 8, 4096, 4096, 256, F16, tags="cuda-sm90:1")
    add("bool mask (B,1,L,S) d256 L4k", 4, 8, 8, 4096, 4096, 256, BF16, "dense_mask", tags="cuda-sm90:1")
    add("pad mask (B,1,1,S) d256 L4k", 4, 8, 8, 4096, 4096, 256, BF16, "pad_mask", tags="cuda-sm90:1")
    # The general kind's other paths (--full): additive masks, dropout, d64 masks, fp16.
    add("additive mask (B,1,L,S) d128 L4k", 4, 16, 16, 4096, 4096, 128, BF16, "add_mask", tags="cuda-sm90:2")
    add("dropout 0.1 d128 L4k", 4, 16, 16, 4096, 4096, 128, BF16, "dropout", tags="cuda-sm90:2")
    add("pad mask (B,1,1,S) d64 L4k", 4, 32, 32, 4096, 4096, 64, BF16, "pad_mask", tags="cuda-sm90:2")
    add("bool mask (B,1,L,S) d64 L4k fp16", 4, 32, 32, 4096, 4096, 64, F16, "dense_mask", tags="cuda-sm90:2")
    add("d64 L4k fp16", 4, 32, 32, 4096, 4096, 64, F16, tags="cuda-sm90:2")
    add("dropout 0.1 d256 L4k", 4, 8, 8, 4096, 4096, 256, BF16, "dropout", tags="cuda-sm90:2")
    add("additive mask (B,1,L,S) d256 L4k", 4, 8, 8, 4096, 4096, 256, BF16, "add_mask", tags="cuda-sm90:2")

    # cuda-bwd-parts: the backward alone, plain and causal, then the general kind (bool, padding, all-true padding,
    # dropout). cuda-mask-bwd: the mask rows' backward alone and forward + backward.
    for d, h in ((64, 32), (128, 16), (256, 8)):
        tier = 1 if d == 256 else 0
        add(f"d{d} L4k", 4, h, h, 4096, 4096, d, BF16, tags=f"cuda-bwd-parts:{tier}")
        add(f"d{d} L4k causal", 4, h, h, 4096, 4096, d, BF16, "causal", tags=f"cuda-bwd-parts:{tier}")
        tier = 2 if d == 256 else 1
        mask_bwd = "" if d == 256 else " cuda-mask-bwd"
        add(f"bool mask (B,1,L,S) d{d} L4k", 4, h, h, 4096, 4096, d, BF16, "dense_mask",
            tags=f"cuda-bwd-parts:{tier}" + mask_bwd)
        add(f"pad mask (B,1,1,S) d{d} L4k", 4, h, h, 4096, 4096, d, BF16, "pad_mask",
            tags=f"cuda-bwd-parts:{tier}" + mask_bwd)
        add(f"all-true pad mask d{d} L4k", 4, h, h, 4096, 4096, d, BF16, "pad_all", tags=f"cuda-bwd-parts:{tier}")
        add(f"dropout 0.1 d{d} L4k", 4, h, h, 4096, 4096, d, BF16, "dropout", tags=f"cuda-bwd-parts:{tier}")
        if mask_bwd:
            add(f"d{d} L4k", 4, h, h, 4096, 4096, d, BF16, tags="cuda-mask-bwd")

    # fp32-accuracy: out, dq, dk, dv of float32 calls against float64, B 2, H 4, L = S.
    for L in (128, 1024, 4096):
        for d in (64, 128, 256):
            for kind, label in (("plain", "plain"), ("causal", "causal"), ("dense_mask", "bool"), ("add_mask", "add")):
                add(f"fp32 L{L} d{d} {label}", 2, 4, 4, L, L, d, F32, kind, tags=f"fp32-accuracy:{min(L // 1024, 1)}")

    # varlen: torch's SDPA tutorial batch (B sequences of random lengths up to L, about half padding, 8 heads,
    # d64) through the tutorial's module as a jagged nested tensor; plain eval and causal training.
    for device, dtypes in (("cpu", (F32, BF16)), ("cuda", (F16,))):
        for dtype in dtypes:
            name = DTYPE_NAMES[dtype]
            add(f"tutorial 32 x <=512 {name}", 32, 8, 8, 512, 512, 64, dtype, tags="varlen", device=device)
            add(f"tutorial 32 x <=512 causal {name}", 32, 8, 8, 512, 512, 64, dtype, "causal", tags="varlen:1",
                device=device)

    # varlen-packed: 16k tokens of one packed batch (hidden 2048), the length mix in `group` (varlen_mix). The shape
    # is the dense batch of the same tokens and work: sequences of sum(L^2) / sum(L) tokens (rounded to 64).
    for mix in ("uniform", "mixed", "long-tailed"):
        lens = varlen_mix(mix)
        L_eq = max(64, round(sum(n * n for n in lens) / sum(lens) / 64) * 64)
        for d in (64, 128):
            for kind in ("plain", "causal"):
                add(f"{mix} 16k tokens d{d} {kind}", sum(lens) // L_eq, 2048 // d, 2048 // d, L_eq, L_eq, d, BF16,
                    kind, group=mix, tags=f"varlen-packed:{0 if d == 128 else 1}", device="cuda")

    # window: a causal sliding window of S / 8 keys (4k at L = 32k) against torch given the same window as a
    # materialised L x S bool mask.
    add("window L32k (4k) d128", 1, 16, 16, 32768, 32768, 128, BF16, "causal", tags="window", device="cuda")
    add("window L32k (4k) gqa 32/8 d128", 1, 32, 8, 32768, 32768, 128, BF16, "causal", tags="window:1",
        device="cuda")
    add("window L8k (1k) d64", 1, 8, 8, 8192, 8192, 64, BF16, "causal", tags="window", device="cpu")

    # paged-decode: one decode step of N sequences over a KV cache, contiguous or paged (pages shuffled). group: the
    # page size.
    for dtype in (F32, BF16):
        for page in (16, 256):
            add(f"decode 8 x 4096 gqa 32/8 d128 page {page} {DTYPE_NAMES[dtype]}", 8, 32, 8, 1, 4096, 128, dtype,
                group=str(page), tags="paged-decode", device="cpu")
    for page in (16, 256):
        add(f"decode 8 x 32768 gqa 32/8 d128 page {page} bf16", 8, 32, 8, 1, 32768, 128, BF16, group=str(page),
            tags="paged-decode", device="cuda")

    # overhead: a call too small for its kernel to matter (a decode step of one query: over 256 keys on CUDA, where
    # the kernel runs asynchronously, over 16 keys of one head on CPU, where it runs inside the call).
    add("tiny decode L1 S16 H1 d64 fp32", 1, 1, 1, 1, 16, 64, F32, tags="overhead", device="cpu")
    add("tiny decode L1 S256 H8 d64 bf16", 1, 8, 8, 1, 256, 64, BF16, tags="overhead", device="cuda")

    # models: one step of small transformers models (2 layers, hidden = Hq x D) built from configs, each attention
    # implementation on the same weights and tokens; B x L tokens. group: the model.
    for device, L, enc in (("cuda", 4096, 512), ("cpu", 512, 128)):
        B = 1
        add(f"llama L{L}", B, 16, 4, L, L, 128, BF16, "causal", "llama", "models", device)
        add(f"qwen2 L{L}", B, 16, 4, L, L, 128, BF16, "causal", "qwen2", "models", device)
        add(f"mistral (window {L // 4}) L{L}", B, 16, 4, L, L, 128, BF16, "causal", "mistral", "models", device)
        add(f"gemma2 (softcap, window {L // 4}) L{L}", B, 16, 8, L, L, 128, BF16, "causal", "gemma2", "models",
            device)
        add(f"gpt-oss (sinks, window 128) L{L}", B, 16, 4, L, L, 64, BF16, "causal", "gpt-oss", "models", device)
        add(f"bert (padding) B8 L{enc}", 8, 16, 16, enc, enc, 64, BF16, "pad_mask", "bert", "models", device)

    # cp-speed-model: one long GQA sequence, split into the pair calls of sdpax.distributed.
    add("L128k gqa 32/8 d128", 1, 32, 8, 131072, 131072, 128, BF16, tags="cp-speed-model")
    add("L128k gqa 32/8 d128 causal", 1, 32, 8, 131072, 131072, 128, BF16, "causal", tags="cp-speed-model")
    return tuple(rows.values())


SHAPES = _table()


def select(tag: str, tier: int = TIERS["default"], device: str | None = None, only: str | None = None) -> list:
    """The rows tagged `tag` up to `tier`, for `device`; `only`: substrings of the name, '|' between alternatives."""
    out = []
    for s in SHAPES:
        t = s.tier(tag)
        if t is None or t > tier or (s.device is not None and device is not None and s.device != device):
            continue
        if only and not any(o in s.name for o in only.split("|")):
            continue
        out.append(s)
    return sorted(out, key=lambda s: s.order(tag))


# ---- work: the one FLOP / byte formula ----

PASS_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}  # the backward's five products against the forward's two


def visible_pairs(L: int, S: int, alignment: str | None) -> int:
    """(query, key) pairs a causal alignment lets through (None: all L * S). Row i sees min(S, max(0, i + 1 + shift))
    keys, shift 0 for upper-left and S - L for lower-right."""
    if alignment is None:
        return L * S
    shift = S - L if alignment == "lower_right" else 0
    i0 = max(0, -shift)                 # first row that sees a key
    i1 = min(L, max(i0, S - 1 - shift))  # rows [i0, i1) see i + 1 + shift < S keys, the rest all S
    first, last = i0 + 1 + shift, i1 + shift
    partial = (first + last) * (i1 - i0) // 2 if i1 > i0 else 0
    return partial + (L - max(i1, i0)) * S


def alignment(shape: Shape) -> str | None:
    return {"causal": "upper_left", "lower_right": "lower_right"}.get(shape.kind)


def flops(shape: Shape, pass_: str = "fwd") -> float:
    """4 B H L S D per forward, counting only the pairs a causal alignment lets through (masks count dense);
    the backward 2.5x that."""
    return 4.0 * shape.B * shape.Hq * shape.D * visible_pairs(shape.L, shape.S, alignment(shape)) * PASS_FACTOR[pass_]


def kv_bytes(shape: Shape) -> float:
    """Bytes of K and V: what a decode step must read."""
    return 2.0 * shape.B * shape.Hkv * shape.S * shape.D * torch.empty(0, dtype=shape.dtype).element_size()


def throughput(shape: Shape, pass_: str, seconds: float) -> float:
    """FLOP/s, or for decode rows the K/V bytes per second."""
    return (kv_bytes(shape) if shape.decode else flops(shape, pass_)) / seconds


def rate(shape: Shape, pass_: str, seconds: float | None, device: str) -> str:
    """throughput() as the tables print it: G(FLOP|B)/s on CPU, T(FLOP|B)/s on CUDA; decode rows also give the
    time."""
    if seconds is None:
        return "n/a"
    unit, scale = ("T", 1e12) if device == "cuda" else ("G", 1e9)
    if shape.decode:
        return f"{seconds * 1e3:.3f} ms ({throughput(shape, pass_, seconds) / scale:.2f} {unit}B/s)"
    return f"{throughput(shape, pass_, seconds) / scale:.0f}"


def ratio(other: float | None, ours: float | None) -> str:
    """other time / our time, as the tables print it (> 1: sdpax faster)."""
    return "n/a" if other is None or ours is None else f"{other / ours:.2f}x"


# ---- the one timer ----

class Timer:
    """Median seconds per call of callables timed side by side on the same inputs.

    Rounds interleave the callables, reversing their order every other round, so drift and other processes' noise
    fall on all of them alike. The first call of each is its warm-up; one that raises RuntimeError there (a backend
    that refuses the input, out of memory) gets None. Rounds: as many as fit `budget_s`, at least `min_reps`, at
    most `max_reps`.
      CPU:  time.perf_counter around each call.
      CUDA: CUDA events around each call, after writing a 256 MB buffer to flush L2 (not timed), following a
            warm-up of `warmup_s` per callable (triton.testing.do_bench's method, with the callables interleaved).
    """

    def __init__(self, device: str, budget_s: float, min_reps: int = 3, max_reps: int = 200, warmup_s: float = 0.05):
        self.device, self.budget_s, self.min_reps, self.max_reps, self.warmup_s = (device, budget_s, min_reps,
                                                                                    max_reps, warmup_s)
        self._flush = None

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _first_calls(self, fns: dict) -> dict:
        est = {}
        for name, fn in fns.items():
            try:
                t0 = time.perf_counter()
                fn()
                self._sync()
                est[name] = time.perf_counter() - t0
            except RuntimeError as e:
                print(f"    {name}: not timed ({str(e).splitlines()[0][:110]})", file=sys.stderr)
                if self.device == "cuda":
                    torch.cuda.empty_cache()
        return est

    def __call__(self, fns: dict) -> dict:
        est = self._first_calls(fns)
        live = [n for n in fns if n in est]
        times = {n: [] for n in live}
        if self.device == "cuda" and live:
            if self._flush is None:
                self._flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
            # Second estimate, warm: the first call may have compiled or allocated.
            for n in live:
                t0 = time.perf_counter()
                fns[n]()
                self._sync()
                est[n] = time.perf_counter() - t0
            for n in live:
                for _ in range(min(100, max(1, math.ceil(self.warmup_s / max(est[n], 1e-6))))):
                    fns[n]()
            self._sync()
        per_round = sum(est[n] for n in live)
        reps = max(self.min_reps, min(self.max_reps, int(self.budget_s / max(per_round, 1e-9))))
        events = []
        for r in range(reps if live else 0):
            for n in (live if r % 2 == 0 else live[::-1]):
                if self.device == "cuda":
                    self._flush.zero_()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fns[n]()
                    end.record()
                    events.append((n, start, end))
                else:
                    t0 = time.perf_counter()
                    fns[n]()
                    times[n].append(time.perf_counter() - t0)
        if events:
            self._sync()
            for n, start, end in events:
                times[n].append(start.elapsed_time(end) * 1e-3)
        return {n: statistics.median(times[n]) if times.get(n) else None for n in fns}


# ---- inputs and calls ----

@dataclass
class Inputs:
    """The tensors of one row and the keyword arguments of each side. theirs is None where torch has no equivalent
    call; ref holds the reference's arguments (plain tensors only), None where it has none (dropout)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    ours: dict
    theirs: dict | None
    ref: dict | None


def make_inputs(shape: Shape, device: str, requires_grad: bool = False, seed: int = 0) -> Inputs:
    g = torch.Generator(device=device).manual_seed(seed)
    B, L, S = shape.B, shape.L, shape.S

    def randn(*size, dtype=shape.dtype):
        return torch.randn(size, generator=g, device=device).to(dtype)

    q, k, v = randn(B, shape.Hq, L, shape.D), randn(B, shape.Hkv, S, shape.D), randn(B, shape.Hkv, S, shape.D)
    dout = randn(B, shape.Hq, L, shape.D)
    if requires_grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    common = {"enable_gqa": True} if shape.Hq != shape.Hkv else {}
    mask = ours_mask = None
    if shape.kind == "causal":
        common["is_causal"] = True
    elif shape.kind == "lower_right":
        mask = torch.arange(S, device=device)[None, :] <= torch.arange(L, device=device)[:, None] + (S - L)
        ours_mask = causal_lower_right(L, S)
    elif shape.kind == "pad_mask":
        lengths = torch.randint(S // 2, S + 1, (B,), generator=g, device=device)
        mask = (torch.arange(S, device=device)[None, :] < lengths[:, None]).view(B, 1, 1, S)
    elif shape.kind == "pad_all":
        mask = torch.ones(B, 1, 1, S, dtype=torch.bool, device=device)
    elif shape.kind == "dense_mask":
        mask = torch.rand(B, 1, L, S, generator=g, device=device) > 0.5
        mask[..., 0] = True
    elif shape.kind == "add_mask":
        mask = randn(B, 1, L, S)
    elif shape.kind == "dropout":
        common["dropout_p"] = 0.1
    ours, theirs = dict(common), dict(common)
    ref = {"is_causal": True} if shape.kind == "causal" else {}
    if mask is not None:
        theirs["attn_mask"] = ref["attn_mask"] = mask
        ours["attn_mask"] = mask if ours_mask is None else ours_mask
    if shape.kind == "sinks":
        ours["sinks"] = ref["sinks"] = randn(shape.Hq, dtype=F32)
        theirs = None
    return Inputs(q, k, v, dout, ours, theirs, None if shape.kind == "dropout" else ref)


def sdpax_call(inp: Inputs, backend=None):
    """sdpax on the row, with its default backend selection or inside sdpa_kernel(backend)."""
    def call():
        with sdpax.sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            return sdpax.scaled_dot_product_attention(inp.q, inp.k, inp.v, **inp.ours)
    return call


def torch_call(inp: Inputs, backends=None):
    """torch's F.scaled_dot_product_attention on the row: its default selection, or only `backends` (a list of
    torch.nn.attention.SDPBackend)."""
    def call():
        with sdpa_kernel(backends) if backends is not None else contextlib.nullcontext():
            return scaled_dot_product_attention(inp.q, inp.k, inp.v, **inp.theirs)
    return call


def forward(call):
    """The forward alone, recording no graph."""
    def go():
        with torch.no_grad():
            return call()
    return go


def forward_backward(call, inp: Inputs, around=None):
    """Forward, then dq, dk, dv of it (around: a context manager factory active for both)."""
    def go():
        with around() if around is not None else contextlib.nullcontext():
            out = call()
            return torch.autograd.grad(out, (inp.q, inp.k, inp.v), inp.dout)
    return go


def backward_only(call, inp: Inputs, around=None):
    """One forward now; the returned callable repeats its backward (dq, dk, dv) alone. around: a context manager
    factory active for the forward and for each backward (a main-loop choice may be recorded by the forward)."""
    with around() if around is not None else contextlib.nullcontext():
        out = call()

    def go():
        with around() if around is not None else contextlib.nullcontext():
            return torch.autograd.grad(out, (inp.q, inp.k, inp.v), inp.dout, retain_graph=True)
    return go


def has_main_loop_override() -> bool:
    return hasattr(sdpax, "cuda_main_loop")


def main_loop(forward: str = "auto", backward: str = "auto"):
    """A factory of sdpax.cuda_main_loop(forward=..., backward=...): the scoped choice between the Hopper (wgmma,
    "sm90") and the mma.sync ("mma") CUDA main loops. Callers check has_main_loop_override() first."""
    return lambda: sdpax.cuda_main_loop(forward=forward, backward=backward)


@contextlib.contextmanager
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) for the block (sdpax's CUDA backward then computes dQ in its own
    pass instead of by atomics)."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


# ---- the float64 reference and error measures ----

def reference(q, k, v, attn_mask=None, is_causal=False, sinks=None):
    """Attention in float64 from the definition, one query head at a time (never an L x S tensor for every head);
    differentiable. attn_mask: bool (True = attend) or additive, broadcastable to (B, Hq, L, S). A row with no
    allowed key gives 0. Scale 1/sqrt(D); sinks join each row's denominator unscaled."""
    q, k, v = q.double(), k.double(), v.double()
    G = q.shape[1] // k.shape[1]
    L, S = q.shape[-2], k.shape[-2]
    if is_causal:
        attn_mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
    outs = []
    for h in range(q.shape[1]):
        s = q[:, h] @ k[:, h // G].transpose(-2, -1) / math.sqrt(q.shape[-1])
        if attn_mask is not None:
            m = attn_mask if attn_mask.dim() < 4 else attn_mask[:, min(h, attn_mask.shape[1] - 1)]
            s = s.masked_fill(~m, -math.inf) if m.dtype == torch.bool else s + m.double()
        if sinks is not None:
            s = torch.cat([s, sinks[h].double().expand(*s.shape[:-1], 1)], -1)
        live = (s > -math.inf).any(-1, keepdim=True)
        p = torch.where(live, torch.softmax(torch.where(live, s, 0.0), -1), 0.0)
        if sinks is not None:
            p = p[..., :-1]
        outs.append(p @ v[:, h // G])
    return torch.stack(outs, 1)


def max_abs_err(a, b) -> float:
    """max |a - b| over the elements where neither is NaN."""
    a, b = a.double(), b.double()
    ok = ~(torch.isnan(a) | torch.isnan(b))
    return (a - b)[ok].abs().max().item() if ok.any() else float("nan")


def rel_errors(x, ref) -> tuple:
    """(max |x - ref| / max |ref|, ||x - ref|| / ||ref||)."""
    d = (x.double() - ref.double()).abs()
    return (d.max() / ref.abs().max().clamp_min(1e-300)).item(), (d.norm() / ref.norm().clamp_min(1e-300)).item()


def rel_diff(xs, ys) -> float:
    """The largest ||x - y|| / ||y|| over pairs of tensors (e.g. the gradients of two implementations)."""
    return max(((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-30)).item() for x, y in zip(xs, ys))


def geomean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


# ---- the header of a recorded table ----

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(device: str) -> str:
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.multi_processor_count} SMs)"
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def versions(device: str) -> str:
    cfg = sdpax.build_config
    text = f"torch {torch.__version__}, sdpax {sdpax.__version__}"
    if device == "cuda":
        return text + f" (CUDA archs {getattr(cfg, 'CUDA_ARCHS', '?')}), CUDA {torch.version.cuda}"
    return text + f" (CPU ISA {getattr(cfg, 'CPU_ISA', '?')})"


def header(title: str, device: str, command: str, notes=()) -> str:
    lines = [f"### {title}: {datetime.date.today()}", "", f"- machine: {machine(device)}",
             f"- versions: {versions(device)}", f"- command: `{command}`"]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def markdown_table(columns, rows) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
