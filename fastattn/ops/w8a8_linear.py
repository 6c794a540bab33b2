"""fastattn.w8a8_linear (dynamic W8A8: per-token int8 activations x per-channel int8 weights,
int32 accumulation, fused dequant + bias epilogue) and fastattn.quantize_per_token_int8, its
activation quantizer. Formats: fastattn/quant_formats.py; plumbing: fastattn/ops/_quant.py."""

from __future__ import annotations

import torch

from .. import backends, reference
from . import _quant

OP = "w8a8_linear"


def _plan_quantize(x, *, backend=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fastattn.quantize_per_token_int8: x must be a torch.Tensor, got "
                        f"{type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError("fastattn.quantize_per_token_int8: x must have shape (..., K) with "
                         f"K >= 1, got {tuple(x.shape)}")
    _quant.check_activation("quantize_per_token_int8", x, x.shape[-1])
    return _quant.choose("quantize_per_token_int8", "quantize_per_token_int8", x, backend)


def quantize_per_token_int8(x: torch.Tensor, *, backend: str | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of x (each token): scale = max|x_row| / 127,
    codes = clamp(rint(x * 127 / max|x_row|), -127, 127) (0 for an all-zero row).

    Args:
      x: (..., K) float32, float16 or bfloat16, finite.
      backend: "cpu", "cuda", "triton" or "reference" to force one.

    Returns:
      (codes int8 (..., K), scale float32 (...)).
    """
    choice = _plan_quantize(x, backend=backend)
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if choice.backend == "reference":
        xq, scale = reference.quantize_per_token_int8(x2)
    else:
        xq, scale = _quant.run("quantize_per_token_int8", choice, x2)
    return xq.view(x.shape), scale.view(x.shape[:-1])


MAX_EXACT_K = 131071  # the int32 sum of K products of codes in [-127, 127] is exact up to here


def _plan(x, weight, w_scale, bias=None, *, backend=None):
    N = _quant.check_int8_weight(OP, weight, w_scale, x)
    if x.shape[-1] > MAX_EXACT_K:
        raise ValueError(f"fastattn.{OP}: in_features K = {x.shape[-1]} exceeds {MAX_EXACT_K}, "
                         "beyond which the int32 accumulation can overflow; use int8_linear")
    bias = _quant.check_bias(OP, bias, N, x)
    return _quant.choose(OP, "int8_scaled_mm", x, backend), N, bias


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """F.linear in dynamic W8A8: x is quantized to int8 per token at run time (its own fused
    kernel), multiplied with the int8 weight in int32, then scaled and biased in one epilogue.

    Args:
      x: (..., K) float32, float16 or bfloat16 activations, finite.
      weight: int8 (N, K) and w_scale float32 (N,), from fastattn.quantize_int8_weight.
      bias: (N,) or None, used in x's dtype.
      backend: "cpu", "cuda", "triton" or "reference" to force one.

    Returns:
      (..., N) in x's dtype. Inference only.
    """
    x = _quant.autocast_input(x)
    choice, N, bias = _plan(x, weight, w_scale, bias, backend=backend)
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if choice.backend == "reference":
        xq, x_scale = reference.quantize_per_token_int8(x2)
        dt = reference._compute_dtype(x.dtype)
        out = reference.int8_scaled_mm(xq, x_scale, weight, w_scale, bias, dtype=dt).to(x.dtype)
    else:
        xq, x_scale = _quant.run("quantize_per_token_int8", choice, x2)  # (M, K), (M,)
        out = _quant.run("int8_scaled_mm", choice, xq, x_scale, weight, w_scale, bias, x.dtype)
    return out.view(*x.shape[:-1], N)  # (..., N)


backends.register_planner(OP, lambda *a, **k: _plan(*a, **k)[0])
backends.register_planner("quantize_per_token_int8", _plan_quantize)
