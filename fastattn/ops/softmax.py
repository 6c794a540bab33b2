"""fastattn.softmax: the fused attention-probability softmax, softmax(scale * x + mask).

Operators (schemas in kernels/registration.cpp):
  fastattn::softmax(x, mask, scale, causal)            CPU and CUDA kernels (C++)
  fastattn::softmax_backward(grad_out, out, scale)     CPU and CUDA kernels (C++)
  fastattn::softmax_triton / softmax_backward_triton   Triton (kernels/triton/softmax.py)
The raw operators take the softmax over the last dim; `softmax()` below validates, moves `dim`
last when needed, picks the backend and calls one of them.
"""

from __future__ import annotations

import math
import numbers

import torch

from .. import _library, backends, reference

_KERNEL_DTYPES = backends.KERNEL_DTYPES


# ---- operator registrations: fake (meta) kernels and autograd ---------------------------------

def _fake_softmax(x, mask, scale, causal):
    torch._check(x.dtype in _KERNEL_DTYPES,
                 lambda: f"fastattn.softmax: x must be float32, float16 or bfloat16, got {x.dtype}")
    torch._check(x.dim() >= 1, lambda: "fastattn.softmax: x must have at least 1 dim")
    return x.new_empty(x.shape)  # the kernels return a contiguous tensor


def _fake_softmax_backward(grad_out, out, scale):
    torch._check(grad_out.shape == out.shape,
                 lambda: f"fastattn.softmax_backward: grad_out shape {tuple(grad_out.shape)} "
                         f"must match out shape {tuple(out.shape)}")
    return out.new_empty(out.shape)


def _setup_context(ctx, inputs, output):
    x, mask, scale, causal = inputs
    ctx.scale = scale
    ctx.mask_shape = mask.shape if mask is not None else None
    ctx.mask_dtype = mask.dtype if mask is not None else None
    ctx.save_for_backward(output)


def _autograd_for(backward_op):
    """Autograd formula shared by the C++ and Triton operators: with p = softmax(z),
    z = scale * x + mask, dz = p * (dp - sum(dp * p)); dx = scale * dz; dmask = dz summed over
    the dims the mask was broadcast along."""

    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        need_x, need_mask = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = grad_mask = None
        if need_mask:
            dz = backward_op(grad, out, 1.0)
            grad_mask = dz.sum_to_size(ctx.mask_shape).to(ctx.mask_dtype)
            if need_x:
                grad_x = dz * ctx.scale
        elif need_x:
            grad_x = backward_op(grad, out, ctx.scale)
        return grad_x, grad_mask, None, None

    return backward


for _key in ("CPU", "CUDA"):
    _library.has_kernel("softmax", _key)
if _library.load_error() is None:
    torch.library.register_fake("fastattn::softmax")(_fake_softmax)
    torch.library.register_fake("fastattn::softmax_backward")(_fake_softmax_backward)
    torch.library.register_autograd(
        "fastattn::softmax", _autograd_for(torch.ops.fastattn.softmax_backward),
        setup_context=_setup_context)

_triton_ops = None


def _triton_softmax():
    """fastattn::softmax_triton, imported (and Triton with it) on first use."""
    global _triton_ops
    if _triton_ops is None:
        from .._triton import softmax as kernels

        torch.library.register_autograd(
            "fastattn::softmax_triton", _autograd_for(kernels.softmax_backward_triton),
            setup_context=_setup_context)
        _triton_ops = kernels.softmax_triton
    return _triton_ops


# ---- the public function -----------------------------------------------------------------------

def _validate(x, dim, scale, mask, causal, dtype):
    """Checks the arguments; returns (x cast to dtype, dim in [0, x.dim()), scale as float)."""
    if not isinstance(x, torch.Tensor):  # checks ordered cheapest first: this runs every call
        raise TypeError(f"fastattn.softmax: x must be a torch.Tensor, got {type(x).__name__}")
    if dtype is not None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"fastattn.softmax: dtype must be a floating torch.dtype, got {dtype!r}")
        x = x.to(dtype)
    if not x.is_floating_point():
        raise TypeError(f"fastattn.softmax: x must be a floating tensor, got {x.dtype}")
    nd = max(x.dim(), 1)
    if isinstance(dim, bool) or not isinstance(dim, int) or not -nd <= dim < nd:
        raise IndexError(f"fastattn.softmax: dim must be an int in [{-nd}, {nd - 1}] for x with "
                         f"shape {tuple(x.shape)}, got {dim!r}")
    dim %= nd
    if scale is None:
        scale = 1.0
    elif type(scale) is not float and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)) \
            or not math.isfinite(scale):
        raise TypeError(f"fastattn.softmax: scale must be a finite real number, got {scale!r}")
    if causal:
        if x.dim() < 2:
            raise ValueError("fastattn.softmax: causal=True masks over the last two dims; x must "
                             f"have at least 2 dims, got shape {tuple(x.shape)}")
        if dim != x.dim() - 1:
            raise ValueError(f"fastattn.softmax: causal=True needs dim=-1, got dim={dim}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"fastattn.softmax: mask must be a torch.Tensor or None, got "
                            f"{type(mask).__name__}")
        if mask.dtype != torch.bool and mask.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"fastattn.softmax: mask must be bool (True = keep) or additive with "
                            f"dtype float32 or x's dtype {x.dtype}, got {mask.dtype}")
        if mask.device != x.device:
            raise ValueError(f"fastattn.softmax: mask is on {mask.device} but x is on {x.device}")
        ms, xs = tuple(mask.shape), tuple(x.shape)
        ok = len(ms) <= len(xs)
        for m, s in zip(ms, xs[len(xs) - len(ms):]):
            ok = ok and (m == s or m == 1)
        if not ok:
            raise ValueError(f"fastattn.softmax: mask with shape {ms} is not broadcastable to x's "
                             f"shape {xs}")
    return x, dim, float(scale)


def _plan(x, dim=-1, *, scale=None, mask=None, causal=False, dtype=None, backend=None):
    x, dim, scale = _validate(x, dim, scale, mask, causal, dtype)
    # Every backend takes every mask _validate lets through; only x's device and dtype matter.
    choice = backends.choose(
        "softmax", backend, x.device,
        lambda name: backends.device_error(name, "softmax", x.device, x.dtype), (x.dtype,))
    return choice, x, dim, scale


def softmax(x: torch.Tensor, dim: int = -1, *, scale: float | None = None,
            mask: torch.Tensor | None = None, causal: bool = False,
            dtype: torch.dtype | None = None, backend: str | None = None) -> torch.Tensor:
    """Fused softmax(scale * x + mask) along `dim`, computed in float32 whatever x's dtype.

    Args:
      x: (..., N) float32, float16 or bfloat16 (float64 runs on the reference backend).
      dim: the dim to normalise over (default the last).
      scale: multiplies x before the mask is applied (default 1.0).
      mask: bool (True = keep) or additive (float32 or x's dtype), broadcastable to x; an
        additive mask that requires grad gets its gradient.
      causal: also mask column j of row i over the last two dims when j > i (top-left
        aligned, like `is_causal` of F.scaled_dot_product_attention); needs dim=-1.
      dtype: cast x to this dtype first (as torch.softmax's `dtype`).
      backend: "cpu", "cuda", "triton" or "reference" to force one (see fastattn.backends).

    Returns:
      Probabilities with x's shape and (after `dtype`) x's dtype. A row whose every entry is
      masked is all zeros, with zero gradient (torch's composition would give NaN).
    """
    choice, x, dim, scale = _plan(x, dim, scale=scale, mask=mask, causal=causal, dtype=dtype,
                                  backend=backend)
    if choice.backend == "reference":
        return reference.softmax(x, dim, scale=scale, mask=mask, causal=causal)
    squeeze = x.dim() == 0
    last = x.dim() - 1
    if squeeze:
        x = x.reshape(1)
    elif dim != last:
        if mask is not None:
            mask = mask.expand(x.shape).movedim(dim, -1)
        x = x.movedim(dim, -1)
    op = _triton_softmax() if choice.backend == "triton" else torch.ops.fastattn.softmax.default
    if torch.is_grad_enabled() and (x.requires_grad or (mask is not None and mask.requires_grad)):
        out = op(x, mask, scale, causal)
    else:
        out = _library.call_without_autograd(op, x, mask, scale, causal)
    if squeeze:
        return out.reshape(())
    return out.movedim(-1, dim) if dim != last else out


backends.register_planner("softmax", lambda *a, **k: _plan(*a, **k)[0])
