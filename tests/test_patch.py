"""sdpax.patch(): existing nn.Module code runs on sdpax and torch's function comes back afterwards."""
import pytest
import torch
import torch.nn.functional as F

import sdpax
import sdpax._patch as patch_mod
from helpers import err


class _Spy:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = patch_mod.scaled_dot_product_attention

        def spy(*a, **kw):
            self.calls += 1
            return real(*a, **kw)
        monkeypatch.setattr(patch_mod, "scaled_dot_product_attention", spy)


def test_patch_context_and_global():
    original = F.scaled_dot_product_attention
    with sdpax.patch():
        assert sdpax.is_patched() and F.scaled_dot_product_attention is not original
        with sdpax.patch():
            pass
        assert sdpax.is_patched()  # nested use keeps the outer patch
    assert F.scaled_dot_product_attention is original
    with pytest.raises(KeyError), sdpax.patch():
        raise KeyError("the patch is undone on an exception too")
    assert F.scaled_dot_product_attention is original
    sdpax.patch()
    assert sdpax.is_patched()
    sdpax.unpatch()
    assert F.scaled_dot_product_attention is original


def test_transformer_encoder_layer_training(monkeypatch):
    spy = _Spy(monkeypatch)
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, dropout=0.0,
                                             batch_first=True).train()
    x = torch.randn(3, 10, 64, requires_grad=True)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[0, 7:] = True
    expected = layer(x, src_key_padding_mask=pad)
    gx_expected, = torch.autograd.grad(expected.sum(), x)
    with sdpax.patch():
        got = layer(x, src_key_padding_mask=pad)
        gx, = torch.autograd.grad(got.sum(), x)
    assert spy.calls == 1
    assert err(got, expected) < 1e-5 and err(gx, gx_expected) < 1e-4
    # with attention dropout in training mode it runs (and differentiates) on sdpax too
    layer_d = torch.nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, dropout=0.3,
                                               batch_first=True).train()
    with sdpax.patch():
        y = layer_d(x)
        y.sum().backward()
    assert spy.calls == 2 and torch.isfinite(x.grad).all()


def test_multihead_attention_causal(monkeypatch):
    spy = _Spy(monkeypatch)
    torch.manual_seed(1)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).train()
    x = torch.randn(2, 6, 32)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(6)
    expected, _ = mha(x, x, x, attn_mask=causal, need_weights=False, is_causal=True)
    with sdpax.patch():
        got, _ = mha(x, x, x, attn_mask=causal, need_weights=False, is_causal=True)
    assert spy.calls == 1 and err(got, expected) < 1e-5


def test_hugging_face_model(monkeypatch):
    transformers = pytest.importorskip("transformers")
    spy = _Spy(monkeypatch)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (2, 12))
    attn = torch.ones(2, 12, dtype=torch.long)
    attn[1, :3] = 0  # left padding
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=attn).logits
        with sdpax.patch():
            got = model(input_ids=ids, attention_mask=attn).logits
    assert spy.calls == cfg.num_hidden_layers
    live = attn.bool()
    assert err(got[live], expected[live]) < 1e-4
