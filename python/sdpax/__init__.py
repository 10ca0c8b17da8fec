"""sdpax: scaled dot product attention for PyTorch.

    out = sdpax.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                             scale=None, enable_gqa=False, sinks=None, softcap=None,
                                             window_size=None)
    out = sdpax.varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, ...)
"""
from . import _build_config as build_config
from . import _flash_registry
from . import _ops  # noqa: F401  (loads the extension and registers fake kernels and autograd)
from . import attention, functional, varlen
from ._errors import AttentionError
from ._patch import is_patched, patch, unpatch
from ._plan import cuda_main_loop
from .attention import SDPBackend, explain, sdpa_kernel
from .functional import scaled_dot_product_attention
from .varlen import varlen_attn

_flash_registry.register()  # torch >= 2.14: activate_flash_attention_impl("sdpax") routes torch's flash ops here

__version__ = "0.1.0"

__all__ = ["scaled_dot_product_attention", "functional", "attention", "SDPBackend", "sdpa_kernel", "explain",
           "patch", "unpatch", "is_patched", "build_config", "AttentionError", "cuda_main_loop",
           "varlen_attn", "varlen"]
