"""The CUDA launch plan (csrc/cuda/plan.cpp) on described devices: host logic, run on every machine.

The plan says which main loop, kind, tile and split count a CUDA FLASH_ATTENTION call gets; the kernels' launch
runs exactly what it says (csrc/cuda/launch.cu), and explain() shows it. Tensors here are CPU tensors: the plan
reads only shapes, dtypes, the mask's layout and the flags.
"""
import threading

import pytest
import torch

import sdpax
from sdpax._plan import cuda_plan

H100 = (9, 132, True)  # compute capability 9, 132 SMs, a build with sm_90a code
A100 = (8, 108, True)  # the same build on an A100
H100_NO_SM90A = (9, 132, False)
bf16 = torch.bfloat16


def qkv(B=4, Hq=8, Hkv=8, L=1024, S=1024, E=128, dtype=bf16):
    return (torch.zeros(B, Hq, L, E, dtype=dtype), torch.zeros(B, Hkv, S, E, dtype=dtype),
            torch.zeros(B, Hkv, S, E, dtype=dtype))


def test_plain_16bit_runs_the_hopper_loops_on_sm90():
    p = cuda_plan(*qkv(), device=H100)
    assert (p.forward_loop, p.forward_kind, p.head_dim, p.forward_tile, p.num_splits) == \
        ("sm90 (wgmma)", "plain", 128, (128, 128), 1)
    assert (p.backward_loop, p.backward_kind, p.backward_tile, p.dq_pass) == ("sm90 (wgmma)", "plain", (64, 128), False)


@pytest.mark.parametrize("device", [A100, H100_NO_SM90A])
def test_no_hopper_loop_without_sm90_device_or_code(device):
    p = cuda_plan(*qkv(), device=device)
    assert (p.forward_loop, p.forward_tile) == ("mma.sync", (128, 64))
    assert (p.backward_loop, p.backward_tile) == ("mma.sync wide", (64, 128))


def test_float32_keeps_the_mma_loops():
    p = cuda_plan(*qkv(dtype=torch.float32), device=H100)
    assert (p.forward_loop, p.forward_tile) == ("mma.sync", (64, 32))
    assert (p.backward_loop, p.backward_tile) == ("mma.sync", (32, 64))


@pytest.mark.parametrize("E, bucket", [(8, 64), (64, 64), (72, 128), (136, 256), (256, 256)])
def test_head_dims_round_up_to_their_bucket(E, bucket):
    assert cuda_plan(*qkv(E=E), device=H100).head_dim == bucket


def test_d256_tiles():
    p = cuda_plan(*qkv(E=256), device=H100)
    assert (p.forward_tile, p.backward_loop, p.backward_tile) == ((128, 64), "sm90 (wgmma)", (64, 64))
    mask = torch.ones(1024, 1024, dtype=torch.bool)
    p = cuda_plan(*qkv(E=256), mask, device=H100)
    # The Hopper backward has no general kind at d256: the wide mma.sync loop takes it.
    assert (p.forward_loop, p.forward_kind, p.backward_loop, p.backward_tile) == \
        ("sm90 (wgmma)", "general", "mma.sync wide", (64, 64))


def test_general_kind_backward():
    q, k, v = qkv()
    bool_mask = torch.ones(4, 1, 1024, 1024, dtype=torch.bool)
    assert cuda_plan(q, k, v, bool_mask, device=H100).backward_loop == "sm90 (wgmma)"
    # dropout, additive masks, mask gradients and unaligned bool masks run the mma.sync backward
    assert cuda_plan(q, k, v, bool_mask, dropout_p=0.1, device=H100).backward_loop == "mma.sync wide"
    add_mask = torch.zeros(4, 1, 1024, 1024, dtype=bf16)
    assert cuda_plan(q, k, v, add_mask, device=H100).backward_loop == "mma.sync wide"
    assert cuda_plan(q, k, v, add_mask, mask_grad=True, device=H100).backward_loop == "mma.sync wide"
    unaligned = torch.ones(1024, 1030, dtype=torch.bool)[:, :1024]
    assert cuda_plan(q, k, v, unaligned, device=H100).backward_loop == "mma.sync wide"
    p = cuda_plan(q, k, v, bool_mask, dropout_p=0.1, device=H100)
    assert (p.forward_kind, p.backward_kind, p.backward_tile) == ("general", "general", (64, 128))


def test_sliding_window_plan():
    """A window alone runs the Hopper forward's plain kind (its causal edge test takes the window's beginning too);
    with a mask or dropout, in the backward, on other devices and for decode-sized calls, the mma.sync loops'
    general kind, which tests every element against it. Strict sm90 names why it cannot run."""
    for window, causal in (((256, -1), 1), ((100, 20), 0), ((-1, 3), 0)):
        p = cuda_plan(*qkv(), causal=causal, device=H100, window=window)
        assert (p.forward_loop, p.forward_kind, p.backward_loop, p.backward_kind) == \
            ("sm90 (wgmma)", "plain", "mma.sync wide", "general")
        p = cuda_plan(*qkv(), causal=causal, device=A100, window=window)
        assert (p.forward_loop, p.forward_kind, p.backward_loop, p.backward_kind) == \
            ("mma.sync", "general", "mma.sync wide", "general")
    pad = torch.ones(4, 1, 1, 1024, dtype=torch.bool)
    p = cuda_plan(*qkv(), pad, device=H100, window=(64, 64))
    assert (p.forward_loop, p.forward_kind) == ("mma.sync", "general")
    decode = qkv(B=1, Hq=32, Hkv=8, L=1, S=32768)
    p = cuda_plan(*decode, enable_gqa=True, device=H100, window=(4096, -1), causal=2)
    assert (p.forward_loop, p.forward_kind) == ("mma.sync", "general")
    p = cuda_plan(*qkv(dtype=torch.float32), device=H100, window=(8, 8))
    assert (p.forward_loop, p.forward_kind, p.backward_loop, p.backward_kind) == \
        ("mma.sync", "general", "mma.sync", "general")
    p = cuda_plan(*qkv(), device=H100, window=(8, 8), deterministic=True)
    assert (p.backward_loop, p.dq_pass) == ("mma.sync wide", True)
    with sdpax.cuda_main_loop(backward="sm90", strict=True), pytest.raises(RuntimeError, match="sliding window"):
        cuda_plan(*qkv(), device=H100, window=(8, -1), causal=1)
    with sdpax.cuda_main_loop(forward="sm90", strict=True), pytest.raises(RuntimeError, match="sliding window"):
        cuda_plan(*qkv(), pad, device=H100, window=(8, 8))
    with sdpax.cuda_main_loop(forward="mma"):
        assert cuda_plan(*qkv(), device=H100, window=(8, -1), causal=1).forward_kind == "general"
    assert cuda_plan(*qkv(), device=H100, window=(-1, -1)).forward_kind == "plain"


def test_softcap_runs_the_mma_general_kind():
    p = cuda_plan(*qkv(), device=H100, softcap=30.0)
    assert (p.forward_loop, p.forward_kind, p.backward_loop, p.backward_kind) == \
        ("mma.sync", "general", "mma.sync wide", "general")
    p = cuda_plan(*qkv(), device=H100, softcap=30.0, window=(64, -1), causal=1)
    assert (p.forward_loop, p.forward_kind) == ("mma.sync", "general")
    with sdpax.cuda_main_loop(forward="sm90", strict=True), pytest.raises(RuntimeError, match="softcap"):
        cuda_plan(*qkv(), device=H100, softcap=30.0)


def test_deterministic_backward_takes_the_dq_pass():
    p = cuda_plan(*qkv(), deterministic=True, device=H100)
    assert (p.backward_loop, p.dq_pass) == ("mma.sync wide", True)


def test_decode_splits_keys_over_the_machine():
    q, k, v = qkv(B=1, Hq=32, Hkv=8, L=1, S=32768)
    p = cuda_plan(q, k, v, enable_gqa=True, device=H100)
    # 4 query rows per kv head: one 16-row decode block each, 8 blocks; keys split so that ~16 blocks per SM run.
    assert (p.forward_loop, p.forward_kind, p.forward_tile) == ("mma.sync", "decode", (16, 32))
    assert p.num_splits == min(-(-16 * 132 // 8), 32768 // 32 // 4, 128)
    # A grid that fills the machine is not split.
    assert cuda_plan(*qkv(B=8, Hq=32, Hkv=32, L=1024, S=1024), device=H100).num_splits == 1


def test_short_key_sequences_are_not_split():
    q, k, v = qkv(B=1, Hq=1, Hkv=1, L=1, S=128)
    assert cuda_plan(q, k, v, device=H100).num_splits == 1


def test_cuda_main_loop_pins_the_loops():
    args = qkv()
    with sdpax.cuda_main_loop(forward="mma"):
        p = cuda_plan(*args, device=H100)
        assert (p.forward_loop, p.backward_loop) == ("mma.sync", "sm90 (wgmma)")
    with sdpax.cuda_main_loop(backward="mma"):
        assert cuda_plan(*args, device=H100).backward_loop == "mma.sync wide"
    with sdpax.cuda_main_loop(forward="sm90", backward="sm90"):
        p = cuda_plan(*args, device=H100)
        assert (p.forward_loop, p.backward_loop, p.mma_fallback) == ("sm90 (wgmma)", "sm90 (wgmma)", True)
        assert cuda_plan(*args, device=A100).forward_loop == "mma.sync"  # not strict: falls back
    with sdpax.cuda_main_loop(backward="sm90", strict=True):
        assert cuda_plan(*args, device=H100).mma_fallback is False
    assert cuda_plan(*args, device=H100).forward_loop == "sm90 (wgmma)"  # restored on exit


@pytest.mark.parametrize("device, kwargs, why", [
    (A100, {}, "not compute capability 9"),
    (H100_NO_SM90A, {}, "no sm_90a code"),
    (H100, {"dtype": torch.float32}, "no variant for this dtype"),
])
def test_strict_sm90_names_why_it_cannot_run(device, kwargs, why):
    with sdpax.cuda_main_loop(forward="sm90", strict=True), pytest.raises(RuntimeError, match=why):
        cuda_plan(*qkv(**kwargs), device=device)


def test_strict_sm90_backward_in_deterministic_mode():
    with sdpax.cuda_main_loop(backward="sm90", strict=True), pytest.raises(RuntimeError, match="deterministic"):
        cuda_plan(*qkv(), deterministic=True, device=H100)


def test_cuda_main_loop_is_per_thread_and_checked():
    seen = []
    with sdpax.cuda_main_loop(forward="mma"):
        t = threading.Thread(target=lambda: seen.append(cuda_plan(*qkv(), device=H100).forward_loop))
        t.start()
        t.join()
    assert seen == ["sm90 (wgmma)"]
    with pytest.raises(ValueError, match="forward must be one of"), sdpax.cuda_main_loop(forward="wgmma"):
        pass


def test_cuda_main_loop_leaves_cpu_calls_alone():
    q, k, v = (torch.randn(1, 2, 64, 32) for _ in range(3))
    want = sdpax.scaled_dot_product_attention(q, k, v, is_causal=True)
    with sdpax.cuda_main_loop(forward="sm90", backward="mma", strict=True):
        got = sdpax.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(got, want)


def test_backend_ids_outside_the_layout_are_refused():
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    with pytest.raises(RuntimeError, match="unknown backend id"):
        torch.ops.sdpax.fwd(q, k, v, None, 0.0, 0, 1.0, False, None, None, 1 | (3 << 4))


def test_explain_shows_the_plan_of_cuda_calls_only():
    q = torch.randn(1, 2, 16, 64)
    assert sdpax.explain(q, q, q).plan is None
    if not torch.cuda.is_available():
        return
    q = q.to("cuda", bf16)
    ex = sdpax.explain(q, q, q, is_causal=True)
    assert ex.plan is not None and "plan: forward" in str(ex)
    with sdpax.cuda_main_loop(forward="mma"):
        assert sdpax.explain(q, q, q).plan.forward_loop == "mma.sync"
