"""Shared by the norm tests: one call of each norm op on fastattn, on the float64 reference and
on PyTorch in the same dtype (the "PyTorch's own error" side of the tolerance rule)."""

import warnings

import torch
import torch.nn.functional as F

import fastattn

OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")


def has_bias(op: str) -> bool:
    return "layer" in op


def has_residual(op: str) -> bool:
    return op.startswith("add_")


def fastattn_call(op, x, residual, shape, weight, bias, eps, backend):
    """Outputs of fastattn.<op> as a tuple: (out,) or (out, x + residual)."""
    fn = getattr(fastattn, op)
    args = (x, residual) if has_residual(op) else (x,)
    kwargs = {"backend": backend}
    out = fn(*args, shape, weight, bias, eps, **kwargs) if has_bias(op) else \
        fn(*args, shape, weight, eps, **kwargs)
    return out if isinstance(out, tuple) else (out,)


def reference64(op, x, residual, shape, weight, bias, eps):
    """The float64 reference of the same call (differentiable)."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    fn = getattr(fastattn.reference, op)
    args = (d(x), d(residual)) if has_residual(op) else (d(x),)
    out = fn(*args, shape, d(weight), d(bias), eps) if has_bias(op) else \
        fn(*args, shape, d(weight), eps)
    return out if isinstance(out, tuple) else (out,)


def torch_call(op, x, residual, shape, weight, bias, eps):
    """What PyTorch computes for the same call in x's dtype."""
    s = x + residual if has_residual(op) else x
    with warnings.catch_warnings():  # rms_norm: "Mismatch dtype ... fused implementation"
        warnings.simplefilter("ignore")
        if has_bias(op):
            out = F.layer_norm(s, shape, weight, bias, eps)
        else:
            out = F.rms_norm(s, shape, weight, eps)
    return (out, s) if has_residual(op) else (out,)
