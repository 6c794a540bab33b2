"""fastattn.layer_norm and fastattn.add_layer_norm: fused LayerNorm (forward and backward
kernels on every backend), optionally with the pre-norm residual add fused in.
Operators and shared plumbing: fastattn/ops/_norm.py."""

from __future__ import annotations

import torch

from .. import backends, reference
from . import _norm


def _plan(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *, backend=None):
    shape = _norm.check_inputs("layer_norm", x, residual, normalized_shape, weight, bias, eps)
    return _norm.choose("layer_norm", x, backend), shape


def layer_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, *,
               backend: str | None = None) -> torch.Tensor:
    """Drop-in for torch.nn.functional.layer_norm: (x - mean) / sqrt(var + eps) * weight + bias
    over the trailing dims `normalized_shape` (biased variance), statistics in float32.

    Args:
      x: (..., *normalized_shape), float32, float16 or bfloat16 (float64 runs on the reference
        backend); any strides.
      normalized_shape: int or sequence of ints, the trailing dims of x to normalize over.
      weight, bias: normalized_shape or None; float32 or x's dtype (the same dtype when both).
      eps: > 0, added to the variance.
      backend: "cpu", "cuda", "triton" or "reference" to force one (see fastattn.backends).

    Returns:
      (..., *normalized_shape) in x's dtype, contiguous. Gradients flow to x, weight and bias.
    """
    choice, shape = _plan(x, None, normalized_shape, weight, bias, eps, backend=backend)
    if choice.backend == "reference":
        return reference.layer_norm(x, shape, weight, bias, eps)
    return _norm.run("layer_norm", choice, x, None, shape, weight, bias, eps)[0]


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, normalized_shape,
                   weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   eps: float = 1e-5, *,
                   backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm residual step in one pass: s = x + residual, then layer_norm(s).

    x, residual: (..., *normalized_shape), the same shape and dtype. Other arguments as
    fastattn.layer_norm. Returns (layer_norm(s), s), both in x's shape and dtype; s is rounded
    to x's dtype before it is normalized, as `layer_norm(x + residual)` would. Gradients flow
    to x, residual, weight and bias from both outputs.
    """
    choice, shape = _plan(x, residual, normalized_shape, weight, bias, eps, backend=backend)
    if choice.backend == "reference":
        return reference.add_layer_norm(x, residual, shape, weight, bias, eps)
    return _norm.run("layer_norm", choice, x, residual, shape, weight, bias, eps)


backends.register_planner("layer_norm", lambda x, *a, **k: _plan(x, None, *a, **k)[0])
backends.register_planner("add_layer_norm", lambda *a, **k: _plan(*a, **k)[0])
