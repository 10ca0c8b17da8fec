"""Adapters that run other libraries' attention on sdpax. Each submodule imports its library; this package and the
sdpax core import none of them.

- `sdpax.integrations.transformers`: a Hugging Face transformers attention backend (`ATTN_IMPLEMENTATION`).
"""
