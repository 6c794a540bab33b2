"""The norm ops as operators and modules: validation errors, raw-operator checks, opcheck,
torch.compile, backend choice, the drop-in modules and their state_dicts, and the CPU kernel's
per-ISA builds."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.backends import BackendError
from tolerances import assert_within_torch_error

X = torch.randn(2, 3, 8)


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: fastattn.layer_norm(X, (3,)), ValueError,
         ["normalized_shape", "(3,)", "trailing dims", "(2, 3, 8)"]),
        (lambda: fastattn.rms_norm(X, (2, 3, 8, 1)), ValueError, ["normalized_shape"]),
        (lambda: fastattn.layer_norm(X, ()), ValueError, ["normalized_shape", "at least one"]),
        (lambda: fastattn.layer_norm(X, "8"), TypeError, ["normalized_shape", "int"]),
        (lambda: fastattn.layer_norm(X, 8, torch.ones(7)), ValueError,
         ["weight", "(8,)", "(7,)"]),
        (lambda: fastattn.layer_norm(X, (3, 8), torch.ones(3, 8), torch.ones(8)), ValueError,
         ["bias", "(3, 8)", "(8,)"]),
        (lambda: fastattn.layer_norm(X, 8, eps=0.0), ValueError, ["eps", "> 0", "0.0"]),
        (lambda: fastattn.rms_norm(X, 8, eps=-1e-6), ValueError, ["eps", "> 0"]),
        (lambda: fastattn.rms_norm(X, 8, eps=float("nan")), ValueError, ["eps"]),
        (lambda: fastattn.layer_norm(X.bfloat16(), 8, torch.ones(8, dtype=torch.float16)),
         TypeError, ["weight", "float32 or x's dtype", "float16"]),
        (lambda: fastattn.layer_norm(X.bfloat16(), 8, torch.ones(8), torch.ones(8).bfloat16()),
         TypeError, ["same dtype"]),
        (lambda: fastattn.layer_norm(X, 8, torch.ones(8, device="meta")), ValueError,
         ["weight", "meta", "cpu"]),
        (lambda: fastattn.layer_norm(torch.ones(2, 8, dtype=torch.int32), 8), TypeError,
         ["x", "floating"]),
        (lambda: fastattn.layer_norm([1.0], 1), TypeError, ["x", "torch.Tensor"]),
        (lambda: fastattn.add_rms_norm(X, X[:1], 8), ValueError, ["residual", "shape"]),
        (lambda: fastattn.add_layer_norm(X, X.half(), 8), ValueError, ["residual", "dtype"]),
        (lambda: fastattn.rms_norm(X, 8, backend="cuda"), BackendError, ["'cuda'", "on cpu"]),
        (lambda: fastattn.rms_norm(X.double(), 8, backend="cpu"), BackendError, ["float64"]),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, words):
    with pytest.raises(error) as info:
        call()
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


@pytest.mark.parametrize(
    "op, args, words",
    [
        ("layer_norm", (torch.arange(6).reshape(2, 3), None, None, None, 1e-5), ["float32", "Long"]),
        ("layer_norm", (torch.randn(2, 3), None, torch.ones(4), None, 1e-5), ["weight", "(3,)"]),
        ("layer_norm", (torch.randn(2, 3), None, None, None, 0.0), ["eps"]),
        ("rms_norm", (torch.randn(2, 3), torch.randn(3), None, 1e-5), ["residual", "shape"]),
        ("rms_norm", (torch.randn(2, 3).half(), None, torch.ones(3).bfloat16(), 1e-5),
         ["weight must be float32"]),
        ("layer_norm_backward", (torch.randn(2, 3), None, torch.randn(2, 4), None,
                                 torch.zeros(2), torch.ones(2), False), ["grad_out shape"]),
        ("rms_norm_backward", (torch.randn(2, 3), None, torch.randn(2, 3), None,
                               torch.ones(3)), ["rstd", "2 elements"]),
    ],
)
def test_raw_operator_checks(op, args, words):
    with pytest.raises(RuntimeError) as info:
        getattr(torch.ops.fastattn, op)(*args)
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_opcheck_cpu(dtype, residual):
    x = torch.randn(3, 5, 37, dtype=dtype, requires_grad=True)
    r = torch.randn(3, 5, 37, dtype=dtype, requires_grad=True) if residual else None
    w = torch.randn(37, requires_grad=True)
    b = torch.randn(37, requires_grad=True)
    torch.library.opcheck(torch.ops.fastattn.layer_norm.default, (x, r, w, b, 1e-5))
    torch.library.opcheck(torch.ops.fastattn.rms_norm.default, (x, r, w, 1e-6))
    torch.library.opcheck(torch.ops.fastattn.rms_norm.default, (x, r, None, 1e-6))
    y = torch.randn(4, 37, dtype=dtype)
    w, b = w.detach(), b.detach()  # the backward operators are not differentiable
    out, _, mean, rstd = torch.ops.fastattn.layer_norm(y, None, w, b, 1e-5)
    torch.library.opcheck(torch.ops.fastattn.layer_norm_backward.default,
                          (torch.randn_like(y), None, y, w, mean, rstd, True))
    torch.library.opcheck(torch.ops.fastattn.rms_norm_backward.default,
                          (torch.randn_like(y), torch.randn_like(y), y, None, rstd))


@pytest.mark.slow
def test_compile_fullgraph_cpu():
    def block(x, res, w1, b1, w2):
        h = fastattn.layer_norm(x, (x.shape[-1],), w1, b1)
        y, s = fastattn.add_rms_norm(h * 2, res, (x.shape[-1],), w2)
        return y + s

    args = [torch.randn(4, 6, 32, requires_grad=True), torch.randn(4, 6, 32, requires_grad=True),
            torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True),
            torch.randn(32, requires_grad=True)]
    compiled = torch.compile(block, fullgraph=True)
    out, eager = compiled(*args), block(*args)
    torch.testing.assert_close(out, eager)
    g = torch.autograd.grad(out.square().sum(), args)
    ge = torch.autograd.grad(eager.square().sum(), args)
    for a, b in zip(g, ge):
        torch.testing.assert_close(a, b)


def test_backend_choice_and_explain():
    assert fastattn.explain("layer_norm", X, (8,)) == \
        "layer_norm: backend 'cpu' (default for cpu tensors)"
    assert "'cpu'" in fastattn.explain("add_rms_norm", X, X, 8)
    why64 = fastattn.explain("rms_norm", X.double(), 8)
    assert "'reference'" in why64 and "float64" in why64
    out64 = fastattn.rms_norm(X.double(), 8)
    torch.testing.assert_close(out64, F.rms_norm(X.double(), (8,)))
    assert "cpu" in fastattn.available_backends("layer_norm", "cpu")


def test_rms_norm_default_eps_is_torchs():
    x = torch.full((2, 16), 1e-4, dtype=torch.bfloat16)  # mean(x^2) comparable to eps
    torch.testing.assert_close(fastattn.rms_norm(x, 16), F.rms_norm(x, (16,)))
    assert fastattn.nn.RMSNorm(16).eps is None


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_module_is_drop_in(affine):
    theirs = torch.nn.LayerNorm((4, 24), eps=1e-6, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            theirs.weight.normal_()
            theirs.bias.normal_()
    mine = fastattn.nn.LayerNorm((4, 24), eps=1e-6, elementwise_affine=affine)
    mine.load_state_dict(theirs.state_dict())
    assert list(mine.state_dict()) == list(theirs.state_dict())
    x = torch.randn(3, 4, 24)
    ref = fastattn.reference.layer_norm(x.double(), (4, 24), *(
        (theirs.weight.double(), theirs.bias.double()) if affine else (None, None)), eps=1e-6)
    assert_within_torch_error(mine(x), ref, theirs(x), "nn.LayerNorm")
    back = torch.nn.LayerNorm((4, 24), eps=1e-6, elementwise_affine=affine)
    back.load_state_dict(mine.state_dict())  # and the other way round
    converted = fastattn.nn.LayerNorm.from_torch(theirs)
    assert isinstance(converted, torch.nn.LayerNorm)
    if affine:
        assert converted.weight is theirs.weight and converted.bias is theirs.bias
    torch.testing.assert_close(converted(x), mine(x))
    no_bias = fastattn.nn.LayerNorm(24, bias=False)
    assert no_bias.bias is None and list(no_bias.state_dict()) == ["weight"]


def test_rms_norm_module_is_drop_in():
    theirs = torch.nn.RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        theirs.weight.normal_()
    mine = fastattn.nn.RMSNorm(48, eps=1e-5)
    mine.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 7, 48, requires_grad=True)
    ref = fastattn.reference.rms_norm(x.double(), (48,), theirs.weight.double(), 1e-5)
    assert_within_torch_error(mine(x), ref, theirs(x), "nn.RMSNorm")
    converted = fastattn.nn.RMSNorm.from_torch(theirs)
    assert converted.weight is theirs.weight and converted.eps == 1e-5
    converted(x).sum().backward()
    assert theirs.weight.grad is not None
    with pytest.raises(TypeError, match="torch.nn.RMSNorm"):
        fastattn.nn.RMSNorm.from_torch(torch.nn.LayerNorm(4))


def test_under_autocast():
    """Under autocast, activations arrive in bf16 while the module keeps float32 parameters:
    the op takes both and returns bf16, as F.layer_norm does (torch itself runs layer_norm in
    float32 under CPU autocast; fastattn keeps x's dtype and computes in float32 inside)."""
    ln = fastattn.nn.LayerNorm(32)
    lin = torch.nn.Linear(32, 32)
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x)
        assert h.dtype == torch.bfloat16
        y = ln(h)
    assert y.dtype == torch.bfloat16
    ref = fastattn.reference.layer_norm(h.double(), (32,), ln.weight.double(), ln.bias.double())
    assert (y.double() - ref).abs().max().item() <= 2 * 2.0**-7 * ref.abs().max().item()


@pytest.mark.parametrize("isa", ["avx2", "default"])
def test_cpu_kernel_isa_fallbacks(isa):
    """The CPU kernels are built per ISA; force the narrower builds (ATEN_CPU_CAPABILITY) and
    compare forward and gradients with the reference in a fresh process."""
    code = (
        "import torch, fastattn\n"
        "for dt in (torch.float32, torch.bfloat16, torch.float16):\n"
        "    for n in (1, 17, 100, 4097):\n"
        "        x = torch.randn(40, n).to(dt).requires_grad_()\n"
        "        r = torch.randn(40, n).to(dt)\n"
        "        w = torch.randn(n, requires_grad=True); b = torch.randn(n, requires_grad=True)\n"
        "        out, s = fastattn.add_layer_norm(x, r, n, w, b)\n"
        "        ref, _ = fastattn.reference.add_layer_norm(x.double(), r.double(), n,\n"
        "                                                   w.double(), b.double())\n"
        "        tol = {torch.float32: 1e-4}.get(dt, 0.1)\n"
        "        assert (out.double() - ref).abs().max().item() < tol, (dt, n)\n"
        "        g = torch.randn_like(out)\n"
        "        got = torch.autograd.grad(out, [x, w, b], g)\n"
        "        want = torch.autograd.grad(ref, [x, w, b], g.double())\n"
        "        for a, e in zip(got, want):\n"
        "            assert (a.double() - e).abs().max().item() < tol * max(1, e.abs().max()), (dt, n)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_opcheck_and_compile_gpu(backend, dtype):
    """opcheck and compile fullgraph on the GPU operators (the Triton operators cannot be
    opchecked in interpreter mode: their fake-tensor runs touch data pointers)."""
    if backend == "triton":
        from fastattn.ops import _norm
        ln, rms = _norm.triton_op("layer_norm"), _norm.triton_op("rms_norm")
    else:
        ln, rms = torch.ops.fastattn.layer_norm.default, torch.ops.fastattn.rms_norm.default
    x = torch.randn(64, 1000, device="cuda", dtype=dtype, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    w = torch.randn(1000, device="cuda", requires_grad=True)
    b = torch.randn(1000, device="cuda", requires_grad=True)
    torch.library.opcheck(ln, (x, r, w, b, 1e-5))
    torch.library.opcheck(rms, (x, None, w, 1e-6))
    f = torch.compile(lambda t, u: fastattn.add_layer_norm(t, u, 1000, w, b, backend=backend),
                      fullgraph=True)
    for got, want in zip(f(x, r), fastattn.add_layer_norm(x, r, 1000, w, b, backend=backend)):
        torch.testing.assert_close(got, want)
