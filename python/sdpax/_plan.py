"""The CUDA launch plan as data: which main loop, kind, tile and split count a FLASH_ATTENTION call gets.

The plan is computed by the same C++ code that launches the kernels (csrc/cuda/plan.cpp, built into every build),
through the sdpax::cuda_plan op, for a described device: explain() passes the real one, tests pass any.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from . import _build_config, _ops, _select

_LOOP_IDS = {"auto": 0, "sm90": 1, "mma": 2}
_FWD_LOOPS = ("mma.sync", "sm90 (wgmma)")
_BWD_LOOPS = ("mma.sync", "mma.sync wide", "sm90 (wgmma)")
_FWD_KINDS = ("plain", "general", "decode")
_BWD_KINDS = ("plain", "general")


@contextlib.contextmanager
def cuda_main_loop(forward: str = "auto", backward: str = "auto", strict: bool = False):
    """Pick the CUDA main loops of FLASH_ATTENTION calls inside the block, for this thread only.

    "auto": the launch plan's choice (the Hopper loop where it has the call's variant on a compute-capability-9
    device, else mma.sync); "sm90": the Hopper loop where the plan can run it; "mma": the mma.sync loop.
    strict=True: a call asked to run "sm90" that cannot (no variant, other device, deterministic mode, or a tensor
    map that cannot be encoded) raises an error naming why instead of running mma.sync. The choice travels with
    the call, so a backward computed later (on autograd's thread) uses the loops its forward was called under.
    Under torch.compile it is read when the function is traced.
    """
    for name, value in (("forward", forward), ("backward", backward)):
        if value not in _LOOP_IDS:
            raise ValueError(f"sdpax.cuda_main_loop: {name} must be one of {', '.join(_LOOP_IDS)}, got {value!r}")
    bits = (_LOOP_IDS[forward] << 4) | (_LOOP_IDS[backward] << 6) | (int(bool(strict)) << 8)
    previous = _select.set_loop_bits(bits)
    try:
        yield
    finally:
        _select.set_loop_bits(previous)


@dataclass(frozen=True)
class CudaPlan:
    """The launch plan of one CUDA FLASH_ATTENTION call (forward and backward)."""

    forward_loop: str
    forward_kind: str
    head_dim: int  # the head-dim bucket of the variant
    forward_tile: tuple  # (query rows, keys) per block
    num_splits: int
    backward_loop: str
    backward_kind: str
    backward_tile: tuple
    dq_pass: bool  # deterministic mode: dQ by its own pass
    mma_fallback: bool  # the Hopper backward falls back to mma.sync if a tensor map cannot be encoded

    def __str__(self) -> str:
        fwd = (f"forward {self.forward_loop}, {self.forward_kind} kind, d{self.head_dim}, "
               f"{self.forward_tile[0]} rows x {self.forward_tile[1]} keys, {self.num_splits} "
               f"split{'s' if self.num_splits > 1 else ''}")
        bwd = (f"backward {self.backward_loop}, {self.backward_kind} kind, {self.backward_tile[0]} rows x "
               f"{self.backward_tile[1]} keys" + (", dQ by its own pass" if self.dq_pass else ""))
        return fwd + "; " + bwd


def build_has_sm90a() -> bool:
    return any(a.startswith("9.0a") for a in getattr(_build_config, "CUDA_ARCHS", []))


def cuda_plan(query, key, value, attn_mask=None, dropout_p=0.0, causal=0, enable_gqa=False, *, mask_grad=False,
              deterministic=False, device=None, loop_bits=None, window=(-1, -1), softcap=0.0) -> CudaPlan:
    """The plan for these (dense, causal-id) arguments. device: (compute capability major, multiprocessors, build
    has sm_90a code); default: the query's CUDA device and this build. loop_bits: the cuda_main_loop choice
    (default: the current thread's). window: the op's (window_left, window_right); softcap: the op's (0: none)."""
    if device is None:
        props = torch.cuda.get_device_properties(query.device)
        device = (props.major, props.multi_processor_count, build_has_sm90a())
    bits = _select.loop_bits() if loop_bits is None else loop_bits
    r = _ops.cuda_plan(query, key, value, attn_mask, float(dropout_p), int(causal), bool(enable_gqa),
                       int(_select.SDPBackend.FLASH_ATTENTION) | bits, bool(mask_grad), bool(deterministic),
                       [int(device[0]), int(device[1]), int(bool(device[2]))], int(window[0]), int(window[1]),
                       float(softcap))
    return CudaPlan(_FWD_LOOPS[r[0]], _FWD_KINDS[r[1]], r[2], (r[3], r[4]), r[5], _BWD_LOOPS[r[6]], _BWD_KINDS[r[7]],
                    (r[8], r[9]), bool(r[10]), bool(r[11]))
