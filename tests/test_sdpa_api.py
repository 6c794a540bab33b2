"""fastattn.sdpa as an operator: validation errors, raw-operator checks, opcheck,
torch.compile, backend choice, autocast, the signature, and O(L) memory on the CPU."""

import inspect
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastattn

def _qkv(B=2, H=4, L=5, S=7, E=8, Ev=8, Hkv=None, dtype=torch.float32):
    Hkv = Hkv or H
    return (torch.randn(B, H, L, E, dtype=dtype), torch.randn(B, Hkv, S, E, dtype=dtype),
            torch.randn(B, Hkv, S, Ev, dtype=dtype))


BAD = [
    ("query not a tensor", lambda q, k, v: fastattn.sdpa(q.tolist(), k, v), TypeError, "query"),
    ("integer query", lambda q, k, v: fastattn.sdpa(q.int(), k, v), TypeError, "floating"),
    ("1-d key", lambda q, k, v: fastattn.sdpa(q, k[0, 0, 0], v), ValueError, "key"),
    ("dtype mismatch", lambda q, k, v: fastattn.sdpa(q, k.half(), v), TypeError, "same dtype"),
    ("E mismatch", lambda q, k, v: fastattn.sdpa(q, k[..., :4], v), ValueError, "head dim"),
    ("S mismatch", lambda q, k, v: fastattn.sdpa(q, k, v[:, :, :3]), ValueError, "same length"),
    ("batch mismatch", lambda q, k, v: fastattn.sdpa(q, k[:1].expand(3, -1, -1, -1),
                                                     v[:1].expand(3, -1, -1, -1)),
     ValueError, "broadcast"),
    ("heads without gqa", lambda q, k, v: fastattn.sdpa(q, k[:, :2], v[:, :2]), ValueError,
     "enable_gqa"),
    ("heads not divisible", lambda q, k, v: fastattn.sdpa(q, k[:, :3], v[:, :3], enable_gqa=True),
     ValueError, "divide"),
    ("gqa k/v heads differ", lambda q, k, v: fastattn.sdpa(q, k[:, :2], v[:, :1],
                                                           enable_gqa=True), ValueError, "equal"),
    ("mask not broadcastable", lambda q, k, v: fastattn.sdpa(
        q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.bool)), ValueError, "not broadcastable"),
    ("mask dtype", lambda q, k, v: fastattn.sdpa(q, k, v, attn_mask=torch.ones(5, 7).int()),
     TypeError, "attn_mask must be bool"),
    ("float16 mask for float32 query", lambda q, k, v: fastattn.sdpa(
        q, k, v, attn_mask=torch.zeros(5, 7, dtype=torch.float16)), TypeError, "float32"),
    ("mask and causal", lambda q, k, v: fastattn.sdpa(
        q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool), is_causal=True), ValueError,
     "not both"),
    ("dropout out of range", lambda q, k, v: fastattn.sdpa(q, k, v, dropout_p=1.5), ValueError,
     "dropout_p"),
    ("scale not finite", lambda q, k, v: fastattn.sdpa(q, k, v, scale=float("nan")), TypeError,
     "scale"),
    ("unknown backend", lambda q, k, v: fastattn.sdpa(q, k, v, backend="tpu"), ValueError,
     "backend"),
]


@pytest.mark.parametrize("what, call, error, words", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise_clear_errors(what, call, error, words):
    q, k, v = _qkv()
    with pytest.raises(error, match=words):
        call(q, k, v)


RAW = [
    ("3-d", lambda q, k, v: (q[0], k[0], v[0], None, 1.0, False, 0.0, 0, 0), "4-d"),
    ("E mismatch", lambda q, k, v: (q, k[..., :3], v, None, 1.0, False, 0.0, 0, 0), "last dim"),
    ("heads", lambda q, k, v: (q, k[:, :3], v[:, :3], None, 1.0, False, 0.0, 0, 0), "multiple"),
    ("mask shape", lambda q, k, v: (q, k, v, torch.ones(5, 7, dtype=torch.bool), 1.0, False, 0.0,
                                    0, 0), "mask of shape"),
    ("mask + causal", lambda q, k, v: (q, k, v, torch.ones(2, 4, 5, 7, dtype=torch.bool), 1.0,
                                       True, 0.0, 0, 0), "not both"),
    ("dropout", lambda q, k, v: (q, k, v, None, 1.0, False, 1.0, 0, 0), "dropout_p"),
    ("dtype", lambda q, k, v: (q.double(), k.double(), v.double(), None, 1.0, False, 0.0, 0, 0),
     "float32, float16 or bfloat16"),
]


@pytest.mark.parametrize("what, args, words", RAW, ids=[r[0] for r in RAW])
def test_raw_operator_checks(what, args, words):
    """The C++ operator checks its own inputs (it is public as torch.ops.fastattn.sdpa)."""
    with pytest.raises(RuntimeError, match=words):
        torch.ops.fastattn.sdpa(*args(*_qkv()))


def test_signature_matches_torch():
    """torch's documented order and defaults; fastattn's own options are keyword-only after."""
    params = list(inspect.signature(fastattn.sdpa).parameters.values())
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
             "enable_gqa"]
    assert [p.name for p in params[:len(names)]] == names
    assert [p.default for p in params[3:len(names)]] == [None, 0.0, False, None, False]
    assert all(p.kind == p.KEYWORD_ONLY for p in params[len(names):])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", ["none", "bool", "float", "causal"])
def test_opcheck_cpu(dtype, mask):
    q, k, v = (t.requires_grad_() for t in _qkv(B=2, H=4, Hkv=2, L=5, S=7, E=8, Ev=6,
                                                 dtype=dtype))
    m = None
    if mask == "bool":
        m = (torch.rand(2, 1, 5, 7) < 0.8).expand(2, 4, 5, 7)
    elif mask == "float":
        m = torch.randn(1, 4, 5, 7).expand(2, 4, 5, 7).requires_grad_()
    args = (q, k, v, m, 0.3, mask == "causal", 0.0, 0, 0)
    torch.library.opcheck(torch.ops.fastattn.sdpa.default, args)
    out, lse = torch.ops.fastattn.sdpa(*(a.detach() if isinstance(a, torch.Tensor) else a
                                         for a in args))
    detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in args[:4]]
    torch.library.opcheck(torch.ops.fastattn.sdpa_backward.default,
                          (torch.randn_like(out), *detached[:3], out, lse, detached[3],
                           *args[4:], m is not None and mask == "float"))


@pytest.mark.slow
def test_compile_fullgraph_cpu():
    """An attention block with fastattn.sdpa compiles with no graph break, gradients included."""
    q, k, v = (t.requires_grad_() for t in _qkv(B=2, H=4, L=16, S=16, E=16, Ev=16))
    pad = torch.rand(2, 1, 1, 16) < 0.9

    def block(q, k, v, pad):
        return fastattn.sdpa(q * 2, k, v, attn_mask=pad).sum(-1)

    compiled = torch.compile(block, fullgraph=True)
    out, eager = compiled(q, k, v, pad), block(q, k, v, pad)
    torch.testing.assert_close(out, eager)
    g1 = torch.autograd.grad(out.sum(), [q, k, v])
    g2 = torch.autograd.grad(eager.sum(), [q, k, v])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_backend_choice_and_explain():
    q, k, v = _qkv()
    assert "sdpa: backend 'cpu'" in fastattn.explain("sdpa", q, k, v)
    assert "'reference'" in fastattn.explain("sdpa", q.double(), k.double(), v.double())
    with fastattn.use_backend("reference"):
        assert "'reference'" in fastattn.explain("sdpa", q, k, v)
    with pytest.raises(fastattn.BackendError, match="cuda"):
        fastattn.sdpa(q, k, v, backend="cuda")


def test_float64_runs_on_the_reference_math():
    q, k, v = _qkv(dtype=torch.float64)
    torch.testing.assert_close(fastattn.sdpa(q, k, v, is_causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_two_dim_inputs_and_batch_broadcast():
    q, k, v = torch.randn(5, 8), torch.randn(7, 8), torch.randn(7, 3)
    torch.testing.assert_close(fastattn.sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v))
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(1, 3, 7, 8), torch.randn(1, 3, 7, 8)
    torch.testing.assert_close(fastattn.sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_under_autocast():
    """Under CPU autocast (bf16), attention runs in bf16 as torch's SDPA does."""
    q, k, v = _qkv(L=16, S=16, E=16, Ev=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastattn.sdpa(q, k, v)
        theirs = F.scaled_dot_product_attention(q, k, v)
    assert out.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(out, theirs, atol=2e-2, rtol=2e-2)


@pytest.mark.slow
def test_long_sequence_never_allocates_the_score_matrix():
    """L = S = 16384, one head, E = 64, float32: an (L, S) float32 buffer is 1 GiB. Forward +
    backward in a fresh process must raise the peak RSS by far less (inputs, outputs and
    gradients are 7 x 4 MiB)."""
    code = """
import resource, torch, fastattn
torch.manual_seed(0)
q, k, v = (torch.randn(1, 1, 16384, 64, requires_grad=True) for _ in range(3))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = fastattn.sdpa(q, k, v, is_causal=True)
out.backward(torch.ones_like(out))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024, float(q.grad.abs().sum()))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    grown, gsum = res.stdout.split()
    assert float(gsum) > 0
    assert int(grown) < 256 * 2**20, f"peak RSS grew by {int(grown) / 2**20:.0f} MiB"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_opcheck_and_compile_gpu(backend, dtype):
    """opcheck and compile fullgraph on the GPU operators (the Triton operators cannot be
    opchecked in interpreter mode: their fake-tensor runs touch data pointers)."""
    from fastattn.ops import sdpa as sdpa_mod

    op = sdpa_mod._triton_sdpa() if backend == "triton" else torch.ops.fastattn.sdpa.default
    q, k, v = (torch.randn(2, 4, 128, 64, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(3))
    m = torch.randn(2, 1, 128, 128, device="cuda", dtype=dtype).expand(2, 4, 128, 128)
    torch.library.opcheck(op, (q, k, v, m, 0.125, False, 0.0, 0, 0))
    torch.library.opcheck(op, (q, k, v, None, 0.125, True, 0.0, 0, 0))
    f = torch.compile(lambda a, b, c: fastattn.sdpa(a, b, c, is_causal=True, backend=backend),
                      fullgraph=True)
    torch.testing.assert_close(f(q, k, v), fastattn.sdpa(q, k, v, is_causal=True,
                                                         backend=backend))
