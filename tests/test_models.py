"""fastattn.models: forward/backward parity of the three architectures between the default
(fused) backend and backend="reference", save -> load, and cached = uncached generation.
Tiny configs only (the whole file runs in seconds on 2 CPU cores)."""

import pytest
import torch

from fastattn.models import (
    ModelConfig,
    build_model,
    generate,
    lm_loss,
    load_pretrained,
    sample_next,
    save_pretrained,
)


pytestmark = pytest.mark.usefixtures("one_thread")


VARIANTS = {  # each architecture crossed with positions / norms / MLPs / GQA
    "rotary-rms-swiglu-gqa": {},
    "learned-ln-gelu-mha": {"positions": "learned", "norm": "layernorm", "mlp": "gelu",
                                "n_kv_heads": 4, "bias": True, "tie_embeddings": False},
    "sinusoidal-ln-swiglu-mqa": {"positions": "sinusoidal", "norm": "layernorm", "n_kv_heads": 1},
}


def _pair(arch, **kw):
    """The same weights as a default-backend model and a backend='reference' model."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", arch=arch, **{"init_std": 0.1, **kw})
    fast = build_model(cfg)
    ref = build_model(cfg.replace(backend="reference"))
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def _batch(B=3, L=11, lengths=(11, 6, 1), V=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, L), generator=g), list(lengths)


def _loss(model, arch, ids, lengths):
    if arch == "decoder":
        return lm_loss(model(ids, lengths), ids, lengths), model(ids, lengths)
    if arch == "encoder":
        logits = model(ids, lengths)
        return logits.square().mean() + model.classify(ids, lengths).square().sum(), logits
    tgt, tgt_len = ids[:, :7], [7, 2, 5]
    logits = model(ids, tgt, lengths, tgt_len)
    return lm_loss(logits, tgt, tgt_len), logits


def _close(a, b, rtol=1e-4, what=""):
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= rtol * scale + 1e-6, f"{what}: max err {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("arch", ["decoder", "encoder", "seq2seq"])
def test_backend_parity_forward_backward(arch, variant):
    """Logits and every parameter gradient: fused kernels vs the reference math, float32,
    ragged batch (one sequence of length 1)."""
    kw = dict(VARIANTS[variant], num_labels=3 if arch == "encoder" else 0)
    fast, ref = _pair(arch, **kw)
    ids, lengths = _batch()
    lf, out_f = _loss(fast, arch, ids, lengths)
    lr, out_r = _loss(ref, arch, ids, lengths)
    _close(out_f, out_r, what="logits")
    _close(lf, lr, what="loss")
    lf.backward()
    lr.backward()
    gr = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        assert p.grad is not None, name
        _close(p.grad, gr[name].grad, rtol=2e-4, what=f"grad {name}")


def test_padding_does_not_leak():
    """A sequence's logits do not depend on the padding after it nor on the other sequences."""
    fast, _ = _pair("decoder")
    ids, _ = _batch(lengths=(11, 6, 1))
    full = fast(ids, [11, 6, 1])
    other = ids.clone()
    other[1, 6:] = 7
    other[0] = 3
    alone = fast(ids[1:2, :6])
    _close(fast(other, [11, 6, 1])[1, :6], alone[0], what="padded row")
    _close(full[1, :6], alone[0], what="batched row")
    assert full[1, 6:].abs().max() == 0 and full[2, 1:].abs().max() == 0


def test_causality():
    """Decoder logits at position i ignore tokens after i."""
    fast, _ = _pair("decoder")
    ids, _ = _batch(B=1, lengths=(11,))
    a = fast(ids)
    ids2 = ids.clone()
    ids2[0, 6:] = 5
    _close(fast(ids2)[0, :6], a[0, :6], what="prefix")


@pytest.mark.parametrize("arch", ["decoder", "encoder", "seq2seq"])
def test_save_load_identical(arch, tmp_path):
    """save_pretrained -> load_pretrained: identical logits, tied weights stay tied, and the
    config round-trips through JSON."""
    fast, _ = _pair(arch, num_labels=2 if arch == "encoder" else 0)
    save_pretrained(fast, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_pretrained(tmp_path)
    assert loaded.config == fast.config
    ids, lengths = _batch()
    with torch.no_grad():
        if arch == "seq2seq":
            a, b = fast(ids, ids[:, :4]), loaded(ids, ids[:, :4])
        else:
            a, b = fast(ids, lengths), loaded(ids, lengths)
    assert torch.equal(a, b)
    if fast.config.tie_embeddings and arch != "encoder":
        assert loaded.head.weight.data_ptr() == loaded.embed.tok.weight.data_ptr()


def test_config_json_and_presets():
    for name in ("tiny", "small", "gpt2-small", "1b"):
        cfg = ModelConfig.preset(name)
        assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert 1.0e9 < _count(ModelConfig.preset("1b")) < 1.2e9
    assert 120e6 < _count(ModelConfig.preset("gpt2-small")) < 130e6
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(n_heads=4, n_kv_heads=3)


def _count(cfg):
    """Parameters of cfg's model without allocating it."""
    with torch.device("meta"):
        return build_model(cfg).num_parameters()


PROMPTS = [[257, 10, 20, 30, 40, 50, 60], [257, 5], [257, 90, 91, 92]]


@pytest.mark.parametrize("backend", [None, "reference"])
def test_cached_equals_uncached_decoder(backend):
    """Greedy tokens with the KV cache (packed prefill + decode steps) equal the tokens of a
    full forward recomputed every step, for a ragged batch; and a stop token ends a row."""
    fast, ref = _pair("decoder", init_std=0.3, tie_embeddings=False)
    model = fast if backend is None else ref
    cached = generate(model, PROMPTS, 12)
    assert cached == generate(model, PROMPTS, 12, use_cache=False)
    assert all(len(c) == 12 for c in cached)
    assert len({tuple(c) for c in cached}) > 1 and len(set(cached[0])) > 1  # not degenerate
    stop = cached[1][3]
    stopped = generate(model, PROMPTS, 12, stop_tokens=[stop])
    assert stopped[1] == cached[1][: cached[1].index(stop) + 1]


def test_cached_equals_uncached_seq2seq():
    """Encoder-decoder: cached generation (cross-attention K/V computed once) == uncached."""
    fast, _ = _pair("seq2seq", init_std=0.3, tie_embeddings=False)
    sources = [[257, 1, 2, 3, 4, 5, 6, 7, 8], [257, 9], [257, 30, 31, 32, 33]]
    prompts = [[257], [257], [257]]
    cached = generate(fast, prompts, 10, sources=sources)
    assert cached == generate(fast, prompts, 10, sources=sources, use_cache=False)
    assert len({tuple(c) for c in cached}) > 1


def test_sampling_reproducible_and_filtered():
    """Same generator seed -> same samples; top_k=1 is greedy; top-p keeps the nucleus only."""
    fast, _ = _pair("decoder", init_std=0.3, tie_embeddings=False)
    kw = {"temperature": 0.9, "top_k": 20, "top_p": 0.9}
    a = generate(fast, PROMPTS, 8, generator=torch.Generator().manual_seed(3), **kw)
    b = generate(fast, PROMPTS, 8, generator=torch.Generator().manual_seed(3), **kw)
    assert a == b
    assert generate(fast, PROMPTS, 8, temperature=1.0, top_k=1) == generate(fast, PROMPTS, 8)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, temperature=1.0, top_p=0.75, generator=g).item()
             for _ in range(200)}
    assert draws == {0, 1}
    draws = {sample_next(logits, temperature=1.0, top_k=3, generator=g).item()
             for _ in range(300)}
    assert draws == {0, 1, 2}


@pytest.mark.parametrize("arch", ["decoder", "seq2seq"])
def test_activation_checkpointing_same_gradients(arch):
    """gradient_checkpointing recomputes each block in backward: same loss and gradients."""
    fast, _ = _pair(arch)
    ids, lengths = _batch()
    loss, _ = _loss(fast, arch, ids, lengths)
    loss.backward()
    want = {n: p.grad.clone() for n, p in fast.named_parameters()}
    fast.zero_grad()
    fast.gradient_checkpointing = True
    fast.train()
    loss2, _ = _loss(fast, arch, ids, lengths)
    loss2.backward()
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)
    for n, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-7, msg=n)


def test_load_weights_encoder_into_classifier(tmp_path):
    """An MLM encoder's weights load into a classifier; only the new head stays fresh."""
    from fastattn.models import load_weights
    mlm, _ = _pair("encoder")
    save_pretrained(mlm, tmp_path)
    clf = build_model(mlm.config.replace(num_labels=2))
    missing, unexpected = load_weights(clf, tmp_path, strict=False)
    assert missing == ["cls_head.bias", "cls_head.weight", "pool.bias", "pool.weight"]
    assert unexpected == []
    assert torch.equal(clf.blocks[1].mlp.up.weight, mlm.blocks[1].mlp.up.weight)
