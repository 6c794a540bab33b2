"""What LayerNorm and RMSNorm share: argument checks, fake (meta) kernels, autograd, backend
choice and the call into an operator. The public functions live in layer_norm.py and
rms_norm.py.

Operators (schemas in kernels/registration.cpp), normalizing over the last dim:
  fastattn::layer_norm(x, residual, weight, bias, eps) -> (out, residual_out, mean, rstd)
  fastattn::rms_norm(x, residual, weight, eps) -> (out, residual_out, rstd)
  fastattn::layer_norm_backward / rms_norm_backward   CPU and CUDA kernels (C++)
  fastattn::<op>_triton / <op>_backward_triton         Triton (kernels/triton/norm.py)
The public functions check the arguments, view x as (..., N) with N = prod(normalized_shape),
pick a backend and call one operator.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from .. import _library, backends

OPS = ("layer_norm", "rms_norm")


# ---- fake (meta) kernels ------------------------------------------------------------------------

def _fake_common(op, x, residual, weight, bias, eps):
    torch._check(x.dtype in backends.KERNEL_DTYPES,
                 lambda: f"fastattn.{op}: x must be float32, float16 or bfloat16, got {x.dtype}")
    torch._check(x.dim() >= 1, lambda: f"fastattn.{op}: x must have at least 1 dim")
    torch._check(math.isfinite(eps) and eps > 0,
                 lambda: f"fastattn.{op}: eps must be a finite number > 0, got {eps}")
    n = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            torch._check(p.dim() == 1 and p.shape[0] == n,
                         lambda: f"fastattn.{op}: {name} must have shape ({n},)")
    if residual is not None:
        torch._check(residual.shape == x.shape and residual.dtype == x.dtype,
                     lambda: f"fastattn.{op}: residual must have x's shape and dtype")
    rows = x.numel() // n if n != 0 else 0
    res_out = x.new_empty(x.shape) if residual is not None else x.new_empty((0,))
    return x.new_empty(x.shape), res_out, x.new_empty((rows,), dtype=torch.float32)


def _fake_layer_norm(x, residual, weight, bias, eps):
    out, res_out, rstd = _fake_common("layer_norm", x, residual, weight, bias, eps)
    return out, res_out, torch.empty_like(rstd), rstd


def _fake_rms_norm(x, residual, weight, eps):
    return _fake_common("rms_norm", x, residual, weight, None, eps)


def _fake_grads(grad_out, input, weight, has_bias):
    torch._check(grad_out.shape == input.shape,
                 lambda: f"fastattn norm backward: grad_out shape {tuple(grad_out.shape)} must "
                         f"match input shape {tuple(input.shape)}")
    n = input.shape[-1]
    pdtype = weight.dtype if weight is not None else input.dtype
    gw = input.new_empty((n,) if weight is not None else (0,), dtype=pdtype)
    gb = input.new_empty((n,) if has_bias else (0,), dtype=pdtype)
    return input.new_empty(input.shape), gw, gb


def _fake_layer_norm_backward(grad_out, grad_residual_out, input, weight, mean, rstd, has_bias):
    return _fake_grads(grad_out, input, weight, has_bias)


def _fake_rms_norm_backward(grad_out, grad_residual_out, input, weight, rstd):
    return _fake_grads(grad_out, input, weight, False)[:2]


# ---- autograd ------------------------------------------------------------------------------------

def _setup_layer_norm(ctx, inputs, output):
    x, residual, weight, bias, eps = inputs
    out, residual_out, mean, rstd = output
    _save(ctx, x, residual, weight, bias, residual_out, mean, rstd)


def _setup_rms_norm(ctx, inputs, output):
    x, residual, weight, eps = inputs
    out, residual_out, rstd = output
    _save(ctx, x, residual, weight, None, residual_out, None, rstd)


def _save(ctx, x, residual, weight, bias, residual_out, mean, rstd):
    ctx.has_residual = residual is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(*(t for t in (mean, rstd) if t is not None))
    normalized = residual_out if residual is not None else x  # what the op normalized
    ctx.save_for_backward(normalized, weight, mean, rstd)


def _grads(ctx, grad_out, grad_residual_out, backward_op, rms):
    """(grad x, grad residual, grad weight, grad bias) from the backward operator."""
    normalized, weight, mean, rstd = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(normalized)
    gres = grad_residual_out if ctx.has_residual else None
    if rms:
        gx, gw = backward_op(grad_out, gres, normalized, weight, rstd)
        gb = None
    else:
        gx, gw, gb = backward_op(grad_out, gres, normalized, weight, mean, rstd,
                                 ctx.bias_dtype is not None)
        gb = gb.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
    gw = gw if weight is not None else None
    # x and residual get the same gradient (s = x + residual); autograd copies a gradient
    # tensor before accumulating into it when another reference exists, so sharing is safe.
    gr = gx if ctx.has_residual and ctx.needs_input_grad[1] else None
    return gx, gr, gw, gb


def _layer_norm_autograd(backward_op):
    def backward(ctx, grad_out, grad_residual_out, _grad_mean, _grad_rstd):
        gx, gr, gw, gb = _grads(ctx, grad_out, grad_residual_out, backward_op, rms=False)
        return gx, gr, gw, gb, None
    return backward


def _rms_norm_autograd(backward_op):
    def backward(ctx, grad_out, grad_residual_out, _grad_rstd):
        gx, gr, gw, _ = _grads(ctx, grad_out, grad_residual_out, backward_op, rms=True)
        return gx, gr, gw, None
    return backward


_AUTOGRAD = {"layer_norm": (_layer_norm_autograd, _setup_layer_norm),
             "rms_norm": (_rms_norm_autograd, _setup_rms_norm)}

for _op in OPS:
    for _key in ("CPU", "CUDA"):
        _library.has_kernel(_op, _key)
if _library.has_kernel("layer_norm", "CPU"):  # the schemas exist (every build has CPU kernels)
    torch.library.register_fake("fastattn::layer_norm")(_fake_layer_norm)
    torch.library.register_fake("fastattn::rms_norm")(_fake_rms_norm)
    torch.library.register_fake("fastattn::layer_norm_backward")(_fake_layer_norm_backward)
    torch.library.register_fake("fastattn::rms_norm_backward")(_fake_rms_norm_backward)
    for _op, (_make, _setup) in _AUTOGRAD.items():
        torch.library.register_autograd(
            f"fastattn::{_op}", _make(getattr(torch.ops.fastattn, f"{_op}_backward").default),
            setup_context=_setup)

_triton_ops: dict[str, object] = {}


def triton_op(op: str):
    """fastattn::<op>_triton, imported (and Triton with it) on first use."""
    if op not in _triton_ops:
        from .._triton import norm as kernels

        for name, (make, setup) in _AUTOGRAD.items():
            torch.library.register_autograd(
                f"fastattn::{name}_triton", make(getattr(kernels, f"{name}_backward_triton")),
                setup_context=setup)
            _triton_ops[name] = getattr(kernels, f"{name}_triton")
    return _triton_ops[op]


# ---- argument checks -----------------------------------------------------------------------------

def normalized_dims(op: str, x: torch.Tensor, normalized_shape) -> tuple[int, ...]:
    """normalized_shape as a tuple of ints (an int means (int,)), checked against x."""
    if type(normalized_shape) is int:  # fast paths first: this runs on every call
        shape = (normalized_shape,)
    elif type(normalized_shape) in (tuple, torch.Size) and all(
            type(d) is int for d in normalized_shape):
        shape = tuple(normalized_shape)
    elif isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        shape = (int(normalized_shape),)
    elif isinstance(normalized_shape, Sequence) and all(
            isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in normalized_shape):
        shape = tuple(int(d) for d in normalized_shape)
    else:
        raise TypeError(f"fastattn.{op}: normalized_shape must be an int or a sequence of ints, "
                        f"got {normalized_shape!r}")
    if not shape:
        raise ValueError(f"fastattn.{op}: normalized_shape must have at least one dim, got ()")
    if len(shape) > x.dim() or x.shape[x.dim() - len(shape):] != shape:
        raise ValueError(f"fastattn.{op}: normalized_shape {shape} must match the trailing dims "
                         f"of x, whose shape is {tuple(x.shape)}")
    return shape


def check_param(op: str, name: str, p, x: torch.Tensor, shape: tuple[int, ...]) -> None:
    """weight/bias: None or a tensor of shape normalized_shape, float32 or x's dtype, on x's
    device (torch itself rejects other mixes, e.g. a bfloat16 weight with a float32 x)."""
    if p is None:
        return
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"fastattn.{op}: {name} must be a torch.Tensor or None, got "
                        f"{type(p).__name__}")
    if tuple(p.shape) != shape:
        raise ValueError(f"fastattn.{op}: {name} must have shape normalized_shape {shape}, got "
                         f"{tuple(p.shape)}")
    if p.dtype != x.dtype and p.dtype != torch.float32:
        raise TypeError(f"fastattn.{op}: {name} must be float32 or x's dtype {x.dtype}, got "
                        f"{p.dtype}")
    if p.device != x.device:
        raise ValueError(f"fastattn.{op}: {name} is on {p.device} but x is on {x.device}")


def check_inputs(op: str, x, residual, normalized_shape, weight, bias, eps) -> tuple[int, ...]:
    """Checks every argument of a norm call (cheapest first); returns normalized_shape."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fastattn.{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"fastattn.{op}: x must be a floating tensor, got {x.dtype}")
    shape = normalized_dims(op, x, normalized_shape)
    if type(eps) is not float and (isinstance(eps, bool) or not isinstance(eps, numbers.Real)) \
            or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"fastattn.{op}: eps must be a finite number > 0, got {eps!r}")
    check_param(op, "weight", weight, x, shape)
    check_param(op, "bias", bias, x, shape)
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(f"fastattn.{op}: weight and bias must have the same dtype, got "
                        f"{weight.dtype} and {bias.dtype}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"fastattn.{op}: residual must be a torch.Tensor, got "
                            f"{type(residual).__name__}")
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"fastattn.{op}: residual must have x's shape {tuple(x.shape)} and "
                             f"dtype {x.dtype}, got {tuple(residual.shape)} {residual.dtype}")
        if residual.device != x.device:
            raise ValueError(f"fastattn.{op}: residual is on {residual.device} but x is on "
                             f"{x.device}")
    return shape


def choose(op: str, x: torch.Tensor, backend: str | None) -> backends.Choice:
    """The backend for a call: only x's device and dtype matter (every kernel takes float32
    or x-dtype parameters, with or without residual, weight and bias)."""
    return backends.choose(op, backend, x.device,
                           lambda name: backends.device_error(name, op, x.device, x.dtype),
                           (x.dtype,))


# ---- the call ------------------------------------------------------------------------------------

_CPP_OPS = {}


def run(op: str, choice: backends.Choice, x, residual, shape, weight, bias, eps):
    """Calls fastattn::<op> (or its Triton twin) on x viewed as (..., N); returns
    (out, residual_out or None) in x's shape."""
    if len(shape) == 1:  # already (..., N)
        x2, r2, w, b = x, residual, weight, bias
    else:
        n = math.prod(shape)
        lead = x.shape[:x.dim() - len(shape)]
        x2 = x.reshape(*lead, n)  # (..., N)
        r2 = None if residual is None else residual.reshape(*lead, n)  # (..., N)
        w = None if weight is None else weight.reshape(n)  # (N,)
        b = None if bias is None else bias.reshape(n)  # (N,)
    if choice.backend == "triton":
        fn = triton_op(op)
    else:
        fn = _CPP_OPS.get(op) or _CPP_OPS.setdefault(op, getattr(torch.ops.fastattn, op).default)
    args = (x2, r2, w, b, eps) if op == "layer_norm" else (x2, r2, w, eps)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or (residual is not None and residual.requires_grad)
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad))
    outs = fn(*args) if needs_grad else _library.call_without_autograd(fn, *args)
    if len(shape) == 1:
        return outs[0], (None if residual is None else outs[1])
    return outs[0].view(x.shape), (None if residual is None else outs[1].view(x.shape))
