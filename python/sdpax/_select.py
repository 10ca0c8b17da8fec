"""Backend selection.

How a backend is chosen: every backend declares its limits as data (`Limits` below). `reasons(backend, call)`
turns limits + the call into a list of human-readable reasons it cannot run (empty: it can). The selector walks
the priority list of the innermost `sdpa_kernel` context (default: FLASH_ATTENTION, then MATH), skipping backends
that context did not enable, and takes the first with no reasons. If none fits, the RuntimeError shows the inputs
and every backend's reasons. `explain()` returns the same information as data.

The enabled set is a thread-local stack, so one thread's `sdpa_kernel` never changes another thread's choice.
"""
from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field

import torch

from . import _build_config


class SDPBackend(enum.IntEnum):
    """sdpax backends. The numbers match torch.nn.attention.SDPBackend members of the same name."""

    MATH = 0
    FLASH_ATTENTION = 1


DEFAULT_PRIORITY = (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)
# A plain tuple: iterating the Enum class itself is not traceable by torch.compile in torch 2.11.
ALL_BACKENDS = (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION)


@dataclass(frozen=True)
class Limits:
    """What a backend can run. `devices` maps a device type to the dtypes it has kernels for (None: any)."""

    devices: dict | None
    min_head_dim: int = 0
    max_head_dim: int | None = None
    head_dim_multiple: int = 1
    mask_grad: bool = True
    note: str = ""
    per_device: dict = field(default_factory=dict)  # device type -> DeviceLimits


@dataclass(frozen=True)
class DeviceLimits:
    """Extra limits of one device's kernel of a backend."""

    head_dim_multiple: int = 1
    min_head_dim: int = 0
    max_head_dim: int | None = None
    deterministic_backward: bool = True
    why_nondeterministic: str = ""
    mask_grad: bool | None = None  # overrides the backend's Limits.mask_grad on this device (None: keep it)
    zero_scale: bool = True  # whether the kernels take scale == 0
    softcap: bool = True  # whether the kernels take a score softcap
    softcap_mask_grad: bool = True  # whether they take a softcap with a mask that requires grad
    dropout_origin: bool = True  # whether the kernels take rng = {seed, offset, row0, col0}
    window: bool = True  # whether the kernels take a sliding window
    varlen: bool = True  # whether the kernels take packed variable-length batches


# What each device's fused kernels take beyond the table's dtypes and head dims (csrc/variants.py, through the
# build config). CUDA: the fused backward computes the float mask gradient and has a deterministic mode (its own
# dQ pass, no atomics). scale == 0 (every score 0) gave NaN gradients from the CUDA backward in the property-based
# fuzz; until the kernels are fixed for it, MATH computes such calls. The CUDA kernels write dS after a softcap's
# derivative, not the mask gradient beside it.
_FLASH_EXTRA = {"cuda": {"mask_grad": True, "zero_scale": False, "softcap_mask_grad": False}}
# Call features a device's kernels may decline (a DeviceLimits flag of the same name), and the reason given.
_DECLINABLE = {"zero_scale": "scale 0 is not supported by the {} kernels",
               "softcap": "softcap is not supported by the {} kernels yet",
               "dropout_origin": "dropout at an origin (context parallelism) is not supported by the {} kernels yet",
               "window": "a sliding window is not supported by the {} kernels yet",
               "varlen": "packed variable-length batches (varlen_attn, nested tensors) are not supported by the {} "
                         "kernels yet"}


def _flash_limits() -> Limits:
    """FLASH_ATTENTION's limits, from the kernels this build contains (the table in csrc/variants.py, written into
    the build config by setup.py). A device missing there gets a reason naming it. Head dim 0 is an empty dot
    product (every score 0): MATH's business, not a tile loop's; the table starts every device at 1 or more."""
    devices = {device: tuple(getattr(torch, d) for d in dtypes)
               for device, dtypes in getattr(_build_config, "FLASH_KERNELS", {}).items()}
    per_device = {device: DeviceLimits(head_dim_multiple=lim["head_dim_multiple"], min_head_dim=lim["min_head_dim"],
                                       max_head_dim=lim["max_head_dim"], **_FLASH_EXTRA.get(device, {}))
                  for device, lim in getattr(_build_config, "FLASH_LIMITS", {}).items()}
    return Limits(devices=devices, mask_grad=False, note="fused tiled kernels", per_device=per_device)


LIMITS = {
    SDPBackend.MATH: Limits(devices=None, note="composite ATen implementation, any device"),
    SDPBackend.FLASH_ATTENTION: _flash_limits(),
}


@dataclass(frozen=True)
class Call:
    """The features of one call that backends care about."""

    device: torch.device
    dtype: torch.dtype
    head_dim: int
    value_head_dim: int
    mask_requires_grad: bool
    needs_grad: bool = False  # grad mode is on and an input requires grad
    deterministic_grad: bool = False  # torch.use_deterministic_algorithms(True) and a gradient may be taken
    zero_scale: bool = False  # scale == 0
    softcap: bool = False  # a score softcap is asked for
    dropout_origin: bool = False  # dropout drawn at an origin (a block of a larger problem: sdpax.distributed)
    window: bool = False  # a sliding window bounds the keys each row sees
    varlen: bool = False  # a packed variable-length batch (varlen_attn, jagged nested tensors)


def reasons(backend: SDPBackend, call: Call) -> list[str]:
    lim = LIMITS[backend]
    out = []
    if lim.devices is not None:
        dtypes = lim.devices.get(call.device.type, ())
        if call.device.type not in lim.devices:
            out.append(f"no {backend.name} kernel for device type '{call.device.type}' in this build "
                       f"(built for: {', '.join(sorted(lim.devices)) or 'none'})")
        elif call.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            out.append(f"dtype {str(call.dtype).replace('torch.', '')} not supported on {call.device.type} "
                       f"(supported: {names})")
    if min(call.head_dim, call.value_head_dim) < lim.min_head_dim:
        out.append(f"head dims ({call.head_dim}, {call.value_head_dim}) must be at least {lim.min_head_dim}")
    if lim.max_head_dim is not None and max(call.head_dim, call.value_head_dim) > lim.max_head_dim:
        out.append(f"head dim {max(call.head_dim, call.value_head_dim)} exceeds {lim.max_head_dim}")
    if lim.head_dim_multiple > 1 and (call.head_dim % lim.head_dim_multiple or
                                      call.value_head_dim % lim.head_dim_multiple):
        out.append(f"head dims ({call.head_dim}, {call.value_head_dim}) must be multiples of "
                   f"{lim.head_dim_multiple}")
    dev = lim.per_device.get(call.device.type)
    mask_grad = lim.mask_grad if dev is None or dev.mask_grad is None else dev.mask_grad
    if call.mask_requires_grad and not mask_grad:
        out.append("attn_mask requires grad (the mask gradient is computed by MATH only)")
    if dev is not None:
        if min(call.head_dim, call.value_head_dim) < dev.min_head_dim:
            out.append(f"head dims ({call.head_dim}, {call.value_head_dim}) must be at least {dev.min_head_dim} on "
                       f"{call.device.type}")
        if dev.max_head_dim is not None and max(call.head_dim, call.value_head_dim) > dev.max_head_dim:
            out.append(f"head dim {max(call.head_dim, call.value_head_dim)} exceeds {dev.max_head_dim} on "
                       f"{call.device.type}")
        m = dev.head_dim_multiple
        if m > 1 and (call.head_dim % m or call.value_head_dim % m):
            out.append(f"head dims ({call.head_dim}, {call.value_head_dim}) must be multiples of {m} on "
                       f"{call.device.type}")
        out += [why.format(call.device.type) for feature, why in _DECLINABLE.items()
                if getattr(call, feature) and not getattr(dev, feature)]
        if call.softcap and call.mask_requires_grad and not dev.softcap_mask_grad:
            out.append(f"a softcap with attn_mask requiring grad is not supported by the {call.device.type} kernels "
                       "(MATH computes the mask gradient)")
        if call.deterministic_grad and not dev.deterministic_backward:
            out.append(f"deterministic algorithms are enabled and {dev.why_nondeterministic}")
    return out


# ---- the thread-local sdpa_kernel stack ----

class _State(threading.local):
    def __init__(self):
        self.stack = []  # entries: tuple of enabled backends in priority order
        self.loop_bits = 0  # the CUDA main loops of sdpax.cuda_main_loop, as bits of the op's backend id


def loop_bits() -> int:
    """The bits 4-8 of the op's backend id (csrc/common/op_args.h) that the innermost cuda_main_loop sets."""
    return _state.loop_bits


def set_loop_bits(bits: int) -> int:
    previous, _state.loop_bits = _state.loop_bits, bits
    return previous


_state = _State()


def coerce_backend(b) -> SDPBackend:
    """Accept sdpax's SDPBackend, torch.nn.attention.SDPBackend members of the same name, or an int."""
    if isinstance(b, SDPBackend):
        return b
    name = getattr(b, "name", None)
    if isinstance(name, str) and name in SDPBackend.__members__:
        return SDPBackend[name]
    if isinstance(b, int) and not isinstance(b, bool) and b in SDPBackend._value2member_map_:
        return SDPBackend(b)
    raise ValueError(f"sdpax has no backend {b!r}; available: {', '.join(SDPBackend.__members__)}")


def push(backends, set_priority: bool) -> None:
    if isinstance(backends, (list, tuple)):
        chosen = [coerce_backend(b) for b in backends]
    else:
        chosen = [coerce_backend(backends)]
    if not chosen:
        raise ValueError("sdpa_kernel needs at least one backend")
    order = tuple(dict.fromkeys(chosen)) if set_priority else tuple(b for b in DEFAULT_PRIORITY if b in chosen)
    _state.stack.append(order)


def pop() -> None:
    _state.stack.pop()


def explicitly_chosen() -> bool:
    """Whether an sdpa_kernel block of sdpax is active on this thread."""
    return bool(_state.stack)


def enabled() -> tuple:
    return _state.stack[-1] if _state.stack else DEFAULT_PRIORITY


@dataclass
class Explanation:
    """Which backend a call would use, and why each other backend would not run."""

    backend: SDPBackend | None
    enabled: tuple
    reasons: dict = field(default_factory=dict)  # backend -> list of reasons (empty list: it could run)
    plan: object = None  # CUDA FLASH_ATTENTION: the launch plan (sdpax._plan.CudaPlan) the call would run

    def __str__(self) -> str:
        lines = [f"chosen: {self.backend.name if self.backend is not None else 'none'}"]
        if self.plan is not None:
            lines.append(f"  plan: {self.plan}")
        for b, rs in self.reasons.items():
            state = "enabled" if b in self.enabled else "disabled by sdpa_kernel"
            lines.append(f"  {b.name} ({state}): " + ("can run" if not rs else "; ".join(rs)))
        return "\n".join(lines)


def explain_call(call: Call) -> Explanation:
    order = enabled()
    table = {b: reasons(b, call) for b in ALL_BACKENDS}
    chosen = next((b for b in order if not table[b]), None)
    return Explanation(backend=chosen, enabled=order, reasons=table)


def select(call: Call) -> SDPBackend:
    ex = explain_call(call)
    if ex.backend is None:
        raise RuntimeError(
            f"sdpax: no enabled backend can run this call (device {call.device}, dtype {call.dtype}, "
            f"head dims {call.head_dim}/{call.value_head_dim}, mask requires grad: {call.mask_requires_grad})\n"
            + str(ex))
    return ex.backend


# select() per (call features, enabled backends): the reasons are pure functions of both, and evaluating them is
# most of the Python cost of a short call. Bounded: a new entry per distinct shape of call, cleared when full.
_SELECT_CACHE: dict = {}


def select_cached(fields: tuple) -> SDPBackend:
    """select(Call(*fields)), cached per (fields, enabled backends)."""
    key = (fields, enabled())
    backend = _SELECT_CACHE.get(key)
    if backend is None:
        backend = remember(_SELECT_CACHE, key, select(Call(*fields)))  # raises (caches nothing) if none can run
    return backend


def remember(cache: dict, key, value):
    """cache[key] = value in a cache bounded to 4096 entries (cleared when full); returns value."""
    if len(cache) > 4096:
        cache.clear()
    cache[key] = value
    return value

