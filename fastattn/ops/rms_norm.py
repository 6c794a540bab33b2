"""fastattn.rms_norm and fastattn.add_rms_norm: fused RMSNorm (forward and backward kernels on
every backend), optionally with the pre-norm residual add fused in.
Operators and shared plumbing: fastattn/ops/_norm.py."""

from __future__ import annotations

import torch

from .. import backends, reference
from . import _norm


def default_eps(x: torch.Tensor) -> float:
    """torch.nn.functional.rms_norm's default eps: the machine epsilon of the dtype the math
    runs in (float32 for float32/float16/bfloat16 inputs, float64 for float64)."""
    return torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps


def _plan(x, residual, normalized_shape, weight=None, eps=None, *, backend=None):
    if eps is None and isinstance(x, torch.Tensor):
        eps = default_eps(x)
    shape = _norm.check_inputs("rms_norm", x, residual, normalized_shape, weight, None, eps)
    return _norm.choose("rms_norm", x, backend), shape, eps


def rms_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
             eps: float | None = None, *, backend: str | None = None) -> torch.Tensor:
    """Drop-in for torch.nn.functional.rms_norm: x / sqrt(mean(x^2) + eps) * weight over the
    trailing dims `normalized_shape`, statistics in float32.

    Args:
      x: (..., *normalized_shape), float32, float16 or bfloat16 (float64 runs on the reference
        backend); any strides.
      normalized_shape: int or sequence of ints, the trailing dims of x to normalize over.
      weight: normalized_shape or None; float32 or x's dtype.
      eps: > 0; None means torch's default, torch.finfo(float32).eps (float64's for float64 x).
      backend: "cpu", "cuda", "triton" or "reference" to force one (see fastattn.backends).

    Returns:
      (..., *normalized_shape) in x's dtype, contiguous. Gradients flow to x and weight.
    """
    choice, shape, eps = _plan(x, None, normalized_shape, weight, eps, backend=backend)
    if choice.backend == "reference":
        return reference.rms_norm(x, shape, weight, eps)
    return _norm.run("rms_norm", choice, x, None, shape, weight, None, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, normalized_shape,
                 weight: torch.Tensor | None = None, eps: float | None = None, *,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm residual step in one pass: s = x + residual, then rms_norm(s).

    x, residual: (..., *normalized_shape), the same shape and dtype. Other arguments as
    fastattn.rms_norm. Returns (rms_norm(s), s), both in x's shape and dtype; s is rounded to
    x's dtype before it is normalized. Gradients flow to x, residual and weight from both
    outputs.
    """
    choice, shape, eps = _plan(x, residual, normalized_shape, weight, eps, backend=backend)
    if choice.backend == "reference":
        return reference.add_rms_norm(x, residual, shape, weight, eps)
    return _norm.run("rms_norm", choice, x, residual, shape, weight, None, eps)


backends.register_planner("rms_norm", lambda x, *a, **k: _plan(x, None, *a, **k)[0])
backends.register_planner("add_rms_norm", lambda *a, **k: _plan(*a, **k)[0])
