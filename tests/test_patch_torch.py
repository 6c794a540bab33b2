"""fastattn.patch on plain torch.nn models: MultiheadAttention, LayerNorm, RMSNorm,
TransformerEncoder(Layer) (incl. its eval fast path and nested-tensor path),
TransformerDecoder(Layer), nn.Transformer. Patched vs unpatched outputs (eval, masks, padding,
batch_first, norm_first), gradients in training mode, fully masked rows, unpatch, the report,
unsupported modules left alone."""

from __future__ import annotations

import copy

import pytest
import torch
from patch_cases import assert_close_to_torch
from torch import nn

import fastattn
from fastattn import patch_torch
from fastattn.nn import LayerNorm, MultiheadAttention
from fastattn.patch import patch, unpatch

E, H, FF = 32, 4, 64
N, S, T = 3, 7, 5  # batch, source length, target length


def _transformer(batch_first=True, norm_first=False, activation="relu"):
    return nn.Transformer(E, H, 2, 2, FF, dropout=0.0, batch_first=batch_first,
                          norm_first=norm_first, activation=activation)


def _seq(batch_first, length, batch=N):
    return torch.randn((batch, length, E) if batch_first else (length, batch, E))


def _padding(length, batch=N):
    """Left-aligned padding (True = pad): sequence 0 full, the others shorter."""
    pad = torch.zeros(batch, length, dtype=torch.bool)
    pad[1, length - 2:] = True
    pad[batch - 1, length - 4:] = True
    return pad


def _run(model, args, kw, *, grad=False):
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        return model(*args, **kw)


def _compare(model, args, kw, what, mode="eval"):
    """model's patched output against its unpatched float32 output and float64 reference."""
    model = model.train(mode == "train")
    ref64 = copy.deepcopy(model).double()
    args64 = [a.double() if a.is_floating_point() else a for a in args]
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in kw.items()}
    want, ref = _run(model, args, kw), _run(ref64, args64, kw64)
    patched, report = patch(model, inplace=False)
    got = _run(patched, args, kw)
    assert_close_to_torch(got, want, ref, what)
    return patched, report


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_transformer_outputs_match(batch_first, norm_first, mode):
    model = _transformer(batch_first, norm_first, activation="gelu" if norm_first else "relu")
    src, tgt = _seq(batch_first, S), _seq(batch_first, T)
    kw = {"tgt_mask": nn.Transformer.generate_square_subsequent_mask(T),
              "src_key_padding_mask": _padding(S), "memory_key_padding_mask": _padding(S),
              "tgt_is_causal": True}
    _patched, report = _compare(model, (src, tgt), kw, f"nn.Transformer {mode}", mode)
    classes = {new for _, _, new in report.swapped}
    assert "fastattn.patch_torch.TransformerEncoderLayer" in classes
    assert "fastattn.nn.MultiheadAttention" in classes
    assert not report.left


@pytest.mark.parametrize("enable_nested", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_nested_path_meaning_kept(enable_nested, batch_first):
    """torch's eval TransformerEncoder with enable_nested_tensor and a padding mask returns 0
    at the padded positions (before its final norm); the patched encoder returns the same, and
    without the nested path, the computed values there, as torch."""
    layer = nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=batch_first)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=enable_nested).eval()
    src, pad = _seq(batch_first, S), _padding(S)
    with torch.no_grad():
        want = enc(src, src_key_padding_mask=pad)
    patched, _ = _compare(enc, (src,), {"src_key_padding_mask": pad}, "encoder")
    with torch.no_grad():
        got = patched(src, src_key_padding_mask=pad)
    padded = got[pad] if batch_first else got.transpose(0, 1)[pad]
    torch_padded = want[pad] if batch_first else want.transpose(0, 1)[pad]
    nested = enable_nested and batch_first  # torch only nests batch_first encoders
    assert bool((torch_padded == 0).all()) == nested
    assert bool((padded == 0).all()) == nested


def test_encoder_layer_eval_fast_path_is_replaced(monkeypatch):
    """The eval fast path never calls self_attn.forward; the patched layer does."""
    layer = nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True).eval()
    patched, _ = patch(layer)
    assert isinstance(patched, patch_torch.TransformerEncoderLayer)
    calls = []
    real = fastattn.patch_torch.MultiheadAttention.forward
    monkeypatch.setattr(MultiheadAttention, "forward",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    with torch.no_grad():
        patched(_seq(True, S), src_key_padding_mask=_padding(S))
    assert calls


def test_decoder_and_mha_gradients_match():
    dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(E, H, FF, dropout=0.0), 2,
                                norm=nn.LayerNorm(E)).train()
    dec64, patched = copy.deepcopy(dec).double(), copy.deepcopy(dec)
    patch(patched)
    tgt, mem = _seq(False, T), _seq(False, S)
    mask = nn.Transformer.generate_square_subsequent_mask(T)
    grads = {}
    for name, m, d in (("torch", dec, torch.float32), ("ref", dec64, torch.float64),
                       ("fa", patched, torch.float32)):
        out = m(tgt.to(d), mem.to(d), tgt_mask=mask.to(d), memory_key_padding_mask=_padding(S))
        (out * torch.linspace(-1, 1, out.numel(), dtype=d).view_as(out)).sum().backward()
        grads[name] = {n: p.grad for n, p in m.named_parameters()}
    for n in grads["torch"]:
        assert_close_to_torch(grads["fa"][n], grads["torch"][n], grads["ref"][n], n, ulps=8)


def test_fully_masked_rows_give_zero_attention():
    """Documented choice: a query row with every key masked gets attention output 0 (so the
    MultiheadAttention output is its out_proj bias), in eval and training, where torch's eval
    fast path gives NaN and its training path 0."""
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    x = _seq(True, S)
    am = torch.zeros(S, S, dtype=torch.bool)
    am[2] = True  # query 2 may attend nowhere
    with torch.no_grad():
        torch_eval = mha.eval()(x, x, x, attn_mask=am, need_weights=False)[0]
        torch_train = mha.train()(x, x, x, attn_mask=am, need_weights=False)[0]
        patched, _ = patch(mha)
        got_eval = patched.eval()(x, x, x, attn_mask=am, need_weights=False)[0]
    assert torch.isnan(torch_eval[:, 2]).all() and torch.isfinite(torch_train).all()
    assert torch.isfinite(got_eval).all()
    torch.testing.assert_close(got_eval[:, 2], mha.out_proj.bias.expand(N, E))
    torch.testing.assert_close(got_eval, torch_train, rtol=1e-5, atol=1e-5)

    layer = nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True)
    fl, _ = patch(copy.deepcopy(layer))
    with torch.no_grad():
        want = layer.train()(x, src_mask=am)
        got = fl.eval()(x, src_mask=am)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_norms_and_mha_share_parameters_keep_hooks_and_keys():
    model = nn.Sequential(nn.Linear(E, E), nn.LayerNorm(E), nn.RMSNorm(E))
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    model.append(nn.Identity())
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(1))
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    x = torch.randn(N, S, E)
    with torch.no_grad():
        want = model(x)
    patched, report = patch(model)
    assert patched is model and isinstance(model[1], LayerNorm)
    assert isinstance(model[2], fastattn.nn.RMSNorm)
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    with torch.no_grad():
        got = model(x)
    assert len(seen) == 2
    assert_close_to_torch(got, want, copy.deepcopy(unpatch(copy.deepcopy(model))).double()(
        x.double()).detach(), "norms")
    pm, _ = patch(mha)
    assert pm.in_proj_weight is mha.in_proj_weight and pm.out_proj.weight is mha.out_proj.weight
    assert [n for n, _, _ in report.swapped] == ["1", "2"]


def test_unpatch_restores_exactly():
    model = _transformer()
    model.eval()
    src, tgt = _seq(True, S), _seq(True, T)
    kw = {"src_key_padding_mask": _padding(S),
              "tgt_mask": nn.Transformer.generate_square_subsequent_mask(T)}
    modules = dict(model.named_modules())
    with torch.no_grad():
        want = model(src, tgt, **kw)
        patched, _ = patch(model)
        assert patched is model and type(model.encoder) is patch_torch.TransformerEncoder
        restored = unpatch(model)
        got = restored(src, tgt, **kw)
    assert restored is model
    assert {n: type(m) for n, m in restored.named_modules()} == \
        {n: type(m) for n, m in modules.items()}
    assert all(dict(restored.named_modules())[n] is m for n, m in modules.items())
    assert torch.equal(got, want)

    layer = nn.TransformerEncoderLayer(E, H, FF, batch_first=True)
    assert unpatch(patch(layer)[0]) is layer  # a swapped root comes back too
    twice, report = patch(patch(model)[0])  # patching a patched model changes nothing more
    assert not report.swapped and not report.left
    assert unpatch(twice) is model
    assert all(dict(model.named_modules())[n] is m for n, m in modules.items())


def test_inplace_false_and_options():
    model = _transformer()
    patched, _report = patch(model, inplace=False)
    assert type(model.encoder) is nn.TransformerEncoder  # untouched
    assert type(patched.encoder) is patch_torch.TransformerEncoder
    _, rep_norms = patch(_transformer(), attention=False)
    assert all("Norm" in old for _, old, _ in rep_norms.swapped) and rep_norms.swapped
    _, rep_attn = patch(_transformer(), norms=False)
    assert not any("Norm" in old for _, old, _ in rep_attn.swapped)


def test_unsupported_modules_left_untouched_and_reported():
    class MyLayerNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(MyLayerNorm(E), nn.LayerNorm(E).double(), nn.Linear(E, E).double())
    x = torch.randn(N, E)
    with torch.no_grad():
        want = model[2](model[1](model[0](x).double()))
    _patched, report = patch(model)
    assert type(model[0]) is MyLayerNorm and type(model[1]) is nn.LayerNorm
    assert not report.swapped
    reasons = {name: why for name, _, why in report.left}
    assert "subclass" in reasons["0"] and "float64" in reasons["1"]
    with torch.no_grad():
        assert torch.equal(model[2](model[1](model[0](x).double())), want)
    text = str(report)
    assert "left    0:" in text and "MyLayerNorm" in text


def test_quantize_option():
    pytest.importorskip("fastattn.quant", reason="fastattn.quantize is not in this build yet")
    model = nn.Sequential(nn.Linear(E, E), nn.LayerNorm(E))
    _, report = patch(model, quantize="int8")
    assert report.quantize is not None


# ---- Triton backend (interpreted on CPU without a GPU) --------------------------------------

@pytest.mark.triton
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_triton_transformer_outputs_match(mode):
    if fastattn.backends.triton_error() is not None:
        pytest.skip(fastattn.backends.triton_error())
    model = _transformer().train(mode == "train")
    src, tgt = _seq(True, S, batch=2), _seq(True, T, batch=2)
    kw = {"tgt_mask": nn.Transformer.generate_square_subsequent_mask(T),
              "src_key_padding_mask": _padding(S, batch=2)}
    ref64 = copy.deepcopy(model).double()
    kw64 = {k: v.double() if v.is_floating_point() else v for k, v in kw.items()}
    with torch.no_grad():
        want = model(src, tgt, **kw)
        ref = ref64(src.double(), tgt.double(), **kw64)
        patched, _ = patch(model, inplace=False)
        with fastattn.use_backend("triton"):
            got = patched(src, tgt, **kw)
    assert_close_to_torch(got, want, ref, f"nn.Transformer {mode} (triton)")


def test_works_without_transformers():
    """transformers is optional: with it unimportable, fastattn imports and patches torch
    models, and nothing imports transformers on the way."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None\n"
            "import torch, fastattn\n"
            "from fastattn.patch import patch, unpatch\n"
            "m = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()\n"
            "p, r = patch(m)\n"
            "with torch.no_grad(): p(torch.randn(2, 3, 16))\n"
            "assert unpatch(p) is m and len(r.swapped) == 4\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.triton
def test_triton_transformer_gradients_match():
    if fastattn.backends.triton_error() is not None:
        pytest.skip(fastattn.backends.triton_error())
    model = _transformer(norm_first=True).train()
    model64, patched = copy.deepcopy(model).double(), copy.deepcopy(model)
    patch(patched)
    src, tgt = _seq(True, S, batch=2), _seq(True, T, batch=2)
    causal, pad = nn.Transformer.generate_square_subsequent_mask(T), _padding(S, batch=2)
    grads = {}
    for name, m, d in (("torch", model, torch.float32), ("ref", model64, torch.float64),
                       ("fa", patched, torch.float32)):
        with fastattn.use_backend("triton"):
            out = m(src.to(d), tgt.to(d), tgt_mask=causal.to(d), src_key_padding_mask=pad,
                    memory_key_padding_mask=pad)
            (out * torch.linspace(-1, 1, out.numel(), dtype=d).view_as(out)).sum().backward()
        grads[name] = {n: p.grad for n, p in m.named_parameters()}
    for n in grads["torch"]:
        assert_close_to_torch(grads["fa"][n], grads["torch"][n], grads["ref"][n],
                              f"{n} (triton)", ulps=8)
