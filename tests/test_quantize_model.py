"""fastattn.quantize on whole models: an nn.Sequential MLP and a torch nn.TransformerEncoder keep
their outputs within the SQNR thresholds; the report says what was replaced and skipped; the
quantized state round-trips exactly through torch.save (weights_only) and safetensors."""

import io

import pytest
import torch
from tolerances import sqnr_threshold
from torch import nn

import fastattn
from fastattn.quant_formats import sqnr_db

CASES = [("int8", 128), ("w8a8", 128), ("int4", 32), ("int4", 128)]


def _mlp(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
    for lin in (m[0], m[2]):
        nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)
    return m.eval()


def _encoder(seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()


@pytest.mark.parametrize("fmt,group_size", CASES)
def test_mlp(fmt, group_size):
    m = _mlp()
    x = torch.randn(16, 256)
    with torch.no_grad():
        ref = m(x)
        report = fastattn.quantize(m, fmt, group_size=group_size)
        out = m(x)
    assert [name for name, _ in report.replaced] == ["0", "2"] and not report.skipped
    assert report.bytes_after < report.bytes_before / (3.5 if fmt != "int4" else 6)
    db = sqnr_db(ref, out)
    assert db >= sqnr_threshold(fmt, group_size, layers_in_series=2), f"{fmt}: {db:.1f} dB"


@pytest.mark.parametrize("fmt,group_size", CASES)
def test_transformer_encoder(fmt, group_size):
    """Eval with a key padding mask (torch's nested-tensor fast path is on for the float model):
    outputs at real tokens within the threshold; the report names what it left and why."""
    enc = _encoder()
    x = torch.randn(3, 10, 128)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[1, 7:] = True
    pad[2, 4:] = True
    with torch.no_grad():
        ref = enc(x, src_key_padding_mask=pad)
        report = fastattn.quantize(enc, fmt, group_size=group_size)
        out = enc(x, src_key_padding_mask=pad)
    replaced = {name for name, _ in report.replaced}
    assert replaced == {f"layers.{i}.linear{j}" for i in range(2) for j in (1, 2)}
    assert {name for name, _ in report.skipped} == {"layers.0.self_attn.out_proj",
                                                    "layers.1.self_attn.out_proj"}
    assert "nn.MultiheadAttention" in report.skipped[0][1]
    assert any("nested tensors" in n for n in report.notes)
    assert enc.use_nested_tensor is False
    real = ~pad
    db = sqnr_db(ref[real], out[real])
    assert db >= sqnr_threshold(fmt, group_size, layers_in_series=4), f"{fmt}: {db:.1f} dB"


def test_report_filter_skips_and_ties():
    m = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32), nn.Linear(32, 64))
    report = fastattn.quantize(m, "int4", group_size=64, filter=lambda name, mod: name != "3")
    assert dict(report.skipped) == {
        "2": "in_features 96 is not a multiple of group_size 64",
        "3": "excluded by filter"}
    assert [n for n, _ in report.replaced] == ["0"]
    assert "replaced 1 linear layer(s), skipped 2" in str(report)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 32)
            self.head = nn.Linear(32, 50, bias=False)
            self.head.weight = self.emb.weight

    report = fastattn.quantize(Tied(), "int8")
    assert "weight tied to emb.weight" in report.replaced[0][1]


def test_bad_arguments():
    with pytest.raises(ValueError, match="format must be one of"):
        fastattn.quantize(_mlp(), "fp8")
    with pytest.raises(ValueError, match="group_size must be one of"):
        fastattn.quantize(_mlp(), "int4", group_size=100)
    with pytest.raises(TypeError, match="cannot be replaced in place"):
        fastattn.quantize(nn.Linear(4, 4), "int8")


@pytest.mark.parametrize("fmt", ["int8", "w8a8", "int4"])
def test_state_dict_and_safetensors_round_trip(fmt, tmp_path):
    m = _mlp(0)
    fastattn.quantize(m, fmt, group_size=64)
    x = torch.randn(4, 256)
    with torch.no_grad():
        want = m(x)
    # torch.save / torch.load(weights_only=True): nothing is unpickled beyond tensors
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    other = _mlp(1)
    fastattn.quantize(other, fmt, group_size=64)
    other.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        assert torch.equal(other(x), want)
    # safetensors
    path = tmp_path / "q.safetensors"
    fastattn.save_quantized(m, path)
    third = _mlp(2)
    fastattn.quantize(third, fmt, group_size=64)
    fastattn.load_quantized(third, path)
    with torch.no_grad():
        assert torch.equal(third(x), want)


def test_load_checks_version_and_group_size():
    m = _mlp()
    fastattn.quantize(m, "int4", group_size=64)
    state = m.state_dict()
    other = _mlp()
    fastattn.quantize(other, "int4", group_size=128)
    with pytest.raises(RuntimeError, match="group_size 64"):
        other.load_state_dict(state)
    state["0.qformat"] = torch.tensor([99, 64], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="format version 99"):
        m.load_state_dict(state)
