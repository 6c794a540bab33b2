"""fastattn.patch on Hugging Face models built from tiny random configs (nothing downloaded):
BERT, GPT-2, Llama (GQA), T5 (relative position bias), Mistral (sliding window), Gemma 2
(softcapping: left on its own). Patched vs unpatched outputs in eval with padding, gradients
after a training-mode forward/backward, greedy generate(), unpatch, the "fastattn"
attn_implementation, the report."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from patch_cases import assert_close_to_torch, double_copy, first_output, hf_inputs, hf_model

import fastattn
from fastattn import patch_hf
from fastattn.patch import patch, unpatch

FAMILIES = ["bert", "gpt2", "llama", "t5"]


@pytest.fixture
def count_sdpa(monkeypatch):
    """Counts the fastattn.sdpa calls made by the registered attention function."""
    calls = []
    real = patch_hf.sdpa

    def spy(*args, **kw):
        calls.append(kw.get("attn_mask") is not None)
        return real(*args, **kw)

    monkeypatch.setattr(patch_hf, "sdpa", spy)
    return calls


def _forward(model, kw):
    return first_output(model(**kw))


@pytest.mark.parametrize("family", FAMILIES + ["mistral"])
def test_eval_outputs_match(family, count_sdpa):
    model = hf_model(family).eval()
    ref64_model = double_copy(model)
    kw = hf_inputs(family)
    with torch.no_grad():
        want = _forward(model, kw)
        ref64 = _forward(ref64_model, kw)
        patched, report = patch(model)
        assert patched is model and model.config._attn_implementation == "fastattn"
        got = _forward(patched, kw)
    assert count_sdpa and any(count_sdpa), "fastattn.sdpa did not run with a padding mask"
    assert_close_to_torch(got, want, ref64, f"{family} eval output")
    assert any("Attention" in old for _, old, _ in report.swapped)
    assert any("Norm" in old for _, old, _ in report.swapped)


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_is_not_dropped(family):
    """The mask function registered with the attention function: with padding, the padded
    sequence's outputs differ from the same run without the mask."""
    model = hf_model(family).eval()
    patch(model)
    kw = hf_inputs(family)
    with torch.no_grad():
        masked = _forward(model, kw)
        unmasked = _forward(model, {**kw, "attention_mask": torch.ones_like(kw["attention_mask"])})
    assert not torch.allclose(masked[1], unmasked[1], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_gradients_match(family):
    model = hf_model(family).train()  # dropout probabilities are 0 in the tiny configs
    model64 = double_copy(model)
    patched = copy.deepcopy(model)
    patch(patched)
    kw = hf_inputs(family)
    outs = {}
    for name, m in (("torch", model), ("ref64", model64), ("fastattn", patched)):
        out = _forward(m, kw)
        g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        (out * g).sum().backward()
        outs[name] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert outs["fastattn"].keys() == outs["torch"].keys() and outs["torch"]
    for n in outs["torch"]:
        assert_close_to_torch(outs["fastattn"][n], outs["torch"][n], outs["ref64"][n],
                              f"{family} grad {n}", ulps=8)


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_greedy_generate_identical(family):
    model = hf_model(family).eval()
    kw = hf_inputs(family, batch=2, length=6)
    gen = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        want = model.generate(**kw, **gen)
        patch(model)
        got = model.generate(**kw, **gen)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_restores_exactly(family):
    model = hf_model(family).eval()
    kw = hf_inputs(family)
    modules = dict(model.named_modules())
    keys = list(model.state_dict())
    with torch.no_grad():
        want = _forward(model, kw)
        patched, _ = patch(model)
        assert list(patched.state_dict()) == keys
        restored = unpatch(patched)
        got = _forward(restored, kw)
    assert restored is model and model.config._attn_implementation == "sdpa"
    assert all(dict(restored.named_modules())[n] is m for n, m in modules.items())
    assert torch.equal(got, want)


def test_inplace_false_leaves_model_alone():
    model = hf_model("llama").eval()
    patched, _report = patch(model, inplace=False)
    assert patched is not model and model.config._attn_implementation == "sdpa"
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"
    assert type(patched.model.norm).__name__ == "HFRMSNorm"


def test_norms_share_weights_and_keep_hooks():
    model = hf_model("llama").eval()
    norm = model.model.norm
    seen = []
    handle = norm.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    patch(model, attention=False)
    assert model.config._attn_implementation == "sdpa"  # attention=False: untouched
    new = model.model.norm
    assert new is not norm and new.weight is norm.weight
    with torch.no_grad():
        model(**hf_inputs("llama"))
    assert len(seen) == 1
    handle.remove()
    with torch.no_grad():
        model(**hf_inputs("llama"))
    assert len(seen) == 1


def test_softcapping_model_left_untouched_and_reported():
    model = hf_model("gemma2").eval()
    kw = hf_inputs("gemma2")
    with torch.no_grad():
        want = _forward(model, kw)
        patched, report = patch(model)
        got = _forward(patched, kw)
    assert model.config._attn_implementation != "fastattn"
    reasons = {name: why for name, _, why in report.left}
    assert "softcapping" in reasons[""]
    assert any("Gemma2RMSNorm" in cls for _, cls, _ in report.left)  # (1 + weight) norm
    assert not any("Attention" in old for _, old, _ in report.swapped)
    assert torch.equal(got, want)
    assert "left" in str(report) and "softcapping" in str(report)


def test_attn_implementation_fastattn_after_register(count_sdpa):
    """register() makes "fastattn" a valid attn_implementation (set_attn_implementation and
    the config path from_pretrained takes)."""
    import transformers as tr

    patch_hf.register()
    model = hf_model("llama").eval()
    model.set_attn_implementation("fastattn")
    kw = hf_inputs("llama")
    with torch.no_grad():
        got = _forward(model, kw)
        model.set_attn_implementation("sdpa")
        want = _forward(model, kw)
    assert count_sdpa
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    cfg = tr.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    cfg._attn_implementation = "fastattn"
    assert tr.LlamaForCausalLM(cfg).config._attn_implementation == "fastattn"


def test_attention_function_contract():
    """Direct call: GQA K/V un-expanded, (B, L, H, E) contiguous output, float bias gets a
    gradient, None weights."""
    q = torch.randn(2, 4, 5, 8)
    k, v = torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    bias = torch.randn(1, 4, 5, 7, requires_grad=True)
    module = torch.nn.Module()
    module.is_causal = False
    out, w = patch_hf.attention_forward(module, q, k, v, None, scaling=0.3, position_bias=bias)
    assert w is None and out.shape == (2, 5, 4, 8) and out.is_contiguous()
    ke, ve = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    want = torch.nn.functional.scaled_dot_product_attention(q, ke, ve, attn_mask=bias, scale=0.3)
    torch.testing.assert_close(out, want.transpose(1, 2))
    out.sum().backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0


def test_quantize_option():
    pytest.importorskip("fastattn.quant", reason="fastattn.quantize is not in this build yet")
    model = hf_model("llama").eval()
    _patched, report = patch(model, quantize="int8")
    assert report.quantize is not None


# ---- Triton backend (interpreted on CPU without a GPU) --------------------------------------

@pytest.mark.triton
@pytest.mark.parametrize("family", FAMILIES)
def test_triton_eval_outputs_match(family):
    if fastattn.backends.triton_error() is not None:
        pytest.skip(fastattn.backends.triton_error())
    model = hf_model(family).eval()
    ref64_model = double_copy(model)
    kw = hf_inputs(family, batch=2, length=6)
    with torch.no_grad():
        want = _forward(model, kw)
        ref64 = _forward(ref64_model, kw)
        patch(model)
        with fastattn.use_backend("triton"):
            got = _forward(model, kw)
    assert_close_to_torch(got, want, ref64, f"{family} eval output (triton)")


def test_attention_dropout_in_training_only():
    model = hf_model("llama", attention_dropout=0.5)
    patch(model)
    kw = hf_inputs("llama")
    with torch.no_grad():
        a, b = _forward(model.train(), kw), _forward(model.train(), kw)
        c, d = _forward(model.eval(), kw), _forward(model.eval(), kw)
    assert torch.isfinite(a).all() and not torch.equal(a, b)
    assert torch.equal(c, d)


def test_hf_rmsnorm_styles_and_mixed_dtypes():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    for cls, style in ((LlamaRMSNorm, "llama"), (T5LayerNorm, "t5")):
        norm = cls(32, eps=1e-5)
        torch.nn.init.normal_(norm.weight)
        new, reason = patch_hf.swap_norm(norm)
        assert reason is None and new.style == style and new.weight is norm.weight
        x = torch.randn(3, 5, 32) * 3
        ref64 = copy.deepcopy(norm).double()(x.double())
        assert_close_to_torch(new(x), norm(x), ref64, f"{style} float32", ulps=2)
        xb = x.bfloat16()  # float32 weight, bf16 input: HF promotes; the original math runs
        assert torch.equal(new(xb), norm(xb))
        nb, _ = patch_hf.swap_norm(copy.deepcopy(norm).bfloat16())
        torch.testing.assert_close(nb(xb), nb._fastattn_original(xb), rtol=1.6e-2, atol=1e-2)


@pytest.mark.triton
@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
def test_triton_training_gradients_match(family):
    if fastattn.backends.triton_error() is not None:
        pytest.skip(fastattn.backends.triton_error())
    model = hf_model(family).train()
    model64, patched = double_copy(model), copy.deepcopy(model)
    patch(patched)
    kw = hf_inputs(family, batch=2, length=6)
    grads = {}
    for name, m in (("torch", model), ("ref64", model64), ("fastattn", patched)):
        with fastattn.use_backend("triton"):  # only the patched model calls fastattn ops
            out = _forward(m, kw)
            g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
            (out * g).sum().backward()
        grads[name] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert grads["fastattn"].keys() == grads["torch"].keys()
    for n in grads["torch"]:
        assert_close_to_torch(grads["fastattn"][n], grads["torch"][n], grads["ref64"][n],
                              f"{family} grad {n} (triton)", ulps=8)


def test_attention_sinks_model_left_untouched():
    import transformers as tr

    if not hasattr(tr, "GptOssForCausalLM"):
        pytest.skip("this transformers has no GPT-OSS")
    cfg = tr.GptOssConfig(vocab_size=100, hidden_size=32, intermediate_size=32,
                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=8, num_local_experts=4, num_experts_per_tok=2)
    model = tr.GptOssForCausalLM(cfg).eval()
    ids = torch.randint(3, 100, (1, 6))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        patched, report = patch(model)
        got = patched(input_ids=ids).logits
    assert "sinks" in {n: w for n, _, w in report.left}[""]
    assert model.config._attn_implementation != "fastattn" and torch.equal(got, want)
