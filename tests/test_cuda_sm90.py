"""Shapes that give the Hopper forward main loop (csrc/cuda/fwd_sm90.h) many key tiles and query blocks: several
128-row blocks per head, GQA groups packed across block edges, both causal alignments with L != S, partial last
tiles, masks (the general kind). On a non-Hopper GPU the same cases check the mma.sync loop. Skips cleanly without
a GPU or a CUDA build.
"""
import pytest
import torch

import sdpax
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [0, 1, 2], ids=["none", "upper_left", "lower_right"])
@pytest.mark.parametrize("B,Hq,Hkv,L,S,E", [(4, 12, 12, 600, 600, 64), (5, 24, 8, 300, 700, 64),
                                            (3, 32, 32, 1000, 1000, 64), (4, 12, 6, 700, 500, 40)], ids=str)
def test_persistent_forward(dtype, causal, B, Hq, Hkv, L, S, E):
    # The plain kind at d64 on Hopper runs a persistent grid once there are at least as many pairs of row blocks
    # as SMs (FwdSm90Work): blocks walk several (batch, head) pairs, an odd number of row blocks leaves one
    # unpaired, GQA rows packed across block edges, L != S under both causal alignments, sinks.
    check_case(B, Hq, Hkv, L, S, E, E, dtype, causal=causal, sinks=causal == 2, backward=False, seed=L + S + B)
