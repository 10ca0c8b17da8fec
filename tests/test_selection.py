"""Backend selection: sdpa_kernel scoping, priority, torch's enum, thread-locality, explain()."""
import threading

import pytest
import torch
from torch.nn.attention import SDPBackend as TorchBackend

import sdpax
from sdpax import SDPBackend, sdpa_kernel
from sdpax._select import LIMITS, Call, enabled, reasons


def _qkv(dtype=torch.float32):
    return torch.randn(1, 2, 5, 8, dtype=dtype), torch.randn(1, 2, 6, 8, dtype=dtype), torch.randn(1, 2, 6, 8,
                                                                                                  dtype=dtype)


def test_default_priority():
    assert enabled() == (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)


def test_context_restores_also_on_exception():
    with pytest.raises(KeyError), sdpa_kernel(SDPBackend.MATH):
        assert enabled() == (SDPBackend.MATH,)
        raise KeyError
    assert enabled() == (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)


def test_list_and_priority_and_torch_enum():
    with sdpa_kernel([SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]):
        assert enabled() == (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)
    with sdpa_kernel([SDPBackend.MATH, SDPBackend.FLASH_ATTENTION], set_priority=True):
        assert enabled() == (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION)
    with sdpa_kernel(TorchBackend.MATH):
        assert enabled() == (SDPBackend.MATH,)
        with sdpa_kernel([TorchBackend.FLASH_ATTENTION]):
            assert enabled() == (SDPBackend.FLASH_ATTENTION,)
        assert enabled() == (SDPBackend.MATH,)
    with pytest.raises(ValueError, match="no backend"), sdpa_kernel(TorchBackend.EFFICIENT_ATTENTION):
        pass


def test_thread_local():
    seen = {}
    inside = threading.Event()
    release = threading.Event()

    def other():
        inside.wait()
        seen["other"] = enabled()
        release.set()

    t = threading.Thread(target=other)
    t.start()
    with sdpa_kernel(SDPBackend.MATH):
        inside.set()
        release.wait()
    t.join()
    assert seen["other"] == (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)


def test_explain_reports_reasons_as_data():
    q, k, v = _qkv(torch.float64)
    ex = sdpax.explain(q, k, v)
    assert ex.backend is not None
    assert set(ex.reasons) == set(SDPBackend)
    assert ex.reasons[SDPBackend.MATH] == []
    flash = ex.reasons[SDPBackend.FLASH_ATTENTION]
    assert flash and all(isinstance(r, str) for r in flash)  # float64 is MATH-only everywhere
    with sdpa_kernel(SDPBackend.MATH):
        assert sdpax.explain(q, k, v).backend == SDPBackend.MATH
    assert "MATH" in str(ex)


def test_reasons_cover_limits():
    call = Call(device=torch.device("cpu"), dtype=torch.float32, head_dim=512, value_head_dim=64,
                mask_requires_grad=True)
    rs = reasons(SDPBackend.FLASH_ATTENTION, call)
    assert any("head dim 512" in r for r in rs)
    assert any("requires grad" in r for r in rs)
    assert reasons(SDPBackend.MATH, call) == []
    assert LIMITS[SDPBackend.MATH].devices is None


def test_cuda_flash_limits_cover_the_backward():
    # The CUDA fused backward takes head dims up to 256, the float mask gradient and deterministic mode; only the
    # device itself may be missing from this build.
    call = Call(device=torch.device("cuda"), dtype=torch.bfloat16, head_dim=256, value_head_dim=256,
                mask_requires_grad=True, needs_grad=True, deterministic_grad=True)
    rs = [r for r in reasons(SDPBackend.FLASH_ATTENTION, call) if "kernel for device type" not in r]
    assert rs == []
    cpu = Call(device=torch.device("cpu"), dtype=torch.bfloat16, head_dim=64, value_head_dim=64,
               mask_requires_grad=True, needs_grad=True)
    assert any("requires grad" in r for r in reasons(SDPBackend.FLASH_ATTENTION, cpu))


def test_zero_scale_and_head_dim_zero_reasons():
    cuda = Call(device=torch.device("cuda"), dtype=torch.bfloat16, head_dim=64, value_head_dim=64,
                mask_requires_grad=False, zero_scale=True)
    assert any("scale 0" in r for r in reasons(SDPBackend.FLASH_ATTENTION, cuda))
    assert not reasons(SDPBackend.MATH, cuda)
    cpu = Call(device=torch.device("cpu"), dtype=torch.float32, head_dim=0, value_head_dim=64,
               mask_requires_grad=False, zero_scale=True)
    rs = reasons(SDPBackend.FLASH_ATTENTION, cpu)
    assert any("at least 1" in r for r in rs) and not any("scale 0" in r for r in rs)


@pytest.mark.parametrize("features,words", [({"softcap": True, "mask_requires_grad": True}, "softcap")])
def test_cuda_declines_what_only_cpu_fuses(features, words):
    """A softcap beside a mask that requires grad is fused on CPU only (the CUDA kernels' dS is taken after the
    cap's derivative): the CUDA kernels decline it and MATH runs it. (The CPU kernels decline any mask gradient,
    for their own reason.) A dropout origin is fused on both."""
    for device in ("cuda", "cpu"):
        call = Call(device=torch.device(device), dtype=torch.bfloat16, head_dim=64, value_head_dim=64,
                    **{"mask_requires_grad": False, **features})
        rs = [r for r in reasons(SDPBackend.FLASH_ATTENTION, call) if "kernel for device type" not in r]
        assert any(words in r for r in rs) == (device == "cuda"), (device, rs)
        assert not reasons(SDPBackend.MATH, call)
    origin = Call(device=torch.device("cuda"), dtype=torch.bfloat16, head_dim=64, value_head_dim=64,
                  mask_requires_grad=False, dropout_origin=True)
    assert [r for r in reasons(SDPBackend.FLASH_ATTENTION, origin) if "kernel for device type" not in r] == []
    softcap_only = Call(device=torch.device("cuda"), dtype=torch.bfloat16, head_dim=64, value_head_dim=64,
                        mask_requires_grad=False, softcap=True)
    assert [r for r in reasons(SDPBackend.FLASH_ATTENTION, softcap_only) if "kernel for device type" not in r] == []


def test_choice_follows_mask_grad():
    q, k, v = _qkv()
    m = torch.randn(5, 6, requires_grad=True)
    assert sdpax.explain(q, k, v, m).backend == SDPBackend.MATH
    with torch.no_grad():
        ex = sdpax.explain(q, k, v, m)
    assert not any("requires grad" in r for r in ex.reasons[SDPBackend.FLASH_ATTENTION])


def test_repeated_calls_follow_the_context():
    """select() is memoised per (call features, enabled backends): a cached choice never outlives its context."""
    q = torch.randn(1, 2, 8, 16)
    want = sdpax.scaled_dot_product_attention(q, q, q)
    for backend in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        with sdpa_kernel(backend):
            assert sdpax.explain(q, q, q).backend == backend
            torch.testing.assert_close(sdpax.scaled_dot_product_attention(q, q, q), want)
    d = q.double()
    sdpax.scaled_dot_product_attention(d, d, d)  # float64 runs on MATH: cached as such
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), pytest.raises(RuntimeError, match="no enabled backend"):
        sdpax.scaled_dot_product_attention(d, d, d)


def test_short_path_runs_what_the_general_path_chooses(monkeypatch):
    """The common call's cached (backend, scale) follows everything the selection reads: the sdpa_kernel context,
    grad mode and requires_grad, deterministic algorithms, the scale argument, dtype and head dims."""
    import sdpax.functional as fn
    seen = []
    real = fn._run_fwd
    monkeypatch.setattr(fn, "_run_fwd", lambda args, grad: seen.append((args[6], args[10])) or real(args, grad))
    q = torch.randn(1, 2, 8, 16)
    qg = q.clone().requires_grad_()

    def check(*inputs, scale=None):
        seen.clear()
        sdpax.scaled_dot_product_attention(*inputs, scale=scale)
        with torch.no_grad() if not any(t.requires_grad for t in inputs) else torch.enable_grad():
            want = sdpax.explain(*inputs, scale=scale).backend
        assert seen and seen[-1][1] & 0xF == int(want)
        assert seen[-1][0] == (1.0 / 4.0 if scale is None else scale)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        for _ in range(2):  # the second round is served from the cache
            check(q, q, q)
            check(q, q, q, scale=0.5)
            check(q, q, q, scale=0.0)
            check(q.double(), q.double(), q.double())
            check(qg, q, q)
            torch.use_deterministic_algorithms(True)
            check(qg, q, q)
            torch.use_deterministic_algorithms(was_deterministic)
            for backend in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION):
                with sdpa_kernel(backend):
                    check(q, q, q)
                    check(qg, q, q)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def test_inference_call_has_no_graph():
    """Without grad mode the call runs below autograd: no grad_fn, even for inputs that require grad."""
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    with torch.no_grad():
        out = sdpax.scaled_dot_product_attention(q, q, q)
    assert out.grad_fn is None and not out.requires_grad
    out = sdpax.scaled_dot_product_attention(q, q, q)
    assert out.grad_fn is not None
