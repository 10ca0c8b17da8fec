"""Forward + backward time of the CUDA FLASH backend: normal vs deterministic mode, and head dim 256 vs torch.

    python benchmarks/cuda_bwd.py

Side by side in one process, bf16, B=4, H=16, L=S=4096. Medians of triton.testing.do_bench (CUDA events).
TFLOP/s counts 4*B*H*L*S*D for the forward (half when causal) and 2.5x that for the backward. torch runs its own
default F.scaled_dot_product_attention (not deterministic mode).
"""
import contextlib

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import sdpax


@contextlib.contextmanager
def deterministic(on):
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


def step(fn, q, k, v, dout, causal):
    def run():
        out = fn(q, k, v, is_causal=causal)
        return torch.autograd.grad(out, (q, k, v), dout)
    return run


def main():
    B, H, L = 4, 16, 4096
    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; fwd+bwd, bf16, B={B} H={H} L=S={L}")
    print(f"{'case':<22}{'variant':<28}{'ms':>9}{'TFLOP/s':>9}")
    for D, causal in ((128, False), (128, True), (256, False), (256, True)):
        mk = lambda *s: torch.randn(s, generator=g, device="cuda").to(torch.bfloat16).requires_grad_()  # noqa
        q, k, v = mk(B, H, L, D), mk(B, H, L, D), mk(B, H, L, D)
        dout = torch.randn(B, H, L, D, generator=g, device="cuda").to(torch.bfloat16)
        flops = 3.5 * 4 * B * H * L * L * D * (0.5 if causal else 1.0)
        name = f"d{D}" + (" causal" if causal else "")
        grads = {}
        for variant, fn, det in (("sdpax FLASH", sdpax.scaled_dot_product_attention, False),
                                 ("sdpax FLASH deterministic", sdpax.scaled_dot_product_attention, True),
                                 ("torch default", F.scaled_dot_product_attention, False)):
            with deterministic(det):
                run = step(fn, q, k, v, dout, causal)
                grads[variant] = run()
                ms = do_bench(run, warmup=5, rep=40, return_mode="median")
            print(f"{name:<22}{variant:<28}{ms:9.3f}{flops / ms / 1e9:9.1f}")
        a, b = grads["sdpax FLASH"], grads["sdpax FLASH deterministic"]
        t = grads["torch default"]
        print(f"{'':<22}max |normal - deterministic| (dq, dk, dv): "
              + ", ".join(f"{(x.float() - y.float()).abs().max().item():.3g}" for x, y in zip(a, b))
              + "; vs torch: " + ", ".join(f"{(x.float() - y.float()).abs().max().item():.3g}" for x, y in zip(a, t)))
        del q, k, v, dout, grads, a, b, t
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
