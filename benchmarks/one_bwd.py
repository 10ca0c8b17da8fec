"""One sdpax backward (bf16 B=4 H=16 L=S=4096), for ncu:  python benchmarks/one_bwd.py D [causal]"""
import sys
import torch
import sdpax
D = int(sys.argv[1]); causal = len(sys.argv) > 2
q, k, v = (torch.randn(4, 16, 4096, D, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3))
out = sdpax.scaled_dot_product_attention(q, k, v, is_causal=causal)
torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
torch.cuda.synchronize()
