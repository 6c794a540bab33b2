"""fastattn.softmax on every backend that runs here against the float64 reference, forward and
backward, within 2x of PyTorch's own error (tests/tolerances.py)."""

import pytest
import torch

import fastattn
from conftest import backend_params
from softmax_cases import MASK_KINDS, make_mask, reference64, torch_softmax
from tolerances import assert_within_torch_error



def interpreted(backend, device):
    return backend == "triton" and device == "cpu"


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# 1 column, primes, a tile boundary + 1, the register/single-pass limits and beyond, 65536.
SHAPES = [(1,), (7, 1), (3, 13), (2, 3, 17, 31), (5, 4097), (2, 9000), (2, 65536)]


def _check_forward(backend, device, dtype, shape, mask_kind, causal, scale=0.37):
    x = torch.randn(shape, device=device, dtype=dtype) * 3
    mask = make_mask(mask_kind, x)
    out = fastattn.softmax(x, scale=scale, mask=mask, causal=causal, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    ref = reference64(x, scale, mask, causal)
    assert_within_torch_error(out, ref, torch_softmax(x, scale, mask, causal),
                              f"softmax {backend} {shape} mask={mask_kind} causal={causal}",
                              interpreted=interpreted(backend, device))


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_shapes(backend, device, dtype, shape):
    causal = len(shape) >= 2
    _check_forward(backend, device, dtype, shape, "bool", causal)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forward_masks(backend, device, dtype, mask_kind, causal):
    _check_forward(backend, device, dtype, (2, 3, 19, 45), mask_kind, causal)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 13), (2, 3, 17, 31), (3, 4097), (1, 9000)], ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "add_f32"])
def test_backward(backend, device, dtype, shape, mask_kind):
    scale, causal = 0.61, True
    x = (torch.randn(shape, device=device, dtype=dtype) * 2).requires_grad_()
    mask = make_mask(mask_kind, x, requires_grad=mask_kind == "add_f32")
    grad = torch.randn(shape, device=device, dtype=dtype)
    inputs = [x] + ([mask] if mask is not None and mask.requires_grad else [])

    out = fastattn.softmax(x, scale=scale, mask=mask, causal=causal, backend=backend)
    got = torch.autograd.grad(out, inputs, grad)
    ref = torch.autograd.grad(reference64(x, scale, mask, causal), inputs, grad.double())
    theirs = torch.autograd.grad(torch_softmax(x, scale, mask, causal), inputs, grad)
    assert got[0].dtype == dtype
    if len(got) == 2:
        assert got[1].dtype == mask.dtype and got[1].shape == mask.shape
    for name, g, r, t in zip(["grad x", "grad mask"], got, ref, theirs):
        assert_within_torch_error(g, r, t, f"{name} {backend} {shape} {mask_kind}", dtype=dtype,
                                  interpreted=interpreted(backend, device), ulps=2)


@pytest.mark.parametrize("backend,device", backend_params())
def test_noncontiguous_and_other_dims(backend, device):
    base = torch.randn(4, 33, 20, device=device)
    for x, dim in [(base.transpose(1, 2), -1), (base[:, ::2, :], -1), (base, 1), (base, 0)]:
        assert not x.is_contiguous() or dim != -1
        mask = torch.rand(x.shape[dim], device=device) < 0.7
        mask_b = mask.reshape([-1 if d == dim % x.dim() else 1 for d in range(x.dim())])
        out = fastattn.softmax(x, dim, scale=0.5, mask=mask_b, backend=backend)
        ref = fastattn.reference.softmax(x.double(), dim, scale=0.5, mask=mask_b)
        theirs = torch.softmax((x * 0.5).masked_fill(~mask_b, float("-inf")), dim)
        assert_within_torch_error(out, ref, theirs, f"dim={dim} strides={x.stride()}",
                                  interpreted=interpreted(backend, device))


@pytest.mark.parametrize("backend,device", backend_params())
def test_noncontiguous_masks(backend, device):
    """Masks that are transposed or strided views, and a rank-5 broadcast whose dims do not
    merge into the kernels' (B, H, M, N) view (the op copies it)."""
    x = torch.randn(2, 3, 4, 5, 24, device=device)
    keep = (torch.rand(24, 5, device=device) < 0.8).t()  # (5, 24), column-major
    add = torch.randn(2, 1, 4, 1, 48, device=device)[..., ::2]  # (2, 1, 4, 1, 24), strided
    for mask in (keep, add):
        out = fastattn.softmax(x, scale=0.7, mask=mask, causal=True, backend=backend)
        ref = reference64(x, 0.7, mask, True)
        assert_within_torch_error(out, ref, torch_softmax(x, 0.7, mask, True),
                                  f"mask strides {mask.stride()}", interpreted=interpreted(backend, device))


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows_are_zero(backend, device, dtype):
    x = torch.randn(3, 5, 300, device=device, dtype=dtype, requires_grad=True)
    keep = torch.rand(3, 5, 300, device=device) < 0.5
    keep[0, 1] = False  # bool-masked row
    add = torch.zeros(5, 300, device=device)
    add[2] = float("-inf")  # additively masked row
    for mask in (keep, add):
        out = fastattn.softmax(x, mask=mask, backend=backend)
        assert not torch.isnan(out).any()
        dead = out[0, 1] if mask is keep else out[:, 2]
        assert (dead == 0).all()
        (gx,) = torch.autograd.grad(out, x, torch.randn_like(out))
        assert not torch.isnan(gx).any()
        assert ((gx[0, 1] if mask is keep else gx[:, 2]) == 0).all()


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_logits(backend, device, dtype):
    x = torch.randn(4, 257, device=device) * 1e4
    x[0, 3] = 1e4
    x[1] = -1e4
    x = x.to(dtype)
    out = fastattn.softmax(x, backend=backend)
    ref = fastattn.reference.softmax(x.double())
    assert_within_torch_error(out, ref, torch.softmax(x, -1), "logits of magnitude 1e4",
                              interpreted=interpreted(backend, device))


@pytest.mark.parametrize("backend,device", backend_params())
def test_degenerate_shapes(backend, device):
    scalar = torch.tensor(3.0, device=device)
    assert fastattn.softmax(scalar, backend=backend).item() == 1.0
    for shape in [(0, 16), (2, 0, 5, 7), (4, 0)]:
        x = torch.randn(shape, device=device)
        causal = len(shape) >= 2
        out = fastattn.softmax(x, causal=causal, backend=backend)
        assert out.shape == x.shape
    one = fastattn.softmax(torch.randn(3, 1, device=device), causal=True, backend=backend)
    assert (one == 1).all()


def test_dtype_argument_casts_first():
    x = torch.randn(4, 10, dtype=torch.float64)
    out = fastattn.softmax(x, dtype=torch.float32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.softmax(x, -1, dtype=torch.float32))


def test_module():
    m = fastattn.nn.Softmax(dim=-1, scale=0.5, causal=True)
    x = torch.randn(2, 6, 6)
    torch.testing.assert_close(m(x), fastattn.reference.softmax(x, scale=0.5, causal=True))
    assert "causal=True" in repr(m)


@pytest.mark.parametrize("backend,device", backend_params())
def test_nan_input_gives_nan_row(backend, device):
    """NaN propagates to its whole row, as in torch.softmax; other rows are untouched."""
    for n in (5, 300, 9000):
        x = torch.randn(3, n, device=device)
        x[1, n // 2] = float("nan")
        out = fastattn.softmax(x, backend=backend)
        assert torch.isnan(out[1]).all()
        assert not torch.isnan(out[0]).any() and not torch.isnan(out[2]).any()
