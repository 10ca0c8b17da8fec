"""sdpax.integrations.transformers: small Hugging Face models built from configs (no downloads) on sdpax, against
transformers' own "eager" attention.

Parity follows the suite's rule (helpers.assert_close_rel): the model runs in float32 on sdpax and on eager, and in
float64 on eager as the oracle; sdpax's float32 logits and gradients must be within K x eager's own float32 error
plus the float32 floor. Losses and comparisons cover the real (non-padding) positions only: a padding query row
that sees no key is 0 on sdpax and an average of masked values on eager, and feeds nothing real.
"""
import copy
import subprocess
import sys

import pytest
import torch

import sdpax
from helpers import assert_close_rel, err

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("sdpax.integrations.transformers")

NAME = hf.ATTN_IMPLEMENTATION
VOCAB = 97
SMALL = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, max_position_embeddings=128))


def qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL, max_position_embeddings=128))


def mistral():  # every layer has an 8-token sliding window, shorter than the test sequences
    return transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, sliding_window=8,
                                                                      max_position_embeddings=128))


def gpt_oss():  # attention sinks, a sliding-window layer and a full one, mixture of experts
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("this transformers has no gpt-oss")
    cfg = transformers.GptOssConfig(**{**SMALL, "intermediate_size": 64}, head_dim=16, sliding_window=8,
                                    layer_types=["sliding_attention", "full_attention"], num_local_experts=4,
                                    num_experts_per_tok=2,
                                    experts_implementation="eager")  # grouped_mm has no float64 (the oracle)
    model = transformers.GptOssForCausalLM(cfg)
    with torch.no_grad():  # the default initialisation leaves the sinks near 0, where a wrong use would not show
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 1.0)
    return model


def gemma2():  # logit softcapping (small cap, so the tanh bends), alternating sliding-window and full layers
    cfg = transformers.Gemma2Config(**SMALL, head_dim=16, sliding_window=8, attn_logit_softcapping=2.0,
                                    query_pre_attn_scalar=16)
    return transformers.Gemma2ForCausalLM(cfg)


def bert():  # bidirectional, learned absolute positions
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64)
    return transformers.BertForMaskedLM(cfg)


def t5():  # encoder-decoder: relative position bias (an additive mask with a gradient), cross-attention, no scale
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg)


def build(factory, seed=0):
    torch.manual_seed(seed)
    return factory().eval()


def batch(n, L, left_pad=(0, 3), right_pad=(0, 0), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, L), generator=g)
    mask = torch.ones(n, L, dtype=torch.long)
    for b, (lp, rp) in enumerate(zip(left_pad, right_pad)):
        mask[b, :lp] = 0
        mask[b, L - rp:] = 0
    return ids, mask


class Spy:
    """Records the attention calls that reach sdpax: (L, S, mask kind, is_causal)."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = hf.scaled_dot_product_attention

        def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
            if attn_mask is None:
                kind = None
            elif isinstance(attn_mask, sdpax.attention.bias.CausalBias):
                window = attn_mask.window_left
                kind = attn_mask.variant.name + (f" window {window}" if window >= 0 else "")
            else:
                kind = tuple(attn_mask.shape)
            self.calls.append((q.shape[-2], k.shape[-2], kind, is_causal))
            return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)
        monkeypatch.setattr(hf, "scaled_dot_product_attention", spy)

    def take(self):
        out, self.calls = sorted(set(self.calls), key=str), []
        return out


def _run(model, impl, inputs, live, weight, grads=True):
    """Logits at the live positions and, with grads, every parameter's gradient of a fixed weighted sum of them."""
    model.set_attn_implementation(impl)
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grads):
        logits = model(**inputs).logits
        out = logits[live]
        if not grads:
            return out.detach(), {}
        (out * weight.to(out.dtype)).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def check_parity(factory, inputs, live, grads=True):
    model32 = build(factory)
    model64 = copy.deepcopy(model32).double()
    weight = torch.randn(int(live.sum()), VOCAB, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref, ref_grads = _run(model64, "eager", inputs, live, weight, grads)
    eager, eager_grads = _run(model32, "eager", inputs, live, weight, grads)
    ours, our_grads = _run(model32, NAME, inputs, live, weight, grads)
    assert_close_rel(ours, ref, err(eager, ref), torch.float32, what="logits")
    assert our_grads.keys() == eager_grads.keys() == ref_grads.keys()
    for name, g in our_grads.items():
        assert_close_rel(g, ref_grads[name], err(eager_grads[name], ref_grads[name]), torch.float32, what=name)


@pytest.mark.parametrize("factory", [llama, qwen2, mistral, gpt_oss, gemma2], ids=lambda f: f.__name__)
def test_causal_lm_parity(factory):
    ids, mask = batch(2, 20)  # left padding on the second row; 20 keys exceed the 8-token sliding windows
    check_parity(factory, {"input_ids": ids, "attention_mask": mask}, mask.bool())
    check_parity(factory, {"input_ids": ids}, torch.ones_like(mask, dtype=torch.bool), grads=False)


@pytest.mark.parametrize("factory", [llama, mistral, gemma2], ids=lambda f: f.__name__)
def test_packed_sequences_parity(factory, monkeypatch):
    """Padding-free training: several sequences in one row (positions restarting), the sliding windows longer
    than some of them. The layers run one packed sdpax.varlen_attn call (no block-diagonal mask); logits and
    gradients match eager on the same packed input."""
    if hf._PACKED_CODE is None:
        pytest.skip("this transformers release builds no packed-sequence masks")
    lengths = [[7, 12, 5], [3, 21]]
    ids = batch(2, 24)[0]
    positions = torch.tensor([[p for n in row for p in range(n)] for row in lengths])
    calls = []
    real = hf.varlen_attn
    monkeypatch.setattr(hf, "varlen_attn", lambda *a, **k: calls.append(a[3].tolist()) or real(*a, **k))
    check_parity(factory, {"input_ids": ids, "position_ids": positions, "use_cache": False},
                 torch.ones_like(ids, dtype=torch.bool))
    assert calls and all(c == [0, 7, 19, 24, 27, 48] for c in calls)


def test_bert_padding_parity():
    ids, mask = batch(3, 17, left_pad=(0, 0, 0), right_pad=(0, 5, 11))
    check_parity(bert, {"input_ids": ids, "attention_mask": mask}, mask.bool())


def test_t5_position_bias_parity():
    ids, mask = batch(2, 15, left_pad=(0, 0), right_pad=(0, 4))
    labels, _ = batch(2, 9, left_pad=(0, 0), seed=3)
    live = torch.ones_like(labels, dtype=torch.bool)
    check_parity(t5, {"input_ids": ids, "attention_mask": mask, "labels": labels}, live)


def test_mask_forms(monkeypatch):
    """The fused paths run wherever the mask is a plain causal (or no) pattern; padding alone is (B, 1, 1, S)."""
    spy = Spy(monkeypatch)
    model = build(llama)
    model.set_attn_implementation(NAME)
    ids, mask = batch(2, 12)
    with torch.no_grad():
        model(input_ids=ids)
        assert spy.take() == [(12, 12, None, True)]
        cache = transformers.DynamicCache(config=model.config)
        model(input_ids=ids[:, :5], past_key_values=cache)
        continued = model(input_ids=ids[:, 5:], past_key_values=cache).logits
        assert spy.take() == [(5, 5, None, True), (7, 12, "LOWER_RIGHT", False)]
        model(input_ids=ids[:, :1], past_key_values=cache)
        assert spy.take() == [(1, 13, None, False)]
        model(input_ids=ids, attention_mask=mask)
        assert spy.take() == [(12, 12, (2, 1, 12, 12), False)]
        static = transformers.StaticCache(config=model.config, max_cache_len=16)
        model(input_ids=ids, past_key_values=static)
        model(input_ids=ids[:, :1], past_key_values=static)
        assert spy.take() == [(1, 16, (2, 1, 1, 16), False), (12, 16, (1, 1, 12, 16), False)]
        model.set_attn_implementation("eager")
        expected = model(input_ids=ids).logits[:, 5:]
    assert_close_rel(continued, expected, 0.0, torch.float32, what="continued from a cache")

    model = build(bert)
    model.set_attn_implementation(NAME)
    ids, mask = batch(2, 10, left_pad=(0, 0), right_pad=(0, 4))
    with torch.no_grad():
        model(input_ids=ids)
        assert spy.take() == [(10, 10, None, False)]
        model(input_ids=ids, attention_mask=mask)
        assert spy.take() == [(10, 10, (2, 1, 1, 10), False)]

    model = build(mistral)  # 20 keys > the 8-token window (keys i - 7 .. i): the fused window
    model.set_attn_implementation(NAME)
    ids, mask = batch(2, 20)
    with torch.no_grad():
        model(input_ids=ids)
        assert spy.take() == [(20, 20, "LOWER_RIGHT window 7", False)]
        model(input_ids=ids, attention_mask=mask)  # left padding inside the window: the materialised mask
        assert spy.take() == [(20, 20, (2, 1, 20, 20), False)]


def _greedy(model, impl, **kwargs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model.generate(max_new_tokens=32, do_sample=False, pad_token_id=0, output_logits=True,
                              return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("factory,cache,padded", [(llama, "dynamic", True), (llama, "static", True),
                                                  (mistral, "dynamic", True), (mistral, "dynamic", False),
                                                  (mistral, "static", False), (gpt_oss, "dynamic", True),
                                                  (gemma2, "dynamic", True), (gemma2, "static", False)],
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_generate_greedy_matches_eager(factory, cache, padded):
    """Unpadded, the sliding-window layers run the windowed bias (12 prompt + 32 new tokens > the 8-token
    window), lower-right with a dynamic cache and upper-left in a static cache's prefill."""
    model = build(factory)
    ids, mask = batch(2, 12, left_pad=(0, 3) if padded else (0, 0))
    kwargs = {"input_ids": ids, "attention_mask": mask, "cache_implementation": cache}
    expected, got = _greedy(model, "eager", **kwargs), _greedy(model, NAME, **kwargs)
    if not torch.equal(got.sequences, expected.sequences):
        # Only a near-tie of eager's own top two logits may flip a token (float32 rounding differs).
        step = int((got.sequences != expected.sequences).any(0).nonzero()[0]) - ids.shape[1]
        top2 = expected.logits[step].topk(2).values
        gap = (top2[:, 0] - top2[:, 1]).min().item()
        assert gap < 1e-4, f"greedy tokens differ from eager at step {step}, eager's top-2 gap {gap:.3g}"


def test_training_with_dropout():
    cfg = transformers.LlamaConfig(**SMALL, max_position_embeddings=128, attention_dropout=0.3)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).train()
    model.set_attn_implementation(NAME)
    ids, mask = batch(2, 16)

    def loss(seed):
        torch.manual_seed(seed)
        return model(input_ids=ids, attention_mask=mask, labels=ids).loss
    first = loss(0)
    first.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert loss(0).item() == first.item()  # the dropout mask follows torch's generator
    assert loss(1).item() != first.item()
    with torch.no_grad():
        model.eval()
        assert loss(0).item() == loss(1).item()  # no dropout outside training


def test_softcap_reaches_sdpax(monkeypatch):
    """Gemma 2's softcap is passed to sdpax as the softcap argument (the fused kernels on CPU), not dropped."""
    seen = []
    real = hf.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("softcap"))
        return real(*args, **kwargs)
    monkeypatch.setattr(hf, "scaled_dot_product_attention", spy)
    model = build(gemma2)
    model.set_attn_implementation(NAME)
    with torch.no_grad():
        model(input_ids=batch(2, 6)[0])
    assert seen == [2.0] * model.config.num_hidden_layers


def test_registration_and_from_pretrained(tmp_path, monkeypatch):
    assert "sdpa" not in NAME and "flash" not in NAME  # transformers special-cases names containing these
    assert transformers.AttentionInterface._global_mapping[NAME] is hf.attention_forward
    assert transformers.masking_utils.AttentionMaskInterface._global_mapping[NAME] is hf.build_mask
    build(llama).save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=NAME)
    assert model.config._attn_implementation == NAME
    spy = Spy(monkeypatch)
    with torch.no_grad():
        model(input_ids=batch(1, 5, left_pad=(0,), right_pad=(0,))[0])
    assert len(spy.calls) == model.config.num_hidden_layers


def test_core_does_not_import_transformers():
    code = ("import sys, sdpax, sdpax.integrations, sdpax.attention, sdpax.distributed; "
            "assert 'transformers' not in sys.modules, 'sdpax imported transformers'")
    subprocess.run([sys.executable, "-c", code], check=True)
