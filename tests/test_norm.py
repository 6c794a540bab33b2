"""fastattn.layer_norm / rms_norm / add_layer_norm / add_rms_norm on every backend that runs
here against the float64 reference, forward and backward (x, residual, weight and bias), within
2x of PyTorch's own error (tests/tolerances.py)."""

import pytest
import torch

from conftest import backend_params
from norm_cases import OPS, fastattn_call, has_bias, has_residual, reference64, torch_call
from tolerances import assert_within_torch_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (x shape, normalized_shape): N = 1, primes, a multi-dim normalized_shape, tile boundaries
# + 1, beyond the register paths, 65536.
SHAPES = [((1,), (1,)), ((7, 1), (1,)), ((3, 13), (13,)), ((2, 3, 17, 31), (31,)),
          ((2, 3, 4, 5), (4, 5)), ((5, 4097), (4097,)), ((2, 9000), (9000,)),
          ((2, 65536), (65536,))]


def interpreted(backend, device):
    return backend == "triton" and device == "cpu"


def _inputs(op, x_shape, shape, dtype, device, *, weight=True, bias=True, param_dtype=None,
            requires_grad=False):
    """x, residual, weight, bias for a call; x ~ N(0.5, 2) so the mean matters."""
    pdt = param_dtype or dtype
    x = (torch.randn(x_shape, device=device) * 2 + 0.5).to(dtype).requires_grad_(requires_grad)
    residual = None
    if has_residual(op):
        residual = torch.randn(x_shape, device=device).to(dtype).requires_grad_(requires_grad)
    w = (torch.randn(shape, device=device) + 1).to(pdt).requires_grad_(requires_grad) \
        if weight else None
    b = torch.randn(shape, device=device).to(pdt).requires_grad_(requires_grad) \
        if bias and has_bias(op) else None
    return x, residual, w, b


def _check(op, backend, device, dtype, x_shape, shape, *, backward=False, eps=1e-5, **kw):
    x, residual, w, b = _inputs(op, x_shape, shape, dtype, device, requires_grad=backward, **kw)
    got = fastattn_call(op, x, residual, shape, w, b, eps, backend)
    ref = reference64(op, x, residual, shape, w, b, eps)
    theirs = torch_call(op, x, residual, shape, w, b, eps)
    what = f"{op} {backend} {tuple(x_shape)} {dtype} weight={w is not None} bias={b is not None}"
    for name, g, r, t in zip(("out", "x + residual"), got, ref, theirs):
        assert g.dtype == dtype and g.shape == x.shape and g.is_contiguous()
        assert_within_torch_error(g, r, t, f"{what} {name}",
                                  interpreted=interpreted(backend, device))
    if not backward:
        return
    inputs = [t for t in (x, residual, w, b) if t is not None]
    names = [n for n, t in zip(("x", "residual", "weight", "bias"), (x, residual, w, b))
             if t is not None]
    grads = [torch.randn_like(g) for g in got]
    g_got = torch.autograd.grad(got, inputs, grads)
    g_ref = torch.autograd.grad(ref, inputs, [g.double() for g in grads])
    g_theirs = torch.autograd.grad(theirs, inputs, grads)
    for name, inp, g, r, t in zip(names, inputs, g_got, g_ref, g_theirs):
        assert g.dtype == inp.dtype and g.shape == inp.shape, f"{what} grad {name}"
        assert_within_torch_error(g, r, t, f"{what} grad {name}", dtype=dtype,
                                  interpreted=interpreted(backend, device), ulps=2)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("x_shape,shape", SHAPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_forward(op, backend, device, dtype, x_shape, shape):
    _check(op, backend, device, dtype, x_shape, shape)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("x_shape,shape", [((3, 13), (13,)), ((2, 3, 4, 5), (4, 5)),
                                           ((5, 4097), (4097,)), ((2, 9000), (9000,))], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_backward(op, backend, device, dtype, x_shape, shape):
    _check(op, backend, device, dtype, x_shape, shape, backward=True)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("params", ["none", "weight", "bias", "float32"])
def test_parameter_combinations(op, backend, device, params):
    """weight and/or bias absent, and float32 parameters with bfloat16 x (as torch allows)."""
    if params == "bias" and not has_bias(op):
        pytest.skip("rms_norm has no bias")
    kw = {"none": dict(weight=False, bias=False), "weight": dict(bias=False),
          "bias": dict(weight=False), "float32": dict(param_dtype=torch.float32)}[params]
    dtype = torch.bfloat16 if params == "float32" else torch.float32
    _check(op, backend, device, dtype, (6, 300), (300,), backward=True, **kw)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("op", OPS)
def test_noncontiguous_input(op, backend, device):
    base = torch.randn(4, 40, 33, device=device)
    for x in (base.transpose(1, 2), base[:, ::2, :]):
        assert not x.is_contiguous()
        n = x.shape[-1]
        w, b = torch.randn(n, device=device), torch.randn(n, device=device)
        residual = torch.randn_like(x).transpose(0, 1).contiguous().transpose(0, 1) \
            if has_residual(op) else None
        got = fastattn_call(op, x, residual, (n,), w, b, 1e-5, backend)
        ref = reference64(op, x, residual, (n,), w, b, 1e-5)
        theirs = torch_call(op, x, residual, (n,), w, b, 1e-5)
        for g, r, t in zip(got, ref, theirs):
            assert_within_torch_error(g, r, t, f"{op} strides {x.stride()}",
                                      interpreted=interpreted(backend, device))


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_hard_statistics(op, backend, device, dtype):
    """A large mean offset with small noise (1e4 + 1e-2 * noise in float32; 100 + noise in the
    half types, which cannot hold 1e4 + 1e-2), a constant row (variance 0: out = bias), a
    row of zeros, and small noise whose first columns are outliers (a kernel that shifts by
    the first values must notice); forward and gradients."""
    offset, noise = (1e4, 1e-2) if dtype == torch.float32 else (100.0, 1.0)
    x = (offset + noise * torch.randn(5, 2000, device=device)).to(dtype)
    x[1] = 3.0
    x[2] = 0.0
    x[3] = (noise * torch.randn(2000, device=device)).to(dtype)
    x[3, :40] = offset
    x.requires_grad_()
    w = torch.randn(2000, device=device, dtype=dtype)
    b = torch.randn(2000, device=device, dtype=dtype) if has_bias(op) else None
    got = fastattn_call(op, x, None, (2000,), w, b, 1e-5, backend)
    ref = reference64(op, x, None, (2000,), w, b, 1e-5)
    theirs = torch_call(op, x, None, (2000,), w, b, 1e-5)
    assert_within_torch_error(got[0], ref[0], theirs[0], f"{op} offset/constant rows",
                              interpreted=interpreted(backend, device))
    grad = torch.randn_like(got[0])
    (gx,) = torch.autograd.grad(got, x, grad)
    (rx,) = torch.autograd.grad(ref, x, grad.double())
    (tx,) = torch.autograd.grad(theirs, x, grad)
    assert_within_torch_error(gx, rx, tx, f"{op} offset/constant rows grad x",
                              interpreted=interpreted(backend, device), ulps=2)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("op", OPS)
def test_degenerate_shapes(op, backend, device):
    """Empty batches (the weight gradient of no rows is 0) and an empty normalized dim."""
    for x_shape, shape in [((0, 16), (16,)), ((2, 0, 7), (7,)), ((3, 0), (0,))]:
        x, residual, w, b = _inputs(op, x_shape, shape, torch.float32, device,
                                    requires_grad=True)
        got = fastattn_call(op, x, residual, shape, w, b, 1e-5, backend)
        assert got[0].shape == x.shape
        inputs = [t for t in (x, residual, w, b) if t is not None]
        grads = torch.autograd.grad(got[0].sum(), inputs)
        for g, t in zip(grads, inputs):
            assert g.shape == t.shape and (g == 0).all()


@pytest.mark.parametrize("backend,device", backend_params())
def test_gradients_of_both_outputs(backend, device):
    """add_rms_norm: a loss on the normed output only, on x + residual only, and on both."""
    x, residual, w, _ = _inputs("add_rms_norm", (5, 64), (64,), torch.float32, device,
                                requires_grad=True)
    for use in ("normed", "sum", "both"):
        out, s = fastattn_call("add_rms_norm", x, residual, (64,), w, None, 1e-6, backend)
        ref_out, ref_s = reference64("add_rms_norm", x, residual, (64,), w, None, 1e-6)
        loss = {"normed": lambda o, t: o.square().sum(), "sum": lambda o, t: (t * t).sum(),
                "both": lambda o, t: o.square().sum() + t.sin().sum()}[use]
        gx, gr, gw = torch.autograd.grad(loss(out, s), [x, residual, w], allow_unused=True)
        rx, rr, rw = torch.autograd.grad(loss(ref_out, ref_s), [x, residual, w],
                                         allow_unused=True)
        torch.testing.assert_close(gx, rx.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gr, rr.float(), rtol=1e-5, atol=1e-5)
        if use == "sum":
            assert gw is None or (gw == 0).all()
        else:
            torch.testing.assert_close(gw, rw.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", backend_params())
def test_weight_gradient_is_deterministic(backend, device):
    x = torch.randn(300, 257, device=device, requires_grad=True)
    w = torch.randn(257, device=device, requires_grad=True)
    b = torch.randn(257, device=device, requires_grad=True)
    grad = torch.randn(300, 257, device=device)
    first = None
    for _ in range(3):
        out = fastattn_call("layer_norm", x, None, (257,), w, b, 1e-5, backend)[0]
        gs = torch.autograd.grad(out, [x, w, b], grad)
        if first is None:
            first = gs
        for g, f in zip(gs, first):
            assert torch.equal(g, f)
