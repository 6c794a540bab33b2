"""fastattn.softmax as an operator: validation errors, opcheck, torch.compile, backend choice,
and the CPU kernel's per-ISA builds."""

import os
import subprocess
import sys

import pytest
import torch

import fastattn
from fastattn.backends import BackendError


def test_operators_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastattn::softmax", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastattn::softmax_backward", "CPU")


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: fastattn.softmax(torch.arange(6).reshape(2, 3)), TypeError, ["x", "floating"]),
        (lambda: fastattn.softmax([1.0, 2.0]), TypeError, ["x", "torch.Tensor"]),
        (lambda: fastattn.softmax(torch.randn(2, 3), dim=2), IndexError, ["dim", "[-2, 1]"]),
        (lambda: fastattn.softmax(torch.randn(2, 3), mask=torch.ones(3, 3, dtype=torch.bool)),
         ValueError, ["mask", "(3, 3)", "broadcastable", "(2, 3)"]),
        (lambda: fastattn.softmax(torch.randn(2, 3), mask=torch.ones(3, dtype=torch.int32)),
         TypeError, ["mask", "bool", "int32"]),
        (lambda: fastattn.softmax(torch.randn(2, 3), mask=torch.ones(3, device="meta")),
         ValueError, ["mask", "meta", "cpu"]),
        (lambda: fastattn.softmax(torch.randn(2, 3), scale=float("nan")), TypeError, ["scale"]),
        (lambda: fastattn.softmax(torch.randn(3), causal=True), ValueError, ["causal", "2 dims"]),
        (lambda: fastattn.softmax(torch.randn(3, 3), 0, causal=True), ValueError, ["causal", "dim=-1"]),
        (lambda: fastattn.softmax(torch.randn(3, 3), backend="gpu"), ValueError, ["backend", "'gpu'"]),
        (lambda: fastattn.softmax(torch.randn(3, 3), backend="cuda"), BackendError, ["'cuda'", "on cpu"]),
        (lambda: fastattn.softmax(torch.randn(3, 3, dtype=torch.float64), backend="cpu"),
         BackendError, ["cpu", "float64"]),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, words):
    with pytest.raises(error) as info:
        call()
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


@pytest.mark.parametrize(
    "args, words",
    [
        ((torch.arange(6).reshape(2, 3), None, 1.0, False), ["float32", "Long"]),
        ((torch.randn(2, 3), torch.ones(4, dtype=torch.bool), 1.0, False), ["broadcastable"]),
        ((torch.randn(2, 3), torch.ones(3, dtype=torch.int8), 1.0, False), ["mask must be bool"]),
        ((torch.randn(2, 3), None, float("inf"), False), ["scale must be finite"]),
    ],
)
def test_raw_operator_checks(args, words):
    with pytest.raises(RuntimeError) as info:
        torch.ops.fastattn.softmax(*args)
    for w in words:
        assert w in str(info.value)


def test_raw_backward_operator_checks():
    with pytest.raises(RuntimeError, match="must match out shape"):
        torch.ops.fastattn.softmax_backward(torch.randn(2, 3), torch.randn(2, 4), 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_opcheck_cpu(dtype, mask_kind):
    x = torch.randn(2, 3, 5, 37, dtype=dtype, requires_grad=True)
    mask = {"none": None, "bool": torch.rand(5, 37) < 0.8,
            "additive": torch.randn(1, 3, 1, 37, requires_grad=True)}[mask_kind]
    torch.library.opcheck(torch.ops.fastattn.softmax.default, (x, mask, 0.3, True))
    y = torch.softmax(torch.randn(4, 37, dtype=dtype), -1)
    torch.library.opcheck(torch.ops.fastattn.softmax_backward.default,
                          (torch.randn(4, 37, dtype=dtype), y, 0.3))


@pytest.mark.slow
def test_compile_fullgraph_cpu():
    def attention_probs(q, k, keep):
        scores = q @ k.transpose(-1, -2)
        return fastattn.softmax(scores, scale=q.shape[-1] ** -0.5, mask=keep, causal=True)

    q = torch.randn(2, 4, 16, 32, requires_grad=True)
    k = torch.randn(2, 4, 16, 32)
    keep = torch.rand(2, 1, 1, 16) < 0.9
    compiled = torch.compile(attention_probs, fullgraph=True)
    out = compiled(q, k, keep)
    eager = attention_probs(q, k, keep)
    torch.testing.assert_close(out, eager)
    (g,) = torch.autograd.grad(out.sum() + (out * out).sum(), q)
    (ge,) = torch.autograd.grad(eager.sum() + (eager * eager).sum(), q)
    torch.testing.assert_close(g, ge)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_compile_makes_the_backend_choice(dtype, monkeypatch):
    """The first call of a shape of call may happen inside torch.compile, including a
    fallback (float64 -> reference): the choice must trace without a graph break."""
    monkeypatch.setattr(fastattn.backends, "_choices", {})
    compiled = torch.compile(lambda t: fastattn.softmax(t, scale=0.5, causal=True), fullgraph=True)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    torch.testing.assert_close(compiled(x), fastattn.reference.softmax(x, scale=0.5, causal=True))


def test_backend_choice_and_explain():
    x = torch.randn(4, 8)
    assert fastattn.explain("softmax", x) == "softmax: backend 'cpu' (default for cpu tensors)"
    why64 = fastattn.explain("softmax", x.double())
    assert "'reference'" in why64 and "float64" in why64
    with fastattn.use_backend("reference"):
        assert "'reference'" in fastattn.explain("softmax", x)
        assert "'cpu'" in fastattn.explain("softmax", x, backend="cpu")
    assert "cpu" in fastattn.available_backends("softmax", "cpu")
    assert "cuda" not in fastattn.available_backends("softmax", "cpu")
    out64 = fastattn.softmax(x.double())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, torch.softmax(x.double(), -1))
    with pytest.raises(ValueError, match="backend must be one of"):
        with fastattn.use_backend("fast"):
            pass


@pytest.mark.parametrize("isa", ["avx2", "default"])
def test_cpu_kernel_isa_fallbacks(isa):
    """The CPU kernel is built per ISA; force the narrower builds (torch's ATEN_CPU_CAPABILITY)
    and check them against the reference in a fresh process."""
    code = (
        "import torch, fastattn\n"
        "from softmax_cases import reference64\n"
        "for dt in (torch.float32, torch.bfloat16, torch.float16):\n"
        "    for n in (1, 17, 100, 4097):\n"
        "        x = torch.randn(3, 5, n).to(dt); m = torch.rand(5, n) < 0.8\n"
        "        out = fastattn.softmax(x, scale=0.5, mask=m, causal=True)\n"
        "        err = (out.double() - reference64(x, 0.5, m, True)).abs().max().item()\n"
        "        assert err < {torch.float32: 1e-6}.get(dt, 1e-2), (dt, n, err)\n"
        "        y = torch.softmax(torch.randn(3, n), -1).to(dt); g = torch.randn(3, n).to(dt)\n"
        "        dx = torch.ops.fastattn.softmax_backward(g, y, 0.5).double()\n"
        "        yd, gd = y.double(), g.double()\n"
        "        ref = 0.5 * yd * (gd - (gd * yd).sum(-1, keepdim=True))\n"
        "        assert (dx - ref).abs().max().item() < {torch.float32: 1e-6}.get(dt, 2e-2)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(__file__), timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_under_autocast():
    """Under torch.autocast the scores arrive in bf16 while masks are often float32: the op
    takes both, computes in float32 and returns the scores' dtype (no cast rule is needed)."""
    q, k = torch.randn(2, 4, 16, 32), torch.randn(2, 4, 16, 32)
    bias = torch.zeros(2, 1, 1, 16).masked_fill(torch.rand(2, 1, 1, 16) < 0.2, float("-inf"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = q @ k.transpose(-1, -2)
        assert scores.dtype == torch.bfloat16
        p = fastattn.softmax(scores, scale=32**-0.5, mask=bias, causal=True)
    assert p.dtype == torch.bfloat16
    ref = fastattn.reference.softmax(scores.double(), scale=32**-0.5, mask=bias.double(), causal=True)
    assert (p.double() - ref).abs().max().item() <= 2.0**-7


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_opcheck_and_compile_gpu(backend, dtype):
    """opcheck and compile fullgraph on the GPU operators (the Triton operator cannot be
    opchecked in interpreter mode: its fake-tensor run touches data pointers)."""
    if backend == "triton":
        sys.modules["fastattn.ops.softmax"]._triton_softmax()  # defines the Triton operators
        op = torch.ops.fastattn.softmax_triton.default
        bwd = torch.ops.fastattn.softmax_backward_triton.default
    else:
        op, bwd = torch.ops.fastattn.softmax.default, torch.ops.fastattn.softmax_backward.default
    x = torch.randn(2, 3, 5, 300, device="cuda", dtype=dtype, requires_grad=True)
    keep = torch.rand(5, 300, device="cuda") < 0.8
    torch.library.opcheck(op, (x, keep, 0.3, True))
    y = torch.softmax(torch.randn(4, 300, device="cuda", dtype=dtype), -1)
    torch.library.opcheck(bwd, (torch.randn_like(y), y, 0.3))
    f = torch.compile(lambda t: fastattn.softmax(t, scale=0.3, mask=keep, causal=True,
                                                 backend=backend), fullgraph=True)
    torch.testing.assert_close(f(x), fastattn.softmax(x, scale=0.3, mask=keep, causal=True,
                                                      backend=backend))
