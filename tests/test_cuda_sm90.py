"""Shapes that give the Hopper forward main loop (csrc/cuda/fwd/sm90_kernel.h) many key tiles and query blocks: several
128-row blocks per head, GQA groups packed across block edges, both causal alignments with L != S, partial last
tiles, masks (the general kind). The Hopper backward main loop (csrc/cuda/bwd/sm90_kernel.h) against float64 and against
the mma.sync backward of the same build, chosen with sdpax.cuda_main_loop. On a non-Hopper GPU the same cases
check the mma.sync loops. Every check is the suite's one oracle and rule (helpers.py, through test_cuda.check_case).
Skips cleanly without a GPU or a CUDA build.
"""
import pytest
import torch

import sdpax
from helpers import assert_close_rel, assert_grads_close, grad_magnitude, reference, torch_errors
from test_cuda import check_case

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or not sdpax.build_config.WITH_CUDA,
                       reason="needs a CUDA device and a CUDA build of sdpax"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("E", [64, 128, 256])
@pytest.mark.parametrize("causal", [0, 1, 2], ids=["none", "upper_left", "lower_right"])
@pytest.mark.parametrize("L,S", [(1000, 1000), (300, 1700), (1700, 300)], ids=str)
def test_long_forward(dtype, E, causal, L, S):
    check_case(2, 4, 2, L, S, E, E, dtype, causal=causal, sinks=causal == 2, backward=False, seed=L + S + E)


@pytest.mark.parametrize("E,Ev", [(64, 40), (128, 96), (72, 72), (256, 200), (160, 256), (136, 136)])
def test_head_dims_padded_to_the_bucket(E, Ev):
    check_case(1, 2, 2, 513, 777, E, Ev, torch.bfloat16, causal=1, backward=False)


@pytest.mark.parametrize("mask_kind", ["bool", "bool_blocks", "pad", "pad_len", "add_f32", "add_same", "bool_rows"])
@pytest.mark.parametrize("E", [64, 128, 256])
@pytest.mark.parametrize("L,S", [(1000, 1000), (300, 1700)], ids=str)
def test_long_masked_forward(mask_kind, E, L, S):
    # The general kind: staged bool masks with tile skipping (bool_blocks masks whole 64x64 tiles), masks read
    # element by element (additive), rows with no allowed key; GQA and sinks ride along. pad_len: whole tiles
    # visible (the unmasked branch of a staged mask), one partial tile, the rest dropped.
    check_case(1, 4, 2, L, S, E, E, torch.bfloat16, mask_kind=mask_kind, sinks=mask_kind == "pad", backward=False,
               seed=L + E)


def _bwd_sm90(on, strict=True):
    """The backward main loop for the duration (sdpax.cuda_main_loop). on: the Hopper loop where the launch plan can
    run it, strictly on a Hopper device (a call it cannot run, or whose tensor maps cannot be encoded, fails instead
    of silently running the mma.sync loop); elsewhere the plan's mma.sync loop. Off: the mma.sync loop."""
    if not on:
        return sdpax.cuda_main_loop(backward="mma")
    return sdpax.cuda_main_loop(backward="sm90", strict=strict and torch.cuda.get_device_capability()[0] == 9)


BWD_LENGTHS = [(1, 1), (7, 7), (97, 97), (1025, 1025), (97, 1025), (1025, 97), (7, 300)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("E", [64, 128, 256])
@pytest.mark.parametrize("causal", [0, 1, 2], ids=["none", "upper_left", "lower_right"])
@pytest.mark.parametrize("L,S", BWD_LENGTHS, ids=str)
def test_sm90_backward(dtype, E, causal, L, S):
    # Odd lengths (partial query tiles and key blocks, rows that see no key under lower-right alignment with L > S),
    # GQA groups of 2 (dK / dV summed over the group in one block), sinks (through lse) on one alignment.
    with _bwd_sm90(True):
        check_case(2, 4, 2, L, S, E, E, dtype, causal=causal, sinks=causal == 2, seed=L + S + E + causal)


@pytest.mark.parametrize("E,Ev", [(64, 40), (40, 64), (128, 96), (72, 72), (96, 128), (256, 200), (200, 256),
                                  (160, 160)])
def test_sm90_backward_padded_head_dims(E, Ev):
    with _bwd_sm90(True):
        check_case(1, 3, 1, 300, 517, E, Ev, torch.bfloat16, causal=1, seed=E + Ev)


@pytest.mark.parametrize("layout", ["bhle", "blhe"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("E", [64, 128, 256])
@pytest.mark.parametrize("causal", [0, 1, 2], ids=["none", "upper_left", "lower_right"])
def test_sm90_backward_matches_mma_sync(layout, dtype, E, causal):
    # The same call through both backward main loops: each within the rule against float64 (check_case), and the
    # two within the rule of each other (same products and roundings in a different order: dQ atomics, fp32
    # accumulation order), the mma.sync result in place of the reference. Both take Delta from the same rounded
    # forward output, so the rule's gradient magnitude (that rounding) does not apply between them.
    args = (2, 8, 2, 700, 900, E, E, dtype)
    kw = {"causal": causal, "layout": layout, "seed": E + causal}
    with _bwd_sm90(True):
        new = check_case(*args, **kw)
    with _bwd_sm90(False):
        old = check_case(*args, **kw)
    for name, a, b, t_err in zip("qkv", new.grads, old.grads, old.torch_errs):
        assert_close_rel(a, b, t_err, dtype, what=f"d{name}: sm90 vs mma.sync")


def test_sm90_backward_deterministic_falls_back():
    # Deterministic mode keeps the mma.sync backward (the sm90 loop adds dQ by atomics): bitwise repeatable. Asked
    # for the Hopper loop without strict, which would refuse the call.
    with _bwd_sm90(True, strict=False):
        a = check_case(1, 4, 2, 300, 300, 128, 128, torch.bfloat16, causal=1, deterministic=True, seed=3)
        b = check_case(1, 4, 2, 300, 300, 128, 128, torch.bfloat16, causal=1, deterministic=True, seed=3)
    for x, y in zip(a.grads, b.grads):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mask_kind", ["bool", "bool_blocks", "pad", "pad_len", "bool_rows"])
@pytest.mark.parametrize("E", [64, 128])
@pytest.mark.parametrize("L,S", [(7, 16), (97, 1024), (1025, 528), (300, 1040)], ids=str)
def test_sm90_backward_bool_masks(dtype, mask_kind, E, L, S):
    # The general kind on sm90: bool masks with 16-byte aligned rows (S a multiple of 16), full (B, 1, L, S), 2-D
    # (L, S) with whole 64 x 64 blocks or whole rows masked, row-broadcast (B, 1, 1, S); fully masked tiles dropped
    # by the producer, partial key blocks, rows with no allowed key. Sinks ride along on one kind.
    with _bwd_sm90(True):
        check_case(1, 4, 2, L, S, E, E, dtype, mask_kind=mask_kind, sinks=mask_kind == "pad", seed=L + S + E)


@pytest.mark.parametrize("E", [64, 128])
def test_sm90_backward_mask_view_partial_chunk(E):
    # A bool mask viewed out of a wider one: rows 16-byte aligned but S not a multiple of 16, so the last 16-byte
    # chunk of the last key block is read byte by byte up to S.
    gen = torch.Generator(device="cuda").manual_seed(E)
    L, S = 200, 1000
    q, k, v = (torch.randn(2, 4, n, E, generator=gen, device="cuda").to(torch.bfloat16).requires_grad_()
               for n in (L, S, S))
    wide = torch.rand(2, 1, L, 1024, generator=gen, device="cuda") > 0.4
    wide[..., S:] = True  # bytes past S: a read past the end would see them as allowed keys
    mask = wide[..., :S]
    dout = torch.randn(2, 4, L, E, generator=gen, device="cuda").to(torch.bfloat16)
    with _bwd_sm90(True):
        out = sdpax.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(reference(*ref_leaves, mask=mask), ref_leaves, dout.double())
    _, t_grads = torch_errors(q, k, v, mask=mask, gout=dout)
    assert_grads_close(["dq", "dk", "dv"], grads, ref_grads, t_grads, torch.bfloat16, grad_magnitude(dout, out))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [0, 1, 2], ids=["none", "upper_left", "lower_right"])
@pytest.mark.parametrize("B,Hq,Hkv,L,S,E", [(4, 12, 12, 600, 600, 64), (5, 24, 8, 300, 700, 64),
                                            (3, 32, 32, 1000, 1000, 64), (4, 12, 6, 700, 500, 40)], ids=str)
def test_persistent_forward(dtype, causal, B, Hq, Hkv, L, S, E):
    # The plain kind at d64 on Hopper runs a persistent grid once there are at least as many pairs of row blocks
    # as SMs (FwdSm90Work): blocks walk several (batch, head) pairs, an odd number of row blocks leaves one
    # unpaired, GQA rows packed across block edges, L != S under both causal alignments, sinks.
    check_case(B, Hq, Hkv, L, S, E, E, dtype, causal=causal, sinks=causal == 2, backward=False, seed=L + S + B)
